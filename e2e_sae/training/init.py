"""The SAE init options that need the model's activations (`saes.tied_init`, `saes.init_b_dec`)."""

from __future__ import annotations

import torch
from torch import Tensor

from e2e_sae.lm.splice import SAETransformer
from e2e_sae.saes.init import Center, center, init_decoder_bias_, tie_encoder_


@torch.no_grad()
def initialize_saes(
    model: SAETransformer, tokens: Tensor | None, *, tied: bool, b_dec: Center
) -> None:
    """Apply the init options to every SAE of `model`; `tokens` [batch, pos] is the data sample
    (needed unless b_dec is "zeros"). Tying happens first, so the bias shift uses the tied W_enc."""
    if tied:
        for pos in model.sae_positions:
            tie_encoder_(model.sae(pos), pos)
    if b_dec == "zeros":
        return
    if tokens is None:
        raise ValueError("initialize_saes: init_b_dec needs a data sample")
    hooks = sorted({h for s in model.sites.values() for h in s.hooks})
    device = next(model.saes.parameters()).device
    _, acts = model.forward_raw(tokens.to(device), run_entire_model=False, cache_positions=hooks)
    for pos, site in model.sites.items():
        out_c = center(acts[site.output_hook], b_dec)
        in_c = center(acts[site.input_hook], b_dec) if site.is_transcoder else out_c
        init_decoder_bias_(model.sae(pos), out_c, in_c)
