"""Metrics sinks: `metrics.jsonl` in the run directory (always) and W&B (when configured): run init
(key/entity from `.env`), metrics, feature-frequency histograms, checkpoint upload (a run is
fetched back by `e2e_sae.runs.wandb`).

Everything works with `WANDB_MODE=offline` (no network; the run is written under
`<run_dir>/wandb/offline-run-*/` and can be uploaded later with `wandb sync`). wandb is imported
only when a run asks for it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from torch import Tensor

from e2e_sae.config import Config, config_to_yaml_dict
from e2e_sae.errors import UserError
from e2e_sae.runs.checkpoint import atomic_write_bytes
from e2e_sae.runs.wandb import import_wandb, load_dotenv_file

logger = logging.getLogger(__name__)

# log10 of a frequency of 0 would be -inf; dead latents land in this bin instead.
LOG10_FLOOR = -10.0


def init_wandb(config: BaseModel, run_dir: Path, project: str | None = None) -> Any:
    """Start a W&B run for `config` (any of our pydantic configs with a `wandb_project`), named
    after the run directory and writing its local files under it."""
    load_dotenv_file()
    wandb = import_wandb()
    project = project or getattr(config, "wandb_project", None)
    if not project:
        raise UserError("wandb_project: not set")
    try:
        return wandb.init(
            project=project,
            entity=os.environ.get("WANDB_ENTITY"),
            name=run_dir.name,
            dir=str(run_dir),
            config=config_to_yaml_dict(config),
            reinit="create_new",
        )
    except Exception as err:  # noqa: BLE001  (auth / network problems -> one line)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"wandb_project '{project}': cannot start a W&B run ({first}); "
            "run `wandb login` or set WANDB_MODE=offline"
        ) from None


def frequency_histograms(
    freqs: Mapping[str, Tensor], prefix: str = "feature_frequency", num_bins: int = 50
) -> dict[str, Any]:
    """{f"{prefix}/{position}": wandb.Histogram of log10(firing frequency per latent)}.

    `freqs[position]` is [d_sae], the fraction of tokens each latent fired on. Dead latents (0)
    are put at `LOG10_FLOOR`.
    """
    wandb = import_wandb()
    out: dict[str, Any] = {}
    for pos, f in freqs.items():
        log_f = f.double().clamp_min(10**LOG10_FLOOR).log10().cpu().numpy()
        out[f"{prefix}/{pos}"] = wandb.Histogram(log_f, num_bins=num_bins)
    return out


def log_feature_frequencies(
    run: Any, freqs: Mapping[str, Tensor], step: int | None = None, prefix: str = "eval"
) -> None:
    """Log per-SAE histograms of log10 feature frequency plus the count of alive latents."""
    if run is None or not freqs:
        return
    record: dict[str, Any] = frequency_histograms(freqs, f"{prefix}/feature_frequency")
    for pos, f in freqs.items():
        record[f"{prefix}/alive_fraction/{pos}"] = float((f > 0).float().mean())
    run.log(record, step=step)


def save_file_to_wandb(run: Any, path: Path) -> None:
    """Upload `path` (a checkpoint, the config) now, named relative to its folder, which is what
    `download_wandb_run` looks for."""
    if run is not None:
        run.save(str(path), base_path=str(path.parent), policy="now")


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
