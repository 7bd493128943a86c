"""Skip transcoder (Paulo, Shabalin & Belrose 2025, "Transcoders beat sparse autoencoders for
interpretability"): the paper's ReLU SAE plus a trainable linear skip connection from input to
output,

    output = relu(x @ W_enc^T + b_enc) @ dict_elements^T + b_dec + x @ W_skip^T,

with `W_skip` [d_out, d_in] initialised to zeros (so at init it is the relu SAE), as SAELens'
`SkipTranscoder` computes it (`W_skip` is its name there too; `decode(c)` leaves the skip out in
both libraries). The skip term carries the part of the map that is linear in x, so the latents only
need to explain the rest.

Meant as a transcoder (`saes.transcoders: [{input, output}]`, e.g. an MLP's input -> its output).
It is also allowed at a single hook (it computes the same function there, and SAELens folders with
hook_name_out == hook_name load as such), but there W_skip = identity with no latent active
reproduces the activation exactly: zero reconstruction error, zero KL, zero sparsity penalty, a
global minimum of every loss here, which training drifts towards. Every loss and forward path
works with it, since they all call `forward`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2e_sae.saes.base import SAEBase
from e2e_sae.saes.registry import register_architecture


@register_architecture
class SkipTranscoder(SAEBase):
    architecture = "skip_transcoder"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.W_skip = nn.Parameter(torch.zeros(self.output_size, self.input_size))

    def encode(self, x: Tensor) -> Tensor:
        return F.relu(self.pre_acts(x))

    def skip(self, x: Tensor) -> Tensor:
        """The skip connection's contribution x @ W_skip^T [..., d_out]."""
        return F.linear(x, self.W_skip)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = self.encode(x)
        return self.decode(c) + self.skip(x), c
