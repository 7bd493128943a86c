"""Transcoder sets (`saes.transcoder_set`) and cross-layer transcoders (`architecture: clt`): the
sites, one spliced pass for every layer, the local / e2e values against direct computations with
TransformerLens hooks, the CLT's reconstruction, parameter count and penalties, training under
each loss with a save / load round trip, exact resume, torchrun, the activation cache, bad input."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TLENS, assert_close_scaled
from transformer_lens import HookedTransformer, HookedTransformerConfig

from e2e_sae import SAETransformer, load_config
from e2e_sae.cli import main
from e2e_sae.config import LossConfigs
from e2e_sae.errors import ConfigError
from e2e_sae.lm.sites import TranscoderSet
from e2e_sae.objective.forward import make_plan, run_forward
from e2e_sae.objective.losses import LogitsKLLoss, OutToInLoss, SparsityLoss
from e2e_sae.runs.checkpoint import list_checkpoints, read_tensors, save_checkpoint, write_config
from e2e_sae.saes import CrossLayerTranscoder, SAEActs, sae_key
from e2e_sae.training.engine import TrainState
from e2e_sae.training.trainer import setup

IN, OUT = "ln2.hook_normalized", "hook_mlp_out"
L = TINY_TLENS["n_layers"]
KL = {"logits_kl": {"coeff": 1.0}}
LOCAL = {"sparsity": {"coeff": 0.1}, "out_to_in": {"coeff": 1.0}}
E2E_DS = {
    "sparsity": {"coeff": 0.1},
    "logits_kl": {"coeff": 1.0},
    "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_post"], "total_coeff": 0.5},
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**over: Any) -> HookedTransformer:
    return HookedTransformer(HookedTransformerConfig(**{**TINY_TLENS, "device": "cpu", **over}))


def tset_model(arch: str = "relu", layers: list[int] | None = None, **kw: Any) -> SAETransformer:
    torch.manual_seed(0)
    spec = TranscoderSet(layers, IN, OUT, cross_layer=arch == "clt")
    return SAETransformer(
        tiny(), [], 2.0, architecture=arch, architecture_kwargs=kw, transcoder_set=spec
    )


def perturb_(model: SAETransformer) -> None:
    """Random decoder biases (zero at init), so each layer's own bias shows in the checks."""
    with torch.no_grad():
        for p in model.sae_positions:
            model.sae(p).decoder.bias.normal_()


def tokens(n: int = 2) -> torch.Tensor:
    return torch.randint(
        0, TINY_TLENS["d_vocab"], (n, 8), generator=torch.Generator().manual_seed(1)
    )


