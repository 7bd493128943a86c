"""W&B access: the client (key / entity from `.env`; wandb is imported only when a run asks for it),
and fetching a run directory back from a W&B run (`SAETransformer.from_wandb`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e2e_sae.data import cache_dir
from e2e_sae.errors import UserError
from e2e_sae.runs.original import samples_of


def import_wandb() -> Any:
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
    wandb = import_wandb()
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
    # Older downloads of this run would otherwise be picked as "newest" when loading.
    for stale in out.glob("samples_*"):
        if stale.name != ckpts[-1] and _checkpoint_samples(stale.name) is not None:
            stale.unlink()
    for n in ("final_config.yaml", ckpts[-1]):
        names[n].download(root=str(out), replace=True)
    return out
