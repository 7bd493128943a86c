"""Eval metrics vs direct computations; sweeps, plots, dictionary geometry, feature browser."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_TLENS, make_config_dict

from e2e_sae.analysis.browser import (
    collect_feature_data,
    parse_features,
    top_windows_update,
    write_browser,
)
from e2e_sae.analysis.geometry import load_dictionary, max_cosine_similarity
from e2e_sae.analysis.plots import (
    interpolate_x_at_y,
    interpolate_y_at_x,
    load_runs,
    pareto_front,
    sae_type,
)
from e2e_sae.cli import main
from e2e_sae.config import Config, load_config, set_dotted
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.eval.evaluate import (
    _SAEStats,
    evaluate,
    evaluate_run,
    firing_counts,
    layer_normalize,
    next_token_ce,
    read_eval,
    read_feature_frequency,
    top1_agreement,
    total_variation,
)
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.objective.forward import make_plan
from e2e_sae.objective.losses import build_loss_terms
from e2e_sae.saes import SAEActs
from e2e_sae.training.sweep import flatten_parameters, load_sweep, wandb_sweep_config
from e2e_sae.training.trainer import train

# The shape of the original library's W&B sweep files (gpt2_e2e_recon_sweep.yaml, shortened).
WANDB_SWEEP = """
program: e2e_sae/scripts/train_tlens_saes/run_train_tlens_saes.py
name: gpt2-e2e
method: grid
metric: {name: val_loss, goal: minimize}
parameters:
  seed: {values: [0]}
  n_samples: {values: [400_000]}
  lr: {values: [5e-4]}
  loss:
    parameters:
      sparsity:
        parameters:
          coeff: {values: [0.8, 2.5, 5]}
      in_to_orig:
        parameters:
          hook_positions: {values: [[blocks.11.hook_resid_pre]]}
          total_coeff: {values: [0.05, 0.1]}
      out_to_orig: {values: [null]}
      logits_kl:
        parameters:
          coeff: {values: [0.5]}
  saes:
    parameters:
      sae_positions:
        values:
          - blocks.10.hook_resid_pre
command:
- ${env}
- ${interpreter}
- ${program}
- e2e_sae/scripts/train_tlens_saes/gpt2_e2e_recon.yaml
"""
GPT2_DEPTH = {**TINY_TLENS, "n_layers": 12}  # (the hooks GPT-2 sweeps name exist)
E2E_LOSS = {"sparsity": {"coeff": 0.1}, "logits_kl": {"coeff": 1.0}}
DS_LOSS = {
    **E2E_LOSS,
    "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_pre"], "total_coeff": 1},
}


def _config(data: Path, save: Path, **kw: Any) -> Config:
    cfg = load_config(make_config_dict(data, save, **kw))
    assert isinstance(cfg, Config)
    return cfg


@pytest.fixture(scope="module")
def runs(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny trained runs: local (seeds 0 and 1), e2e and e2e+ds."""
    root = tmp_path_factory.mktemp("runs")
    specs = {
        "local0": {},
        "local1": {"seed": 1},
        "e2e": {"loss": E2E_LOSS},
        "ds": {"loss": DS_LOSS},
    }
    return {
        name: train(_config(token_data, root, **kw), root / name, progress=False)
        for name, kw in specs.items()
    }


@pytest.fixture
def model(token_data: Path, tmp_path: Path) -> SAETransformer:
    cfg = _config(
        token_data,
        tmp_path,
        saes={"sae_positions": ["blocks.1.hook_resid_pre"], "dict_size_to_input_ratio": 2.0},
    )
    m = SAETransformer.from_config(cfg, device="cpu")
    m.run_config = cfg  # type: ignore[attr-defined]
    return m


def _batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (4, 16), generator=g) for _ in range(n)]


def _eval(model: SAETransformer, batches: list[torch.Tensor]):
    cfg: Config = model.run_config  # type: ignore[attr-defined]
    plan = make_plan(model, cfg.loss, force_full_pass=True)
    return evaluate(model, iter(batches), len(batches), plan, build_loss_terms(cfg.loss))


