"""Tidying a run directory: when training continues one (`prepare_run_dir`), the temp files of
writes a kill interrupted, the metric records past the checkpoint and the damaged files it skipped;
after each checkpoint, the resume points beyond `keep_last_n_checkpoints` (`prune_points`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from e2e_sae.config import Config
from e2e_sae.runs.checkpoint import atomic_write_bytes, write_config
from e2e_sae.training.distributed import Dist, broadcast_str
from e2e_sae.training.find_run import Resume
from e2e_sae.training.resume import DAMAGED_SUFFIX, point_indices, point_step

_TMP_RE = re.compile(r"^\..+\.tmp\d+$")


def prepare_run_dir(config: Config, run_dir: Path | None, resume: Resume | None, d: Dist) -> Path:
    """Rank 0 writes the config (and, when resuming, drops metric records past the checkpoint,
    stale temp files, and renames the damaged files it skipped); every rank learns the
    directory's path."""
    if d.is_main:
        assert run_dir is not None
        write_config(run_dir, config)
        if resume is not None:
            clean_stale_temp_files(run_dir)
            for path in resume.damaged:
                if path.exists():
                    os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
            point = resume.point
            truncate_metrics(run_dir, point_step(point) if point is not None else 0)
    path = broadcast_str(str(run_dir) if run_dir is not None else None, d)
    assert path is not None
    return Path(path)


def clean_stale_temp_files(run_dir: Path) -> None:
    """Temp files of writes that a kill interrupted (never renamed, so never read)."""
    for p in run_dir.iterdir():
        if _TMP_RE.match(p.name):
            p.unlink(missing_ok=True)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the metrics.jsonl records up to `step` (later ones will be logged again)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept: list[str] = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if not isinstance(rec, dict) or int(rec.get("step", 0)) <= step:
            kept.append(line)
    atomic_write_bytes(path, "".join(f"{ln}\n" for ln in kept).encode())


def prune_points(run_dir: Path, keep: int, upto: int | None = None) -> None:
    """Delete all but the newest `keep` checkpoints up to `upto` samples (samples first: a samples
    file always has its resume file). Later files are left from before a resume (the run will
    write them again): they must not count as newest."""
    found = sorted(point_indices(run_dir))
    found = [n for n in found if upto is None or n <= upto]
    for n in found[: max(0, len(found) - keep)]:
        (run_dir / f"samples_{n}.safetensors").unlink(missing_ok=True)
        (run_dir / f"resume_{n}.safetensors").unlink(missing_ok=True)
