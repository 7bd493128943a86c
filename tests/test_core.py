"""Core library: losses vs direct computations, SAE, splicing, training, save/load, config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_TLENS, assert_close_scaled
from pydantic import ValidationError

from e2e_sae import SAE, Config, SAETransformer, load_config
from e2e_sae.cli import main
from e2e_sae.config import LossConfigs
from e2e_sae.errors import ConfigError
from e2e_sae.lm.load import build_random_model
from e2e_sae.objective.forward import make_plan, run_forward
from e2e_sae.objective.losses import (
    InToOrigLoss,
    LogitsKLLoss,
    LossInputs,
    OutToInLoss,
    OutToOrigLoss,
    SparsityLoss,
    build_loss_terms,
    compute_losses,
    kl_clean_to_new,
)
from e2e_sae.saes import SAEActs
from e2e_sae.training.engine import lr_schedule
from e2e_sae.training.runlog import read_metrics
from e2e_sae.training.trainer import train


def tiny_model() -> Any:
    """A random TINY_TLENS model (a HookedTransformer; on TransformerLens 4.x a bridge)."""
    return build_random_model(TINY_TLENS, device="cpu").train()


# --- losses ---
def _acts(seed: int = 0, d_in: int = 6, d_sae: int = 10) -> SAEActs:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, d_in, generator=g)
    c = torch.relu(torch.randn(2, 3, d_sae, generator=g))
    out = torch.randn(2, 3, d_in, generator=g)
    return SAEActs(x, c, out)


def test_sparsity_loss_is_lp_norm_mean_over_tokens_divided_by_d_in() -> None:
    a, b = _acts(0), _acts(1, d_in=4, d_sae=8)
    for p in (1.0, 2.0, 0.5):
        got = SparsityLoss(1.0, p)(LossInputs(sae_acts={"a": a, "b": b}))
        want = 0.0
        for acts in (a, b):
            c = acts.c.reshape(-1, acts.c.shape[-1])
            per_token = [sum(float(v) ** p for v in row) ** (1 / p) for row in c]
            want += sum(per_token) / len(per_token) / acts.input.shape[-1]
        assert float(got) == pytest.approx(want, rel=1e-5)


def test_mse_terms_against_direct_computation() -> None:
    a = _acts(0)
    clean = torch.randn_like(a.output)
    direct_in = ((a.output - a.input) ** 2).sum() / a.output.numel()
    direct_orig = ((a.output - clean) ** 2).sum() / a.output.numel()
    inputs = LossInputs(sae_acts={"h": a}, orig_acts={"h": clean})
    assert float(OutToInLoss(1.0)(inputs)) == pytest.approx(float(direct_in), rel=1e-6)
    assert float(OutToOrigLoss(1.0)(inputs)) == pytest.approx(float(direct_orig), rel=1e-6)


def test_in_to_orig_splits_total_coeff_evenly() -> None:
    g = torch.Generator().manual_seed(3)
    new = {h: torch.randn(2, 3, 4, generator=g) for h in ("x", "y")}
    orig = {h: torch.randn(2, 3, 4, generator=g) for h in ("x", "y")}
    term = InToOrigLoss(2.5, ["x", "y"])
    inputs = LossInputs(sae_acts={}, orig_acts=orig, new_acts=new)
    total, values = compute_losses([term], inputs)
    mse = [float(((new[h] - orig[h]) ** 2).mean()) for h in ("x", "y")]
    assert float(total) == pytest.approx(2.5 / 2 * mse[0] + 2.5 / 2 * mse[1], rel=1e-6)
    assert float(values["in_to_orig"]) == pytest.approx(sum(mse) / 2, rel=1e-6)


def test_logits_kl_is_kl_clean_to_spliced_per_token_mean() -> None:
    """KL(P_orig || P_new) by hand, and it is not the reverse direction."""
    orig = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    new = torch.tensor([[[0.0, 1.0, 0.0], [3.0, -2.0, 0.5]]])
    per_token = []
    for t in range(2):
        p = [math.exp(v) for v in orig[0, t].tolist()]
        q = [math.exp(v) for v in new[0, t].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        per_token.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))
    want = sum(per_token) / 2
    got = LogitsKLLoss(1.0)(LossInputs(sae_acts={}, orig_logits=orig, new_logits=new))
    assert float(got) == pytest.approx(want, rel=1e-6)
    reverse = float(kl_clean_to_new(new, orig))
    assert abs(reverse - want) > 1e-2
    # the original library's formula on flattened tokens
    lib = F.kl_div(
        F.log_softmax(new.reshape(-1, 3), -1),
        F.log_softmax(orig.reshape(-1, 3), -1),
        log_target=True,
        reduction="batchmean",
    )
    assert float(got) == pytest.approx(float(lib), rel=1e-6)
    assert float(kl_clean_to_new(orig, new, chunk_tokens=1)) == pytest.approx(want, rel=1e-6)


def test_zero_coeff_terms_are_computed_but_not_optimised() -> None:
    a = _acts(0)
    total, values = compute_losses([OutToInLoss(0.0), SparsityLoss(1.0)], LossInputs({"h": a}))
    assert float(values["out_to_in"]) > 0
    assert float(total) == pytest.approx(float(values["sparsity"]))


# --- SAE ---
def test_sae_forward_matches_direct_computation() -> None:
    torch.manual_seed(0)
    sae = SAE(8, 24)
    with torch.no_grad():
        sae.decoder.weight.mul_(3.0)  # forward must renormalise the columns
    x = torch.randn(5, 8)
    out, c = sae(x)
    w_enc, b_enc = sae.encoder[0].weight, sae.encoder[0].bias
    w_dec = sae.decoder.weight / sae.decoder.weight.norm(dim=0, keepdim=True)
    assert torch.allclose(c, torch.relu(x @ w_enc.T + b_enc))
    assert torch.allclose(out, c @ w_dec.T + sae.decoder.bias, atol=1e-6)
    assert torch.allclose(sae.dict_elements.norm(dim=0), torch.ones(24), atol=1e-6)


def test_orthogonal_decoder_init() -> None:
    torch.manual_seed(0)
    sae = SAE(8, 16)
    w = sae.decoder.weight  # [8, 16]: rows orthonormal
    assert torch.allclose(w @ w.T, torch.eye(8), atol=1e-5)


# --- splicing ---
def test_positions_match_substrings_and_reject_unknown_hooks() -> None:
    model = SAETransformer(tiny_model(), ["hook_resid_pre"], 2.0)
    assert model.sae_positions == [f"blocks.{i}.hook_resid_pre" for i in range(3)]
    assert model.sae("blocks.0.hook_resid_pre").n_dict_components == 64
    with pytest.raises(ConfigError, match="saes.sae_positions: 'blocks.9.nope'"):
        SAETransformer(tiny_model(), ["blocks.9.nope"], 2.0)


def test_forward_raw_and_forward_shapes_and_identity() -> None:
    torch.manual_seed(0)
    model = SAETransformer(tiny_model(), ["blocks.1.hook_resid_pre"], 2.0)
    tokens = torch.randint(0, 97, (2, 16))
    logits, cache = model.forward_raw(tokens, cache_positions=["blocks.1.hook_resid_pre"])
    assert logits is not None and logits.shape == (2, 16, 97)
    assert torch.allclose(logits, model.tlens_model(tokens))
    new_logits, acts = model.forward(tokens, ["blocks.1.hook_resid_pre"])
    a = acts["blocks.1.hook_resid_pre"]
    assert isinstance(a, SAEActs)
    assert torch.allclose(a.input, cache["blocks.1.hook_resid_pre"])
    # splicing the SAE output in by hand gives the same logits
    manual = model.tlens_model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: a.output)]
    )
    assert new_logits is not None and torch.allclose(new_logits, manual, atol=1e-6)


def test_local_run_never_executes_layers_past_its_sae() -> None:
    model = SAETransformer(tiny_model(), ["blocks.1.hook_resid_pre"], 2.0)
    calls = {i: 0 for i in range(3)}
    for i, block in enumerate(model.tlens_model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    calls_unembed = []
    model.tlens_model.unembed.register_forward_pre_hook(lambda m, a: calls_unembed.append(1))
    plan = make_plan(model, LossConfigs.model_validate({"out_to_in": {"coeff": 1.0}}))
    # the TransformerLens path (the fastlm path's early stop: tests/test_perf_paths.py)
    run_forward(model, torch.randint(0, 97, (2, 16)), plan, reference=True)
    # block 1 starts (its hook_resid_pre lives inside it) but stops at that hook
    assert calls[2] == 0 and not calls_unembed
    assert calls[0] == 1


def test_fast_e2e_path_equals_reference_path() -> None:
    torch.manual_seed(0)
    model = SAETransformer(tiny_model(), ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"], 2)
    loss_cfg = LossConfigs.model_validate(
        {
            "sparsity": {"coeff": 0.5},
            "logits_kl": {"coeff": 1.0},
            "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_post"], "total_coeff": 1.0},
        }
    )
    plan = make_plan(model, loss_cfg)
    terms = build_loss_terms(loss_cfg, plan.new_cache)
    tokens = torch.randint(0, 97, (2, 16))
    results = []
    for reference in (True, False):
        model.saes.zero_grad()
        total, values = compute_losses(terms, run_forward(model, tokens, plan, reference))
        total.backward()
        grads = [p.grad.clone() for p in model.saes.parameters()]  # type: ignore[union-attr]
        results.append((total.detach(), grads))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    for g0, g1 in zip(results[0][1], results[1][1], strict=True):
        assert_close_scaled(g1, g0, rtol=1e-5, what="SAE gradient")
    assert all(p.grad is None for p in model.tlens_model.parameters())


# --- training ---
LOSS_SETUPS = {
    "local": {"sparsity": {"coeff": 0.01}, "out_to_in": {"coeff": 1.0}},
    "e2e": {"sparsity": {"coeff": 0.01}, "logits_kl": {"coeff": 1.0}},
    "e2e_ds": {
        "sparsity": {"coeff": 0.01},
        "logits_kl": {"coeff": 1.0},
        "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_pre"], "total_coeff": 1.0},
    },
}


@pytest.mark.parametrize("setup", list(LOSS_SETUPS))
def test_a_few_steps_lower_the_loss(setup: str, config_dict) -> None:
    cfg = load_config(config_dict(loss=LOSS_SETUPS[setup], n_samples=96, lr=3e-3, batch_size=4))
    run_dir = train(cfg, progress=False)
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert (run_dir / "final_config.yaml").exists()
    assert (run_dir / "samples_96.safetensors").exists()
    evals = [r for r in read_metrics(run_dir) if "eval/ce_loss_clean" in r]
    assert evals and "eval/l0/blocks.1.hook_resid_pre" in evals[-1]


def test_save_and_from_local_path_give_identical_outputs(config_dict) -> None:
    cfg = load_config(config_dict(loss=LOSS_SETUPS["e2e"], n_samples=16))
    run_dir = train(cfg, progress=False)
    loaded = SAETransformer.from_local_path(run_dir)
    again = SAETransformer.from_local_path(run_dir / "samples_16.safetensors")
    tokens = torch.randint(0, 97, (2, 16))
    la, aa = loaded(tokens)
    lb, ab = again(tokens)
    assert la is not None and lb is not None and torch.equal(la, lb)
    pos = "blocks.1.hook_resid_pre"
    assert torch.equal(aa[pos].output, ab[pos].output)
    # the loaded SAE is the trained one, not a fresh init
    fresh = SAETransformer(loaded.tlens_model, [pos], 2.0)
    assert not torch.equal(fresh.sae(pos).encoder[0].weight, loaded.sae(pos).encoder[0].weight)


def test_gradient_accumulation_equals_the_big_batch(config_dict, tmp_path: Path) -> None:
    base = {"loss": LOSS_SETUPS["e2e"], "n_samples": 16, "lr": 1e-3, "eval_n_samples": None}
    big = train(load_config(config_dict(**base, batch_size=8, run_name="big")), progress=False)
    acc = train(
        load_config(config_dict(**base, batch_size=4, effective_batch_size=8, run_name="acc")),
        progress=False,
    )
    a = SAETransformer.from_local_path(big).sae("blocks.1.hook_resid_pre")
    b = SAETransformer.from_local_path(acc).sae("blocks.1.hook_resid_pre")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_runs_are_deterministic_given_the_seed(config_dict) -> None:
    cfg = config_dict(loss=LOSS_SETUPS["local"], n_samples=16, eval_n_samples=None)
    a = train(load_config({**cfg, "run_name": "a"}), progress=False)
    b = train(load_config({**cfg, "run_name": "b"}), progress=False)
    sa = SAETransformer.from_local_path(a).saes.state_dict()
    sb = SAETransformer.from_local_path(b).saes.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lr_schedule_warmup_then_decay_to_min_factor(config_dict) -> None:
    for schedule in ("cosine", "linear"):
        cfg = load_config(
            config_dict(n_samples=400, batch_size=4, warmup_samples=40, lr_schedule=schedule)
        )
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        lr_lambda = lr_schedule(opt, cfg, cfg.n_grad_steps).lr_lambdas[0]
        assert lr_lambda(0) == pytest.approx(0.1)
        assert lr_lambda(9) == pytest.approx(1.0)
        assert lr_lambda(10) == pytest.approx(1.0)
        assert lr_lambda(100) == pytest.approx(0.1)
        mid = lr_lambda(55)
        assert mid == pytest.approx(0.55, abs=1e-6)  # half-way: both schedules give the midpoint


# --- config and CLI ---
ORIGINAL_STYLE = """
wandb_project: null
wandb_run_name: null
wandb_run_name_prefix: ""
seed: 0
tlens_model_name: gpt2-small
tlens_model_path: null
n_samples: 400_000
save_every_n_samples: null
eval_every_n_samples: 40_000
eval_n_samples: 500
log_every_n_grad_steps: 20
collect_act_frequency_every_n_samples: 40_000
act_frequency_n_tokens: 500_000
batch_size: 8
effective_batch_size: 16
lr: 5e-4
lr_schedule: cosine
min_lr_factor: 0.1
warmup_samples: 20_000
max_grad_norm: 10.0
loss:
  sparsity: {p_norm: 1.0, coeff: 1.5}
  in_to_orig:
    hook_positions: [blocks.7.hook_resid_pre, blocks.8.hook_resid_pre]
    total_coeff: 2.5
  out_to_orig: null
  out_to_in: {coeff: 0.0}
  logits_kl: {coeff: 0.5}
