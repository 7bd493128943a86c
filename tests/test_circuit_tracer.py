"""Exports to circuit-tracer 0.5, checked by the real package in its own virtualenv (`.venv-ct`,
built by `make install` / `make install-ct`, as a user installs it: it pins transformers <= 4.57.3):
its loaders reproduce our features and reconstructions, its ReplacementModel (built from our
exported LM) our clean logits, and its `attribute` builds a graph on a `shakespeare-lm` run,
offline. Runs in CI: a missing `.venv-ct` fails, it does not skip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY_TLENS

from e2e_sae import SAETransformer, load_config
from e2e_sae.cli import main
from e2e_sae.interop.circuits import check_acts, check_exports, export_circuit_tracer
from e2e_sae.lm.sites import TranscoderSet
from e2e_sae.runs.checkpoint import save_checkpoint, write_config
from e2e_sae.training.engine import TrainState
from e2e_sae.training.trainer import setup

REPO = Path(__file__).resolve().parent.parent
CT_PYTHON = REPO / ".venv-ct" / "bin" / "python"
IN, OUT = "ln2.hook_normalized", "hook_mlp_out"
TOL = 1e-5  # relative to the scale of our values


@pytest.fixture(scope="module")
def ct_python() -> Path:
    assert CT_PYTHON.exists(), (
        f"{CT_PYTHON} is missing: `make install` (or `make install-ct`) builds circuit-tracer's "
        "environment"
    )
    return CT_PYTHON


def _assert_matches(check: dict[str, Any], what: str) -> None:
    for layer, r in enumerate(check["layers"]):
        assert r["n_active"] > 0, f"{what} layer {layer}: no feature fired"
        assert r["features_err"] <= TOL * r["features_scale"], (what, layer, r)
        assert r["attribution_features_err"] <= TOL * r["features_scale"], (what, layer, r)
        assert r["reconstruction_err"] <= TOL * r["reconstruction_scale"], (what, layer, r)
    if "logits_err" in check:
        assert check["logits_err"] <= TOL * check["logits_scale"], (what, check)


def _tiny(arch: str, seed: int, **kw: Any) -> SAETransformer:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    lm = HookedTransformer(HookedTransformerConfig(**{**TINY_TLENS, "device": "cpu"}))
    skip = kw.pop("skip", False)
    spec = TranscoderSet(None, IN, OUT, skip=skip, cross_layer=arch == "clt")
    model = SAETransformer(
        lm, [], 2.0, architecture=arch, architecture_kwargs=kw, transcoder_set=spec
    )
    with torch.no_grad():  # trained-looking parameters: biases, skip paths, decoder norms
        for p in model.sae_positions:
            sae = model.sae(p)
            sae.decoder.bias.normal_()
            sae.decoder.weight.mul_(torch.rand(sae.decoder.weight.shape[1]) + 0.5)
            if sae.W_skip is not None:
                sae.W_skip.normal_(std=0.1)
            if arch == "batchtopk":  # its threshold, as training leaves it
                sae.threshold.fill_(0.05)
    return model.eval()


def test_exports_match_circuit_tracer_loaders(ct_python: Path, tmp_path: Path) -> None:
    """relu with skip paths, jumprelu, batchtopk (its threshold), CLT with raw and with unit
    decoders: circuit-tracer's features and reconstructions equal ours within 1e-5."""
    cases = {
        "relu-skip": _tiny("relu", 0, skip=True),
        "jumprelu": _tiny("jumprelu", 1, init_threshold=0.05),
        "batchtopk": _tiny("batchtopk", 2, k=4),
        "clt-raw": _tiny("clt", 3, init_threshold=0.05, unit_decoders=False),
        "clt-unit": _tiny("clt", 4, init_threshold=0.05),
    }
    toks = torch.randint(
        0, TINY_TLENS["d_vocab"], (2, 12), generator=torch.Generator().manual_seed(0)
    )
    items = []
    for name, model in cases.items():
        out = export_circuit_tracer(model, tmp_path / name, with_lm=False)
        items.append((out, check_acts(model, toks, with_logits=False)))
    checks = check_exports(items, ct_python=ct_python, timeout=600)
    kinds = [c["kind"] for c in checks]
    assert kinds == ["TranscoderSet"] * 3 + ["CrossLayerTranscoder"] * 2
    for name, check in zip(cases, checks, strict=True):
        _assert_matches(check, name)