# --- metric formulas ------------------------------------------------------------------------------
def test_metric_formulas_match_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    ce = F.cross_entropy(a[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    assert next_token_ce(a, tokens) == pytest.approx(float(ce), rel=1e-6)
    p, q = a.softmax(-1).reshape(-1, 11), b.softmax(-1).reshape(-1, 11)
    tvd = sum(0.5 * sum(abs(float(p[i, v] - q[i, v])) for v in range(11)) for i in range(15)) / 15
    assert float(total_variation(a, b, chunk_tokens=4)) == pytest.approx(tvd, rel=1e-5)
    assert float(total_variation(a, a)) == pytest.approx(0.0, abs=1e-7)
    agree = sum(
        int(a.reshape(-1, 11)[i].argmax() == b.reshape(-1, 11)[i].argmax()) for i in range(15)
    )
    assert float(top1_agreement(a, b)) == pytest.approx(agree / 15)
    x = torch.randn(4, 7, generator=g) * 3 + 1
    assert torch.allclose(layer_normalize(x), F.layer_norm(x, (7,), eps=1e-5), atol=1e-6)


def test_l0_and_alive_counts_on_a_known_code_matrix() -> None:
    # 4 tokens x 5 latents; latent 3 never fires, latent 4 fires once with a negative value.
    c = torch.tensor([[1.0, 0, 2, 0, 0], [0, 0, 3, 0, -1], [5, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    assert firing_counts(c).tolist() == [3, 1, 3, 0, 1]
    stats = _SAEStats()
    x = torch.randn(4, 3)
    stats.update(x[:2], c[:2], x[:2])
    stats.update(x[2:], c[2:], x[2:])  # the counts accumulate over batches
    r = stats.result()
    assert r["l0"] == pytest.approx((2 + 2 + 1 + 3) / 4)
    assert (r["alive_dict_elements"], r["dead_dict_elements"]) == (4, 1)
    assert stats.counts is not None and stats.counts.tolist() == [3, 1, 3, 0, 1]


def saebench_core(x: torch.Tensor, x_hat: torch.Tensor, c: torch.Tensor) -> dict[str, float]:
    """SAEBench's core-eval formulas (get_sparsity_and_variance_metrics), written out on one batch
    holding every token; l1 with abs (equal for the non-negative codes SAEBench assumes)."""
    l2_in, l2_out = x.norm(dim=-1), x_hat.norm(dim=-1)
    l2_in_for_div = l2_in.clone()
    l2_in_for_div[l2_in_for_div.abs() < 0.0001] = 1
    cos = [float(x[i] @ x_hat[i] / (x[i].norm() * x_hat[i].norm())) for i in range(len(x))]
    return {
        "l2_ratio": float((l2_out / l2_in_for_div).mean()),
        "relative_reconstruction_bias": float((l2_out**2).mean() / (x * x_hat).sum(-1).mean()),
        "cossim": sum(cos) / len(cos),
        "l1": float(c.abs().sum(-1).mean()),
    }


def test_saebench_core_metrics_pool_all_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    x[3] = 1e-6  # below SAEBench's 1e-4: its l2_ratio divides by 1 there
    x_hat = 0.7 * x + 0.3 * torch.randn(10, 6, generator=g, dtype=torch.float64)
    x_hat[7:] *= 4  # the batches differ, so a mean of per-batch ratios would not match
    c = torch.randn(10, 9, generator=g, dtype=torch.float64).relu()
    stats = _SAEStats()
    stats.update(x[:7], c[:7], x_hat[:7])
    stats.update(x[7:], c[7:], x_hat[7:])
    r, want = stats.result(), saebench_core(x, x_hat, c)
    for key, value in want.items():
        assert r[key] == pytest.approx(value, rel=1e-12), key
    assert r["l2_ratio"] == pytest.approx(
        float(sum(x_hat[i].norm() / (1 if i == 3 else x[i].norm()) for i in range(10)) / 10)
    )
    per_batch = [
        saebench_core(x[s], x_hat[s], c[s])["relative_reconstruction_bias"]
        for s in (slice(0, 7), slice(7, 10))
    ]
    assert abs(sum(per_batch) / 2 - r["relative_reconstruction_bias"]) > 0.01
    # perfect reconstruction: every ratio is 1; a zero reconstruction has cossim 0 (not NaN)
    exact = _SAEStats()
    exact.update(x[4:], c[4:], x[4:])  # (not row 3, whose l2_ratio divides by 1)
    assert [exact.result()[k] for k in ("l2_ratio", "relative_reconstruction_bias", "cossim")] == [
        pytest.approx(1.0, rel=1e-12)
    ] * 3
    zero = _SAEStats()
    zero.update(x, c, torch.zeros_like(x))
    assert (zero.result()["cossim"], zero.result()["l2_ratio"]) == (0.0, 0.0)


# --- evaluate() with special SAEs -----------------------------------------------------------------
def test_identity_sae_loses_nothing(model: SAETransformer, monkeypatch) -> None:
    sae = model.sae("blocks.1.hook_resid_pre")
    code = torch.zeros(sae.n_dict_components)
    code[[0, 5]] = 1.0  # two latents always on, the rest dead

    monkeypatch.setattr(sae, "forward", lambda x: (x, code.expand(*x.shape[:-1], -1)))
    r = _eval(model, _batches())
    m = r.metrics
    assert m["ce_loss_increase"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["tvd"] == pytest.approx(0.0, abs=1e-6)
    assert m["top1_agreement"] == 1.0
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
    s = r.per_sae["blocks.1.hook_resid_pre"]
    assert s["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert s["explained_variance_ln"] == pytest.approx(1.0, abs=1e-9)
    assert (s["l0"], s["alive_dict_elements"], s["dead_dict_elements"]) == (2, 2, 62)
    assert s["l1"] == 2.0
    for key in ("l2_ratio", "relative_reconstruction_bias", "cossim"):
        assert s[key] == pytest.approx(1.0, abs=1e-6), key
    assert set(r.downstream) == {"blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"}
    assert all(d["explained_variance"] == pytest.approx(1.0) for d in r.downstream.values())
    assert r.feature_frequency("blocks.1.hook_resid_pre")[[0, 5]].tolist() == [1.0, 1.0]


def test_zero_output_sae_recovers_nothing(model: SAETransformer, monkeypatch) -> None:
    sae = model.sae("blocks.1.hook_resid_pre")
    monkeypatch.setattr(
        sae, "forward", lambda x: (torch.zeros_like(x), torch.zeros(*x.shape[:-1], 64))
    )
    m = _eval(model, _batches()).metrics
    assert m["ce_loss_with_saes"] == pytest.approx(m["ce_loss_zero_abl"], rel=1e-6)
    assert m["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl_div_score"] == pytest.approx(0.0, abs=1e-5)
    assert m["kl"] > 0


def test_evaluate_matches_direct_computation(model: SAETransformer) -> None:
    pos = "blocks.1.hook_resid_pre"
    later = ["blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"]
    batches = _batches(3)
    r = _eval(model, batches)
    tl = model.tlens_model
    tokens = torch.cat(batches)
    with torch.no_grad():
        out_clean, cache = tl.run_with_cache(tokens)
        new, acts = model.forward(tokens, cache_positions=later)
        with tl.hooks(fwd_hooks=[(pos, lambda x, hook: torch.zeros_like(x))]):
            zero = tl(tokens)
    clean = cast(torch.Tensor, out_clean)
    assert new is not None and isinstance(zero, torch.Tensor)
    v = clean.shape[-1]

    def ce(logits: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, v), tokens[:, 1:].reshape(-1)))

    def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
        lp, lq = p_logits.log_softmax(-1).reshape(-1, v), q_logits.log_softmax(-1).reshape(-1, v)
        return float(F.kl_div(lq, lp, log_target=True, reduction="batchmean"))

    def ev(t: torch.Tensor, x: torch.Tensor) -> float:
        t, x = t.reshape(-1, t.shape[-1]).double(), x.reshape(-1, x.shape[-1]).double()
        return float(1 - ((t - x) ** 2).sum() / ((t - t.mean(0)) ** 2).sum())

    m = r.metrics
    assert m["ce_loss_clean"] == pytest.approx(ce(clean), rel=1e-5)
    assert m["ce_loss_with_saes"] == pytest.approx(ce(new), rel=1e-5)
    assert m["ce_loss_zero_abl"] == pytest.approx(ce(zero), rel=1e-5)
    assert m["ce_loss_score"] == pytest.approx(
        (ce(zero) - ce(new)) / (ce(zero) - ce(clean)), rel=1e-4
    )
    assert m["kl"] == pytest.approx(kl(clean, new), rel=1e-4)
    assert m["kl_div_score"] == pytest.approx(1 - kl(clean, new) / kl(clean, zero), rel=1e-4)
    p, q = clean.softmax(-1), new.softmax(-1)
    assert m["tvd"] == pytest.approx(float(0.5 * (p - q).abs().sum(-1).mean()), rel=1e-4)
    assert m["top1_agreement"] == pytest.approx(
        float((clean.argmax(-1) == new.argmax(-1)).float().mean())
    )
    assert m["n_tokens"] == tokens.numel()
    sae_acts = acts[pos]
    assert isinstance(sae_acts, SAEActs)
    sae_in, c, out = sae_acts
    s = r.per_sae[pos]
    assert s["explained_variance"] == pytest.approx(ev(sae_in, out), rel=1e-5)
    ln = (F.layer_norm(sae_in, (32,), eps=1e-5), F.layer_norm(out, (32,), eps=1e-5))
    assert s["explained_variance_ln"] == pytest.approx(ev(*ln), rel=1e-5)
    assert s["mse"] == pytest.approx(float(F.mse_loss(out, sae_in)), rel=1e-5)
    assert s["l0"] == pytest.approx(float((c != 0).sum(-1).float().mean()), rel=1e-6)
    assert s["alive_dict_elements"] == int((c != 0).reshape(-1, 64).any(0).sum())
    flat = [t.reshape(-1, t.shape[-1]).double() for t in (sae_in, out, c)]
    for key, value in saebench_core(*flat).items():
        assert s[key] == pytest.approx(value, rel=1e-5), key
    for h in later:
        assert r.downstream[h]["explained_variance"] == pytest.approx(
            ev(cache[h], acts[h].input), rel=1e-5
        )
        assert r.downstream[h]["mse"] == pytest.approx(
            float(F.mse_loss(acts[h].input, cache[h])), rel=1e-5
        )
    assert [r.downstream[h]["layer"] for h in later] == [2, 3]


def test_eval_cli_writes_eval_json(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    run = runs["e2e"]
    out = tmp_path / "e.json"
    assert main(["eval", str(run), "--n-tokens", "64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ce_loss_score" in text and "downstream" in text
    assert "relative_reconstruction_bias" in text and "cossim" in text
    ev = json.loads(out.read_text())
    for key in (
        "ce_loss_clean",
        "ce_loss_with_saes",
        "ce_loss_increase",
        "kl",
        "kl_div_score",
        "ce_loss_score",
        "top1_agreement",
        "tvd",
    ):
        assert isinstance(ev[key], float), key
    sae = ev["per_sae"]["blocks.1.hook_resid_pre"]
    assert {
        "l0",
        "alive_dict_elements",
        "explained_variance",
        "explained_variance_ln",
        "mse",
        "l1",
        "l2_ratio",
        "relative_reconstruction_bias",
        "cossim",
    } <= set(sae)
    assert ev["n_tokens"] == 64  # 64 tokens = one batch of 4 x 16
    # The same call through the library gives the same numbers.
    again = evaluate_run(run, n_tokens=64)
    assert again.metrics["kl"] == pytest.approx(ev["kl"], rel=1e-6)
    assert main(["eval", str(tmp_path / "nope")]) == 2


# --- sweeps ---------------------------------------------------------------------------------------
def test_sweep_formats_expand_to_the_same_grid(token_data: Path, tmp_path: Path) -> None:
    params = {"a": {"b": 1}, "c": None}
    set_dotted(params, "a.d.e", [1, 2])
    set_dotted(params, "c.x", 3)
    assert params == {"a": {"b": 1, "d": {"e": [1, 2]}}, "c": {"x": 3}}
    ours = {"loss.sparsity.coeff": [0.1, 1.0], "seed": {"values": [0, 1]}, "lr": 0.01}
    coeff = {"coeff": {"values": [0.1, 1.0]}}
    nested = {
        "loss": {"parameters": {"sparsity": {"parameters": coeff}}},
        "seed": {"values": [0, 1]},
        "lr": {"value": 0.01},
    }
    assert flatten_parameters(ours, "s") == flatten_parameters(nested, "s")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(make_config_dict(token_data, tmp_path / "runs")))
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"base_config": "base.yaml", "parameters": ours}))
    sweep = load_sweep(sweep_file)
    assert len(sweep.runs) == 4 and sweep.varied == ["loss.sparsity.coeff", "seed"]
    got = [
        (r.config.loss.sparsity.coeff, r.config.seed) for r in sweep.runs if r.config.loss.sparsity
    ]
    assert got == [(0.1, 0), (0.1, 1), (1.0, 0), (1.0, 1)]
    assert all(r.config.lr == 0.01 for r in sweep.runs)
    assert sweep.runs[1].run_dir == tmp_path / "runs" / "s" / "01_coeff-0.1_seed-1"
    # The original W&B sweep file: method grid, nested parameters, command naming a config.
    seed_sweep = tmp_path / "gpt2_e2e_recon_sweep.yaml"
    seed_sweep.write_text(WANDB_SWEEP)
    with pytest.raises(ConfigError, match=r"run 0: .*'blocks.10.hook_resid_pre' matches no hook"):
        load_sweep(seed_sweep, config=base)  # every run's hooks are checked: 3 layers here
    deep = {**make_config_dict(token_data, tmp_path / "runs"), "tlens_config": GPT2_DEPTH}
    base.write_text(yaml.safe_dump(deep))
    wb = load_sweep(seed_sweep, config=base)
    assert wb.wandb_format and len(wb.runs) == 6
    c = wb.runs[-1].config
    assert c.loss.sparsity is not None and c.loss.sparsity.coeff == 5
    assert c.loss.in_to_orig is not None and c.loss.in_to_orig.total_coeff == 0.1
    assert c.loss.out_to_orig is None and c.n_samples == 400_000 and c.lr == 5e-4
    assert c.saes.sae_positions == ["blocks.10.hook_resid_pre"]
    cfg = wandb_sweep_config(wb)
    assert cfg["method"] == "grid" and cfg["metric"]["name"] == "val_loss"
    loss = cfg["parameters"]["loss"]["parameters"]
    assert loss["sparsity"]["parameters"]["coeff"]["values"] == [0.8, 2.5, 5]
    with pytest.raises(Exception, match="base config"):
        load_sweep(seed_sweep)  # its command names a config that does not exist here


def test_sweep_cli_trains_summarises_and_skips_done_runs(
    token_data: Path, tmp_path: Path, capsys
) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(make_config_dict(token_data, tmp_path / "runs", n_samples=8)))
    sweep_file = tmp_path / "s.yaml"
    params = {"loss.sparsity.coeff": [0.01, 10.0]}
    sweep_file.write_text(yaml.safe_dump({"base_config": "base.yaml", "parameters": params}))
    out = tmp_path / "out"
    assert main(["sweep", str(sweep_file), "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ce_loss_increase" in text and "coeff-10_" not in text
    records = json.loads((out / "sweep_summary.json").read_text())
    assert [r["status"] for r in records] == ["ok", "ok"]
    l0 = [r["eval"]["per_sae"]["blocks.1.hook_resid_pre"]["l0"] for r in records]
    assert all(read_eval(r["run_dir"]) is not None for r in records)
    assert main(["sweep", str(sweep_file), "--out-dir", str(out)]) == 0
    assert [r["status"] for r in json.loads((out / "sweep_summary.json").read_text())] == [
        "skipped",
        "skipped",
    ]
    assert len(l0) == 2


def test_wandb_sweep_hands_the_grid_to_wandb(token_data: Path, tmp_path: Path, monkeypatch) -> None:
    calls: dict[str, Any] = {"logged": []}

    class FakeRun:
        id = "abc123"
        summary: dict[str, Any] = {}

        def __init__(self, config: dict[str, Any]) -> None:
            self.config = config

        def log(self, rec: dict[str, Any], step: int | None = None) -> None:
            calls["logged"].append(rec)

        def finish(self) -> None:
            calls["finished"] = True

    fake = types.ModuleType("wandb")
    fake.login = lambda **kw: True  # type: ignore[attr-defined]
    fake.sweep = lambda cfg, project=None, entity=None: calls.update(sweep=cfg) or "sweep-1"  # type: ignore[attr-defined]
    fake.init = lambda: FakeRun({"loss": {"sparsity": {"coeff": 0.5}}, "seed": 3})  # type: ignore[attr-defined]
    fake.agent = lambda sweep_id, function, **kw: function()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(make_config_dict(token_data, tmp_path / "runs", n_samples=8)))
    sweep_file = tmp_path / "s.yaml"
    params = {
        "loss": {"parameters": {"sparsity": {"parameters": {"coeff": {"values": [0.5, 1]}}}}},
        "seed": {"values": [3]},
    }
    sweep_file.write_text(yaml.safe_dump({"method": "grid", "parameters": params}))
    assert (
        main(
            [
                "sweep",
                str(sweep_file),
                "--config",
                str(base),
                "--wandb",
                "--out-dir",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert calls["sweep"]["parameters"] == params
    run_dir = tmp_path / "o" / "abc123"
    cfg = load_config(run_dir / "final_config.yaml")
    assert cfg.seed == 3 and cfg.loss.sparsity.coeff == 0.5 and cfg.wandb_project is None
    assert calls["finished"] and any("loss" in r for r in calls["logged"])


# --- Pareto fronts, geometry, plots ---------------------------------------------------------------
def test_pareto_front_and_interpolation() -> None:
    x = [10.0, 20.0, 40.0, 15.0, 30.0]
    y = [0.5, 0.3, 0.1, 0.6, 0.35]  # (15, 0.6) and (30, 0.35) are dominated
    assert pareto_front(x, y) == [0, 1, 2]
    # Linear in log x between (20, 0.3) and (40, 0.1): halfway in log space is sqrt(800).
    assert interpolate_y_at_x(x, y, math.sqrt(800)) == pytest.approx(0.2)
    assert interpolate_y_at_x(x, y, 20.0) == pytest.approx(0.3)
    assert math.isnan(interpolate_y_at_x(x, y, 50.0))
    assert interpolate_x_at_y(x, y, 0.2) == pytest.approx(math.sqrt(800))
    assert interpolate_x_at_y(x, y, 0.4) == pytest.approx(math.sqrt(200))
    assert math.isnan(interpolate_x_at_y(x, y, 0.05))


def test_max_cosine_similarity_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 9, generator=g), torch.randn(6, 5, generator=g)
    an, bn = F.normalize(a, dim=0), F.normalize(b, dim=0)
    want = [max(float(an[:, i] @ bn[:, j]) for j in range(5)) for i in range(9)]
    assert max_cosine_similarity(a, b, chunk=4).tolist() == pytest.approx(want, abs=1e-6)
    within = [max(float(an[:, i] @ an[:, j]) for j in range(9) if j != i) for i in range(9)]
    assert max_cosine_similarity(a, a, exclude_self=True, chunk=4).tolist() == pytest.approx(
        within, abs=1e-6
    )
    perm = a[:, torch.randperm(9, generator=g)] * 3  # same directions, other order and scale
    assert max_cosine_similarity(a, perm).tolist() == pytest.approx([1.0] * 9, abs=1e-6)


def test_plots_from_run_dirs(runs: dict[str, Path], tmp_path: Path) -> None:
    assert sae_type(load_config(runs["local0"] / "final_config.yaml")) == "local"
    assert sae_type(load_config(runs["e2e"] / "final_config.yaml")) == "e2e"
    assert sae_type(load_config(runs["ds"] / "final_config.yaml")) == "e2e+ds"
    dirs = [tmp_path / n for n in runs]
    for n, d in runs.items():
        shutil.copytree(d, tmp_path / n)
    infos = load_runs(dirs)  # evaluates the runs (none has eval.json yet)
    assert all(read_eval(d) is not None and read_feature_frequency(d) for d in dirs)
    pos, dictionary = load_dictionary(dirs[0])
    assert pos == "blocks.1.hook_resid_pre" and dictionary.shape == (32, 64)
    assert torch.allclose(dictionary.norm(dim=0), torch.ones(64), atol=1e-5)
    # Different seeds give different dictionaries.
    assert not torch.allclose(dictionary, load_dictionary(dirs[1])[1])
    out = tmp_path / "plots"
    paths = main(["plot", *map(str, dirs), "--out", str(out)])
    assert paths == 0
    stems = {
        "pareto_l0_ce_increase",
        "alive_vs_ce_increase",
        "feature_density",
        "downstream_reconstruction",
        "dictionary_geometry",
    }
    for stem in stems:
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert "<svg" in (out / f"{stem}.svg").read_text()[:2000]
    # The SVGs carry their text as comments: the types and the panels are named.
    pareto = (out / "pareto_l0_ce_increase.svg").read_text()
    for t in ("local · relu (2 runs)", "e2e · relu (1 run)", "e2e+ds · relu (1 run)"):
        assert t in pareto
    assert (
        "| local relu λ=0.1, seed=0 | local | relu | λ=0.1 | 0 |" in (out / "runs.md").read_text()
    )
    geometry = (out / "dictionary_geometry.svg").read_text()
    assert "across seeds" in geometry and "e2e → local" in geometry
    assert [i.sae_type for i in infos] == ["local", "local", "e2e", "e2e+ds"]


# --- feature browser ------------------------------------------------------------------------------
def test_top_windows_update_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(2)
    c = torch.relu(torch.randn(10, 12, 6, generator=g))
    state: dict[str, torch.Tensor] = {}
    for s in range(0, 10, 3):  # batches of 3, 3, 3, 1 sequences
        top_windows_update(c[s : s + 3], s, state, k=4, before=2, after=1)
    per_seq_max = c.max(dim=1).values  # [seq, feature]
    for f in range(6):
        want = per_seq_max[:, f].topk(4)
        assert state["values"][:, f].tolist() == pytest.approx(want.values.tolist())
        assert state["sequences"][:, f].tolist() == want.indices.tolist()
        for j in range(4):
            seq, start = int(state["sequences"][j, f]), int(state["starts"][j, f])
            assert state["windows"][j, :, f].tolist() == c[seq, start : start + 4, f].tolist()
            assert c[seq, start : start + 4, f].max() == want.values[j]


def test_browser_is_one_folder_format(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    from e2e_sae.lm.splice import SAETransformer

    # `--out page.html` (the older single page) is a one-line error naming the folder to use
    argv = ["browse", str(runs["local0"]), "--n-tokens", "64", "--features", "4"]
    assert main([*argv, "--out", str(tmp_path / "page.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the browser is a folder" in err
    assert f"--out {tmp_path / 'page'}" in err and not (tmp_path / "page.html").exists()
    # a feature list and a loaded model: the pages hold exactly those features
    out = write_browser(
        SAETransformer.from_local_path(runs["e2e"]), tmp_path / "p", n_tokens=64, features=[3, 10]
    )
    assert out == tmp_path / "p" / "index.html"
    index = _read_js(tmp_path / "p" / "data" / "index.js", "registerIndex")
    assert set(index["ids"]) | set(index["dead"]) == {3, 10}
    (page,) = [_read_js(p, "registerPage") for p in (tmp_path / "p" / "data").glob("page_*.js")]
    assert len(page[1]["features"]) == 2
    assert (
        main(["browse", str(runs["e2e"]), "--out", str(tmp_path / "x"), "--features", "999"]) == 2
    )
    assert parse_features("3") == [0, 1, 2] and parse_features("4,9") == [4, 9]


def test_matched_tables_interpolate_on_each_types_front(token_data: Path, tmp_path: Path) -> None:
    from e2e_sae.analysis.matched import matched_tables, ratios
    from e2e_sae.analysis.plots import RunInfo

    pos = "blocks.2.hook_resid_pre"
    e2e_loss = {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}}

    def info(loss: dict[str, Any] | None, l0: float, ce: float, alive: int) -> RunInfo:
        kw = {"loss": loss} if loss else {}
        cfg = _config(token_data, tmp_path, saes={"sae_positions": [pos]}, **kw)
        ev = {"ce_loss_increase": ce, "per_sae": {pos: {"l0": l0, "alive_dict_elements": alive}}}
        return RunInfo(tmp_path, cfg, ev)

    # local: CE increase 0.4 at L0 10, 0.2 at L0 40; e2e: 0.3 at L0 5, 0.1 at L0 40.
    runs = [
        info(None, 10, 0.4, 100),
        info(None, 40, 0.2, 200),
        info(e2e_loss, 5, 0.3, 50),
        info(e2e_loss, 40, 0.1, 150),
    ]
    m = matched_tables(runs, pos, n_ref=1)
    assert m["types"] == ["local", "e2e"]
    (row,) = m["same_l0"]  # L0 20: the geometric middle of the common range [10, 40]
    assert row["l0"] == pytest.approx(20) and row["local"] == pytest.approx(0.3)
    assert row["e2e"] == pytest.approx(0.3 - 0.2 * math.log(4) / math.log(8))
    (row,) = m["same_ce"]  # CE increase 0.25: the middle of the common range [0.2, 0.3]
    assert row["ce_loss_increase"] == pytest.approx(0.25)
    assert row["local"] == pytest.approx(10 * 4**0.75) and row["e2e"] == pytest.approx(5 * 8**0.25)
    assert row["local_alive"] == pytest.approx(175) and row["e2e_alive"] == pytest.approx(75)
    r = ratios(m, "e2e")
    assert r["ce_at_l0"] == [pytest.approx((0.3 - 0.2 * math.log(4) / math.log(8)) / 0.3)]
    assert r["l0_at_ce"] == [pytest.approx(10 * 4**0.75 / (5 * 8**0.25))]
    # Another seed's runs are left out unless asked for.
    other = info(e2e_loss, 20, 0.01, 100)
    other.config = other.config.model_copy(update={"seed": 1})
    assert matched_tables([*runs, other], pos, n_ref=1) == m
    assert matched_tables([*runs, other], pos, n_ref=1, seed=None) != m


def _experiment_module(name: str) -> Any:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "experiments" / name / "run.py"
    spec = importlib.util.spec_from_file_location(f"{name}_run", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_budget_study_plans_every_budget_from_scratch(tmp_path: Path) -> None:
    mod = _experiment_module("budget")
    sweep = mod.plan(tmp_path, mod.BUDGETS, {})
    largest = mod.BUDGETS[-1]
    assert largest == mod.TRAIN_WINDOWS and mod.BUDGETS[-1] / mod.BUDGETS[0] >= 30
    # 4 local + 3 e2e + 3 e2e+ds coefficients per budget, a second seed of all at the largest.
    assert len(sweep.runs) == 10 * len(mod.BUDGETS) + 10
    assert len({r.run_dir for r in sweep.runs}) == len(sweep.runs)
    assert [r.index for r in sweep.runs] == list(range(len(sweep.runs)))
    for r in sweep.runs:
        n = r.config.n_samples
        assert r.config.warmup_samples == int(0.1 * n) and r.config.lr_schedule == "cosine"
        assert r.config.seed == 0 or n == largest
        assert r.run_dir.parent.parent.name == f"n{n}"
    costs = [r.config.n_samples * (1 if r.overrides["type"] == "local" else 6) for r in sweep.runs]
    assert costs[0] == max(costs) and sweep.runs[-1].overrides["type"] == "local"


@pytest.mark.slow
def test_pareto_experiment_quick_mode_end_to_end(tmp_path: Path) -> None:
    mod = _experiment_module("pareto")
    assert mod.main(["--quick", "--out-root", str(tmp_path)]) == 0
    md = (tmp_path / "results" / "pareto.md").read_text()
    assert "| local | 1 |" in md and "| e2e | 1 |" in md and "| e2e+ds | 0 |" in md
    assert (tmp_path / "results" / "pareto_l0_ce_increase.svg").exists()
    summary = json.loads((tmp_path / "results" / "results.json").read_text())
    assert len(summary["runs"]) == 12 and summary["meta"]["timing"]["wall_s"] > 0


@pytest.mark.slow
def test_budget_study_quick_mode_end_to_end(tmp_path: Path) -> None:
    mod = _experiment_module("budget")
    assert mod.main(["--quick", "--parallel", "2", "--out-root", str(tmp_path)]) == 0
    md = (tmp_path / "results" / "budget.md").read_text()
    assert "## 8,192 tokens (64 windows)" in md and "| e2e+ds | 1 |" in md
    assert (tmp_path / "results" / "ratios.svg").exists()
    summary = json.loads((tmp_path / "results" / "results.json").read_text())
    assert len(summary["runs"]) == 50 and summary["timing"]["wall_s"] > 0


def _read_js(path: Path, fn: str) -> Any:
    text = path.read_text(encoding="utf-8")
    assert text.startswith(fn + "(") and text.endswith(");\n")
    args = json.loads("[" + text[len(fn) + 1 : -3] + "]")
    return args[0] if len(args) == 1 else args


def argv_base(run: Path, out: Path) -> list[str]:
    return ["browse", str(run), "--out", str(out), "--n-tokens", "128", "--features", "10"]


def test_browser_folder_matches_direct_computation(runs: dict[str, Path], tmp_path: Path) -> None:
    from e2e_sae.analysis.browser import HIST_EDGES
    from e2e_sae.data import create_data_loader
    from e2e_sae.lm.splice import SAETransformer

    run, other_run = runs["e2e"], runs["local0"]
    out = tmp_path / "browser"
    assert (
        main(
            [
                "browse",
                str(run),
                "--out",
                str(out),
                "--n-tokens",
                "128",
                "--features",
                "10",
                "--top-k",
                "3",
                "--no-skip-first",
                "--page-size",
                "4",
                "--compare",
                str(other_run),
            ]
        )
        == 0
    )
    assert (out / "index.html").is_file()
    names = sorted(p.name for p in (out / "data").iterdir())
    assert names == ["index.js", "page_0.js", "page_1.js", "page_2.js"]  # 10 features, 4 a page
    index = _read_js(out / "data" / "index.js", "registerIndex")
    pages = [_read_js(out / "data" / f"page_{n}.js", "registerPage") for n in range(3)]
    assert [p[0] for p in pages] == [0, 1, 2]
    feats = [f for p in pages for f in p[1]["features"]]
    assert len(feats) == 10
    # Direct computation over the same 128 tokens (2 batches of the eval loader).
    model = SAETransformer.from_local_path(run)
    cfg = cast(Config, model.run_config)
    assert cfg.eval_data is not None
    loader = create_data_loader(cfg.eval_data, cfg.batch_size, cfg.seed + 42)
    tokens = torch.cat([next(loader) for _ in range(2)])
    hook = "blocks.1.hook_resid_pre"
    with torch.no_grad():
        _, cache = model.forward_raw(tokens, run_entire_model=False, cache_positions=[hook])
        c_all = model.sae(hook).encode(cache[hook]).reshape(-1, 64)
        c = c_all.reshape(*tokens.shape, 64)[..., :10]
        other_c = SAETransformer.from_local_path(other_run).sae(hook).encode(cache[hook])
    live = (c_all != 0).any(0)
    live_other = (other_c != 0).reshape(-1, other_c.shape[-1]).any(0)
    alive = [f for f in range(10) if (c[..., f] != 0).any()]
    assert index["ids"] == alive and index["slot"] == alive
    assert index["dead"] == [f for f in range(10) if f not in alive]
    edges = torch.tensor(HIST_EDGES)
    d_all = model.sae(hook).dict_elements.detach()
    d_other = SAETransformer.from_local_path(other_run).sae(hook).dict_elements.detach()
    tl = model.tlens_model
    w_ln = tl.ln_final.w
    assert isinstance(w_ln, torch.Tensor)
    for row, f in enumerate(alive):
        cf = c[..., f]
        nz = cf[cf > 0]
        assert index["freq"][row] == pytest.approx(float((cf != 0).float().mean()), rel=1e-2)
        assert index["max"][row] == pytest.approx(float(cf.max()), rel=1e-2)
        assert index["mean"][row] == pytest.approx(float(nz.mean()), rel=1e-2)
        page = feats[f]
        # Histogram: counts of the nonzero activations per bin.
        assert page["hist"] == torch.bincount(torch.bucketize(nz, edges), minlength=26).tolist()
        assert len(page["top"]) == min(3, int((cf.amax(1) > 0).sum()))
        assert page["top"][0][0] == pytest.approx(float(cf.max()), rel=1e-2)
        # Always five quantile rows, named by quantile; each example is a real token of that
        # feature inside the bin holding that quantile, a different one per row while the bin
        # has enough.
        assert [q for q, *_ in page["q"]] == ["10%", "30%", "50%", "70%", "90%"]
        cum = torch.tensor(page["hist"]).cumsum(0)
        shown: dict[int, list[float]] = {}
        for (_q, _, value, toks, acts, mark), frac in zip(
            page["q"], (0.1, 0.3, 0.5, 0.7, 0.9), strict=True
        ):
            b = int(torch.bucketize(torch.tensor(value), edges))
            assert b == int(torch.searchsorted(cum.double(), frac * float(cum[-1])))
            assert (nz - value).abs().min() <= 1e-3 * max(1.0, value)
            assert acts[mark] == value and len(toks) == len(acts)
            shown.setdefault(b, []).append(value)
        for b, values in shown.items():
            assert len(set(values)) == min(len(values), page["hist"][b]), (b, values)
        for value, _, acts, mark in page["top"]:
            assert acts[mark] == value == max(acts)
        # Promoted / suppressed: extremes of (w_ln * centred direction) @ W_U.
        d = d_all[:, f]
        logit = ((d - d.mean()) * w_ln) @ tl.W_U
        assert [t for t, _ in page["up"]] == logit.topk(10).indices.tolist()
        assert [t for t, _ in page["down"]] == logit.topk(10, largest=False).indices.tolist()
        rms = float((logit - logit.mean()).pow(2).mean().sqrt())
        assert index["effect"][row] == pytest.approx(float(nz.mean()) * rms, rel=2e-2)
        # Nearest live features within the dictionary (itself excluded) and in the other run.
        cos = F.normalize(d_all, dim=0).T @ F.normalize(d, dim=0)
        cos[f] = -2
        cos[~live] = -3
        assert [i for i, _ in page["near"]] == cos.topk(8).indices.tolist()
        cos_o = F.normalize(d_other, dim=0).T @ F.normalize(d, dim=0)
        cos_o[~live_other] = -3
        assert [i for i, _ in page["far"]] == cos_o.topk(8).indices.tolist()
        assert all(live[i] for i, _ in page["near"]) and all(live_other[i] for i, _ in page["far"])
        # Correlated features: Pearson r of the activations over the scanned tokens.
        r = torch.corrcoef(torch.cat([c_all[:, f : f + 1], c_all], 1).T.double())[0, 1:]
        r[f] = -2
        r[~live] = -2
        want = r.topk(8)
        assert [i for i, _ in page["corr"]] == want.indices.tolist()
        assert [v for _, v in page["corr"]] == pytest.approx(want.values.tolist(), rel=1e-2)
        # The direct logit effect's histogram covers the whole vocabulary.
        assert sum(page["lhist"]) == tl.cfg.d_vocab
        assert page["lrange"] == pytest.approx([float(logit.min()), float(logit.max())], rel=1e-2)
    # Ablation KL for every live feature (fewer than the default 64), nonnegative.
    assert all(v is not None and v >= 0 for v in index["ablation"])
    # The other run's features link to its browser folder (default: named after the run, next
    # to this one); the search text holds the top snippets' context.
    assert index["other_href"] == f"../{other_run.name}"
    assert all(isinstance(x, str) and x for x in index["ctx"])
    assert not any("the 0 most frequent" in n for n in index["notes"])
    assert main([*argv_base(run, out), "--ablate", "0"]) == 0
    index0 = _read_js(out / "data" / "index.js", "registerIndex")
    assert "ablation" not in index0
    assert "Ablation KL: not computed (--ablate 0)." in index0["notes"]
    assert not any("0 most frequent" in n for n in index0["notes"])
    # Writing again replaces the folder; a folder that is not a browser's is refused.
    assert main(["browse", str(run), "--out", str(out), "--n-tokens", "64", "--features", "3"]) == 0
    assert not (out / "data" / "page_1.js").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("keep")
    assert main(["browse", str(run), "--out", str(tmp_path / "other"), "--n-tokens", "64"]) == 2
    assert (tmp_path / "other" / "x.txt").read_text() == "keep"


def test_browser_skip_first_position(model: SAETransformer) -> None:
    from e2e_sae.analysis.browser import first_position_outlier

    pos = "blocks.1.hook_resid_pre"
    batches = _batches(2)
    tokens = torch.cat(batches)
    with torch.no_grad():
        _, cache = model.forward_raw(tokens, run_entire_model=False, cache_positions=[pos])
        c = model.sae(pos).encode(cache[pos])
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    keep &= tokens != 5  # a "special" token
    kept = c * keep[..., None]
    fd = collect_feature_data(
        model, pos, iter(batches), 2, top_k=2, skip_first=True, special_ids=[5]
    )
    assert fd.skip_first and fd.n_example_tokens == int(keep.sum())
    assert fd.counts.tolist() == (c != 0).sum((0, 1)).tolist()  # counts use every token
    torch.testing.assert_close(fd.top_values[0], kept.amax((0, 1)))
    assert fd.hist is not None
    assert fd.hist.sum(1).tolist() == (kept > 0).sum((0, 1)).tolist()
    off = collect_feature_data(model, pos, iter(batches), 2, top_k=2, skip_first=False)
    torch.testing.assert_close(off.top_values[0], c.amax((0, 1)))
    # Auto rule: first-position mean norm > 3x the others', or every sequence starts with BOS.
    x = torch.ones(2, 5, 4)
    x[:, 0] *= 3.5
    assert first_position_outlier(x) == (True, pytest.approx(3.5))
    x[:, 0] = 2.0
    assert first_position_outlier(x)[0] is False
    bos = [torch.cat([torch.zeros(4, 1, dtype=torch.long), b[:, 1:]], 1) for b in batches]
    auto = collect_feature_data(model, pos, iter(bos), 2, skip_first=None, bos_id=0)
    assert auto.skip_first and "every sequence starts with BOS: True" in auto.skip_reason


def test_js_data_and_html_are_escaped() -> None:
    from e2e_sae.analysis.browser import js_call, readable

    evil = "</script><img src=x onerror=alert(1)>\u2028"
    js = js_call("registerPage", 0, {"tokens": {"1": evil}})
    assert "</" not in js and "\u2028" not in js
    assert json.loads(js[len("registerPage(0,") : -3]) == {"tokens": {"1": evil}}
    assert readable("a\nb\tc\x1b\u200b") == "a⏎b⇥c⟨0x1B⟩⟨U+200B⟩"
    app = (Path(__file__).resolve().parent.parent / "e2e_sae/assets/browser/app.js").read_text()
    assert "innerHTML" not in app  # data reaches the DOM only as textContent


def test_token_text_decodes_byte_level_tokens() -> None:
    from e2e_sae.analysis.browser import token_text
    from e2e_sae.data.tokenizer import load_tokenizer

    tok = load_tokenizer("shakespeare-bpe")  # byte-level BPE
    text = "naïve — ✓ déjà"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [token_text(tok, i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    # Joined, the pieces are the text with each split multi-byte character as its bytes.
    joined = "".join(pieces)
    want = re.sub(r"⟨0x([0-9A-F]{2})⟩", lambda m: chr(int(m.group(1), 16) + 0xDC00), joined)
    assert want.encode("utf-8", errors="surrogateescape") == text.encode("utf-8")
    split = [i for i in ids if "\ufffd" in tok.decode([i])]
    for i in split:
        assert re.fullmatch(r"(⟨0x[89A-F][0-9A-F]⟩|[^\ufffd])+", token_text(tok, i))

    class ByteFallback:  # SentencePiece-style byte tokens
        def decode(self, ids: list[int]) -> str:
            return "\ufffd"

        def convert_ids_to_tokens(self, i: int) -> str:
            return "<0xE2>"

    assert token_text(ByteFallback(), 7) == "⟨0xE2⟩"


def test_ablation_kl_matches_a_model_without_that_feature(model: SAETransformer) -> None:
    import copy

    from e2e_sae.analysis.browser import ablation_kl

    pos = "blocks.1.hook_resid_pre"
    tokens = torch.cat(_batches(1))
    with torch.no_grad():
        _, cache = model.forward_raw(tokens, run_entire_model=False, cache_positions=[pos])
        c = model.sae(pos).encode(cache[pos])
        logits, _ = model.forward(tokens, [pos])
        assert logits is not None
        fires = [f for f in range(c.shape[-1]) if (c[..., f] > 0).any()][:3]
        never = [f for f in range(c.shape[-1]) if not (c[..., f] > 0).any()][:1]
        assert len(fires) == 3
        vals, n = ablation_kl(model, pos, tokens, fires + never)
        assert n == tokens.numel()
        for f, v in zip(fires, vals, strict=False):
            other = copy.deepcopy(model)
            other.sae(pos).decoder.weight[:, f] = 0.0  # its direction no longer reaches the output
            ab, _ = other.forward(tokens, [pos])
            assert ab is not None
            logp, logq = logits.log_softmax(-1), ab.log_softmax(-1)
            kl = (logp.exp() * (logp - logq)).sum(-1)[c[..., f] > 0].mean()
            assert v == pytest.approx(float(kl), rel=1e-3, abs=1e-7)
        assert vals[len(fires) :] == [None] * len(never)


def _experiment_script(folder: str, name: str) -> Any:
    import importlib.util

    here = Path(__file__).resolve().parent.parent / "experiments" / folder
    sys.path.insert(0, str(here))
    try:
        spec = importlib.util.spec_from_file_location(f"{folder}_{name}", here / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(here))
    return mod


def test_smollm2_study_calibration_interpolates_in_log_log_space() -> None:
    mod = _experiment_script("smollm2", "run")
    # L0 = 100 * coeff^-1: the coefficient for L0 40 is 2.5, found from any two points.
    assert mod.log_interp([1.0, 4.0], [100.0, 25.0], 40.0) == pytest.approx(2.5)
    assert mod.log_interp([4.0, 1.0], [25.0, 100.0], 40.0) == pytest.approx(2.5)
    assert mod.log_interp([1.0, 4.0, 16.0], [100.0, 25.0, 6.25], 10.0) == pytest.approx(10.0)
    # Outside the points: extrapolated along the nearest segment, at most 10x beyond the range.
    assert mod.log_interp([1.0, 4.0], [100.0, 25.0], 12.5) == pytest.approx(8.0)
    assert mod.log_interp([1.0, 4.0], [100.0, 25.0], 1e-6) == pytest.approx(40.0)
    assert mod.distinct([4.0, 2.0, 1.0]) == [4.0, 2.0, 1.0]
    assert sorted(mod.distinct([3.0, 3.0, 1.0])) == [1.5, 3.0, 6.0]


def test_paper_scale_script_builds_the_papers_settings() -> None:
    mod = _experiment_script("smollm2", "paper_scale")
    args = mod.argparse.Namespace(
        device="cuda",
        tokens=100e6,
        calib_tokens=2e6,
        dataset="shakespeare",
        ratio=60.0,
        position=mod.POSITION,
        n_layers=30,
        n_ctx=1024,
        batch_size=8,
        eval_windows=500,
        precision="bf16",
        tiny=False,
    )
    local = mod.run_config(args, "local", 1.0, args.tokens)
    ds = mod.run_config(args, "e2e+ds", 2.0, args.tokens)
    assert local.n_samples == int(100e6 // 1024) and local.warmup_samples == local.n_samples // 20
    assert local.effective_batch_size == 16 and local.lr == 5e-4 and local.max_grad_norm == 10
    assert local.saes.dict_size_to_input_ratio == 60 and local.train_data.n_ctx == 1024
    assert local.loss.logits_kl is None and local.precision == "bf16"
    assert ds.loss.in_to_orig is not None and ds.loss.logits_kl is not None
    assert ds.loss.in_to_orig.hook_positions[0] == "blocks.15.hook_resid_post"
    assert len(ds.loss.in_to_orig.hook_positions) == 15 and ds.loss.logits_kl.coeff == 0.5
    assert mod.run_config(args, "e2e", 1.0, args.calib_tokens).n_samples == int(2e6 // 1024)


# --- honest eval numbers --------------------------------------------------------------------------
def test_eval_records_its_settings_and_never_silently_replaces_others(
    token_data: Path, tmp_path: Path, capsys
) -> None:
    # eval_n_samples 6 is not a multiple of batch_size 4: training's evaluations and `eval` must
    # still scan the same 6 windows (96 tokens), in the same order
    cfg = _config(token_data, tmp_path, eval_n_samples=6, n_samples=16, eval_every_n_samples=8)
    run = train(cfg, tmp_path / "run", progress=False)
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    last = [r for r in evals if "eval/kl" in r][-1]
    assert last["eval/n_tokens"] == 96
    assert main(["eval", str(run)]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_tokens"] == 96 and ev["kl"] == pytest.approx(last["eval/kl"], rel=1e-5)
    assert ev["per_sae"]["blocks.1.hook_resid_pre"]["l0"] == pytest.approx(
        last["eval/l0/blocks.1.hook_resid_pre"], rel=1e-5
    )
    assert ev["settings"] == {
        "dataset": str(token_data),
        "split": "train",
        "tokenizer_name": None,
        "n_ctx": 16,
        "n_windows": 6,
        "n_tokens": 96,
        "batch_size": 4,
        "data_seed": 42,
        "checkpoint": "samples_16.safetensors",
    }
    before = (run / "eval.json").read_text()
    # The same settings again: rewritten (the same numbers). Other settings: refused, unchanged.
    assert main(["eval", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--n-tokens", "32"]) == 2
    err = capsys.readouterr().err
    assert "n_windows: 6 -> 2" in err and "n_tokens: 96 -> 32" in err and "--overwrite" in err
    assert (run / "eval.json").read_text() == before
    assert main(["eval", str(run), "--n-tokens", "32", "--out", str(tmp_path / "e32.json")]) == 0
    assert json.loads((tmp_path / "e32.json").read_text())["settings"]["n_tokens"] == 32
    assert (tmp_path / "e32.feature_frequency.safetensors").is_file()
    assert main(["eval", str(run), "--n-tokens", "32", "--overwrite"]) == 0
    assert json.loads((run / "eval.json").read_text())["n_tokens"] == 32
    # a file without settings (an older version's) is not replaced silently either
    (run / "eval.json").write_text(json.dumps({"n_tokens": 96.0}))
    assert main(["eval", str(run)]) == 2
    assert "records no settings" in capsys.readouterr().err


def test_quantile_examples_are_uniform_subsets_of_their_bin() -> None:
    from e2e_sae.analysis.browser import HIST_EDGES, sample_update

    # one feature, 20 activations in one histogram bin (1.1 .. 1.29), in 3 batches
    values = torch.linspace(1.1, 1.29, 20)
    c = values.view(4, 5, 1)
    nb = len(HIST_EDGES) + 1
    b = int(torch.bucketize(values[0], torch.tensor(HIST_EDGES)))
    chosen = torch.zeros(20)
    trials = 600
    for seed in range(trials):
        state: dict[str, torch.Tensor] = {}
        gen = torch.Generator().manual_seed(seed)
        for s in (0, 1, 3):  # batches of 1, 2, 1 sequences
            e = {0: 1, 1: 3, 3: 4}[s]
            sample_update(c[s:e], s, state, before=1, after=1, generator=gen, per_bin=5)
        assert int(state["hist"][b]) == 20 and int(state["hist"].sum()) == 20
        slots = state["value"][b * 5 : b * 5 + 5]
        assert (state["seq"][b * 5 : b * 5 + 5] >= 0).all()
        idx = torch.searchsorted(values, slots)
        assert torch.equal(values[idx], slots) and idx.unique().numel() == 5  # 5 distinct
        for k in range(5):  # the window and position belong to the kept token
            seq, pos = int(state["seq"][b * 5 + k]), int(state["pos"][b * 5 + k])
            assert float(c[seq, pos, 0]) == float(slots[k])
        chosen[idx] += 1
    # each of the 20 is kept with probability 5/20: expected 150 of 600 trials
    assert state["key"][nb * 5 - 1] == -1  # untouched cells stay empty
    assert chosen.min() > 110 and chosen.max() < 190, chosen


def test_matryoshka_browser_shows_the_prefix_band(token_data: Path, tmp_path: Path) -> None:
    saes = {
        "sae_positions": ["blocks.1.hook_resid_pre"],
        "dict_size_to_input_ratio": 2.0,
        "architecture": "matryoshka",
        "k": 4,
        "architecture_kwargs": {"matryoshka_widths": [8, 24]},
    }
    cfg = _config(token_data, tmp_path, saes=saes, loss={"out_to_in": {"coeff": 1.0}})
    model = SAETransformer.from_config(cfg, device="cpu")
    model.run_config = cfg  # type: ignore[attr-defined]
    write_browser(model, tmp_path / "b", n_tokens=64, ablate=0)
    index = _read_js(tmp_path / "b" / "data" / "index.js", "registerIndex")
    assert "prefix" in [c["key"] for c in index["columns"]]
    want = [8 if i < 8 else 24 if i < 24 else 64 for i in index["ids"]]
    assert index["prefix"] == want and len(set(want)) > 1
    assert "Matryoshka prefixes (first N latents): 8, 24, 64." in index["notes"]


def test_unset_batchtopk_threshold_is_not_divergence() -> None:
    from e2e_sae.eval.evaluate import check_finite_weights
    from e2e_sae.saes import BatchTopKSAE

    sae = BatchTopKSAE(4, 8, k=2)
    assert torch.isnan(sae.threshold)  # no training batch yet
    check_finite_weights(sae, "untrained")  # accepted: eval falls back to per-token TopK
    with torch.no_grad():
        sae.threshold.fill_(float("inf"))
    with pytest.raises(UserError, match=r"non-finite weights \(saes.threshold\)"):
        check_finite_weights(sae, "x")
    with torch.no_grad():
        sae.threshold.fill_(float("nan"))
        next(sae.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(UserError, match="non-finite weights"):
        check_finite_weights(sae, "x")
