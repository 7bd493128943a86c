"""BatchTopK SAE (Bussmann et al. 2024): k x n_tokens active latents per batch while training.

Training mode keeps the k * n_tokens largest pre-activations of the whole batch (some tokens get
more than k latents, some fewer; the batch mean is exactly k, see `topk.positive_values`). Each
training batch also updates a running mean of the smallest kept activation; eval mode uses it as
one global threshold (c = pre where pre > threshold), so single tokens work and L0 is about k on
average. Before any training batch the threshold is unset (NaN) and eval mode falls back to
per-token TopK.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from e2e_sae.saes.registry import register_architecture
from e2e_sae.saes.topk import TopKSAE, check_option, positive_values, topk_code


@register_architecture
class BatchTopKSAE(TopKSAE):
    """TopK across the batch in training; a learned global threshold at inference.

    architecture_kwargs (besides TopK's k_aux, aux_coeff, dead_tokens_threshold):
      threshold_momentum: weight of each training batch in the running threshold (EMA, default
        0.01; the first batch sets it directly).
    """

    architecture = "batchtopk"

    def __init__(
        self,
        *args: Any,
        threshold_momentum: float = 0.01,
        **topk_kwargs: Any,
    ) -> None:
        super().__init__(*args, **topk_kwargs)
        check_option(
            0 < threshold_momentum <= 1,
            "saes.architecture_kwargs.threshold_momentum",
            f"must be in (0, 1], got {threshold_momentum}",
        )
        self.threshold_momentum = float(threshold_momentum)
        self.threshold: Tensor
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def encode(self, x: Tensor) -> Tensor:
        return self.code(self.pre_acts(x))

    def code(self, pre: Tensor, update_threshold: bool = True) -> Tensor:
        """The code of pre-activations [..., d_sae]: in training mode the batch's k x n_tokens
        largest (moving the running threshold unless `update_threshold` is False), in eval mode
        those over the threshold (per-token TopK before any training batch set it)."""
        if not self.training:
            if torch.isnan(self.threshold):
                return topk_code(pre, self.k)
            return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))
        flat = pre.reshape(-1)
        n_tokens = flat.numel() // pre.shape[-1]
        values, idx = flat.topk(self.k * n_tokens, sorted=False)
        kept = positive_values(values)
        if update_threshold:
            self._update_threshold(kept.detach().min())
        return torch.zeros_like(flat).scatter(0, idx, kept).reshape(pre.shape)

    @torch.no_grad()
    def _update_threshold(self, smallest_kept: Tensor) -> None:
        m = smallest_kept.to(self.threshold.dtype)
        ema = torch.lerp(self.threshold, m, self.threshold_momentum)
        # torch.where instead of a Python branch: no device sync on every training batch
        self.threshold.copy_(torch.where(torch.isnan(self.threshold), m, ema))

    def init_kwargs(self) -> dict[str, Any]:
        return {**super().init_kwargs(), "threshold_momentum": self.threshold_momentum}
