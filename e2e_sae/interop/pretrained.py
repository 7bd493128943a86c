"""Pretrained SAEs named in a config (`saes.pretrained_sae_paths`): our checkpoints and run
directories, the original's `.pt` files, SAELens folders, local or `hf://`."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from e2e_sae.errors import UserError
from e2e_sae.interop.hub import is_saelens_dir, resolve_path
from e2e_sae.interop.saelens import load_saelens_into
from e2e_sae.lm.sites import filter_names
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.runs.checkpoint import (
    list_sae_checkpoints,
    load_sae_weights,
    newest_intact,
    read_tensors,
)
from e2e_sae.saes import sae_key


def load_pretrained_saes(
    model: SAETransformer, paths: list[Path], retrain: bool | list[str]
) -> set[str]:
    """Load SAEs from checkpoints (files or run dirs, local or hf://, or SAELens folders); returns
    the positions that stay frozen."""
    loaded: list[str] = []
    for p in paths:
        p = resolve_path(newest_match(p))  # local path, or hf://user/repo[/path] downloaded
        if is_saelens_dir(p):  # a SAELens SAE folder (cfg.json + sae_weights.safetensors)
            loaded += load_saelens_into(model, p)
            continue
        if p.is_dir():
            ckpts = list_sae_checkpoints(p)
            if not ckpts:
                raise UserError(f"saes.pretrained_sae_paths: {p} holds no checkpoint")
            p, have = newest_intact(ckpts, "saes.pretrained_sae_paths")
        else:
            have = read_tensors(p, "saes.pretrained_sae_paths")
        positions = [
            pos
            for pos in model.sae_positions
            if any(k.startswith(sae_key(pos) + ".") for k in have)
        ]
        if not positions:
            raise UserError(f"saes.pretrained_sae_paths: {p} has no SAE at {model.sae_positions}")
        try:
            loaded += load_sae_weights(model, p, positions, state=have)
        except UserError as err:  # (a shape that does not fit the config, ...)
            raise UserError(f"saes.pretrained_sae_paths: {err}") from None
    if retrain is True:
        return set()
    if retrain is False:
        return set(loaded)
    trainable = set(filter_names_safe(model, retrain))
    return {p for p in loaded if p not in trainable}


def newest_match(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """A local path with glob characters (`runs/local_*`) -> its newest match by modification time,
    so a fine-tuning config can name an earlier run whose timestamp it does not know."""
    text = os.path.expanduser(str(path))
    if not any(ch in text for ch in "*?[") or os.path.exists(text):
        return path
    matches = glob.glob(text)
    if not matches:
        raise UserError(f"saes.pretrained_sae_paths: nothing matches {path}")
    return Path(max(matches, key=os.path.getmtime))


def filter_names_safe(model: SAETransformer, patterns: list[str]) -> list[str]:
    have = model.sae_positions
    for pat in patterns:
        if not any(pat == p or pat in p for p in have):
            raise UserError(f"saes.retrain_saes: '{pat}' names no SAE (SAEs at {', '.join(have)})")
    return filter_names(have, patterns, "saes.retrain_saes")
