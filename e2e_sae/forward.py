"""The forward half of a training/eval step: which passes run, and what the loss terms get.

Two ways to compute the same numbers:
- `reference=True`: what the original library does — a clean pass and an SAE-spliced pass, each
  from the tokens.
- default: the layers before the first SAE run once; the clean and the spliced pass both start from
  that residual (`start_at_layer`). Same ops on the same inputs, so the same values.
Local-only runs (no KL / downstream terms) stop the LM right after the last hook they need and run
the SAEs on the cached clean activations.

Where `e2e_sae.fastlm` supports the model and hooks, the fast path runs the LM through its lean
forward (weights laid out once, fused attention; optionally bf16 matmuls) and hands the KL term the
final residuals instead of logits, so it never holds [tokens, d_vocab] for either run
(`losses.kl_from_final`). Otherwise it uses TransformerLens with `start_at_layer`.

The LM is reached through `model.lm` (`e2e_sae.lm_runner`). A TransformerBridge (backend bridge)
has no lean forward and cannot start from a residual: its e2e steps run both passes from the
tokens (the reference path's passes); local steps still stop right after the last hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from e2e_sae.config import LossConfigs
from e2e_sae.errors import UserError
from e2e_sae.fastlm import LeanLM
from e2e_sae.losses import KLTarget, LossInputs, Unembedding
from e2e_sae.saes import CacheActs, SAEActs
from e2e_sae.saes.matryoshka import batched_prefix_passes, full_copy, prefix_passes
from e2e_sae.splice import SAETransformer, filter_names, hook_layer


@dataclass(frozen=True)
class StepPlan:
    sae_positions: list[str]
    orig_cache: list[str]
    """Clean-run hooks to cache: SAE inputs, replaced hooks, downstream hooks."""
    new_cache: list[str] = field(default_factory=list)
    """Spliced-run hooks to cache (downstream `in_to_orig` hooks)."""
    e2e: bool = False
    transcoder_targets: dict[str, str] = field(default_factory=dict)
    logits: bool = False
    """Return both runs' logits (evaluation). Training's KL reads the final residuals instead."""
    precision: str = "fp32"
    """"bf16": the fast path's LM matmuls and attention run in bf16 (`fastlm`)."""
    teacher: Teacher | None = None
    """Cached clean next-token distributions (`teacher_cache`): the clean pass stops after the
    hooks in `orig_cache` and the KL is taken against the cache (top-k approximation)."""
    prefix_passes: int = 1
    """> 1: e2e training of Matryoshka SAEs on every prefix: the spliced pass runs this many
    prefix-major copies of the batch at once (`saes.matryoshka`); the clean pass runs once."""


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
        downstream = filter_names(
            model.all_hook_names,
            loss_cfg.in_to_orig.hook_positions,
            "loss.in_to_orig.hook_positions",
        )
    orig: list[str] = []
    for pos, site in model.sites.items():
        for h in (site.input_hook, pos):
            if h not in orig:
                orig.append(h)
    orig += [h for h in downstream if h not in orig]
    e2e = loss_cfg.needs_clean_run_past_saes or force_full_pass
    passes = 1
    if e2e and not force_full_pass:  # evaluation measures the full dictionary only
        passes = prefix_passes(model.sae(p) for p in model.sae_positions)
    return StepPlan(
        sae_positions=list(model.sae_positions),
        orig_cache=orig,
        new_cache=downstream,
        e2e=e2e,
        transcoder_targets={p: p for p, s in model.sites.items() if s.is_transcoder},
        logits=force_full_pass,
        precision=precision,
        prefix_passes=passes,
    )


def first_sae_layer(model: SAETransformer, plan: StepPlan) -> int:
    """Block index where both passes can start from a shared residual (0 = no shared prefix)."""
    hooks = [model.sites[p].input_hook for p in plan.sae_positions] + plan.orig_cache
    return max(0, min(hook_layer(h, model.n_layers) for h in hooks))


def run_forward(
    model: SAETransformer, tokens: Tensor, plan: StepPlan, reference: bool = False
) -> LossInputs:
    """Run the passes the plan needs; gradients flow only into the SAEs."""
    if not reference:
        lean = model.lm.lean(plan.precision)
        if lean is not None and lean.supports(_hooks_used(model, plan)):
            return _run_lean(model, lean, tokens, plan)
    if plan.teacher is not None:
        raise UserError(
            "teacher_cache: needs the fast path (fastlm) for this model and these hooks "
            f"(backend hooked; this model runs on backend {model.backend})"
        )
    if not plan.e2e:
        with torch.no_grad():
            _, orig_acts = model.forward_raw(
                tokens, run_entire_model=False, cache_positions=plan.orig_cache
            )
        _, acts = model.forward(tokens, plan.sae_positions, orig_acts=orig_acts)
        return LossInputs(
            sae_acts=_sae_acts(acts),
            orig_acts=orig_acts,
            transcoder_targets=plan.transcoder_targets,
            saes={p: model.sae(p) for p in plan.sae_positions},
        )
    start = 0 if reference or not model.lm.supports_start_at_layer else first_sae_layer(model, plan)
    n = plan.prefix_passes
    if start == 0:
        with torch.no_grad():
            orig_logits, orig_acts = model.forward_raw(tokens, cache_positions=plan.orig_cache)
        with _prefix_copies(model, plan):
            new_logits, acts = model.forward(_tile(tokens, n), plan.sae_positions, plan.new_cache)
    else:
        with torch.no_grad():
            resid = model.lm.run(tokens, stop_at_layer=start)
            assert resid is not None
            orig_logits, cached = model.forward_with_hooks(
                resid, [], plan.orig_cache, start_at_layer=start
            )
            orig_acts = {k: v.input for k, v in cached.items()}
        with _prefix_copies(model, plan):
            new_logits, acts = model.forward_with_hooks(
                _tile(resid, n), plan.sae_positions, plan.new_cache, start_at_layer=start
            )
    return LossInputs(
        sae_acts=_sae_acts(acts, n),
        orig_acts=orig_acts,
        new_acts=_new_acts(model, acts, plan),
        orig_logits=orig_logits,
        new_logits=new_logits,
        transcoder_targets=plan.transcoder_targets,
        saes={p: model.sae(p) for p in plan.sae_positions},
    )