def direct_clt(model: SAETransformer, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """A CLT's reconstructions from its parameters: out[t] = sum_{s<=t} c_s @ D[s->t]^T + b[t],
    with D the unit-normed concatenated decoder columns (the house's parameterisation)."""
    saes = [model.sae(p) for p in model.sae_positions]
    outs = [sae.decoder.bias.clone() for sae in saes]
    for s, (sae, x) in enumerate(zip(saes, xs, strict=True)):
        assert isinstance(sae, CrossLayerTranscoder)
        w = sae.decoder.weight
        w = w / w.norm(dim=0, keepdim=True) if sae.unit_decoders else w
        c = sae.encode(x)
        for j in range(sae.n_targets):
            outs[s + j] = outs[s + j] + c @ w[j * sae.output_size : (j + 1) * sae.output_size].T
    return outs


def direct_spliced_logits(model: SAETransformer, toks: torch.Tensor) -> torch.Tensor:
    """Every listed MLP output replaced, computed with plain TransformerLens hooks: each layer's
    transcoder (or CLT layer) runs on the spliced pass's own MLP input as the pass reaches it."""
    positions = model.sae_positions
    written: dict[int, torch.Tensor] = {}
    layers = [int(p.split(".")[1]) for p in positions]

    def read(k: int):
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            sae = model.sae(positions[k])
            if isinstance(sae, CrossLayerTranscoder):
                c = sae.encode(x)
                w = sae.decoder_weights()
                for j in range(sae.n_targets):
                    d = sae.output_size
                    part = c @ w[j * d : (j + 1) * d].T + (sae.decoder.bias if j == 0 else 0)
                    written[k + j] = written.get(k + j, 0) + part
            else:
                written[k] = sae(x)[0]
            return x

        return hook

    def write(k: int):
        return lambda x, hook: written[k]

    hooks = []
    for k, lay in enumerate(layers):
        hooks += [(f"blocks.{lay}.{IN}", read(k)), (f"blocks.{lay}.{OUT}", write(k))]
    return model.tlens_model.run_with_hooks(toks, fwd_hooks=hooks)


# --- sites ----------------------------------------------------------------------------------------
def test_sites_of_a_set_and_of_a_subset() -> None:
    m = tset_model()
    assert m.sae_positions == [f"blocks.{i}.{OUT}" for i in range(L)]
    for i in range(L):
        s = m.sites[f"blocks.{i}.{OUT}"]
        assert (s.input_hook, s.later_outputs) == (f"blocks.{i}.{IN}", ())
    sub = tset_model(layers=[0, 2])
    assert sub.sae_positions == [f"blocks.0.{OUT}", f"blocks.2.{OUT}"]
    clt = tset_model("clt")
    assert clt.sites[f"blocks.0.{OUT}"].later_outputs == (f"blocks.1.{OUT}", f"blocks.2.{OUT}")
    assert clt.sites[f"blocks.2.{OUT}"].later_outputs == ()
    # a CLT splices in whole: asking for one layer brings every layer it depends on
    assert clt.resolve_sae_positions([f"blocks.1.{OUT}"]) == clt.sae_positions


def test_config_entry_builds_the_same_sites(config_dict) -> None:
    cfg = load_config(config_dict(saes={"transcoder_set": {"layers": [0, 1]}}))
    model = SAETransformer.from_config(cfg, device="cpu")
    assert model.sae_positions == [f"blocks.0.{OUT}", f"blocks.1.{OUT}"]
    assert model.sae(f"blocks.0.{OUT}").input_size == TINY_TLENS["d_model"]


# --- one spliced pass, values against direct computations -----------------------------------------
@pytest.mark.parametrize("arch", ["relu", "clt"])
def test_e2e_is_one_spliced_pass_and_equals_hooks(arch: str, monkeypatch) -> None:
    model = tset_model(arch)
    perturb_(model)
    plan = make_plan(model, LossConfigs.model_validate(KL))
    calls = []
    assert plan.runner is not None
    orig = plan.runner.run_blocks

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(len(a[2]) if len(a) > 2 else len(k.get("hooks", []) or []))
        return orig(*a, **k)

    monkeypatch.setattr(plan.runner, "run_blocks", counting)
    toks = tokens()
    with torch.no_grad():
        inputs = run_forward(model, toks, plan)
    # the clean pass (caching each layer's input and output) and ONE spliced pass carrying the
    # read and write hooks of all L dictionaries
    assert calls == [2 * L, 2 * L], calls
    ref_plan = make_plan(model, LossConfigs.model_validate(KL), force_full_pass=True)
    with torch.no_grad():
        ref = run_forward(model, toks, ref_plan, reference=True)
        want = direct_spliced_logits(model, toks)
        clean = model.tlens_model(toks)
    assert ref.new_logits is not None
    assert_close_scaled(ref.new_logits, want, rtol=1e-5, what="spliced logits")
    direct_kl = F.kl_div(
        F.log_softmax(want, -1).flatten(0, 1),
        F.log_softmax(clean, -1).flatten(0, 1),
        log_target=True,
        reduction="batchmean",
    )
    got = LogitsKLLoss(1.0)(inputs)
    assert float(direct_kl) > 0
    assert abs(float(got) - float(direct_kl)) <= 1e-4 * float(direct_kl)


@pytest.mark.parametrize("arch", ["relu", "clt"])
def test_local_loss_is_the_sum_of_per_layer_mses(arch: str) -> None:
    model = tset_model(arch)
    perturb_(model)
    plan = make_plan(model, LossConfigs.model_validate(LOCAL))
    toks = tokens()
    with torch.no_grad():
        inputs = run_forward(model, toks, plan)
        _, clean = model.tlens_model.run_with_cache(toks)
        xs = [clean[f"blocks.{i}.{IN}"] for i in range(L)]
        if arch == "clt":
            outs = direct_clt(model, xs)
        else:
            outs = [model.sae(f"blocks.{i}.{OUT}")(x)[0] for i, x in enumerate(xs)]
        want = sum(F.mse_loss(o, clean[f"blocks.{i}.{OUT}"]) for i, o in enumerate(outs))
        got = OutToInLoss(1.0)(inputs)
    assert isinstance(want, torch.Tensor)
    assert abs(float(got) - float(want)) <= 1e-5 * float(want)
    for i in range(L):
        a = inputs.sae_acts[f"blocks.{i}.{OUT}"]
        assert_close_scaled(a.output, outs[i], what=f"layer {i}")


def test_clt_in_a_pass_sums_the_earlier_layers_and_counts_its_parameters() -> None:
    model = tset_model("clt")
    perturb_(model)
    d, d_sae = TINY_TLENS["d_model"], 2 * TINY_TLENS["d_model"]
    n_dec = sum(model.sae(p).decoder.weight.numel() for p in model.sae_positions)
    assert n_dec == L * (L + 1) // 2 * d_sae * d  # decoders grow as L(L+1)/2
    toks = tokens()
    with torch.no_grad():
        _, acts = model.forward(toks)  # spliced: each layer reads the spliced pass's input
        xs = [acts[f"blocks.{i}.{OUT}"].input for i in range(L)]
        outs = direct_clt(model, xs)
    for i in range(L):
        a = acts[f"blocks.{i}.{OUT}"]
        assert isinstance(a, SAEActs)
        assert_close_scaled(a.output, outs[i], what=f"layer {i}")


def test_clt_penalties_against_direct_computation() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 7, 16)
    for kw in (
        {"activation": "jumprelu", "penalty": "l0", "init_threshold": 0.1},
        {"activation": "jumprelu", "penalty": "tanh", "tanh_scale": 2.0, "init_threshold": 0.1},
        {"activation": "relu", "penalty": "lp"},
    ):
        sae = CrossLayerTranscoder(16, 24, output_size=12, n_targets=3, unit_decoders=False, **kw)
        with torch.no_grad():
            sae.decoder.weight.mul_(torch.rand(24) * 3)  # norms differ from 1
        out, c = sae.forward_targets(x)
        assert out.shape == (3, 5, 7, 12)
        norms = sae.decoder.weight.norm(dim=0)  # the concatenated column over all 3 targets
        z = sae.pre_acts(x)
        if kw["penalty"] == "l0":
            want = ((z > sae.threshold).float() * norms).sum(-1)
            assert torch.equal(c, z * (z > sae.threshold))
        elif kw["penalty"] == "tanh":
            want = torch.tanh(2.0 * c * norms).sum(-1)
        else:
            assert torch.equal(c, F.relu(z))
            want = (c * norms).abs().sum(-1)
        acts = SAEActs(x, c, out[0])
        assert_close_scaled(sae.sparsity_penalty(acts, 1.0), want, what=str(kw))
        loss = SparsityLoss(1.0)
        from e2e_sae.objective.losses import LossInputs

        got = loss(LossInputs({"p": acts}, orig_acts={}, sites={}, saes={"p": sae}))
        w = float(want.mean().detach() / 16)
        assert abs(float(got.detach()) - w) <= 1e-5 * w
    topk = CrossLayerTranscoder(16, 24, n_targets=2, activation="topk", k=3)
    _, c = topk.forward_targets(x)
    assert int((c != 0).sum(-1).max()) <= 3


