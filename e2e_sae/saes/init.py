"""Init options applied once after the SAEs are built (`saes.tied_init`, `saes.init_b_dec`).

- tied: each latent's encoder row starts as its unit-norm decoder column (W_enc = W_dec^T), so it
  reads the direction it writes. Needs input size == output size.
- b_dec at the mean or the geometric median of a data sample of the activation the SAE writes. This
  SAE layout has no pre-encoder `x - b_dec`, so the encoder bias is also shifted by
  -W_enc @ center(input) (for an SAE, center(input) is the new b_dec): at init the encoder sees
  centred inputs, and a large shared mean does not decide which latents fire.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, cast

import torch
from torch import Tensor, nn

from e2e_sae.errors import ConfigError
from e2e_sae.saes.base import SAEBase

Center = Literal["zeros", "mean", "geometric_median"]


def geometric_median(points: Tensor, max_iter: int = 200, rtol: float = 1e-7) -> Tensor:
    """The point minimising the sum of Euclidean distances to `points` [n, d] -> [d].

    Weiszfeld's iteration from the mean, in float64; distances are floored at 1e-12 so an iterate
    that lands on a data point stays finite.
    """
    x = points.reshape(-1, points.shape[-1]).double()
    y = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-12)
        y_next = (w[:, None] * x).sum(0) / w.sum()
        done = float((y_next - y).norm()) <= rtol * (1.0 + float(y.norm()))
        y = y_next
        if done:
            break
    return y.to(points.dtype)


def center(points: Tensor, method: Center) -> Tensor:
    """Mean or geometric median of `points` [..., d] over all leading dims -> [d]."""
    flat = points.reshape(-1, points.shape[-1])
    if method == "mean":
        return flat.mean(0)
    if method == "geometric_median":
        return geometric_median(flat)
    return flat.new_zeros(flat.shape[-1])


@torch.no_grad()
def tie_encoder_(sae: SAEBase, position: str = "") -> None:
    """W_enc <- W_dec^T with unit-norm decoder columns."""
    if sae.input_size != sae.output_size:
        raise ConfigError(
            f"saes.tied_init: needs equal input and output sizes, but the SAE at '{position}' "
            f"maps {sae.input_size} -> {sae.output_size}"
        )
    sae.normalize_decoder_()
    cast(nn.Linear, sae.encoder[0]).weight.copy_(sae.decoder.weight.T)


@torch.no_grad()
def init_decoder_bias_(sae: SAEBase, out_center: Tensor, in_center: Tensor) -> None:
    """b_dec <- out_center [d_out]; the encoder's biases shift so that it sees x - in_center."""
    sae.decoder.bias.copy_(out_center)
    sae.center_input_(in_center)


@torch.no_grad()
def init_saes_(
    saes: Mapping[str, SAEBase],
    samples: Mapping[str, tuple[Tensor, Tensor | None]] | None,
    *,
    tied: bool,
    b_dec: Center,
) -> None:
    """Apply the init options to SAEs {position: SAE}: `tied` ties each encoder to its decoder
    first (so the bias shift uses the tied W_enc), then `b_dec` centres the decoder bias on the
    sample's activations {position: (at the output site, at the input site or None when the two
    are one)}, needed unless b_dec is "zeros"."""
    for pos, sae in saes.items():
        if tied:
            tie_encoder_(sae, pos)
        if b_dec == "zeros":
            continue
        assert samples is not None
        out_acts, in_acts = samples[pos]
        out_c = center(out_acts, b_dec)
        in_c = out_c if in_acts is None else center(in_acts, b_dec)
        init_decoder_bias_(sae, out_c, in_c)
