"""W&B glue: run init (key/entity from `.env`), checkpoint upload, and fetching a run back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from e2e_sae.config import Config, config_to_yaml_dict
from e2e_sae.errors import UserError


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise UserError(
            "wandb_project is set but wandb is not installed: pip install wandb"
        ) from None
    return wandb


def load_dotenv_file() -> None:
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)


def init_wandb(config: Config, run_dir: Path) -> Any:
    load_dotenv_file()
    wandb = _import_wandb()
    return wandb.init(
        project=config.wandb_project,
        entity=os.environ.get("WANDB_ENTITY"),
        name=run_dir.name,
        dir=str(run_dir),
        config=config_to_yaml_dict(config),
        reinit=True,
    )


def download_wandb_run(run_path: str, out_root: Path | None = None) -> Path:
    """Fetch `final_config.yaml` and the newest `samples_<N>.safetensors` of a W&B run."""
    load_dotenv_file()
    wandb = _import_wandb()
    parts = run_path.strip("/").split("/")
    if len(parts) != 3:
        raise UserError(f"W&B run '{run_path}': expected 'entity/project/run_id'")
    out = (out_root or Path.home() / ".cache" / "e2e_sae" / "wandb") / "_".join(parts)
    out.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.Api().run(run_path)
        files = list(run.files())
    except Exception as err:  # noqa: BLE001
        raise UserError(f"W&B run '{run_path}': {str(err).splitlines()[0]}") from None
    names = {f.name: f for f in files}
    if "final_config.yaml" not in names:
        raise UserError(f"W&B run '{run_path}': no final_config.yaml among its files")
    ckpts = sorted(
        (n for n in names if n.startswith("samples_") and n.endswith(".safetensors")),
        key=lambda n: int(n.removeprefix("samples_").removesuffix(".safetensors")),
    )
    if not ckpts:
        raise UserError(f"W&B run '{run_path}': no samples_<N>.safetensors checkpoint")
    for n in ("final_config.yaml", ckpts[-1]):
        names[n].download(root=str(out), replace=True)
    return out


def save_file_to_wandb(run: Any, path: Path) -> None:
    if run is not None:
        run.save(str(path), base_path=str(path.parent), policy="now")
