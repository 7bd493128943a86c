"""Dictionary geometry: how close each direction of one dictionary is to another dictionary.

A dictionary is the SAE's unit-norm decoder columns, [d_model, n_dict]. For each column a_i of A,
`max_cosine_similarity(A, B)[i] = max_j <a_i, b_j>` (cosine, since columns are unit-norm). The paper
compares e2e vs local dictionaries (cross-type), dictionaries trained with different seeds
(cross-seed), and each dictionary with itself excluding the direction itself (within).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from e2e_sae.errors import UserError
from e2e_sae.runs.checkpoint import list_checkpoints, read_tensors


def max_cosine_similarity(
    a: Tensor, b: Tensor, *, exclude_self: bool = False, chunk: int = 2048
) -> Tensor:
    """For each column of `a` [d, n_a], the largest cosine similarity to any column of `b` [d, n_b].

    `exclude_self` (a and b the same dictionary) skips the pairing of a column with itself.
    Columns are normalised here, so raw decoder weights may be passed. Returns [n_a] (float32)."""
    if a.shape[0] != b.shape[0]:
        raise UserError(f"dictionaries live in different spaces (d={a.shape[0]} vs d={b.shape[0]})")
    a = F.normalize(a.float(), dim=0)
    b = F.normalize(b.float(), dim=0)
    out = []
    for s in range(0, a.shape[1], chunk):
        sims = a[:, s : s + chunk].T @ b  # [chunk, n_b]
        if exclude_self:
            idx = torch.arange(s, min(s + chunk, a.shape[1]))
            sims[idx - s, idx] = float("-inf")
        out.append(sims.max(dim=1).values)
    return torch.cat(out)


def load_dictionary(run_dir: str | Path, position: str | None = None) -> tuple[str, Tensor]:
    """(position, unit-norm dictionary [d_out, n_dict]) of a run's newest checkpoint.

    Reads only the safetensors file (no LM is loaded); `position` may be omitted for one SAE."""

    path = Path(run_dir)
    ckpt = path if path.is_file() else (list_checkpoints(path) or [None])[-1]
    if ckpt is None:
        raise UserError(f"run directory {run_dir}: no samples_<N>.safetensors checkpoint")
    state = read_tensors(ckpt)
    decoders = {
        k.removesuffix(".decoder.weight"): v
        for k, v in state.items()
        if k.endswith(".decoder.weight")
    }
    positions = {k.replace("-", "."): k for k in decoders}
    if position is None:
        if len(decoders) != 1:
            raise UserError(f"{ckpt}: several SAEs ({', '.join(positions)}); name one position")
        position = next(iter(positions))
    if position not in positions:
        raise UserError(f"{ckpt}: no SAE at '{position}' (has {', '.join(positions)})")
    return position, F.normalize(decoders[positions[position]].float(), dim=0)
