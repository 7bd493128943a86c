"""One small class per loss term. Each returns an unweighted scalar; `coeff` weights it.

A coefficient of 0 still computes (and logs) the term without optimising it, as in the original.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from e2e_sae.config import LossConfigs
from e2e_sae.saes import SAEActs, SAEBase


@dataclass
class LossInputs:
    """Everything a loss term may look at for one batch.

    orig_acts: clean-run activations (at SAE inputs/outputs and downstream hooks).
    sae_acts: per SAE position, what it read (`input`), its code `c` and its `output`.
    new_acts: SAE-spliced-run activations at downstream (`in_to_orig`) hooks.
    orig_logits / new_logits: [batch, pos, d_vocab] for the clean / spliced run (None if local).
    """

    sae_acts: Mapping[str, SAEActs]
    orig_acts: Mapping[str, Tensor] = field(default_factory=dict)
    new_acts: Mapping[str, Tensor] = field(default_factory=dict)
    orig_logits: Tensor | None = None
    new_logits: Tensor | None = None
    transcoder_targets: Mapping[str, str] = field(default_factory=dict)
    """position -> hook whose clean activation a transcoder's output should match."""
    saes: Mapping[str, SAEBase] = field(default_factory=dict)
    """position -> the SAE module (for architecture-specific penalties such as JumpReLU's L0)."""

    def target(self, pos: str) -> Tensor:
        """What the SAE at `pos` reconstructs: its input, or a transcoder's clean target."""
        if pos in self.transcoder_targets:
            return self.orig_acts[self.transcoder_targets[pos]]
        return self.sae_acts[pos].input


def kl_clean_to_new(
    orig_logits: Tensor, new_logits: Tensor, chunk_tokens: int | None = None
) -> Tensor:
    """KL(P_orig || P_new) of next-token distributions per token, averaged over all tokens.

    = mean_t sum_v P_orig(v|t) (log P_orig(v|t) - log P_new(v|t)). This is what the original
    library's `F.kl_div(new_logp, orig_logp, log_target=True, reduction="batchmean")` computes on
    flattened tokens. `chunk_tokens` bounds the memory of the [tokens, vocab] temporaries.
    """
    orig = orig_logits.reshape(-1, orig_logits.shape[-1])
    new = new_logits.reshape(-1, new_logits.shape[-1])
    n = orig.shape[0]
    step = chunk_tokens or n
    total = new.new_zeros(())
    for s in range(0, n, step):
        o = F.log_softmax(orig[s : s + step].float(), dim=-1)
        w = F.log_softmax(new[s : s + step].float(), dim=-1)
        total = total + (o.exp() * (o - w)).sum()
    return total / n


class LossTerm(ABC):
    name: str = ""

    def __init__(self, coeff: float) -> None:
        self.coeff = coeff

    @abstractmethod
    def __call__(self, inputs: LossInputs) -> Tensor: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}(coeff={self.coeff})"


class SparsityLoss(LossTerm):
    """Lp norm of each SAE's code over the dictionary dim, mean over tokens, divided by d_in;
    summed over SAEs. Architectures may substitute their own penalty (JumpReLU's L0)."""

    name = "sparsity"

    def __init__(self, coeff: float, p_norm: float = 1.0) -> None:
        super().__init__(coeff)
        self.p_norm = p_norm

    def __call__(self, inputs: LossInputs) -> Tensor:
        total = torch.zeros(())
        for pos, acts in inputs.sae_acts.items():
            sae = inputs.saes.get(pos)
            if sae is not None:
                penalty = sae.sparsity_penalty(acts, self.p_norm)
            else:
                penalty = torch.norm(acts.c, p=self.p_norm, dim=-1)
            total = total + penalty.mean() / acts.input.shape[-1]
        return total


class OutToInLoss(LossTerm):
    """MSE between each SAE's output and its input (local reconstruction); summed over SAEs.
    For a transcoder the target is the clean activation at the hook it replaces."""

    name = "out_to_in"

    def __call__(self, inputs: LossInputs) -> Tensor:
        total = torch.zeros(())
        for pos, acts in inputs.sae_acts.items():
            target = acts.input
            if pos in inputs.transcoder_targets:
                target = inputs.orig_acts[inputs.transcoder_targets[pos]]
            total = total + F.mse_loss(acts.output, target)
        return total


class OutToOrigLoss(LossTerm):
    """MSE between each SAE's output and the clean run's activation at the hook it replaces."""

    name = "out_to_orig"

    def __call__(self, inputs: LossInputs) -> Tensor:
        total = torch.zeros(())
        for pos, acts in inputs.sae_acts.items():
            total = total + F.mse_loss(acts.output, inputs.orig_acts[pos])
        return total


class InToOrigLoss(LossTerm):
    """Mean over `hook_positions` of the MSE between the spliced and the clean run's activations.

    The config's `total_coeff` is split evenly over the hooks, i.e. coeff * mean == sum of
    (total_coeff / n_hooks) * mse per hook.
    """

    name = "in_to_orig"

    def __init__(self, total_coeff: float, hook_positions: list[str]) -> None:
        super().__init__(total_coeff)
        self.hook_positions = hook_positions

    def __call__(self, inputs: LossInputs) -> Tensor:
        total = torch.zeros(())
        for h in self.hook_positions:
            total = total + F.mse_loss(inputs.new_acts[h], inputs.orig_acts[h])
        return total / len(self.hook_positions)


class LogitsKLLoss(LossTerm):
    """KL(P_clean || P_with_SAEs) per token, mean over tokens (see `kl_clean_to_new`)."""

    name = "logits_kl"

    def __init__(self, coeff: float, chunk_tokens: int | None = None) -> None:
        super().__init__(coeff)
        self.chunk_tokens = chunk_tokens

    def __call__(self, inputs: LossInputs) -> Tensor:
        assert inputs.orig_logits is not None and inputs.new_logits is not None
        return kl_clean_to_new(inputs.orig_logits, inputs.new_logits, self.chunk_tokens)


def build_loss_terms(cfg: LossConfigs, in_to_orig_hooks: list[str] | None = None) -> list[LossTerm]:
    """Loss terms in a fixed order; `in_to_orig_hooks` are the resolved downstream hook names."""
    terms: list[LossTerm] = []
    if cfg.sparsity is not None:
        terms.append(SparsityLoss(cfg.sparsity.coeff, cfg.sparsity.p_norm))
    if cfg.out_to_in is not None:
        terms.append(OutToInLoss(cfg.out_to_in.coeff))
    if cfg.out_to_orig is not None:
        terms.append(OutToOrigLoss(cfg.out_to_orig.coeff))
    if cfg.in_to_orig is not None:
        hooks = in_to_orig_hooks or list(cfg.in_to_orig.hook_positions)
        terms.append(InToOrigLoss(cfg.in_to_orig.total_coeff, hooks))
    if cfg.logits_kl is not None:
        terms.append(LogitsKLLoss(cfg.logits_kl.coeff))
    return terms


def compute_losses(
    terms: list[LossTerm], inputs: LossInputs, aux: Mapping[str, Tensor] | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total = sum(coeff * term) + sum(aux). Returns (total, {name: unweighted value})."""
    values: dict[str, Tensor] = {}
    total = torch.zeros(())
    for term in terms:
        v = term(inputs)
        values[term.name] = v
        total = total + term.coeff * v
    for name, v in (aux or {}).items():
        values[name] = v
        total = total + v
    return total, values
