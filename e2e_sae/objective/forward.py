"""The forward half of a training/eval step: which passes run, and what the loss terms get.

One `run_forward`, written against the step-level part of `e2e_sae.lm.runner.LMRunner`
(`embed`, `run_blocks`, `unembedding_fn`). The runner is chosen once, when the plan is made
(`make_plan` / `with_runner`: the lean forward `fastlm` where it supports the model and the plan's
hooks, else the backend's runner), and stored in the plan.

Two ways to compute the same numbers:
- `reference=True`: what the original library does — a clean pass and an SAE-spliced pass, each
  from the tokens, through the backend's runner (never the lean one), with both runs' logits.
- default: the layers before the first SAE run once; the clean and the spliced pass both start from
  that residual (where the runner `supports_start_at_layer`; else both run from the tokens). Same
  ops on the same inputs, so the same values. The KL term gets the final residuals and the
  unembedding instead of logits, so it never holds [tokens, d_vocab] for either run
  (`losses.kl_from_final`, chunked by `kl_chunk_tokens`); with a teacher cache (`plan.teacher`)
  the clean pass stops after the hooks it must cache and the KL is taken against the cache. Both
  work on every backend (a runner whose logits are not its unembedding of the final residual,
  `final_is_residual` False, hands over logits and has no teacher cache).
Local-only runs (no KL / downstream terms) stop the LM right after the last hook they need and run
the SAEs on the cached clean activations.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
from torch import Tensor

from e2e_sae.config import LossConfigs
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.runner import LMRunner, cache_into, step_runner
from e2e_sae.lm.sites import check_after_first_sae, filter_names, hook_layer
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.objective.losses import KLTarget, LossInputs
from e2e_sae.saes import CacheActs, SAEActs, SAEBase


@dataclass(frozen=True)
class StepPlan:
    sae_positions: list[str]
    orig_cache: list[str]
    """Clean-run hooks to cache: SAE inputs, replaced hooks, downstream hooks."""
    new_cache: list[str] = field(default_factory=list)
    """Spliced-run hooks to cache (downstream `in_to_orig` hooks)."""
    e2e: bool = False
    logits: bool = False
    """Return both runs' logits (evaluation). Training's KL reads the final residuals instead."""
    precision: str = "fp32"
    """"bf16": the fast path's LM matmuls and attention run in bf16 (`fastlm`)."""
    teacher: Teacher | None = None
    """Cached clean next-token distributions (`teacher_cache`): the clean pass stops after the
    hooks in `orig_cache` and the KL is taken against the cache (top-k approximation)."""
    spliced_copies: int = 1
    """Copies of the batch the spliced pass runs at once, copy-major (`SAEBase.spliced_copies`,
    e.g. one per prefix of a Matryoshka SAE); the clean pass runs once. The loss terms on the
    SAEs' activations see the last copy's (the SAEs as at inference); the KL and downstream terms
    average over the copies."""
    runner: LMRunner | None = None
    """The LM runner for these hooks and this precision (`with_runner`); None (a plan built by
    hand): `run_forward` chooses one on every call."""


class Teacher(Protocol):
    def kl_target(self, tokens: Tensor) -> KLTarget:
        """The KL term's clean side for these token windows (flattened over tokens)."""
        ...


def make_plan(
    model: SAETransformer,
    loss_cfg: LossConfigs,
    force_full_pass: bool = False,
    precision: str = "fp32",
) -> StepPlan:
    """What to run for these loss terms. `force_full_pass` (eval) always computes both logits."""
    downstream: list[str] = []
    if loss_cfg.in_to_orig is not None:
        downstream = in_to_orig_hooks(model, loss_cfg.in_to_orig.hook_positions)
    orig = list(dict.fromkeys(h for site in model.sites.values() for h in site.hooks))
    orig += [h for h in downstream if h not in orig]
    e2e = loss_cfg.needs_clean_run_past_saes or force_full_pass
    copies = 1
    if e2e and not force_full_pass:  # evaluation measures the SAEs as at inference only
        copies = spliced_copies([model.sae(p) for p in model.sae_positions])
    plan = StepPlan(
        sae_positions=list(model.sae_positions),
        orig_cache=orig,
        new_cache=downstream,
        e2e=e2e,
        logits=force_full_pass,
        precision=precision,
        spliced_copies=copies,
    )
    return with_runner(model, plan)


def in_to_orig_hooks(model: SAETransformer, patterns: Sequence[str]) -> list[str]:
    """The `in_to_orig` hooks: they must run after the first SAE's output; before it (or at it)
    the spliced run equals the clean one, and the term would be 0 at every step."""
    field = "loss.in_to_orig.hook_positions"
    hooks = filter_names(model.all_hook_names, patterns, field)
    outputs = [model.sites[p].output_hook for p in model.sae_positions]
    order = list(model.hook_shapes([*outputs, *hooks]))  # in the order the forward pass runs
    check_after_first_sae(order, outputs, hooks, field)
    return hooks


def spliced_copies(saes: Sequence[SAEBase]) -> int:
    """The copies of the batch an e2e step splices these SAEs into: 1, or the count the SAEs
    that ask for more agree on (a one-line ConfigError when they do not)."""
    counts = sorted({sae.spliced_copies() for sae in saes} - {1})
    if len(counts) > 1:
        raise ConfigError(
            f"saes.architecture_kwargs: the SAEs ask for {counts} copies of the batch in one "
            "spliced pass (a Matryoshka SAE: one per prefix); they must agree"
        )
    return counts[0] if counts else 1


