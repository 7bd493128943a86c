"""The step-level LM-runner protocol behind `run_forward`: the runner is chosen once per plan, and
the chunked KL and the teacher cache give the reference's numbers on every runner (lean,
TransformerLens without the lean forward, TransformerBridge)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_TLENS, needs_hooked
from transformers import LlamaConfig, LlamaForCausalLM

from e2e_sae import SAETransformer
from e2e_sae.caches.teacher import TeacherCache
from e2e_sae.config import LossConfigs
from e2e_sae.data.tokenizer import load_tokenizer
from e2e_sae.errors import UserError
from e2e_sae.lm.bridge import load_bridge
from e2e_sae.lm.load import build_random_model
from e2e_sae.lm.runner import BridgeRunner, HookedRunner, LeanRunner
from e2e_sae.objective.forward import StepPlan, make_plan, run_forward
from e2e_sae.objective.losses import build_loss_terms, compute_losses

E2E = LossConfigs.model_validate({"sparsity": {"coeff": 0.1}, "logits_kl": {"coeff": 1.0}})
TWO_SAES = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]

Step = tuple[dict[str, float], dict[str, torch.Tensor]]


def _hooked(**extra: Any) -> SAETransformer:
    tl = build_random_model({**TINY_TLENS, **extra, "seed": 3})
    torch.manual_seed(0)
    return SAETransformer(tl, TWO_SAES, 2.0)


@pytest.fixture(scope="module")
def bridged(tmp_path_factory: pytest.TempPathFactory) -> SAETransformer:
    """SAEs in a TransformerBridge around a tiny random Llama saved as a local HF folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    load_tokenizer("shakespeare-bpe").save_pretrained(str(folder))
    torch.manual_seed(0)
    return SAETransformer(load_bridge(str(folder)), ["blocks.1.hook_resid_pre"], 2.0)


def _step(model: SAETransformer, plan: StepPlan, tokens: torch.Tensor, ref: bool = False) -> Step:
    """Loss values and SAE gradients of one step (KL chunks of 5 tokens)."""
    model.saes.zero_grad()
    terms = build_loss_terms(E2E, plan.new_cache, kl_chunk_tokens=5)
    inputs = run_forward(model, tokens, plan, reference=ref)
    if not ref:  # the KL reads final residuals + the unembedding, never [tokens, d_vocab]
        assert inputs.new_logits is None and inputs.orig_logits is None
        assert inputs.new_final is not None and inputs.unembed is not None
    total, values = compute_losses(terms, inputs)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.saes.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in values.items()}, grads


def _assert_same(got: Step, want: Step, rel: float = 1e-5) -> None:
    assert got[0].keys() == want[0].keys()
    for k, v in want[0].items():
        assert got[0][k] == pytest.approx(v, rel=rel), k
    assert got[1].keys() == want[1].keys() and got[1]
    for n, g in want[1].items():
        assert float((got[1][n] - g).norm()) <= rel * max(float(g.norm()), 1e-12), n


@needs_hooked
def test_the_runner_is_chosen_once_per_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _hooked()
    plan = make_plan(model, E2E)
    assert isinstance(plan.runner, LeanRunner) and isinstance(model.lm, HookedRunner)
    # a hook the lean forward lacks: the plan keeps TransformerLens
    attn = make_plan(
        model,
        LossConfigs.model_validate(
            {
                **E2E.model_dump(exclude_none=True),
                "in_to_orig": {"hook_positions": ["blocks.2.attn.hook_z"], "total_coeff": 1.0},
            }
        ),
    )
    assert attn.runner is model.lm

    def no_lookup(*args: Any) -> None:
        raise AssertionError("a step looked up the lean forward")

    monkeypatch.setattr(HookedRunner, "lean", no_lookup)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    run_forward(model, tokens, plan)
    run_forward(model, tokens, attn)


@needs_hooked
def test_chunked_kl_and_teacher_cache_agree_with_and_without_the_lean_runner(
    tmp_path: Path,
) -> None:
    model = _hooked()
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    lean = make_plan(model, E2E)
    hooked = dataclasses.replace(lean, runner=model.lm)
    assert isinstance(lean.runner, LeanRunner)
    want = _step(model, lean, tokens, ref=True)
    # k = d_vocab keeps every token (tail mass 0): the cached KL is the exact one
    cache = TeacherCache.build(model, [tokens], 1, tmp_path / "teacher", k=97, progress=False)
    for plan in (lean, hooked):
        _assert_same(_step(model, plan, tokens), want)
        _assert_same(_step(model, dataclasses.replace(plan, teacher=cache), tokens), want)
    # a top-k cache: the same (approximate) loss through either runner
    top8 = TeacherCache.build(model, [tokens], 1, tmp_path / "top8", k=8, progress=False)
    a, b = (_step(model, dataclasses.replace(p, teacher=top8), tokens) for p in (lean, hooked))
    _assert_same(a, b)
    assert 0 < a[0]["logits_kl"] < want[0]["logits_kl"]


def test_chunked_kl_and_teacher_cache_on_the_bridge(bridged: SAETransformer, tmp_path: Path):
    model = bridged
    plan = make_plan(model, E2E)
    assert isinstance(plan.runner, BridgeRunner) and plan.runner.final_is_residual
    tokens = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    want = _step(model, plan, tokens, ref=True)  # logits, each pass from the tokens
    _assert_same(_step(model, plan, tokens), want, rel=1e-4)
    cache = TeacherCache.build(model, [tokens], 1, tmp_path / "teacher", k=4096, progress=False)
    _assert_same(_step(model, dataclasses.replace(plan, teacher=cache), tokens), want, rel=1e-4)


def test_the_lean_runner_follows_weight_changes() -> None:
    model = _hooked()
    plan = make_plan(model, E2E)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    before = _step(model, plan, tokens)
    with torch.no_grad():
        model.tlens_model.blocks[1].attn.W_Q.mul_(2.0)  # in place: the layout is rebuilt
    after = _step(model, plan, tokens)
    assert after[0]["logits_kl"] != pytest.approx(before[0]["logits_kl"], rel=1e-3)
    _assert_same(after, _step(model, plan, tokens, ref=True))


@needs_hooked
def test_soft_capped_logits_reach_the_kl_as_logits(tmp_path: Path) -> None:
    """A soft cap after the unembedding: the runner hands over logits (no teacher cache)."""
    model = _hooked(output_logits_soft_cap=2.0)
    plan = make_plan(model, E2E)
    assert plan.runner is model.lm and not model.lm.final_is_residual
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    inputs = run_forward(model, tokens, plan)
    with torch.no_grad():
        want = model.tlens_model(tokens)
    assert inputs.orig_logits is not None and torch.allclose(inputs.orig_logits, want, atol=1e-6)
    terms = build_loss_terms(E2E, plan.new_cache)
    got = compute_losses(terms, inputs)[1]["logits_kl"]
    ref = compute_losses(terms, run_forward(model, tokens, plan, reference=True))[1]["logits_kl"]
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    cache = TeacherCache.build(model, [tokens], 1, tmp_path / "teacher", k=8, progress=False)
    with pytest.raises(UserError, match="teacher_cache: this model's logits"):
        run_forward(model, tokens, dataclasses.replace(plan, teacher=cache))
