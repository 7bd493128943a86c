"""What a run directory, a checkpoint file or a config file names when a trained model is loaded
(`SAETransformer.from_local_path`): the config to rebuild it from and the checkpoint to load, ours
or the original e2e_sae's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from e2e_sae.config import Config
from e2e_sae.errors import UserError
from e2e_sae.runs.checkpoint import CONFIG_FILE, list_sae_checkpoints, newest_intact, read_tensors
from e2e_sae.runs.original import load_run_config, samples_of


@dataclass(frozen=True)
class FoundRun:
    """A run to load: its config, directory, checkpoint file and that file's tensors."""

    config: Config
    run_dir: Path
    checkpoint: Path
    state: dict[str, Tensor]


def locate_run(
    path: str | Path | None = None,
    checkpoint: str | Path | None = None,
    *,
    config_file: str | Path | None = None,
) -> FoundRun:
    """The config and checkpoint of a run directory or one of its checkpoint files.

    `checkpoint`: a file (relative to the run directory, else as given); default: the newest
    intact one, skipping damaged newer files with a warning. `config_file`: instead of the run
    directory's `final_config.yaml`. A relative `tlens_model_path` is looked up in the config's
    folder first."""
    ckpt: Path | None = None
    if path is None:
        if checkpoint is None and config_file is None:
            raise UserError("load: give a run directory, a checkpoint file or a config file")
        run_dir = Path(checkpoint or config_file or "").expanduser().parent
    else:
        run_dir = Path(path).expanduser()
        if run_dir.is_file():
            if checkpoint is not None:
                raise UserError(f"load: {run_dir} is a checkpoint file; do not also give one")
            run_dir, ckpt = run_dir.parent, run_dir
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        ckpt = run_dir / ckpt if not ckpt.is_absolute() and (run_dir / ckpt).exists() else ckpt
    cfg_path = Path(config_file).expanduser() if config_file is not None else run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        if config_file is not None:
            raise UserError(f"config_file: file not found: {cfg_path}")
        if not run_dir.is_dir():
            raise UserError(f"run directory {run_dir}: not found")
        raise UserError(f"run directory {run_dir}: no {CONFIG_FILE} (is it a training run?)")
    ckpts = [ckpt] if ckpt is not None else list_sae_checkpoints(run_dir)
    if not ckpts:
        raise UserError(
            f"run directory {run_dir}: no samples_<N>.safetensors (or original samples_<N>.pt) "
            "checkpoint"
        )
    config = _local_model_path(load_run_config(cfg_path, samples_of(ckpts[-1])), cfg_path.parent)
    if ckpt is not None:
        state = read_tensors(ckpt)
    else:
        ckpt, state = newest_intact(ckpts, f"run directory {run_dir}")
    return FoundRun(config, run_dir, ckpt, state)


def _local_model_path(config: Config, folder: Path) -> Config:
    """A relative `tlens_model_path` that exists under the config's folder (as `e2e-sae convert`
    writes it) is taken from there; otherwise it stays relative to the working directory."""
    p = config.tlens_model_path
    if p is None or p.is_absolute() or not (folder / p).exists():
        return config
    return config.model_copy(update={"tlens_model_path": folder / p})
