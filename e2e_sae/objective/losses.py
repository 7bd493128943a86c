"""One small class per loss term. Each returns an unweighted scalar; `coeff` weights it.

A coefficient of 0 still computes (and logs) the term without optimising it, as in the original.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from e2e_sae.config import LossConfigs
from e2e_sae.lm.runner import Unembedding
from e2e_sae.lm.sites import SpliceSite
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
    orig_final: Tensor | None = None
    new_final: Tensor | None = None
    """Final normalised residuals [batch, pos, d_model] (the unembedding's input). Training passes
    these and `unembed` instead of logits on every runner whose final residual is the unembedding's
    input (`LMRunner.final_is_residual`); `logits_kl` then never holds full logits."""
    unembed: Unembedding | None = None
    kl_target: KLTarget | None = None
    """The clean side of `logits_kl` when it comes from a teacher cache instead of a clean run."""
    sites: Mapping[str, SpliceSite] = field(default_factory=dict)
    """position -> where its SAE reads and what it replaces (none given: it reads and replaces
    `position`)."""
    saes: Mapping[str, SAEBase] = field(default_factory=dict)
    """position -> the SAE module (its own reconstruction loss and penalties, e.g. JumpReLU's
    L0)."""

    def site(self, pos: str) -> SpliceSite:
        return self.sites.get(pos) or SpliceSite(pos, pos)

    def target(self, pos: str) -> Tensor:
        """What the SAE at `pos` reconstructs (`SpliceSite.target`)."""
        return self.site(pos).target(self.sae_acts[pos], self.orig_acts)


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


DEFAULT_KL_CHUNK_ELEMENTS = 1 << 23
"""Default KL chunk: ~8M logits (32 MB fp32) per [chunk, d_vocab] temporary."""


class KLTarget(Protocol):
    """The clean side of a chunked KL: for token rows [s, e) and the new run's log-probs
    [e - s, d_vocab], returns (sum over the rows of the KL term, the target distribution P~ whose
    difference softmax(new) - P~ is the gradient w.r.t. the new logits)."""

    def __call__(self, s: int, e: int, logp_new: Tensor) -> tuple[Tensor, Tensor]: ...


class _ChunkedUnembedKL(torch.autograd.Function):
    """sum_t KL_t from the new run's final residual, one token chunk at a time.

    For KL(P || softmax(z)) the gradient w.r.t. the logits z is softmax(z) - P per token, so each
    chunk's gradient w.r.t. `new_final` is computed right away ([chunk, d_model], small) and no
    [tokens, d_vocab] tensor outlives its chunk: no logits copies and no recomputation.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, new_final: Tensor, target: KLTarget, unembed: Unembedding, chunk: int
    ) -> Tensor:
        new = new_final.reshape(-1, new_final.shape[-1])
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty(new.shape, dtype=torch.float32, device=new.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float64, device=new.device)
        for s in range(0, new.shape[0], chunk):
            e = min(s + chunk, new.shape[0])
            logp_n = F.log_softmax(unembed(new[s:e]), dim=-1)
            kl_sum, p_target = target(s, e, logp_n)
            total += kl_sum
            if grad is not None:
                g = logp_n.exp_().sub_(p_target)  # d(sum_t KL_t) / d new_logits, in place
                w = unembed.weight
                grad[s:e] = (g.to(w.dtype) @ w).float()
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.shape, ctx.dtype = new_final.shape, new_final.dtype
        return total.float()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).reshape(ctx.shape).to(ctx.dtype), None, None, None