def _sae_acts(acts: dict[str, SAEActs | CacheActs], n: int = 1) -> dict[str, SAEActs]:
    """The SAEs' activations; of a batched prefix pass (n > 1), the full dictionary's copy."""
    out = {k: v for k, v in acts.items() if isinstance(v, SAEActs)}
    return out if n == 1 else {k: full_copy(v, n) for k, v in out.items()}


def _tile(x: Tensor, n: int) -> Tensor:
    """n prefix-major copies of a batch along dim 0 (x itself for n == 1)."""
    return x if n == 1 else x.repeat(n, *([1] * (x.dim() - 1)))


def _prefix_copies(model: SAETransformer, plan: StepPlan) -> contextlib.AbstractContextManager:
    if plan.prefix_passes == 1:
        return contextlib.nullcontext()
    saes = [model.sae(p) for p in plan.sae_positions]
    return batched_prefix_passes(saes, plan.prefix_passes)


def _new_acts(
    model: SAETransformer, acts: dict[str, SAEActs | CacheActs], plan: StepPlan
) -> dict[str, Tensor]:
    """The spliced pass's activations at the downstream-loss hooks (`plan.new_cache`)."""
    return {h: model.spliced_activation(h, acts[h]) for h in plan.new_cache if h in acts}


def _hooks_used(model: SAETransformer, plan: StepPlan) -> list[str]:
    inputs = [model.sites[p].input_hook for p in plan.sae_positions]
    return list(dict.fromkeys(plan.sae_positions + inputs + plan.orig_cache + plan.new_cache))


def _run_lean(model: SAETransformer, lean: LeanLM, tokens: Tensor, plan: StepPlan) -> LossInputs:
    """The fast path through `fastlm` (same values as the reference within float rounding)."""
    orig_acts: dict[str, Tensor] = {}
    clean_hooks = [(h, _store(orig_acts, h)) for h in plan.orig_cache]
    if not plan.e2e:
        with torch.no_grad():
            lean.run(tokens, 0, clean_hooks, until=lean.last_hook(plan.orig_cache))
        _, acts = model.forward(tokens, plan.sae_positions, orig_acts=orig_acts)
        return LossInputs(
            sae_acts=_sae_acts(acts),
            orig_acts=orig_acts,
            transcoder_targets=plan.transcoder_targets,
            saes={p: model.sae(p) for p in plan.sae_positions},
        )
    start = first_sae_layer(model, plan)
    with torch.no_grad():
        resid = lean.run(tokens, 0, stop_at_layer=start) if start > 0 else lean.embed(tokens)
        assert resid is not None
        if plan.teacher is None:
            orig_final = lean.run(resid, start, clean_hooks)
            assert orig_final is not None
        else:  # the cache stands in for the clean run's distributions: stop after its hooks
            orig_final = None
            if clean_hooks:
                lean.run(resid, start, clean_hooks, until=lean.last_hook(plan.orig_cache))
    hooks, acts = model.splice_hooks(plan.sae_positions, plan.new_cache)
    n = plan.prefix_passes
    with _prefix_copies(model, plan):
        new_final = lean.run(_tile(resid, n), start, hooks)
    assert new_final is not None
    unembed = Unembedding(lean.w_u, lean.b_u)
    teacher_tokens = _tile(tokens, n)
    return LossInputs(
        sae_acts=_sae_acts(acts, n),
        orig_acts=orig_acts,
        new_acts=_new_acts(model, acts, plan),
        orig_logits=unembed(orig_final) if plan.logits and orig_final is not None else None,
        new_logits=unembed(new_final) if plan.logits else None,
        orig_final=orig_final,
        new_final=new_final,
        unembed=unembed,
        kl_target=plan.teacher.kl_target(teacher_tokens) if plan.teacher is not None else None,
        transcoder_targets=plan.transcoder_targets,
        saes={p: model.sae(p) for p in plan.sae_positions},
    )


def _store(store: dict[str, Tensor], name: str) -> Callable[..., Tensor]:
    def hook(x: Tensor, hook: object = None) -> Tensor:
        store[name] = x
        return x

    return hook


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast for the SAEs (and a TransformerLens fallback); a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dev = torch.device(device).type
    return torch.autocast(dev, dtype=torch.bfloat16)
