"""SAEs on a small MLP trained on scikit-learn's 8x8 digits (offline, real data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from e2e_sae.cli import main
from e2e_sae.errors import ConfigError
from e2e_sae.mlp import MLP, MLPConfig, load_digits_split, run_mlp_job
from e2e_sae.mlp.train import sae_step_inputs
from e2e_sae.objective.losses import LossInputs, build_loss_terms, compute_losses

REPO = Path(__file__).resolve().parents[1]


def job_config(save_dir: Path | None, **overrides: Any) -> MLPConfig:
    """The shipped example config, shortened a little for the test budget."""
    raw = yaml.safe_load((REPO / "configs" / "mlp_digits.yaml").read_text())
    raw["save_dir"] = str(save_dir) if save_dir else None
    raw["run_name"] = "t"
    raw["mlp"]["n_epochs"] = 30
    for run in raw["saes"]:
        run["n_epochs"] = 30
    raw.update(overrides)
    return MLPConfig.model_validate(raw)


def test_digits_split_is_real_stratified_and_deterministic() -> None:
    train, test = load_digits_split(0.2, seed=0)
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.shape[1] == 64 and 0 <= float(train.x.min()) and float(train.x.max()) == 1.0
    counts = torch.bincount(test.y, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # ~36 per class
    again, _ = load_digits_split(0.2, seed=0)
    assert torch.equal(again.x, train.x)
    other, _ = load_digits_split(0.2, seed=1)
    assert not torch.equal(other.x, train.x)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return run_mlp_job(job_config(tmp_path_factory.mktemp("mlp")), device="cpu", progress=False)


def test_mlp_accuracy_and_e2e_sae_keeps_it(job: Any) -> None:
    _, test = load_digits_split(0.2, seed=0)
    mlp = job.mlp
    with torch.no_grad():
        logits, acts, _ = mlp(test.x)
    acc = float((logits.argmax(-1) == test.y).float().mean())
    assert job.mlp_metrics["accuracy"] == pytest.approx(acc)
    assert acc > 0.90

    e2e = job.sae_metrics["e2e"]
    assert e2e["accuracy"] == pytest.approx(acc)
    # percentage points; 1 test image is 0.28 pp. The SAEs' training trajectory (not just the
    # last digits) differs between CPU kernels: 0.3 pp with AVX-512, 2.2 pp with
    # ATEN_CPU_CAPABILITY=default.
    assert abs(e2e["accuracy_drop"]) < 4.0
    saes = job.saes["e2e"]
    with torch.no_grad():
        new_logits, _, sae_acts = mlp(test.x, saes)
    p, q = F.softmax(logits, -1), F.softmax(new_logits, -1)
    kl = float((p * (p.log() - q.log())).sum(-1).mean())
    assert e2e["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert e2e["accuracy_with_saes"] == pytest.approx(
        float((new_logits.argmax(-1) == test.y).float().mean())
    )
    h, c, out = sae_acts["hidden.0"]
    assert torch.equal(h, acts["hidden.0"])  # the first SAE reads the clean activation
    stats = e2e["per_sae"]["hidden.0"]
    assert stats["l0"] == pytest.approx(float((c != 0).float().sum(-1).mean()))
    ev = 1 - float(((out - h) ** 2).sum() / ((h - h.mean(0)) ** 2).sum())
    assert stats["explained_variance"] == pytest.approx(ev, rel=1e-4)
    assert 0 < stats["l0"] < 64  # sparse: fewer active latents than hidden units

    # e2e buys sparsity with reconstruction: sparser than the local SAE, worse MSE (paper, sec. 4)
    local = job.sae_metrics["local"]["per_sae"]["hidden.0"]
    assert stats["l0"] < local["l0"] and stats["mse"] > local["mse"]
    assert job.sae_metrics["local"]["accuracy_drop"] < 5.0


def test_job_files_and_reloading_the_mlp(job: Any, tmp_path: Path) -> None:
    run_dir = job.run_dir
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "config.yaml",
        "mlp.safetensors",
        "sae_local.safetensors",
        "sae_e2e.safetensors",
        "results.json",
    } <= names
    results = json.loads((run_dir / "results.json").read_text())
    assert results["saes"]["e2e"]["kl"] == pytest.approx(job.sae_metrics["e2e"]["kl"])
    loaded = MLP.load(run_dir)
    _, test = load_digits_split(0.2, seed=0)
    with torch.no_grad():
        assert torch.equal(loaded(test.x)[0], job.mlp(test.x)[0])
    # reuse the trained MLP: no MLP training, same clean accuracy
    cfg = job_config(None, saved_mlp_path=str(run_dir / "mlp.safetensors"), saes=[])
    again = run_mlp_job(cfg, device="cpu", progress=False)
    assert again.mlp_metrics["accuracy"] == job.mlp_metrics["accuracy"]


def test_local_and_e2e_losses_match_direct_computation() -> None:
    torch.manual_seed(0)
    mlp = MLP(8, [6, 5], 3)
    from e2e_sae.config import LossConfigs
    from e2e_sae.saes import build_sae

    saes = {"hidden.0": build_sae("relu", 6, 12), "hidden.1": build_sae("relu", 5, 10)}
    x = torch.randn(7, 8)
    cfg = LossConfigs.model_validate(
        {"sparsity": {"coeff": 0.5}, "out_to_in": {"coeff": 1.0}, "logits_kl": {"coeff": 2.0}}
    )
    terms = build_loss_terms(cfg)
    inputs: LossInputs = sae_step_inputs(mlp, saes, x, e2e=True)
    total, values = compute_losses(terms, inputs)
    # direct: run the layers by hand with both SAEs spliced in
    with torch.no_grad():
        h0 = F.relu(mlp.hidden[0](x))
        o0, c0 = saes["hidden.0"](h0)
        h1 = F.relu(mlp.hidden[1](o0))
        o1, c1 = saes["hidden.1"](h1)
        new = mlp.out(o1)
        orig = mlp.out(F.relu(mlp.hidden[1](h0)))
    sparsity = c0.abs().sum(-1).mean() / 6 + c1.abs().sum(-1).mean() / 5
    mse = F.mse_loss(o0, h0) + F.mse_loss(o1, h1)
    p, logq = F.softmax(orig, -1), F.log_softmax(new, -1)
    kl = (p * (p.log() - logq)).sum(-1).mean()
    assert values["sparsity"].item() == pytest.approx(float(sparsity), rel=1e-5)
    assert values["out_to_in"].item() == pytest.approx(float(mse), rel=1e-5)
    assert values["logits_kl"].item() == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    assert total.item() == pytest.approx(float(0.5 * sparsity + mse + 2 * kl), rel=1e-4)
    # local: each SAE reads the clean activation, no spliced logits
    local = sae_step_inputs(mlp, saes, x, e2e=False)
    assert local.new_logits is None
    with torch.no_grad():
        assert torch.equal(local.sae_acts["hidden.1"].input, F.relu(mlp.hidden[1](h0)))


def test_train_mlp_cli_and_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = yaml.safe_load((REPO / "configs" / "mlp_digits.yaml").read_text())
    raw["mlp"]["n_epochs"] = 2
    raw["saes"] = raw["saes"][1:]
    raw["saes"][0]["n_epochs"] = 1
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train-mlp", str(path), "--no-save", "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "MLP test accuracy" in out and "e2e" in out and "hidden.0" in out

    # with W&B (offline): config, metrics, histograms and files land under the run directory
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    path.write_text(
        yaml.safe_dump(
            raw | {"save_dir": str(tmp_path / "runs"), "run_name": "w", "wandb_project": "mlp-test"}
        )
    )
    assert main(["train-mlp", str(path), "--quiet", "--device", "cpu"]) == 0
    wandb.teardown()
    (offline,) = (tmp_path / "runs" / "w" / "wandb").glob("offline-run-*")
    saved = {p.name for p in (offline / "files").iterdir()}
    assert {"mlp.safetensors", "sae_e2e.safetensors", "results.json"} <= saved
    data = next(offline.glob("run-*.wandb")).read_bytes()
    assert b"mlp-test" in data and b"e2e/feature_frequency/hidden.0" in data
    capsys.readouterr()

    raw["saes"][0]["sae_positions"] = ["hidden.7"]
    path.write_text(yaml.safe_dump(raw))
    assert main(["train-mlp", str(path), "--no-save", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "hidden.7" in err and "\n" not in err
    with pytest.raises(ConfigError, match="unknown key"):
        MLPConfig.model_validate({**raw, "bogus": 1}) if False else _load(raw | {"bogus": 1})


def _load(raw: dict[str, Any]) -> MLPConfig:
    from e2e_sae.config import load_config

    return load_config(raw, MLPConfig)
