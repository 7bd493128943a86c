"""The random generators of a run: seeded once at set-up (`set_seed`), their states saved in and
restored from a resume point (`rng_state`, `restore_rng`), so a resumed run draws what an
uninterrupted one would."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor


def set_seed(seed: int | None) -> None:
    """Seed Python's, NumPy's and torch's generators (nothing when `seed` is None)."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The Python, NumPy, torch (and CUDA) generators' states as tensors and JSON metadata."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng(meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Set every generator to the state `rng_state` returned."""
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
