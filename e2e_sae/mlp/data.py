"""Image classification data for the MLP: scikit-learn's 8x8 digits (offline) or MNIST."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from e2e_sae.data import cache_dir
from e2e_sae.errors import UserError


@dataclass(frozen=True)
class Split:
    """x: [n, n_pixels] float in [0, 1]; y: [n] class ids."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: str | torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """1797 8x8 images of digits 0-9 (bundled with scikit-learn: no download), split into
    (train, test) stratified by class, deterministically for a given seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x = np.asarray(images, dtype=np.float32) / 16.0  # pixel intensities are 0..16
    y = np.asarray(labels, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return (
        Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        Split(torch.from_numpy(x_te), torch.from_numpy(y_te)),
    )


def load_mnist_split(root: Path) -> tuple[Split, Split]:
    """MNIST's 60k/10k split via torchvision (downloads on first use)."""
    try:
        from torchvision.datasets import MNIST  # type: ignore[import-not-found]  # optional
    except Exception as err:  # noqa: BLE001  (missing, or built for another torch)
        raise UserError(
            f"dataset: mnist needs torchvision matching your torch ({type(err).__name__}); "
            "use dataset: digits offline"
        ) from None
    out = []
    for train in (True, False):
        try:
            ds = MNIST(str(root), train=train, download=True)
        except Exception as err:  # noqa: BLE001  (network)
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"dataset: cannot download MNIST to {root} ({first})") from None
        x = ds.data.reshape(len(ds), -1).float() / 255.0
        out.append(Split(x, ds.targets.long()))
    return out[0], out[1]


def load_split(
    dataset: str, seed: int = 0, test_fraction: float = 0.2, data_dir: Path | None = None
) -> tuple[Split, Split]:
    """(train, test) for `dataset` ("digits" or "mnist")."""
    if dataset == "digits":
        return load_digits_split(test_fraction, seed)
    if dataset == "mnist":
        return load_mnist_split(data_dir or cache_dir() / "mnist")
    raise UserError(f"dataset: unknown '{dataset}' (digits or mnist)")
