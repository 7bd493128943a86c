"""JumpReLU SAE (Rajamanoharan et al. 2024): per-latent learned thresholds and an L0 penalty.

c = z * H(z - theta) with z the pre-activations and theta = exp(log_threshold) > 0 per latent.
The step H has no useful gradient, so theta learns through straight-through pseudo-derivatives
with a rectangle kernel of width `bandwidth` (eps):

  d JumpReLU / d theta := -(theta / eps) * 1[|z - theta| < eps / 2]
  d H(z - theta) / d theta := -(1 / eps) * 1[|z - theta| < eps / 2]

while d JumpReLU / d z = H(z - theta) and d H / d z = 0 (the L0 penalty moves only thresholds).
The `sparsity` loss term applies the L0 penalty sum_i H(z_i - theta_i) (its `p_norm` is ignored),
divided by d_in like every sparsity penalty in this library.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from e2e_sae.errors import ConfigError
from e2e_sae.saes.base import SAEActs, SAEBase
from e2e_sae.saes.registry import register_architecture


def _window(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel K((z - theta) / eps): 1 where |z - theta| < eps / 2, else 0."""
    return ((z - threshold).abs() < bandwidth / 2).to(z.dtype)


def _sum_to_latents(g: Tensor) -> Tensor:
    return g.reshape(-1, g.shape[-1]).sum(0)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, threshold = ctx.saved_tensors
        bw: float = ctx.bandwidth
        grad_z = grad * (z > threshold).to(grad.dtype)
        grad_t = -(threshold / bw) * _window(z, threshold, bw) * grad
        return grad_z, _sum_to_latents(grad_t), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        z, threshold = ctx.saved_tensors
        bw: float = ctx.bandwidth
        grad_t = -(1.0 / bw) * _window(z, threshold, bw) * grad
        return None, _sum_to_latents(grad_t), None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """z * H(z - threshold) with the straight-through threshold gradient (see module doc)."""
    out = _JumpReLU.apply(z, threshold, bandwidth)
    assert isinstance(out, Tensor)
    return out


def step(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(z - threshold) as float, with the straight-through threshold gradient."""
    out = _Step.apply(z, threshold, bandwidth)
    assert isinstance(out, Tensor)
    return out


@register_architecture
class JumpReLUSAE(SAEBase):
    """SAE with a JumpReLU activation; pair it with the `sparsity` term (an L0 penalty here).

    architecture_kwargs:
      bandwidth: width eps of the rectangle kernel (default 0.001, in activation units).
      init_threshold: initial theta of every latent (default 0.001).
    Both defaults come from the JumpReLU paper, which scales inputs to unit mean squared norm per
    dimension; scale them with your activations' size.
    """

    architecture = "jumprelu"

    def __init__(
        self,
        *args: Any,
        bandwidth: float = 0.001,
        init_threshold: float = 0.001,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        for name, value in (("bandwidth", bandwidth), ("init_threshold", init_threshold)):
            if not value > 0:
                raise ConfigError(f"saes.architecture_kwargs.{name}: must be positive, got {value}")
        self.bandwidth = float(bandwidth)
        self.init_threshold = float(init_threshold)
        # log-parametrised so thresholds stay positive
        self.log_threshold = nn.Parameter(
            torch.full((self.n_dict_components,), math.log(init_threshold))
        )

    @property
    def threshold(self) -> Tensor:
        """[d_sae] per-latent thresholds theta > 0."""
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        return jumprelu(self.pre_acts(x), self.threshold, self.bandwidth)

    def sparsity_penalty(self, acts: SAEActs, p_norm: float) -> Tensor:
        """L0 per token [...] (the count of non-zero code entries); gradient -> theta only."""
        # d H / d z = 0, so the pre-activations are recomputed without building a graph
        with torch.no_grad():
            z = self.pre_acts(acts.input)
        return step(z, self.threshold, self.bandwidth).sum(-1)

    def init_kwargs(self) -> dict[str, Any]:
        return {"bandwidth": self.bandwidth, "init_threshold": self.init_threshold}