def _shakespeare_run(tmp_path: Path, arch: str) -> tuple[Path, SAETransformer]:
    cfg = yaml.safe_load((REPO / "configs" / "shakespeare_e2e.yaml").read_text())
    cfg.update(n_samples=8, batch_size=4, save_dir=str(tmp_path / "runs"), eval_n_samples=None)
    cfg["eval_every_n_samples"] = None
    for k in ("train_data", "eval_data"):
        cfg[k] = {**cfg[k], "n_ctx": 32}
    saes: dict[str, Any] = {
        "transcoder_set": {"layers": "all"},
        "architecture": arch,
        "dict_size_to_input_ratio": 1.0,
    }
    if arch == "clt":
        saes["architecture_kwargs"] = {"init_threshold": 0.05}
    cfg["saes"] = saes
    config = load_config(cfg)
    t = setup(config, device="cpu")
    batches = t.batches(config.train_data, config.seed)
    state = TrainState()
    t.model.train()
    t.train_step(batches, state)
    run = tmp_path / "run"
    run.mkdir()
    write_config(run, config)
    save_checkpoint(run, t.model, state.n_samples)
    return run, t.model.eval()


@pytest.mark.parametrize("arch", ["relu", "clt"])
def test_shakespeare_run_exported_checked_and_graphed(
    arch: str, ct_python: Path, tmp_path: Path, capsys
) -> None:
    """The CLI path a user takes: train, `export --format circuit-tracer`, then circuit-tracer
    loads it (features, reconstructions, the replacement model's clean logits = ours) and
    `e2e-sae graph` builds an attribution graph offline with its scores."""
    run, model = _shakespeare_run(tmp_path, arch)
    out = tmp_path / "export"
    assert main(["export", str(run), "--format", "circuit-tracer", str(out)]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    kind = "cross_layer_transcoder" if arch == "clt" else "transcoder_set"
    assert cfg["model_kind"] == kind
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == (IN, OUT)
    tok = model.lm.tokenizer
    assert tok is not None
    ids = tok("To be, or not to be, that is the question", add_special_tokens=False)["input_ids"]
    toks = torch.tensor([ids[:10]])
    (check,) = check_exports([(out, check_acts(model, toks))], ct_python=ct_python, timeout=600)
    assert "logits_err" in check
    _assert_matches(check, arch)
    capsys.readouterr()
    args = [
        "graph",
        str(out),
        "To be, or not",
        "--ct-python",
        str(ct_python),
        "--save",
        str(tmp_path / "graphs"),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "replacement" in printed and "completeness" in printed and "mean" in printed
    assert (tmp_path / "graphs" / "graph_0.pt").is_file()
    if arch == "relu":  # eval of the replacement model with graph scores on fixed eval prompts
        args = [
            "eval",
            str(run),
            "--n-tokens",
            "64",
            "--graph-prompts",
            "2",
            "--graph-prompt-tokens",
            "6",
            "--ct-python",
            str(ct_python),
        ]
        assert main(args) == 0
        ev = json.loads((run / "eval.json").read_text())
        assert len(ev["graphs"]) == 2
        for key in ("graph_replacement_score", "graph_completeness_score"):
            assert 0 < ev[key] <= 1, key
            mean = sum(g[key.removeprefix("graph_")] for g in ev["graphs"]) / 2
            assert ev[key] == pytest.approx(mean)
        layer0 = ev["per_sae"][f"blocks.0.{OUT}"]
        assert "explained_variance_local" in layer0 and ev["ce_loss_increase"] > 0


def test_export_bad_input(tmp_path: Path, capsys, config_dict) -> None:
    """Runs circuit-tracer cannot represent: one line naming the run, exit 2, nothing written."""
    for name, saes in {
        "residual": {"sae_positions": ["blocks.1.hook_resid_pre"]},
        "matryoshka": {
            "transcoder_set": {"layers": "all"},
            "architecture": "matryoshka",
            "k": 4,
            "architecture_kwargs": {"matryoshka_widths": [8, 64]},
        },
        "topk": {"transcoder_set": {"layers": "all"}, "architecture": "topk", "k": 4},
        "subset": {"transcoder_set": {"layers": [0, 1]}},
    }.items():
        cfg = load_config(config_dict(saes={"dict_size_to_input_ratio": 2.0, **saes}))
        model = SAETransformer.from_config(cfg, device="cpu")
        run = tmp_path / name
        run.mkdir()
        write_config(run, cfg)
        save_checkpoint(run, model, 0)
        out = tmp_path / f"out_{name}"
        assert main(["export", str(run), "--format", "circuit-tracer", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert str(run) in err and "circuit-tracer" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists(), name
