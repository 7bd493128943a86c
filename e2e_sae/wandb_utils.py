"""W&B glue: run init (key/entity from `.env`), metrics, feature-frequency histograms, checkpoint
upload, and fetching a run back.

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
from e2e_sae.data import cache_dir
from e2e_sae.errors import UserError
from e2e_sae.runs.original import samples_of

logger = logging.getLogger(__name__)

# log10 of a frequency of 0 would be -inf; dead latents land in this bin instead.
LOG10_FLOOR = -10.0


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise UserError(
            "wandb_project is set but wandb is not installed: pip install wandb"
        ) from None
    return wandb


def load_dotenv_file() -> None:
    """Read WANDB_API_KEY / WANDB_ENTITY from ./.env (never overriding the environment)."""
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)


def init_wandb(config: BaseModel, run_dir: Path, project: str | None = None) -> Any:
    """Start a W&B run for `config` (any of our pydantic configs with a `wandb_project`), named
    after the run directory and writing its local files under it."""
    load_dotenv_file()
    wandb = _import_wandb()
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
    wandb = _import_wandb()
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


def _checkpoint_samples(name: str) -> int | None:
    """N of `samples_<N>.safetensors` or the original's `samples_<N>.pt`, else None."""

    return samples_of(Path(name)) if "/" not in name else None


def _age_key(name: str) -> tuple[int, bool]:
    """Sort key, newest last: by N; at equal N our safetensors file after the original's `.pt`."""
    return (_checkpoint_samples(name) or 0, name.endswith(".safetensors"))


def download_wandb_run(run_path: str, out_root: Path | None = None) -> Path:
    """Fetch `final_config.yaml` and the newest `samples_<N>.safetensors` (or, for runs of the
    original e2e_sae, `samples_<N>.pt`) of a W&B run ("entity/project/run_id") into a local
    folder, and return it (a run directory)."""

    load_dotenv_file()
    wandb = _import_wandb()
    parts = run_path.strip("/").split("/")
    if len(parts) != 3 or not all(parts):
        raise UserError(f"W&B run '{run_path}': expected 'entity/project/run_id'")
    out = (out_root or cache_dir() / "wandb") / "_".join(parts)
    try:
        run = wandb.Api().run("/".join(parts))
        files = list(run.files())
    except Exception as err:  # noqa: BLE001
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"W&B run '{run_path}': {first}") from None
    names = {f.name: f for f in files}
    if "final_config.yaml" not in names:
        raise UserError(f"W&B run '{run_path}': no final_config.yaml among its files")
    ckpts = sorted((n for n in names if _checkpoint_samples(n) is not None), key=_age_key)
    if not ckpts:
        raise UserError(f"W&B run '{run_path}': no samples_<N>.safetensors or samples_<N>.pt file")
    out.mkdir(parents=True, exist_ok=True)
    # Older downloads of this run would otherwise be picked as "newest" by load_run.
    for stale in out.glob("samples_*"):
        if stale.name != ckpts[-1] and _checkpoint_samples(stale.name) is not None:
            stale.unlink()
    for n in ("final_config.yaml", ckpts[-1]):
        names[n].download(root=str(out), replace=True)
    return out
