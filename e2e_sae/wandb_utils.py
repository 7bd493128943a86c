"""W&B logging: run init (key/entity from `.env`), metrics, feature-frequency histograms, checkpoint
upload (a run is fetched back by `e2e_sae.runs.wandb`).

Everything works with `WANDB_MODE=offline` (no network; the run is written under
`<run_dir>/wandb/offline-run-*/` and can be uploaded later with `wandb sync`). wandb is imported
only when a run asks for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from torch import Tensor

from e2e_sae.config import config_to_yaml_dict
from e2e_sae.errors import UserError
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
