"""Which run `--resume` continues: the run directory given (or the newest run of this config
under `save_dir`), checked against the config, locked, its newest intact resume point, and what
is tidied before the run goes on (`Resume.tidy`; each file's owner cleans it: temp files
`runs.checkpoint`, metrics `runlog`, old points `resume`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e_sae.config import Config, config_to_yaml_dict, load_config
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.runs.checkpoint import CONFIG_FILE, clean_stale_temp_files
from e2e_sae.runs.rundir import RunLock
from e2e_sae.training.distributed import SINGLE, Dist, broadcast_str, on_main
from e2e_sae.training.resume import (
    DAMAGED_SUFFIX,
    ResumePoint,
    newest_intact_point,
    point_step,
    resume_points,
)
from e2e_sae.training.runlog import truncate_metrics

LATEST = "latest"

# Config keys that may change between the interrupted run and its continuation: they steer logging,
# saving, evaluation, length, or where / how memory-frugally the same step runs. (`batch_size` /
# `effective_batch_size` may change with the number of ranks as long as the global batch stays the
# same; checked separately.) Changing n_samples, device, compile or kl_chunk_tokens gives a valid
# continuation that is no longer bit-identical to an uninterrupted run.
RESUMABLE_CHANGES = frozenset(
    {
        "n_samples",
        "save_every_n_samples",
        "keep_last_n_checkpoints",
        "eval_every_n_samples",
        "eval_n_samples",
        "eval_data",
        "log_every_n_grad_steps",
        "act_frequency_n_tokens",
        "collect_act_frequency_every_n_samples",
        "wandb_project",
        "wandb_run_name",
        "wandb_run_name_prefix",
        "run_name",
        "save_dir",
        "device",
        "compile",
        "kl_chunk_tokens",
        "batch_size",
        "effective_batch_size",
        "divergence_factor",
    }
)


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """Dotted path of the first field where two config dicts differ (None if equal)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            if not path and key in RESUMABLE_CHANGES:
                continue
            sub = first_difference(old.get(key), new.get(key), f"{path}{key}.")
            if sub is not None:
                return sub
        return None
    return None if old == new else path.rstrip(".")


def run_config(run_dir: Path) -> Config:
    """The config a run directory was trained with."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"--resume: {run_dir} is not a run directory (no {CONFIG_FILE})")
    config = load_config(path)
    assert isinstance(config, Config)
    return config


def check_same_run(run_dir: Path, config: Config) -> None:
    """The given config must train the same thing as the run's own config (one-line error)."""
    old = config_to_yaml_dict(run_config(run_dir))
    new = config_to_yaml_dict(config)
    if new.get("precision") == "auto":  # the run recorded what `auto` chose for it
        new["precision"] = old.get("precision")
    diff = first_difference(old, new)
    if diff is not None:

        def pick(d: Any) -> Any:
            for part in diff.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return d

        raise ConfigError(
            f"--resume: config differs from {run_dir / CONFIG_FILE} at '{diff}' "
            f"({pick(old)!r} there, {pick(new)!r} now); resume with the run's own config"
        )


def find_run_dir(resume: str | Path, config: Config) -> Path:
    """The run directory to continue: the one given, or (`latest`) the newest run under
    `save_dir` whose config matches."""
    if str(resume) != LATEST:
        run_dir = Path(resume).expanduser()
        if not run_dir.is_dir():
            raise UserError(f"--resume: run directory {run_dir} does not exist")
        check_same_run(run_dir, config)
        return run_dir
    save_dir = Path(config.save_dir or ".").expanduser()
    found: list[tuple[float, Path]] = []
    if save_dir.is_dir():
        for d in save_dir.iterdir():
            if not (d / CONFIG_FILE).is_file():
                continue
            try:
                check_same_run(d, config)
            except UserError:
                continue
            points = resume_points(d)
            newest = points[-1].samples_path if points else d / CONFIG_FILE
            found.append((newest.stat().st_mtime, d))
    if not found:
        raise UserError(
            f"--resume: no run of this config under save_dir {save_dir} (pass --resume RUN_DIR)"
        )
    return max(found)[1]


def recorded_precision(resume: str | Path, config: Config) -> str:
    """The precision the run that `resume` names was trained in (`auto` when there is no such
    run: `find_resume` then says what is wrong)."""
    try:
        run_dir = find_run_dir(resume, config)
        return run_config(run_dir).precision
    except UserError:
        return config.precision


@dataclass
class Resume:
    """What `--resume` continues: the run directory (locked by rank 0), the point to restore
    (None: start over at step 0, e.g. a run killed before its first checkpoint) and the damaged
    files of newer points that were skipped."""

    run_dir: Path
    point: ResumePoint | None
    damaged: list[Path] = field(default_factory=list)
    lock: RunLock | None = None

    def tidy(self) -> None:
        """Before the run goes on (rank 0): the temp files of writes a kill interrupted, the
        metric records past the point (they will be logged again) and the damaged files skipped
        (renamed `*.damaged`) go."""
        clean_stale_temp_files(self.run_dir)
        for path in self.damaged:
            if path.exists():
                os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
        truncate_metrics(self.run_dir, point_step(self.point) if self.point is not None else 0)


def find_resume(resume: str | Path, config: Config, d: Dist = SINGLE) -> Resume:
    """Find the run directory, lock it (rank 0) and pick its newest intact point. Writes nothing
    but the lock file; the caller releases `lock`."""
    run_dir = find_run_dir(resume, config)
    lock = on_main(lambda: RunLock(run_dir).acquire("--resume"), d)
    try:
        choice = on_main(lambda: newest_intact_point(run_dir), d)
        n = broadcast_str(None if choice is None or choice[0] is None else str(choice[0]), d)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    point = ResumePoint(run_dir, int(n)) if n is not None else None
    return Resume(run_dir, point, choice[1] if choice is not None else [], lock)