# --- training under each loss, save / load --------------------------------------------------------
ARCHS: dict[str, dict[str, Any]] = {
    "relu": {},
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "jumprelu": {"architecture_kwargs": {"bandwidth": 0.1, "init_threshold": 0.1}},
    "relu-skip": {},
    "clt": {"architecture_kwargs": {"bandwidth": 0.1, "init_threshold": 0.1}},
    "clt-topk": {"k": 4, "architecture_kwargs": {"activation": "topk"}},
}


@pytest.mark.parametrize("kind", ["local", "e2e", "e2e_ds"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_trains_under_each_loss_and_round_trips(
    name: str, kind: str, config_dict, tmp_path: Path
) -> None:
    arch = name.split("-")[0]
    tset: dict[str, Any] = {"layers": "all", "skip": name.endswith("skip")}
    loss = {"local": LOCAL, "e2e": {"sparsity": {"coeff": 0.1}, **KL}, "e2e_ds": E2E_DS}[kind]
    saes = {
        "transcoder_set": tset,
        "architecture": arch,
        "dict_size_to_input_ratio": 2.0,
        **ARCHS[name],
    }
    cfg = load_config(config_dict(loss=loss, saes=saes))
    t = setup(cfg, device="cpu")
    before = {k: v.clone() for k, v in t.model.saes.state_dict().items()}
    batches = t.batches(cfg.train_data, cfg.seed)
    state = TrainState()
    t.model.train()
    values = {}
    for _ in range(2):
        values = t.train_step(batches, state)
    assert all(math.isfinite(v) for v in values.values())
    after = t.model.saes.state_dict()
    for pos in t.model.sae_positions:
        key = sae_key(pos)
        assert not torch.equal(before[f"{key}.encoder.0.weight"], after[f"{key}.encoder.0.weight"])
        if tset["skip"]:
            assert not torch.equal(before[f"{key}.W_skip"], after[f"{key}.W_skip"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, cfg)
    save_checkpoint(run_dir, t.model, state.n_samples)
    loaded = SAETransformer.from_local_path(run_dir, device="cpu")
    assert loaded.sites == t.model.sites
    for k, v in loaded.saes.state_dict().items():
        assert torch.equal(v, after[k]), k
    t.model.eval()
    loaded.eval()
    toks = tokens()
    with torch.no_grad():
        a, b = t.model.forward(toks)[0], loaded.forward(toks)[0]
    assert a is not None and b is not None and torch.equal(a, b)


def test_two_stage_recipe_fine_tunes_a_local_set_with_kl(config_dict, tmp_path: Path) -> None:
    saes = {"transcoder_set": {"layers": "all"}, "dict_size_to_input_ratio": 2.0}
    first = config_dict(loss=LOCAL, saes=saes, n_samples=16)
    from e2e_sae.training.trainer import train

    run1 = train(load_config(first), run_dir=tmp_path / "local", device="cpu", progress=False)
    second = config_dict(loss={"sparsity": {"coeff": 0.1}, **KL}, saes=saes, n_samples=16)
    second["saes"] = {
        **saes,
        "pretrained_sae_paths": [str(list_checkpoints(run1)[-1])],
        "retrain_saes": True,
    }
    cfg2 = load_config(second)
    t = setup(cfg2, device="cpu")
    w1 = read_tensors(list_checkpoints(run1)[-1])
    for k, v in t.model.saes.state_dict().items():
        if k in w1:
            assert torch.equal(v, w1[k]), k  # starts from the local set
    run2 = train(cfg2, run_dir=tmp_path / "kl", device="cpu", progress=False)
    w2 = read_tensors(list_checkpoints(run2)[-1])
    assert any(not torch.equal(w2[k], w1[k]) for k in w1 if k in w2)


# --- exact resume, torchrun, the activation cache -------------------------------------------------
def test_clt_signal_then_resume_is_bit_exact(config_dict, tmp_path: Path, monkeypatch) -> None:
    from test_reliability import _assert_bit_exact, _interrupt_after, _newest_weights, _only_run
    from test_reliability import _write as write_yaml

    from e2e_sae.training import trainer as train_mod

    saes = {
        "transcoder_set": {"layers": "all"},
        "architecture": "clt",
        "dict_size_to_input_ratio": 2.0,
        **ARCHS["clt"],
    }
    cfg = config_dict(loss=E2E_DS, saes=saes, n_samples=32, save_every_n_samples=8)
    ref = train_mod.train(load_config(cfg), run_dir=tmp_path / "ref", progress=False)
    path = write_yaml(tmp_path / "cfg.yaml", cfg)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3, signal.SIGTERM)
        assert main(["train", str(path)]) == 128 + signal.SIGTERM
    run = _only_run(Path(cfg["save_dir"]))
    assert main(["train", str(path), "--resume"]) == 0
    _assert_bit_exact(_newest_weights(ref), _newest_weights(run))


def test_torchrun_two_processes_equal_one_with_double_batch(config_dict, tmp_path: Path) -> None:
    from test_reliability import _newest_weights, _only_run, _torchrun
    from test_reliability import _write as write_yaml

    from e2e_sae.training import trainer as train_mod

    saes = {
        "transcoder_set": {"layers": "all"},
        "architecture": "clt",
        "dict_size_to_input_ratio": 2.0,
        **ARCHS["clt"],
    }
    over = {"loss": E2E_DS, "saes": saes, "n_samples": 16, "max_grad_norm": 1.0}
    cfg2 = config_dict(batch_size=2, **over)
    proc = _torchrun(2, [str(write_yaml(tmp_path / "ddp.yaml", cfg2))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_run = _only_run(Path(cfg2["save_dir"]))
    cfg1 = config_dict(batch_size=4, **over)
    ref = train_mod.train(load_config(cfg1), run_dir=tmp_path / "ref", progress=False)
    a, b = _newest_weights(ref), _newest_weights(ddp_run)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def test_train_cached_equals_lm_training(config_dict, tmp_path: Path, capsys) -> None:
    import yaml

    from e2e_sae.training.trainer import train

    saes = {
        "transcoder_set": {"layers": "all"},
        "architecture": "clt",
        "dict_size_to_input_ratio": 2.0,
        **ARCHS["clt"],
    }
    d = config_dict(loss=LOCAL, saes=saes, n_samples=16, eval_n_samples=None)
    lm_dir = train(load_config(d), run_dir=tmp_path / "lm_run", device="cpu", progress=False)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["cache-acts", str(path), "--out", str(tmp_path / "acts")]) == 0
    assert main(["train-cached", str(path), "--cache", str(tmp_path / "acts")]) == 0
    (cached_dir,) = [p for p in Path(d["save_dir"]).iterdir() if p.is_dir() and p != lm_dir]
    want = read_tensors(list_checkpoints(lm_dir)[-1])
    got = read_tensors(list_checkpoints(cached_dir)[-1])
    assert want.keys() == got.keys()
    for k, w in want.items():
        assert_close_scaled(got[k], w, rtol=1e-6, what=k)


# --- bad input ------------------------------------------------------------------------------------
def test_bad_input(config_dict, tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"transcoder_set.input: block 0 has no hook"):
        SAETransformer(tiny(attn_only=True), [], 2.0, transcoder_set=TranscoderSet(None, IN, OUT))
    with pytest.raises(ConfigError, match="consecutive layers"):
        SAETransformer(
            tiny(),
            [],
            2.0,
            architecture="clt",
            transcoder_set=TranscoderSet([0, 2], IN, OUT, cross_layer=True),
        )
    with pytest.raises(ConfigError, match="not a block of this model"):
        tset_model(layers=[0, 5])
    bad = config_dict(saes={"transcoder_set": {"layers": [0, 2]}, "architecture": "clt"})
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(bad))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "transcoder_set.layers" in err and "consecutive" in err and "Traceback" not in err
    assert not Path(bad["save_dir"]).exists() or not any(Path(bad["save_dir"]).iterdir())


# --- eval: the replacement model ------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["relu", "clt"])
def test_eval_measures_the_replacement_model(arch: str) -> None:
    from e2e_sae.eval.evaluate import evaluate

    model = tset_model(arch).eval()
    perturb_(model)
    toks = tokens(3)
    plan = make_plan(model, LossConfigs.model_validate(KL), force_full_pass=True)
    result = evaluate(model, iter([toks]), 1, plan, [], zero_ablation=False, downstream=False)
    with torch.no_grad():
        new = direct_spliced_logits(model, toks)
        clean, cache = model.tlens_model.run_with_cache(toks)

        def ce(logits: torch.Tensor) -> float:
            return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), toks[:, 1:].flatten()))

        kl = (
            F.kl_div(
                F.log_softmax(new, -1), F.log_softmax(clean, -1), log_target=True, reduction="none"
            )
            .sum(-1)
            .mean()
        )
        xs = [cache[f"blocks.{i}.{IN}"] for i in range(L)]
        local = (
            direct_clt(model, xs)
            if arch == "clt"
            else [model.sae(f"blocks.{i}.{OUT}")(x)[0] for i, x in enumerate(xs)]
        )
    m = result.metrics
    assert m["ce_loss_increase"] == pytest.approx(ce(new) - ce(clean), rel=1e-4, abs=1e-6)
    assert m["kl"] == pytest.approx(float(kl), rel=1e-4)
    for i in range(L):
        target = cache[f"blocks.{i}.{OUT}"].double()
        fve = (
            1
            - ((target - local[i].double()) ** 2).sum()
            / ((target - target.mean((0, 1))) ** 2).sum()
        )
        got = result.per_sae[f"blocks.{i}.{OUT}"]
        assert got["explained_variance_local"] == pytest.approx(float(fve), rel=1e-4, abs=1e-6)
        assert got["l0"] > 0
    # layer 0 reads a clean input in the spliced pass too; later layers read compounded errors
    first = result.per_sae[f"blocks.0.{OUT}"]
    if arch == "relu":
        assert first["explained_variance"] == pytest.approx(first["explained_variance_local"])


