"""Where a step's activations come from: the LM run on token windows, or stored activations.

Both are `engine.Feed`s (one micro-batch -> `LossInputs`), so an LM-fed and a cache-fed run take
the same optimizer steps. For a local config, `CacheFeed` on the activations the LM computes
gives the same `LossInputs` as `LMFeed` (the SAEs read the clean activations at their input
hooks), which is why `train-cached` on a cache built from a config's windows reproduces `train`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from e2e_sae.lm.sites import SpliceSite, run_sites
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.objective.forward import StepPlan, run_forward
from e2e_sae.objective.losses import LossInputs
from e2e_sae.saes import SAEDict


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """`t` on `device`. From host memory to a GPU it goes through pinned (page-locked) memory as
    a non-blocking copy: the host queues it and moves on, where a copy from ordinary (pageable)
    memory would wait for everything queued on the GPU first. (The pinned buffer outlives the
    copy: torch's pinned-memory allocator reuses a block only after the copies reading it.)"""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class PlanHolder(Protocol):
    model: SAETransformer
    plan: StepPlan
    reference: bool
    device: torch.device


@dataclass(frozen=True)
class LMFeed:
    """Token windows [batch, pos] through the LM with the SAEs spliced in as the holder's `plan`
    says, read at each call (`reference`: the original library's two full passes)."""

    holder: PlanHolder

    def __call__(self, tokens: Tensor) -> LossInputs:
        h = self.holder
        return run_forward(h.model, to_device(tokens, h.device), h.plan, h.reference)


@dataclass(frozen=True)
class CacheFeed:
    """Stored clean activations {hook: [batch, pos, d]} (local losses only): each SAE reads the
    activation at its input hook; a transcoder's target is the one at its output hook (a
    cross-layer transcoder's output there sums every layer's, `lm.sites.run_sites`)."""

    sites: Mapping[str, SpliceSite]
    saes: SAEDict
    device: torch.device

    def __call__(self, acts: Mapping[str, Tensor]) -> LossInputs:
        acts = {h: to_device(v, self.device) for h, v in acts.items()}
        saes = {pos: self.saes.at(pos) for pos in self.sites}
        sae_acts = run_sites(self.sites, saes, acts)
        return LossInputs(sae_acts, orig_acts=acts, sites=self.sites, saes=saes)
