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
works with it, since they all call `forward`. The skip path itself is `SAEBase`'s (every
architecture of a transcoder set takes it, `transcoder_set.skip`); this one is the relu SAE with it
always on.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from e2e_sae.errors import ConfigError
from e2e_sae.saes.base import SAEBase
from e2e_sae.saes.registry import register_architecture


@register_architecture
class SkipTranscoder(SAEBase):
    architecture = "skip_transcoder"

    def __init__(self, *args: Any, skip: bool = True, **kwargs: Any) -> None:
        if not skip:
            raise ConfigError("saes.architecture_kwargs.skip: a skip_transcoder has its skip path")
        super().__init__(*args, skip=True, **kwargs)

    def encode(self, x: Tensor) -> Tensor:
        return F.relu(self.pre_acts(x))

    def skip(self, x: Tensor) -> Tensor:
        """The skip connection's contribution x @ W_skip^T [..., d_out]."""
        assert self.W_skip is not None
        return F.linear(x, self.W_skip)