def with_runner(model: SAETransformer, plan: StepPlan) -> StepPlan:
    """`plan` with its runner chosen for its hooks and precision (`lm_runner.step_runner`): call
    it again after changing a plan's hooks."""
    return dataclasses.replace(plan, runner=_choose_runner(model, plan))


def _choose_runner(model: SAETransformer, plan: StepPlan) -> LMRunner:
    sites = [h for p in plan.sae_positions for h in model.sites[p].hooks]
    hooks = list(dict.fromkeys(sites + plan.orig_cache + plan.new_cache))
    return step_runner(model.lm, hooks, plan.precision)


def _shared_start(model: SAETransformer, plan: StepPlan) -> int | None:
    """The block both passes start from (0: from the shared embedding), or None where a hook
    sits in the embedding (both passes then run from the tokens)."""
    hooks = [h for p in plan.sae_positions for h in model.sites[p].hooks] + plan.orig_cache
    first = min(hook_layer(h, model.n_layers) for h in hooks)
    return None if first < 0 else first


def run_forward(
    model: SAETransformer, tokens: Tensor, plan: StepPlan, reference: bool = False
) -> LossInputs:
    """Run the passes the plan needs; gradients flow only into the SAEs."""
    if reference:
        lm = model.lm
    else:
        lm = plan.runner if plan.runner is not None else _choose_runner(model, plan)
    device = lm.device
    orig_acts: dict[str, Tensor] = {}
    clean_hooks = [(h, cache_into(orig_acts, h, device)) for h in plan.orig_cache]
    saes = {p: model.sae(p) for p in plan.sae_positions}
    if not plan.e2e:
        if clean_hooks:
            with torch.no_grad():
                lm.run_blocks(tokens, 0, clean_hooks, stop_after=plan.orig_cache)
        _, acts = model.forward(tokens, plan.sae_positions, orig_acts=orig_acts)
        return LossInputs(
            sae_acts=_sae_acts(acts, plan.sae_positions),
            orig_acts=orig_acts,
            sites=model.sites,
            saes=saes,
        )
    if plan.teacher is not None and not lm.final_is_residual:
        raise UserError(
            f"teacher_cache: this model's logits are not its unembedding of the final residual "
            f"(backend {lm.backend}: a logit soft cap or scale, or a model spread over devices)"
        )
    shared = None if reference or not lm.supports_start_at_layer else _shared_start(model, plan)
    start = shared or 0
    with torch.no_grad():
        if shared is None:
            resid = tokens
        elif shared == 0:
            resid = lm.embed(tokens)
        else:
            resid = lm.run_blocks(tokens, 0, stop_at_layer=shared)
            assert resid is not None
        if plan.teacher is None:
            orig_final = lm.run_blocks(resid, start, clean_hooks)
            assert orig_final is not None
        else:  # the cache stands in for the clean run's distributions: stop after its hooks
            orig_final = None
            if clean_hooks:
                lm.run_blocks(resid, start, clean_hooks, stop_after=plan.orig_cache)
    n = plan.spliced_copies
    hooks, acts = model.splice_hooks(plan.sae_positions, plan.new_cache, copies=n)
    new_final = lm.run_blocks(_tile(resid, n), start, hooks)
    assert new_final is not None
    inputs = LossInputs(
        sae_acts=_sae_acts(acts, plan.sae_positions, n),
        orig_acts=orig_acts,
        new_acts=_new_acts(model, acts, plan),
        kl_target=plan.teacher.kl_target(_tile(tokens, n)) if plan.teacher is not None else None,
        sites=model.sites,
        saes=saes,
    )
    if not lm.final_is_residual:  # the runner handed over logits
        inputs.orig_logits, inputs.new_logits = orig_final, new_final
        return inputs
    unembed = lm.unembedding_fn()
    inputs.orig_final, inputs.new_final, inputs.unembed = orig_final, new_final, unembed
    if plan.logits or reference:
        inputs.new_logits = unembed(new_final)
        inputs.orig_logits = unembed(orig_final) if orig_final is not None else None
    return inputs


def _sae_acts(
    acts: dict[str, SAEActs | CacheActs], positions: list[str], n: int = 1
) -> dict[str, SAEActs]:
    """The SAEs' activations (at an SAE position the pass records `SAEActs`); of a pass over
    n > 1 copies, the last copy's."""
    out = {p: cast(SAEActs, acts[p]) for p in positions}
    return out if n == 1 else {p: _last_copy(v, n) for p, v in out.items()}


def _last_copy(acts: SAEActs, n: int) -> SAEActs:
    m = acts.input.shape[0] // n
    return SAEActs(acts.input[-m:], acts.c[-m:], acts.output[-m:])


def _tile(x: Tensor, n: int) -> Tensor:
    """n copy-major copies of a batch along dim 0 (x itself for n == 1)."""
    return x if n == 1 else x.repeat(n, *([1] * (x.dim() - 1)))


def _new_acts(
    model: SAETransformer, acts: dict[str, SAEActs | CacheActs], plan: StepPlan
) -> dict[str, Tensor]:
    """The spliced pass's activations at the downstream-loss hooks (`plan.new_cache`)."""
    return {h: model.spliced_activation(h, acts[h]) for h in plan.new_cache if h in acts}


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast for the SAEs (and a TransformerLens fallback); a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dev = torch.device(device).type
    return torch.autocast(dev, dtype=torch.bfloat16)
