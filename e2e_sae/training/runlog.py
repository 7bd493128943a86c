"""Metrics sinks: `metrics.jsonl` in the run directory (always) and W&B (when configured)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from e2e_sae.config import Config
from e2e_sae.runs.checkpoint import atomic_write_bytes
from e2e_sae.wandb_utils import init_wandb, log_feature_frequencies, save_file_to_wandb


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLogger:
    """Appends one JSON object per call to metrics.jsonl (flushed and fsynced: a killed run keeps
    every complete line) and mirrors it to W&B when `wandb_project` is set."""

    def __init__(self, run_dir: Path, config: Config | None = None, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.wandb_run: Any = None
        if enabled and config is not None and config.wandb_project:
            self.wandb_run = init_wandb(config, run_dir)
            save_file_to_wandb(self.wandb_run, run_dir / "final_config.yaml")

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _clean(v) for k, v in record.items()}) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # (a full disk, a size limit: say which file)
            raise OSError(err.errno, err.strerror, str(self.path)) from None
        if self.wandb_run is not None:
            self.wandb_run.log({k: _clean(v) for k, v in record.items()}, step=step)

    def save_file(self, path: Path | None) -> None:
        """Upload a checkpoint or the config to W&B now (no-op without W&B)."""
        if self.wandb_run is not None and path is not None and path.exists():
            save_file_to_wandb(self.wandb_run, path)

    def log_feature_frequencies(self, freqs: dict[str, Any], step: int | None = None) -> None:
        """W&B histograms of log10 firing frequency per SAE ({position: [d_sae] fractions})."""
        if self.wandb_run is not None:
            log_feature_frequencies(self.wandb_run, freqs, step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All complete records of a run's metrics.jsonl (a torn last line is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


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
