"""Resampling dead latents of ReLU SAEs (Bricken et al. 2023, "Towards Monosemanticity").

Off by default (`saes.resample_every_n_samples`). Every that many training samples during the
first half of the run (the second half lets resampled latents settle), each latent that has not
fired for `act_frequency_n_tokens` tokens is re-initialised from a high-loss token of the last
training micro-batch:

- a token is drawn with probability proportional to its squared reconstruction error
  ||output - target||^2 (target: the SAE's input, or a transcoder's clean output activation),
  without replacement unless there are more dead latents than tokens with an error;
- the latent's decoder column becomes that token's residual error target - output, normalised to
  unit norm (the direction the SAE misses there);
- its encoder row becomes the same direction (for a transcoder, whose input lives in another
  space: the token's input direction), scaled to 0.2 x the mean norm of the live latents'
  encoder rows; its encoder bias becomes 0;
- Adam's moment estimates for those rows / columns / bias entries are reset to 0, and the latent's
  firing counter restarts.

The draw uses a generator seeded from the run's seed and step, so a resumed run resamples exactly
as an uninterrupted one. Anthropic's recipe takes the token's input as both directions; the
residual error gave slightly better SAEs here (experiments/resample/results.md). Under torchrun
the dead set is the same on every rank (firing counters are merged); rank 0's choice is broadcast
with its weights.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from e2e_sae.saes import SAEBase

ENCODER_SCALE = 0.2


def _moments(optimizer: torch.optim.Optimizer, param: Tensor) -> list[Tensor]:
    state = optimizer.state.get(param, {})
    return [v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]


@torch.no_grad()
def resample_dead_latents(
    sae: SAEBase,
    x: Tensor,
    target: Tensor,
    output: Tensor,
    dead: Tensor,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    transcoder: bool = False,
) -> int:
    """Re-initialise the latents where `dead` [d_sae] is True; returns how many were.

    `x`, `target`, `output`: the SAE's input, what it should reconstruct and what it produced on
    some tokens ([..., d_in], [..., d_out], [..., d_out]). `transcoder`: input and output are
    different activations (the encoder then reads the input's direction).
    """
    idx = dead.nonzero().squeeze(-1)
    x2 = x.detach().reshape(-1, x.shape[-1]).float()
    t2 = target.detach().reshape(-1, target.shape[-1]).float()
    out2 = output.detach().reshape(t2.shape).float()
    err = (out2 - t2).pow(2).sum(-1)
    if idx.numel() == 0 or not bool(err.sum() > 0):
        return 0
    n_candidates = int((err > 0).sum())  # without replacement while there are enough tokens
    picks = torch.multinomial(
        err.cpu(), idx.numel(), replacement=idx.numel() > n_candidates, generator=generator
    ).to(x2.device)
    enc = cast(nn.Linear, sae.encoder[0])
    alive = ~dead
    norms = enc.weight.norm(dim=-1)
    scale = ENCODER_SCALE * (float(norms[alive].mean()) if bool(alive.any()) else 1.0)
    dtype = enc.weight.dtype
    # the direction the SAE misses on that token; an encoder in another space (a transcoder's
    # input) reads the token's input direction instead
    err_dirs = nn.functional.normalize((t2 - out2)[picks], dim=-1)
    in_dirs = nn.functional.normalize(x2[picks], dim=-1) if transcoder else err_dirs
    enc.weight[idx] = (in_dirs * scale).to(dtype)
    sae.decoder.weight[:, idx] = err_dirs.T.to(dtype)
    enc.bias[idx] = 0.0
    for m in _moments(optimizer, enc.weight) + _moments(optimizer, enc.bias):
        m[idx] = 0.0
    for m in _moments(optimizer, sae.decoder.weight):
        m[:, idx] = 0.0
    sae.tokens_since_fired[idx] = 0
    return int(idx.numel())
