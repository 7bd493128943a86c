"""Fast paths (fastlm, chunked KL, bf16, activation / teacher caches) vs the reference path."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TLENS, assert_close_scaled, needs_hooked, train_on_same_batches

from e2e_sae import SAETransformer, load_config
from e2e_sae.caches.activations import ActivationCache, lm_activation_batches
from e2e_sae.caches.teacher import TeacherCache, kl_topk, topk_distribution
from e2e_sae.config import Config, LossConfigs
from e2e_sae.errors import UserError
from e2e_sae.lm.fastlm import LeanLM, get_lean_lm
from e2e_sae.lm.load import build_random_model
from e2e_sae.lm.tl import HookedTransformer
from e2e_sae.objective.forward import make_plan, run_forward
from e2e_sae.objective.losses import (
    Unembedding,
    build_loss_terms,
    compute_losses,
    kl_clean_to_new,
    kl_from_final,
)
from e2e_sae.training.engine import TrainState
from e2e_sae.training.loop import Run, run_loop
from e2e_sae.training.runlog import RunLogger
from e2e_sae.training.trainer import setup

# A SmolLM2-shaped miniature: RMS norms, rotary, grouped-query attention, gated SiLU MLP.
LLAMA_TINY: dict[str, Any] = dict(
    d_model=32,
    d_head=8,
    n_heads=4,
    n_key_value_heads=2,
    d_mlp=48,
    n_layers=3,
    n_ctx=16,
    d_vocab=97,
    act_fn="silu",
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_dim=8,
    rotary_adjacent_pairs=False,
    gated_mlp=True,
    final_rms=True,
    seed=1,
)
E2E = {"sparsity": {"coeff": 0.1}, "logits_kl": {"coeff": 1.0}}
E2E_DS = {
    "sparsity": {"coeff": 0.1},
    "logits_kl": {"coeff": 0.5},
    "in_to_orig": {
        "hook_positions": ["blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"],
        "total_coeff": 2.5,
    },
}
LOCAL = {"sparsity": {"coeff": 0.1}, "out_to_in": {"coeff": 1.0}}
TWO_SAES = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]


def _randomise_biases(tl: HookedTransformer) -> None:
    """Random weights get zero biases; give them some so the bias paths are exercised too."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in tl.named_parameters():
            if name.split(".")[-1] in ("b_Q", "_b_K", "b_K", "_b_V", "b_V", "b_O", "b_in", "b_out"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _model(tlens: dict[str, Any], positions: list[str], biases: bool = True) -> SAETransformer:
    tl = build_random_model(tlens)
    if biases:
        _randomise_biases(tl)
    torch.manual_seed(0)
    return SAETransformer(tl, positions, 2.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --- fastlm: the same function as TransformerLens -------------------------------------------------
@needs_hooked
@pytest.mark.parametrize("tlens", [TINY_TLENS, LLAMA_TINY], ids=["ln-gelu", "llama"])
def test_lean_forward_matches_tlens_with_hooks(tlens: dict[str, Any]) -> None:
    model = _model(tlens, ["blocks.1.hook_resid_pre"])
    tl = model.tlens_model
    lean = get_lean_lm(tl)
    assert isinstance(lean, LeanLM)
    tokens = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    for name in (
        "blocks.1.hook_resid_mid",
        "blocks.1.ln2.hook_normalized",
        "blocks.2.hook_mlp_out",
        "blocks.0.hook_attn_out",
        "blocks.2.hook_resid_post",
    ):
        seen: dict[str, dict[str, torch.Tensor]] = {"tl": {}, "lean": {}}

        def edit(store: dict[str, torch.Tensor]) -> Any:
            def fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
                store[hook.name] = x.detach().clone()
                return x * 1.5 + 0.1  # the hook's output must be used downstream

            return fn

        with tl.hooks(fwd_hooks=[(name, edit(seen["tl"]))]):
            want = tl(tokens)
        final = lean.run(tokens, 0, [(name, edit(seen["lean"]))])
        assert final is not None
        got = lean.logits(final)
        assert _rel(seen["lean"][name], seen["tl"][name]) < 1e-5, name
        assert _rel(got, want) < 1e-5, name


@needs_hooked
def test_lean_local_run_stops_at_its_last_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(TINY_TLENS, ["blocks.1.hook_resid_pre"])
    lean = get_lean_lm(model.tlens_model)
    assert lean is not None
    ran: list[int] = []
    original = LeanLM._block
    monkeypatch.setattr(
        LeanLM, "_block", lambda self, i, *a: ran.append(i) or original(self, i, *a)
    )
    plan = make_plan(model, LossConfigs.model_validate(LOCAL))
    inputs = run_forward(model, torch.randint(0, 97, (2, 16)), plan)
    assert ran == [0, 1]  # block 1 starts (its hook_resid_pre is inside it) and stops there
    assert inputs.orig_logits is None and inputs.orig_final is None


@needs_hooked
def test_unsupported_models_fall_back_to_transformer_lens() -> None:
    model = _model({**TINY_TLENS, "positional_embedding_type": "shortformer"}, TWO_SAES)
    assert get_lean_lm(model.tlens_model) is None
    loss_cfg = LossConfigs.model_validate(E2E)
    plan = make_plan(model, loss_cfg)
    assert plan.runner is model.lm  # TransformerLens, chosen once
    # a shortformer adds its positions inside attention: no shared prefix past the embedding
    assert not model.lm.supports_start_at_layer
    tokens = torch.randint(0, 97, (2, 16))
    inputs = run_forward(model, tokens, plan)
    # the KL gets final residuals here too, and the same value as the reference's logits
    assert inputs.orig_logits is None and inputs.orig_final is not None
    terms = build_loss_terms(loss_cfg, plan.new_cache, kl_chunk_tokens=5)
    ref = compute_losses(terms, run_forward(model, tokens, plan, reference=True))[1]
    got = compute_losses(terms, inputs)[1]
    for k, v in ref.items():
        assert float(got[k].detach()) == pytest.approx(float(v.detach()), rel=1e-5), k


# --- the fast e2e step equals the reference step --------------------------------------------------
@pytest.mark.parametrize("tlens", [TINY_TLENS, LLAMA_TINY], ids=["ln-gelu", "llama"])
@pytest.mark.parametrize("loss", [E2E, E2E_DS, LOCAL], ids=["e2e", "e2e_ds", "local"])
def test_fast_step_equals_reference_losses_and_grads(tlens: dict, loss: dict) -> None:
    model = _model(tlens, TWO_SAES)
    loss_cfg = LossConfigs.model_validate(loss)
    plan = make_plan(model, loss_cfg)
    terms = build_loss_terms(loss_cfg, plan.new_cache, kl_chunk_tokens=5)
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    out = {}
    for reference in (True, False):
        model.saes.zero_grad()
        inputs = run_forward(model, tokens, plan, reference=reference)
        total, values = compute_losses(terms, inputs)
        values = {k: v.detach() for k, v in values.items()}
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.saes.named_parameters() if p.grad is not None}
        out[reference] = (values, grads, inputs)
    ref_values, ref_grads, ref_inputs = out[True]
    values, grads, inputs = out[False]
    for k, v in ref_values.items():
        assert abs(float(values[k]) - float(v)) <= 1e-5 * abs(float(v)), k
    assert grads.keys() == ref_grads.keys() and len(grads) == 8
    for n, g in ref_grads.items():
        assert _rel(grads[n], g) < 1e-5, n
    if "logits_kl" in loss:
        # the fast path never materialises logits; the clean run carries no autograd graph
        assert inputs.new_logits is None and inputs.orig_logits is None
        assert ref_inputs.new_logits is not None
        assert inputs.orig_final is not None and not inputs.orig_final.requires_grad
    assert all(p.grad is None for p in model.tlens_model.parameters())


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
def test_in_to_orig_at_an_sae_position_keeps_that_saes_acts(reference: bool) -> None:
    """E2E_DS compares blocks.2.hook_resid_pre, where the second SAE sits: that SAE keeps its
    SAEActs (sparsity, L0, firing stats) and the spliced value compared there is its input, as in
    the original (what the first SAE made of the residual)."""
    model = _model(TINY_TLENS, TWO_SAES)
    loss_cfg = LossConfigs.model_validate(E2E_DS)
    plan = make_plan(model, loss_cfg)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    inputs = run_forward(model, tokens, plan, reference=reference)
    assert set(inputs.sae_acts) == set(TWO_SAES)
    pos = TWO_SAES[1]
    assert torch.equal(inputs.new_acts[pos], inputs.sae_acts[pos].input)
    terms = build_loss_terms(loss_cfg, plan.new_cache)
    _, values = compute_losses(terms, inputs)
    # the sparsity term counts both SAEs: ||c||_1 mean over tokens / d_in, summed
    want = sum(a.c.norm(p=1, dim=-1).mean() / a.input.shape[-1] for a in inputs.sae_acts.values())
    torch.testing.assert_close(values["sparsity"], want)
    # the second SAE's input differs from the clean activation: the first SAE changed it
    assert not torch.allclose(inputs.new_acts[pos], inputs.orig_acts[pos])


@needs_hooked
def test_bf16_step_runs_and_is_close_to_fp32(config_dict: Any) -> None:
    cfg = load_config(
        config_dict(loss=E2E, saes={"sae_positions": TWO_SAES, "dict_size_to_input_ratio": 2.0})
    )
    values = {}
    for precision in ("fp32", "bf16"):
        t = setup(cfg.model_copy(update={"precision": precision}), device="cpu")
        batches = t.batches(cfg.train_data, cfg.seed)
        values[precision] = t.train_step(batches, TrainState())
        assert t.plan.precision == precision
        # the fastlm path ran (its fp32 self-check is not fooled by the step's autocast)
        assert isinstance(get_lean_lm(t.model.tlens_model, precision), LeanLM)
    for k in ("logits_kl", "sparsity", "loss"):
        assert values["bf16"][k] == pytest.approx(values["fp32"][k], rel=0.05), k


# --- chunked KL -----------------------------------------------------------------------------------
def test_chunked_kl_from_final_equals_unchunked_and_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(50, 8, generator=g), torch.randn(50, generator=g)
    unembed = Unembedding(w, b)
    orig = torch.randn(2, 7, 8, generator=g)
    new = torch.randn(2, 7, 8, generator=g, requires_grad=True)
    # direct: sum_v p (log p - log q), mean over the 14 tokens, in float64
    p = F.softmax((orig @ w.T + b).double(), -1)
    q = F.log_softmax((new @ w.T + b).double(), -1)
    direct = (p * (p.log() - q)).sum(-1).mean()
    direct.backward()
    assert new.grad is not None
    want_grad = new.grad.clone()
    for chunk in (None, 1, 3, 14, 100):
        new.grad = None
        got = kl_from_final(orig, new, unembed, chunk)
        got.backward()
        assert float(got.detach()) == pytest.approx(float(direct.detach()), rel=1e-6), chunk
        assert new.grad is not None and _rel(new.grad, want_grad) < 1e-6, chunk
        unchunked = kl_clean_to_new(orig @ w.T + b, (new @ w.T + b).detach())
        assert float(got.detach()) == pytest.approx(float(unchunked), rel=1e-6)


# --- activation cache -----------------------------------------------------------------------------
def _local_config(config_dict: Any, coeff: float = 0.1) -> Config:
    return load_config(
        config_dict(
            loss={"sparsity": {"coeff": coeff}, "out_to_in": {"coeff": 1.0}},
            saes={"sae_positions": TWO_SAES, "dict_size_to_input_ratio": 2.0},
            n_samples=16,
            max_grad_norm=1.0,
            lr_schedule="cosine",
            warmup_samples=4,
        )
    )


def test_cache_training_matches_lm_training(config_dict: Any, tmp_path: Path) -> None:
    cfg = _local_config(config_dict)
    t = setup(cfg, device="cpu")
    token_batches = [next(t.batches(cfg.train_data, cfg.seed, start=i)) for i in range(4)]
    cache = ActivationCache.build(t.model, token_batches, 4, tmp_path / "acts", progress=False)
    cached = setup(cfg, device="cpu").fed_from_cache()  # the same initial SAE weights
    state = TrainState()
    lm_batches = iter(token_batches)
    for _ in range(4):
        t.train_step(lm_batches, state)
    train_on_same_batches([cached], cache.batches(cfg.batch_size, seed=None), n_steps=4)
    for name, p in t.model.saes.state_dict().items():
        assert_close_scaled(cached.saes.state_dict()[name], p, rtol=1e-5, what=name)
    # on disk: raw arrays that load without pickle, plus a JSON description
    meta = json.loads((tmp_path / "acts" / "meta.json").read_text())
    assert meta["hooks"] == TWO_SAES and meta["n_windows"] == 16
    arr = np.load(tmp_path / "acts" / "blocks.1.hook_resid_pre.npy", allow_pickle=False)
    assert arr.shape == (16, 16, 32) and arr.dtype == np.float32


def test_sweep_from_one_lm_pass_equals_separate_runs(config_dict: Any) -> None:
    cfgs = [_local_config(config_dict, c) for c in (0.05, 0.5)]
    t = setup(cfgs[0], device="cpu")
    token_batches = [next(t.batches(cfgs[0].train_data, 0, start=i)) for i in range(3)]
    calls = []
    acts = lm_activation_batches(t.model, token_batches, TWO_SAES)
    counted = (calls.append(1) or a for a in acts)
    sweep = [setup(c, device="cpu").fed_from_cache() for c in cfgs]
    train_on_same_batches(sweep, counted, n_steps=3)
    assert len(calls) == 3  # one LM pass per batch for both configs
    for c, trained in zip(cfgs, sweep, strict=True):
        alone = setup(c, device="cpu").fed_from_cache()
        train_on_same_batches([alone], lm_activation_batches(t.model, token_batches, TWO_SAES), 3)
        for name, p in alone.saes.state_dict().items():
            assert torch.equal(trained.saes.state_dict()[name], p), name
    w0 = sweep[0].saes.state_dict()["blocks-1-hook_resid_pre.encoder.0.weight"]
    assert not torch.equal(
        w0, sweep[1].saes.state_dict()["blocks-1-hook_resid_pre.encoder.0.weight"]
    )


def test_cache_batches_replay_stored_order_then_reshuffle(config_dict: Any, tmp_path: Path) -> None:
    cfg = _local_config(config_dict)
    t = setup(cfg, device="cpu")
    token_batches = [next(t.batches(cfg.train_data, cfg.seed, start=i)) for i in range(3)]
    cache = ActivationCache.build(t.model, token_batches, 3, tmp_path / "acts", progress=False)
    stored = cache.rows(slice(None))[TWO_SAES[0]]
    it = cache.batches(4, seed=0, in_order_epochs=1)
    first, second = (torch.cat([next(it)[TWO_SAES[0]] for _ in range(3)]) for _ in range(2))
    assert torch.equal(first, stored)  # epoch 0: the order the windows were cached in
    assert not torch.equal(second, stored)  # epoch 1: a permutation of the same windows
    assert sorted(second[:, 0, 0].tolist()) == sorted(stored[:, 0, 0].tolist())
    shuffled = torch.cat([b[TWO_SAES[0]] for b in itertools.islice(cache.batches(4, seed=0), 3)])
    assert not torch.equal(shuffled, stored)  # the default order is shuffled from epoch 0


def test_cache_build_that_runs_out_of_data_leaves_nothing(tmp_path: Path) -> None:
    model = _model(TINY_TLENS, ["blocks.1.hook_resid_pre"])
    batches = [torch.randint(0, 97, (2, 16)) for _ in range(2)]
    with pytest.raises(UserError, match="ran out after 2 of 3"):
        ActivationCache.build(model, batches, 3, tmp_path / "acts", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its temp folder


def test_the_loop_runs_each_config_for_its_own_steps(config_dict: Any, tmp_path: Path) -> None:
    """Runs on one batch stream (`train-cached`'s loop) each take their own number of steps."""
    short, long = (_local_config(config_dict).model_copy(update={"n_samples": n}) for n in (8, 16))
    t = setup(short, device="cpu")
    token_batches = [next(t.batches(short.train_data, 0, start=i)) for i in range(4)]
    both = [setup(c, device="cpu").fed_from_cache() for c in (short, long)]
    runs = []
    for name, b in zip(("short", "long"), both, strict=True):
        (tmp_path / name).mkdir()
        runs.append(Run(b, TrainState(), tmp_path / name, RunLogger(tmp_path / name)))
    rounds: list[int] = []
    acts = lm_activation_batches(t.model, token_batches, TWO_SAES)
    counted = (rounds.append(len(rounds) + 1) or a for a in acts)
    run_loop(runs, counted, token_batches[0].shape[1], progress=False)
    assert [r.state.step for r in runs] == [2, 4] and rounds == [1, 2, 3, 4]
    alone = setup(short, device="cpu").fed_from_cache()
    train_on_same_batches([alone], lm_activation_batches(t.model, token_batches, TWO_SAES))
    for name, p in alone.saes.state_dict().items():
        assert torch.equal(both[0].saes.state_dict()[name], p), name


# --- teacher cache --------------------------------------------------------------------------------
def test_topk_kl_is_the_coarsened_kl_and_its_error_is_tail_mass_times_tail_kl() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 8, generator=g)
    unembed = Unembedding(w)
    orig = 2 * torch.randn(10, 8, generator=g)
    new = (orig + 0.5 * torch.randn(10, 8, generator=g)).requires_grad_(True)
    p = F.softmax(orig @ w.T, -1).double()
    q = F.softmax(new.detach() @ w.T, -1).double()
    exact = (p * (p.log() - q.log())).sum(-1)
    for k in (1, 5, 39, 40):
        rows = topk_distribution(orig @ w.T, k)
        got = kl_topk(rows, new, unembed, chunk_tokens=3)
        tail = torch.ones_like(p, dtype=torch.bool).scatter_(-1, rows.ids, False)
        m_p, m_q = (p * tail).sum(-1), (q * tail).sum(-1)
        # direct: KL between the distributions coarsened to top-k u {tail}
        pt, qt = p.gather(-1, rows.ids), q.gather(-1, rows.ids)
        coarse = (pt * (pt.log() - qt.log())).sum(-1) + torch.where(
            m_p > 0, m_p * (m_p.log() - m_q.log()), 0.0
        )
        assert float(got.detach()) == pytest.approx(float(coarse.mean()), rel=1e-4, abs=1e-7), k
        # the error: tail mass times the KL within the tail (chain rule), >= 0
        pc, qc = p * tail / m_p[:, None].clamp_min(1e-300), q * tail / m_q[:, None]
        tail_kl = torch.where(tail, pc * (pc.clamp_min(1e-300).log() - qc.log()), 0.0).sum(-1)
        err = exact.mean() - float(got.detach())
        assert float(err) == pytest.approx(float((m_p * tail_kl).mean()), rel=1e-3, abs=1e-6)
        assert float(err) >= -1e-6
        # its gradient is that of the coarsened KL
        got.backward()
        assert new.grad is not None
        ng = new.grad.clone()
        new.grad = None
        new2 = new.detach().clone().requires_grad_(True)
        q2 = F.log_softmax(new2 @ w.T, -1)
        q2_tail = q2.masked_fill(~tail, float("-inf")).logsumexp(-1)
        ref = -(pt.float() * q2.gather(-1, rows.ids)).sum(-1) - m_p.float() * q2_tail
        ref.mean().backward()
        assert new2.grad is not None and _rel(ng, new2.grad) < 1e-4, k


def test_teacher_cache_round_trip(tmp_path: Path) -> None:
    model = _model(TINY_TLENS, ["blocks.1.hook_resid_pre"])
    batches = [
        torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    cache = TeacherCache.build(model, batches, 2, tmp_path / "teacher", k=8, progress=False)
    rows = cache.lookup(torch.cat([batches[1][1:], batches[0][:1]]))
    want = topk_distribution(model.tlens_model(torch.cat([batches[1][1:], batches[0][:1]])), 8)
    assert torch.equal(rows.ids, want.ids)
    assert torch.allclose(rows.logp, want.logp, atol=1e-5)
    assert torch.allclose(rows.tail, want.tail, atol=1e-6)


@pytest.mark.parametrize("k", [97, 8])
def test_training_with_a_teacher_cache(config_dict: Any, tmp_path: Path, k: int) -> None:
    """k = d_vocab keeps everything (tail mass 0): the same step as with the clean pass."""
    cfg = load_config(
        config_dict(loss=E2E, saes={"sae_positions": TWO_SAES, "dict_size_to_input_ratio": 2.0})
    )
    t = setup(cfg, device="cpu")
    batches = [next(t.batches(cfg.train_data, cfg.seed, start=i)) for i in range(2)]
    TeacherCache.build(t.model, batches, 2, tmp_path / "teacher", k=k, progress=False)
    taught = setup(cfg.model_copy(update={"teacher_cache": tmp_path / "teacher"}), device="cpu")
    got = [taught.train_step(iter([b]), TrainState()) for b in batches]
    want = [t.train_step(iter([b]), TrainState()) for b in batches]
    for g, w in zip(got, want, strict=True):
        if k == 97:
            assert g["logits_kl"] == pytest.approx(w["logits_kl"], rel=1e-5)
        else:  # a lower bound of the exact KL
            assert 0 < g["logits_kl"] <= w["logits_kl"] * (1 + 1e-6)
    if k == 97:
        for name, p in t.model.saes.state_dict().items():
            assert torch.allclose(taught.model.saes.state_dict()[name], p, atol=1e-6), name
    with pytest.raises(UserError, match="not in the cache"):
        taught.train_step(iter([torch.zeros_like(batches[0])]), TrainState())


@needs_hooked
def test_layout_cache_follows_weight_changes_and_does_not_keep_models_alive() -> None:
    import gc
    import weakref

    model = _model(TINY_TLENS, ["blocks.1.hook_resid_pre"])
    tl = model.tlens_model
    lean = get_lean_lm(tl)
    assert lean is not None and get_lean_lm(tl) is lean
    tokens = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        tl.blocks[1].attn.W_Q.mul_(2.0)  # an in-place edit: the layout is rebuilt
    fresh = get_lean_lm(tl)
    assert fresh is not None and fresh is not lean
    final = fresh.run(tokens)
    assert final is not None and _rel(fresh.logits(final), tl(tokens)) < 1e-5
    ref = weakref.ref(tl)
    del model, tl, lean, fresh
    gc.collect()
    assert ref() is None