train_data:
  dataset_name: apollo-research/Skylion007-openwebtext-tokenizer-gpt2
  is_tokenized: true
  tokenizer_name: gpt2
  streaming: true
  split: train
  n_ctx: 1024
eval_data:
  dataset_name: apollo-research/Skylion007-openwebtext-tokenizer-gpt2
  is_tokenized: true
  tokenizer_name: gpt2
  streaming: true
  split: train
  n_ctx: 1024
saes:
  retrain_saes: false
  pretrained_sae_paths: null
  sae_positions: blocks.6.hook_resid_pre
  dict_size_to_input_ratio: 60.0
"""


def test_original_schema_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "orig.yaml"
    path.write_text(ORIGINAL_STYLE)
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.saes.sae_positions == ["blocks.6.hook_resid_pre"]
    assert cfg.grad_accum_steps == 2 and cfg.n_grad_steps == 25_000
    assert cfg.loss.in_to_orig is not None and cfg.loss.in_to_orig.coeff == 1.25
    with pytest.raises(ValidationError):  # frozen
        cfg.lr = 1.0  # type: ignore[misc]


def test_dry_run_prints_the_resolved_config(tmp_path: Path, capsys) -> None:
    path = tmp_path / "orig.yaml"
    path.write_text(ORIGINAL_STYLE)  # gpt2-small is not loadable offline: dry-run must not try
    assert main(["train", str(path), "--dry-run"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["saes"]["sae_positions"] == ["blocks.6.hook_resid_pre"]
    assert out["lr_schedule"] == "cosine" and out["saes"]["architecture"] == "relu"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"bogus_key": 1}, "bogus_key: unknown key"),
        ({"lr": "fast"}, "lr:"),
        ({"effective_batch_size": 6}, "multiple of batch_size"),
        ({"tlens_model_name": "gpt2"}, "exactly one of tlens_model_name"),
        ({"tlens_config": None}, "exactly one of tlens_model_name"),
        ({"saes": {"sae_positions": ["blocks.7.hook_nothing"]}}, "saes.sae_positions"),
        ({"train_data": {"dataset_name": "/no/such/dir", "n_ctx": 16}}, "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_dir(
    change, needle, config_dict, tmp_path: Path, capsys
) -> None:
    cfg = config_dict()
    cfg.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "runs").exists()


def test_missing_required_field(config_dict, tmp_path: Path, capsys) -> None:
    cfg = config_dict()
    del cfg["batch_size"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--dry-run"]) == 2
    assert "batch_size: required field is missing" in capsys.readouterr().err
