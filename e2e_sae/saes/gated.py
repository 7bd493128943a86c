"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders"): one path decides which latents fire, another how strongly.

With W_gate, b_gate the encoder Linear (`encoder.0`), per latent i:

  pi_gate = W_gate x + b_gate
  pi_mag  = exp(r_mag) * (W_gate x) + b_mag          (the rows of W_gate rescaled, shared weights)
  c       = 1[pi_gate > 0] * ReLU(pi_mag)

Both paths come from one GEMM (W_gate x). c is exactly 0 where pi_gate <= 0. The step gives the
gate no gradient through c, so the gate path learns from two losses only:

- the `sparsity` term: ||ReLU(pi_gate)||_p per token (p = its `p_norm`; the paper's weighting by
  decoder column norms is 1 here, as columns are unit norm), divided by d_in like every sparsity
  penalty in this library;
- `gated_aux`: aux_coeff * MSE(ReLU(pi_gate) @ W_dec^T + b_dec, target), the gate path decoded
  by the frozen decoder (weights and bias detached), the input and target detached too, so it
  trains W_gate and b_gate only. MSE is the mean over elements, like the library's `out_to_in`.

Input centring: the paper encodes x - b_dec. This SAE does not, like every SAE here (and as it
must for transcoders, whose b_dec lives in the output space); the encoder biases absorb the
shift (b_gate - W_gate b_dec, b_mag - exp(r_mag) * W_gate b_dec), so the model class is the same.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2e_sae.errors import ConfigError
from e2e_sae.saes.base import SAEActs, SAEBase
from e2e_sae.saes.registry import register_architecture


@register_architecture
class GatedSAE(SAEBase):
    """SAE with separate gate and magnitude paths sharing the encoder weights (see module doc).

    Parameters beyond the base SAE: `r_mag` [d_sae] (log-scale of each magnitude row, init 0) and
    `b_mag` [d_sae] (magnitude bias, init 0).

    architecture_kwargs:
      aux_coeff: weight of the gate path's auxiliary reconstruction loss (default 1.0, as in the
        paper; 0 turns it off).
    """

    architecture = "gated"

    def __init__(
        self,
        *args: Any,
        aux_coeff: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        ok = isinstance(aux_coeff, (int, float)) and not isinstance(aux_coeff, bool)
        if not (ok and math.isfinite(aux_coeff) and aux_coeff >= 0):
            raise ConfigError(
                f"saes.architecture_kwargs.aux_coeff: must be a number >= 0, got {aux_coeff!r}"
            )
        self.aux_coeff = float(aux_coeff)
        self.r_mag = nn.Parameter(torch.zeros(self.n_dict_components))
        self.b_mag = nn.Parameter(torch.zeros(self.n_dict_components))

    @property
    def gate(self) -> nn.Linear:
        """The gate path's Linear: W_gate [d_sae, d_in], b_gate [d_sae] (`encoder.0`)."""
        return cast(nn.Linear, self.encoder[0])

    def paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pi_gate, pi_mag), each [..., d_sae], from one product W_gate x."""
        wx = F.linear(x, self.gate.weight)
        return wx + self.gate.bias, wx * self.r_mag.exp() + self.b_mag

    def encode(self, x: Tensor) -> Tensor:
        pi_gate, pi_mag = self.paths(x)
        return torch.where(pi_gate > 0, F.relu(pi_mag), 0.0)

    def gate_acts(self, x: Tensor) -> Tensor:
        """ReLU(pi_gate) [..., d_sae] for input x, recomputed with a graph into W_gate, b_gate."""
        return F.relu(self.pre_acts(x.to(self.gate.weight.dtype)))

    def sparsity_penalty(self, acts: SAEActs, p_norm: float) -> Tensor:
        """||ReLU(pi_gate)||_p per token [...]; gradient -> W_gate, b_gate (and, as for relu's
        ||c||_p, the SAE input)."""
        return torch.norm(self.gate_acts(acts.input), p=p_norm, dim=-1)

    def aux_losses(self, acts: SAEActs, target: Tensor | None = None) -> dict[str, Tensor]:
        """{"gated_aux": aux_coeff * MSE(gate path through the frozen decoder, target)}; {} when
        aux_coeff is 0. Gradients reach W_gate and b_gate only (see the module docstring)."""
        if self.aux_coeff == 0:
            return {}
        target = acts.input if target is None else target
        via_gate = self.gate_acts(acts.input.detach())
        recon = F.linear(via_gate, self.dict_elements.detach(), self.decoder.bias.detach())
        loss = F.mse_loss(recon, target.detach().to(recon.dtype))
        return {"gated_aux": self.aux_coeff * loss}

    @torch.no_grad()
    def center_input_(self, center: Tensor) -> None:
        """Both paths see x - center: b_gate -= W_gate c and b_mag -= exp(r_mag) * W_gate c."""
        shift = self.gate.weight @ center.to(self.gate.weight.dtype)
        self.gate.bias.sub_(shift)
        self.b_mag.sub_(shift * self.r_mag.exp())

    def init_kwargs(self) -> dict[str, Any]:
        return {"aux_coeff": self.aux_coeff}