def chunked_unembed_kl(
    new_final: Tensor, target: KLTarget, unembed: Unembedding, chunk_tokens: int | None = None
) -> Tensor:
    """mean_t of the KL term `target` defines, against softmax(unembed(new_final)), computed in
    token chunks (see `_ChunkedUnembedKL`); gradients flow into `new_final` only."""
    n = new_final.numel() // new_final.shape[-1]
    chunk = chunk_tokens or max(1, DEFAULT_KL_CHUNK_ELEMENTS // unembed.weight.shape[0])
    total = _ChunkedUnembedKL.apply(new_final, target, unembed, chunk)
    assert isinstance(total, Tensor)
    return total / n


def kl_from_final(
    orig_final: Tensor, new_final: Tensor, unembed: Unembedding, chunk_tokens: int | None = None
) -> Tensor:
    """`kl_clean_to_new` of the logits `unembed` gives for the two final residuals (same value,
    same gradient w.r.t. `new_final`), without materialising [tokens, d_vocab] for either run.

    `orig_final` gets no gradient (the clean run is the fixed target).
    """
    orig = orig_final.detach().reshape(-1, orig_final.shape[-1])

    def exact(s: int, e: int, logp_new: Tensor) -> tuple[Tensor, Tensor]:
        logp_o = F.log_softmax(unembed(orig[s:e]), dim=-1)
        p_o = logp_o.exp()
        return (p_o * (logp_o - logp_new)).sum(dtype=torch.float64), p_o

    return chunked_unembed_kl(new_final, exact, unembed, chunk_tokens)


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
    For a transcoder the target is the clean activation at the hook it replaces
    (`LossInputs.target`). An SAE may count its own reconstruction loss
    (`SAEBase.reconstruction_loss`, e.g. a Matryoshka SAE's prefixes)."""

    name = "out_to_in"

    def __call__(self, inputs: LossInputs) -> Tensor:
        total = torch.zeros(())
        for pos, acts in inputs.sae_acts.items():
            target = inputs.target(pos)
            sae = inputs.saes.get(pos)
            if sae is not None:
                total = total + sae.reconstruction_loss(acts, target)
            else:
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
    (total_coeff / n_hooks) * mse per hook. When the spliced run holds n copies of the batch
    (`StepPlan.spliced_copies`), each hook's MSE is the mean over the copies.
    """

    name = "in_to_orig"

    def __init__(self, total_coeff: float, hook_positions: list[str]) -> None:
        super().__init__(total_coeff)
        self.hook_positions = hook_positions

    def __call__(self, inputs: LossInputs) -> Tensor:
        total = torch.zeros(())
        for h in self.hook_positions:
            new = inputs.new_acts[h]
            total = total + F.mse_loss(new, tile_like(inputs.orig_acts[h], new))
        return total / len(self.hook_positions)


def tile_like(orig: Tensor, new: Tensor) -> Tensor:
    """`orig` repeated along dim 0 to the batch of `new`, a spliced run of n copy-major copies of
    the batch (`StepPlan.spliced_copies`); `orig` itself when the batches agree."""
    if orig.shape[0] == new.shape[0]:
        return orig
    n = new.shape[0] // orig.shape[0]
    assert n * orig.shape[0] == new.shape[0], (orig.shape, new.shape)
    return orig.repeat(n, *([1] * (orig.dim() - 1)))


class LogitsKLLoss(LossTerm):
    """KL(P_clean || P_with_SAEs) per token, mean over tokens (see `kl_clean_to_new`). When the
    spliced run holds n copies of the batch (`StepPlan.spliced_copies`): the mean of their KLs."""

    name = "logits_kl"

    def __init__(self, coeff: float, chunk_tokens: int | None = None) -> None:
        super().__init__(coeff)
        self.chunk_tokens = chunk_tokens

    def __call__(self, inputs: LossInputs) -> Tensor:
        if inputs.kl_target is not None:
            assert inputs.new_final is not None and inputs.unembed is not None
            return chunked_unembed_kl(
                inputs.new_final, inputs.kl_target, inputs.unembed, self.chunk_tokens
            )
        if inputs.orig_logits is not None and inputs.new_logits is not None:
            orig = tile_like(inputs.orig_logits, inputs.new_logits)
            return kl_clean_to_new(orig, inputs.new_logits, self.chunk_tokens)
        assert inputs.orig_final is not None and inputs.new_final is not None
        assert inputs.unembed is not None
        orig = tile_like(inputs.orig_final, inputs.new_final)
        return kl_from_final(orig, inputs.new_final, inputs.unembed, self.chunk_tokens)


def build_loss_terms(
    cfg: LossConfigs, in_to_orig_hooks: list[str] | None = None, kl_chunk_tokens: int | None = None
) -> list[LossTerm]:
    """Loss terms in a fixed order; `in_to_orig_hooks` are the resolved downstream hook names;
    `kl_chunk_tokens` bounds the KL's [tokens, d_vocab] temporaries (None: automatic)."""
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
        terms.append(LogitsKLLoss(cfg.logits_kl.coeff, kl_chunk_tokens))
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