@pytest.mark.parametrize("arch", ["relu", "clt"])
def test_browser_opens_transcoder_and_clt_features(arch: str, config_dict, tmp_path: Path) -> None:
    from e2e_sae.analysis.browser import write_browser

    saes = {
        "transcoder_set": {"layers": "all"},
        "architecture": arch,
        "dict_size_to_input_ratio": 2.0,
    }
    cfg = load_config(config_dict(saes=saes))
    model = SAETransformer.from_config(cfg, device="cpu")
    run = tmp_path / "run"
    run.mkdir()
    write_config(run, cfg)
    save_checkpoint(run, model, 0)
    out = write_browser(run, tmp_path / "b", position=f"blocks.0.{OUT}", n_tokens=64, ablate=4)
    text = "".join(p.read_text() for p in out.parent.rglob("*") if p.is_file())
    writes = (
        f"blocks.0.{OUT}, blocks.1.{OUT}, blocks.2.{OUT}" if arch == "clt" else f"blocks.0.{OUT}"
    )
    assert f"read blocks.0.{IN} and write to {writes}" in text


def test_sweep_over_transcoder_sets(token_data: Path, tmp_path: Path, capsys) -> None:
    import json

    import yaml
    from conftest import make_config_dict

    base = make_config_dict(token_data, tmp_path / "runs", n_samples=8)
    base["saes"] = {
        "transcoder_set": {"layers": "all"},
        "architecture": "clt",
        "dict_size_to_input_ratio": 1.0,
        "architecture_kwargs": {"activation": "relu"},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep_file = tmp_path / "s.yaml"
    params = {"saes.transcoder_set.layers": [[0, 1], [1, 2]]}
    sweep_file.write_text(yaml.safe_dump({"base_config": "base.yaml", "parameters": params}))
    assert main(["sweep", str(sweep_file), "--out-dir", str(tmp_path / "out")]) == 0
    records = json.loads((tmp_path / "out" / "sweep_summary.json").read_text())
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert [sorted(r["eval"]["per_sae"]) for r in records] == [
        [f"blocks.0.{OUT}", f"blocks.1.{OUT}"],
        [f"blocks.1.{OUT}", f"blocks.2.{OUT}"],
    ]
