"""Rewriting a run of the original e2e_sae 2.1.1 as one of ours (`e2e-sae convert`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from e2e_sae.errors import UserError
from e2e_sae.lm.load import load_original_lm, save_tlens_model
from e2e_sae.runs.checkpoint import (
    list_sae_checkpoints,
    new_run_dir,
    newest_intact,
    read_tensors,
    save_relu_run,
)
from e2e_sae.runs.original import (
    CONFIG_FILE,
    SAE_PARAMS,
    load_run_config,
    original_lm_fields,
    original_lm_file,
    samples_of,
)

logger = logging.getLogger(__name__)


def _sae_groups(state: Mapping[str, Tensor], source: Path) -> dict[str, dict[str, Tensor]]:
    """{sae_key: {param: tensor}} of an original SAE state dict, checked to be its ReLU SAE."""
    groups: dict[str, dict[str, Tensor]] = {}
    for name, t in state.items():
        param = next((p for p in SAE_PARAMS if name.endswith("." + p)), None)
        if param is None:
            raise UserError(f"convert: {source}: '{name}' is not a parameter of the original's SAE")
        groups.setdefault(name[: -len(param) - 1], {})[param] = t
    for key, g in groups.items():
        missing = [p for p in SAE_PARAMS if p not in g]
        if missing:
            raise UserError(f"convert: {source}: SAE '{key}' lacks {missing[0]}")
        d_sae, d_in = g["encoder.0.weight"].shape
        if tuple(g["decoder.weight"].shape) != (d_in, d_sae):
            raise UserError(
                f"convert: {source}: '{key}.decoder.weight' is {tuple(g['decoder.weight'].shape)},"
                f" expected {(d_in, d_sae)}"
            )
    if not groups:
        raise UserError(f"convert: {source}: no SAE weights")
    return groups


def convert_original_run(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
) -> Path:
    """Rewrite an original run directory as one of ours in `out`: `samples_<N>.safetensors` (the
    same tensors, plus zeroed firing statistics) and our `final_config.yaml`. A custom float32 LM
    (`tlens_model_path` to an `epoch_<N>.pt`) is rewritten too, as `out/tlens_model/`.

    No language model from the Hub is needed. `out` appears complete or not at all."""
    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    if run_dir.is_file():
        run_dir, checkpoint = run_dir.parent, checkpoint or run_dir
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"convert: {run_dir} has no {CONFIG_FILE} (is it a training run?)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"convert: output {out} already exists and is not empty")
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        ckpt = run_dir / ckpt if not ckpt.is_absolute() and (run_dir / ckpt).exists() else ckpt
        state = read_tensors(ckpt, "convert")
    else:
        ckpts = list_sae_checkpoints(run_dir)
        if not ckpts:
            raise UserError(f"convert: {run_dir} has no samples_<N>.pt checkpoint")
        ckpt, state = newest_intact(ckpts, f"convert: {run_dir}")
    n = samples_of(ckpt)
    config = load_run_config(run_dir / CONFIG_FILE, n)
    n = n if n is not None else config.n_samples or 0
    groups = _sae_groups(state, ckpt)
    positions = [k.replace("-", ".") for k in groups]  # hook names never contain '-'
    ratio = config.saes.dict_size_to_input_ratio
    for key, g in groups.items():
        d_sae, d_in = g["encoder.0.weight"].shape
        if int(d_in * ratio) != d_sae:
            raise UserError(
                f"convert: {ckpt}: SAE '{key}' has {d_sae} latents for d_in {d_in}, "
                f"but saes.dict_size_to_input_ratio is {ratio}"
            )
    patterns = config.saes.sae_positions
    stray = [p for p in positions if not any(pat in p for pat in patterns)]
    unused = [pat for pat in patterns if not any(pat in p for p in positions)]
    if stray or unused:
        what = f"an SAE at '{stray[0]}'" if stray else f"no SAE for '{unused[0]}'"
        raise UserError(f"convert: {ckpt} has {what}, which saes.sae_positions does not match")

    with new_run_dir(out) as tmp:
        lm = original_lm_file(config.tlens_model_path) if config.tlens_model_path else None
        if lm is not None:
            if original_lm_fields(lm).get("dtype", torch.float32) == torch.float32:
                save_tlens_model(load_original_lm(lm, device="cpu"), tmp / "tlens_model")
                config = config.model_copy(update={"tlens_model_path": Path("tlens_model")})
            else:  # our model files record no dtype: keep reading the original's file
                logger.info("convert: %s is not float32; tlens_model_path still names it", lm)
        tensors = {k: v for k, v in state.items()}
        for key, g in groups.items():
            tensors[f"{key}.tokens_since_fired"] = torch.zeros(
                g["encoder.0.weight"].shape[0], dtype=torch.long
            )
        save_relu_run(tmp, tensors, positions, n, config, str(ckpt))
    return out
