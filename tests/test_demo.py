"""`e2e-sae demo` end to end (tiny n_samples), the curves plot, and the example configs."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from e2e_sae.cli import main
from e2e_sae.cli.demo import demo_config_dict, demo_config_path
from e2e_sae.config import Config, load_config
from e2e_sae.training.curves import collect_series, plot_training_curves

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXAMPLE_CONFIGS = [
    "demo",
    "shakespeare_local",
    "shakespeare_e2e",
    "shakespeare_e2e_ds",
    "smollm2_local",
    "smollm2_e2e",
    "gpt2_local",
    "gpt2_e2e",
    "gpt2_e2e_ds",
    "matryoshka_local",
]


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture):
    argv = [
        "demo",
        "--save-dir",
        str(tmp_path),
        "--n-samples",
        "32",
        "--eval-n-samples",
        "16",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in (
        "ce_loss_clean",
        "ce_loss_with_saes",
        "ce_loss_increase",
        "kl",
        "l0",
        "alive_dict_elements",
        "explained_variance",
    ):
        assert re.search(rf"\b{name}\b", out), name
    run_dir = Path(re.search(r"run directory:\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    png = Path(re.search(r"training curves:\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    assert run_dir.parent == tmp_path
    assert (run_dir / "samples_32.safetensors").is_file()
    assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC
    # The table's CE increase is the difference of the two CE rows it prints.
    rows = dict(re.findall(r"^\s*(ce_loss_\w+)\s+(\S+)\s*$", out, flags=re.M))
    inc = float(rows["ce_loss_with_saes"]) - float(rows["ce_loss_clean"])
    assert float(rows["ce_loss_increase"]) == pytest.approx(inc, abs=2e-3)


def test_train_without_config_runs_the_demo(monkeypatch: pytest.MonkeyPatch):
    calls: list[argparse.Namespace] = []
    monkeypatch.setattr("e2e_sae.cli.demo.cmd_demo", lambda args: calls.append(args) or 0)
    assert main(["train"]) == 0
    assert len(calls) == 1 and calls[0].config is None


def test_demo_overrides(tmp_path: Path):
    cfg = load_config(demo_config_dict(tmp_path, n_samples=100, eval_n_samples=8))
    assert isinstance(cfg, Config)
    assert cfg.save_dir == tmp_path and cfg.n_samples == 100 and cfg.eval_n_samples == 8
    assert cfg.warmup_samples <= 10
    assert cfg.tlens_model_name == "shakespeare-lm" and cfg.loss.logits_kl is not None


@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_example_configs_load(name: str):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config)


def test_packaged_demo_config_matches_example():
    assert load_config(demo_config_path()) == load_config(REPO / "configs" / "demo.yaml")


def test_collect_series_groups_positions_and_eval(tmp_path: Path):
    records = [
        {
            "samples": 16,
            "step": 1,
            "loss": 2.0,
            "lr": 1e-3,
            "sparsity": 5.0,
            "dead_dict_elements/blocks.1.hook_resid_pre": 3,
            "tokens_per_s": 9.0,
        },
        {"samples": 32, "step": 2, "loss": 1.5, "lr": 1e-3, "sparsity": "nan"},
        {"samples": 32, "step": 2, "eval/l0/blocks.1.hook_resid_pre": 7.5, "eval/kl": 0.1},
    ]
    series = collect_series(records)
    assert series["loss"][""] == ([16.0, 32.0], [2.0, 1.5])
    assert series["sparsity"][""] == ([16.0], [5.0])  # the non-finite value is dropped
    assert series["dead_dict_elements"]["blocks.1.hook_resid_pre"] == ([16.0], [3.0])
    assert series["eval/l0"]["blocks.1.hook_resid_pre"] == ([32.0], [7.5])
    assert "tokens_per_s" not in series and "samples" not in series

    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    png = plot_training_curves(tmp_path)
    assert png == tmp_path / "training_curves.png" and png.read_bytes()[:8] == PNG_MAGIC


def test_demo_results_are_quoted_in_one_place() -> None:
    """The README quotes the demo's measured result and time; the configs and the notebook point
    there instead of quoting their own (three copies had drifted apart)."""
    notebook = json.loads((REPO / "demos" / "quickstart.ipynb").read_text())
    texts = {
        "configs/demo.yaml": (REPO / "configs" / "demo.yaml").read_text(),
        "e2e_sae/configs/demo.yaml": demo_config_path().read_text(),
        "demos/quickstart.ipynb": "".join("".join(c["source"]) for c in notebook["cells"]),
    }
    quote = re.compile(r"L0 \d|\d+/2048|CE \d\.\d+ ?(->|→)|KL \d\.\d|\b\d+ ?(s|min|minutes)\b")
    for name, text in texts.items():
        comments = (
            text
            if name.endswith(".ipynb")
            else "\n".join(line for line in text.splitlines() if "#" in line)
        )
        assert not quote.search(comments), (name, quote.search(comments))
        assert "README" in text, name
    readme = (REPO / "README.md").read_text()
    assert re.search(
        r"Result \(seed 0,\s+identical on reruns,\s+measured [^)]*\):\s+L0 [\d.]+", readme
    )


def test_matryoshka_example_lets_auxk_act(capsys: pytest.CaptureFixture) -> None:
    from e2e_sae.lm.dry_run import build_meta_saes, hook_shapes

    path = REPO / "configs" / "matryoshka_local.yaml"
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.saes.architecture == "matryoshka"
    (sae,) = build_meta_saes(cfg, hook_shapes(cfg)).values()
    assert sae.dead_tokens_threshold == 38_400 == cfg.train_tokens // 10  # type: ignore[attr-defined]
    assert main(["train", str(path), "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().out
