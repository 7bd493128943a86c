"""What a researcher sees: curves after every run, the overlay plot, the progress bar's speed, dead
counts that name their window, dry-run hook checks, config error messages, `5e-3` as a number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import make_config_dict

from e2e_sae.analysis.overlay import plot_curves_overlay
from e2e_sae.analysis.plots import (
    RunInfo,
    downstream_figure,
    tradeoff_figure,
)
from e2e_sae.cli import main
from e2e_sae.config import Config, load_config, parse_set, yaml_load
from e2e_sae.errors import ConfigError
from e2e_sae.training.curves import CURVES_FILE, panel_title
from e2e_sae.training.loop import TokenRate, format_rate
from e2e_sae.training.sweep import load_sweep
from e2e_sae.training.trainer import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- YAML numbers ---------------------------------------------------------------------------------
def test_exponent_numbers_are_floats() -> None:
    got = yaml_load("a: 5e-3\nb: 1.0e5\nc: -2E+3\nd: .5e-2\ne: 7\nf: 5e\ng: e5\nh: 0.25\n")
    assert got == {
        "a": 0.005,
        "b": 1e5,
        "c": -2000.0,
        "d": 0.005,
        "e": 7,
        "f": "5e",
        "g": "e5",
        "h": 0.25,
    }
    assert all(type(got[k]) is float for k in "abcdh") and type(got["e"]) is int


def test_config_and_sweep_read_5e_3_as_a_float(config_dict, tmp_path: Path) -> None:
    cfg = config_dict()
    text = yaml.safe_dump(cfg).replace("lr: 0.001", "lr: 5e-3")
    assert "lr: 5e-3" in text
    (tmp_path / "base.yaml").write_text(text)
    config = load_config(tmp_path / "base.yaml")
    assert isinstance(config, Config) and config.lr == 0.005
    (tmp_path / "sweep.yaml").write_text(
        "base_config: base.yaml\nparameters:\n  lr: [5e-3, 1e-2]\n  loss.sparsity.coeff: [2e-1]\n"
    )
    sweep = load_sweep(tmp_path / "sweep.yaml", overrides=parse_set(["eval_n_samples=4"]))
    assert [r.overrides["lr"] for r in sweep.runs] == [0.005, 0.01]
    assert all(type(r.overrides["lr"]) is float for r in sweep.runs)
    assert [r.config.lr for r in sweep.runs] == [0.005, 0.01]
    assert sweep.runs[0].config.loss.sparsity is not None
    assert sweep.runs[0].config.loss.sparsity.coeff == 0.2
    assert parse_set(["lr=5e-3"]) == {"lr": 0.005}


def test_example_sweep_file_expands() -> None:
    repo = Path(__file__).resolve().parents[1]
    sweep = load_sweep(repo / "configs" / "sweep_demo_sparsity.yaml")
    coeffs = [r.config.loss.sparsity.coeff for r in sweep.runs]  # type: ignore[union-attr]
    assert coeffs == [0.5, 1.0, 2.0, 4.0] and all(type(c) is float for c in coeffs)
    assert sweep.varied == ["loss.sparsity.coeff"]


# --- config error messages ------------------------------------------------------------------------
def test_every_missing_field_is_named(config_dict) -> None:
    cfg = config_dict()
    for k in ("batch_size", "lr", "train_data"):
        del cfg[k]
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value) == "config: required fields are missing: batch_size, lr, train_data"


def test_near_miss_keys_get_did_you_mean(config_dict) -> None:
    cfg = config_dict()
    cfg["batch_sise"] = cfg.pop("batch_size")
    cfg["saes"]["sae_positons"] = cfg["saes"].pop("sae_positions")
    cfg["whatever_else"] = 1
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert "saes.sae_positons: unknown key (did you mean 'sae_positions'?)" in msg
    assert "batch_sise: unknown key (did you mean 'batch_size'?)" in msg
    assert "whatever_else: unknown key;" in msg or msg.endswith("whatever_else: unknown key")
    assert "batch_size: required field is missing" in msg


def test_version(capsys) -> None:
    from e2e_sae import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"e2e-sae {__version__}"


# --- dry run --------------------------------------------------------------------------------------
def test_dry_run_checks_hooks_against_the_model(config_dict, tmp_path: Path, capsys) -> None:
    cfg = config_dict(saes={"sae_positions": ["blocks.7.hook_resid_pre"]})  # 3-layer model
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "saes.sae_positions" in err and "blocks.7" in err
    cfg["saes"]["sae_positions"] = ["hook_resid_pre"]  # a substring: every layer
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    positions = ", ".join(f"blocks.{i}.hook_resid_pre" for i in range(3))
    assert f"\n# SAE positions: {positions} (relu)\n" in captured.out
    assert captured.out.endswith("\n")  # the report lines are YAML comments: still a config
    assert yaml.safe_load(captured.out)["saes"]["sae_positions"] == ["hook_resid_pre"]
    assert not (tmp_path / "runs").exists()
    # A pattern matches whole dot-separated parts: a truncated hook name matches nothing.
    cfg["saes"]["sae_positions"] = ["blocks.1.hook_resid_pr"]
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--dry-run"]) == 2
    assert "did you mean 'blocks.1.hook_resid_pre'?" in capsys.readouterr().err


def test_hook_patterns_match_whole_name_parts() -> None:
    from e2e_sae.lm.sites import filter_names, matches_pattern

    names = [
        "hook_embed",
        "blocks.1.hook_resid_pre",
        "blocks.1.attn.hook_q",
        "blocks.12.hook_resid_pre",
    ]
    assert filter_names(names, ["hook_resid_pre"], "f") == [names[1], names[3]]
    assert filter_names(names, ["blocks.1"], "f") == names[1:3]  # not blocks.12
    assert filter_names(names, ["attn.hook_q"], "f") == [names[2]]
    for partial in ("blocks.1.hook_resid_pr", "resid_pre", "hook_resid", "locks.1"):
        assert not any(matches_pattern(n, partial) for n in names), partial
        with pytest.raises(ConfigError, match="matches no hook"):
            filter_names(names, [partial], "saes.sae_positions")


# Each of these passed `--dry-run` before and failed only in the real run (on the built-in
# shakespeare-lm: d_vocab 4096, n_ctx 128).
DRY_RUN_CATCHES = [
    ({"saes.architecture": "TopK"}, "saes.architecture: unknown 'TopK' (did you mean 'topk'?"),
    ({"saes.architecture": "topk"}, "saes.k: required for architecture 'topk'"),
    (
        {"saes.architecture": "matryoshka", "saes.k": 8},
        "saes.architecture_kwargs.matryoshka_widths",
    ),
    (
        {"train_data.tokenizer_name": "gpt2"},
        "train_data.tokenizer_name: 'gpt2' has 50,257 tokens, more than the model's d_vocab 4,096",
    ),
    ({"eval_data.n_ctx": 512}, "eval_data.n_ctx: 512 is longer than the model's context n_ctx=128"),
    ({"train_data.dataset_name": "./no/such/corpus"}, "path './no/such/corpus' does not exist"),
    ({"train_data.dataset_name": "shakespear"}, "(did you mean 'shakespeare'?)"),
    ({"eval_data.tokenizer_name": "shakespeare_bpe"}, "(did you mean 'shakespeare-bpe'?)"),
    ({"tlens_model_name": "shakespeare_lm"}, "unknown model 'shakespeare_lm' (did you mean"),
    (
        {"saes.sae_positions": ["blocks.2.hook_resid_pr"]},
        "(did you mean 'blocks.2.hook_resid_pre'?)",
    ),
    ({"teacher_cache": "no/such/cache"}, "teacher_cache: no/such/cache does not exist"),
]


@pytest.mark.parametrize(("change", "needle"), DRY_RUN_CATCHES, ids=lambda v: str(v)[:40])
def test_dry_run_catches_what_the_run_catches(change, needle, tmp_path: Path, capsys) -> None:
    from e2e_sae.cli.demo import demo_config_dict

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(demo_config_dict(save_dir=tmp_path / "runs")))
    sets = [f"--set={k}={json.dumps(v)}" for k, v in change.items()]
    assert main(["train", str(path), "--dry-run", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "runs").exists()


def test_dry_run_warns_when_an_aux_loss_can_never_act(tmp_path: Path, capsys) -> None:
    from e2e_sae.cli.demo import demo_config_dict

    path = tmp_path / "c.yaml"
    cfg = demo_config_dict(save_dir=tmp_path / "runs")
    cfg["saes"].update(architecture="topk", k=8)
    path.write_text(yaml.safe_dump(cfg))
    # the default dead threshold (a tenth of the run's 512,000 tokens) lets AuxK act
    assert main(["train", str(path), "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().out
    fixed = "--set=saes.architecture_kwargs.dead_tokens_threshold=10000000"
    assert main(["train", str(path), "--dry-run", fixed]) == 0
    out = capsys.readouterr().out
    assert "# warning: blocks.2.hook_resid_pre: AuxK can never act" in out
    assert "(10,000,000 tokens) is not below the run's 512,000 training tokens" in out


def test_dry_run_checks_in_to_orig_hooks_of_a_builtin_model(tmp_path: Path, capsys) -> None:
    from e2e_sae.cli.demo import demo_config_dict

    cfg = demo_config_dict(save_dir=tmp_path / "runs")
    cfg["loss"]["in_to_orig"] = {"hook_positions": ["blocks.99.hook_resid_pre"], "total_coeff": 1.0}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--dry-run"]) == 2
    assert "loss.in_to_orig.hook_positions" in capsys.readouterr().err


# --- progress bar speed ---------------------------------------------------------------------------
def test_token_rate_is_current_not_cumulative() -> None:
    r = TokenRate(window_s=10.0, now=0.0)
    assert r.update(1000, now=1.0) == 1000.0
    for t in range(2, 21):  # 1000 tokens/s for 20 s
        r.update(1000, now=float(t))
    for t in range(21, 31):  # then 100 tokens/s: the last 10 s show only that
        rate = r.update(100, now=float(t))
    assert rate == pytest.approx(100.0)
    assert format_rate(1234.0) == "1.23k tok/s" and format_rate(12.0) == "12 tok/s"
    assert format_rate(2.5e6) == "2.5M tok/s"


def test_speed_and_eta_leave_evaluation_out() -> None:
    import io

    from tqdm import tqdm

    from e2e_sae.training.loop import pause_bar

    # 10 steps of 1 s, then a 60 s evaluation, then a step: the current speed stays 1 step/s
    r = TokenRate(window_s=5.0, now=0.0)
    for t in range(1, 11):
        r.update(100, now=float(t))
    r.pause(60.0)
    assert r.update(100, now=71.0) == pytest.approx(100.0)
    clock = [0.0]
    bar = tqdm(total=20, file=io.StringIO(), mininterval=0, smoothing=0)
    bar._time = lambda: clock[0]  # type: ignore[attr-defined]
    bar.start_t = bar.last_print_t = 0.0
    for _ in range(10):
        clock[0] += 1.0
        bar.update(1)
    clock[0] += 60.0  # the evaluation
    pause_bar(bar, 60.0)
    clock[0] += 1.0
    bar.update(1)
    info = bar.format_dict
    assert info["elapsed"] == pytest.approx(11.0)
    assert info["n"] / info["elapsed"] == pytest.approx(1.0)  # the rate tqdm shows and its ETA use
    bar.close()
    pause_bar(tqdm(total=1, disable=True), 1.0)  # a disabled bar has no clock: nothing to do


# --- a training run: curves, progress, dead window ------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, token_data: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("ux_runs")
    dirs = []
    for i, coeff in enumerate((0.1, 1.0)):
        loss = {"sparsity": {"coeff": coeff}, "out_to_in": {"coeff": 1.0}}
        cfg = make_config_dict(
            token_data,
            root,
            n_samples=16,
            eval_every_n_samples=8,
            run_name=f"run-{i}",
            act_frequency_n_tokens=48,
            loss=loss,
        )
        config = load_config(cfg)
        assert isinstance(config, Config)
        dirs.append(train(config, device="cpu", progress=False))
    return dirs


def test_train_writes_training_curves(two_runs: list[Path]) -> None:
    for d in two_runs:
        assert (d / CURVES_FILE).read_bytes()[:8] == PNG_MAGIC


def test_train_progress_bar_shows_speed_and_final_eval(config_dict, capsys) -> None:
    config = load_config(config_dict(n_samples=8))
    assert isinstance(config, Config)
    train(config, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "tok/s" in err and "final eval" in err
    assert "<" in err  # tqdm's remaining-time estimate (elapsed<remaining)


def test_dead_counts_name_their_window(two_runs: list[Path]) -> None:
    lines = (two_runs[0] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train_recs = [r for r in records if "loss" in r]
    assert train_recs and all(r["dead_window_tokens"] == 48 for r in train_recs)
    assert panel_title("dead_dict_elements", records) == (
        "dead latents (none of the last 48 train tokens)"
    )
    n_eval = next(r["eval/n_tokens"] for r in records if "eval/n_tokens" in r)
    assert panel_title("eval/dead_dict_elements", records) == (
        f"eval dead latents (none of {int(n_eval)} eval tokens)"
    )


def test_curves_overlay_has_one_line_per_run(two_runs: list[Path], tmp_path: Path) -> None:
    out = plot_curves_overlay(two_runs, tmp_path)
    assert [p.name for p in out.paths] == [
        "training_curves_overlay.png",
        "training_curves_overlay.svg",
        "training_curves_overlay.md",  # the side table: label -> run directory
    ]
    assert out.paths[0].read_bytes()[:8] == PNG_MAGIC
    names = [d.name for d in two_runs]
    pos = "blocks.1.hook_resid_pre"
    assert out.lines["loss"] == [(n, "") for n in names]
    assert out.lines["sparsity"] == [(n, "") for n in names]
    for panel in ("eval/l0", "dead_dict_elements", "eval/dead_dict_elements"):
        assert out.lines[panel] == [(n, pos) for n in names], panel
    assert out.lines["eval/ce_loss_increase"] == [(n, "") for n in names]


def test_plot_curves_cli(two_runs: list[Path], tmp_path: Path, capsys) -> None:
    argv = ["plot", "--curves", *map(str, two_runs), "--out", str(tmp_path / "p")]
    assert main(argv) == 0
    assert (tmp_path / "p" / "training_curves_overlay.png").is_file()
    assert "training_curves_overlay.png" in capsys.readouterr().out


# --- plot: colours, Pareto front, labels, legends, log axes (geometry: test_paper.py) -----------
POS = "blocks.1.hook_resid_pre"
LONG = "a-run-directory-name-much-longer-than-twenty-eight-characters"


def _info(
    token_data: Path,
    root: Path,
    name: str,
    loss: dict,
    l0: float,
    ce: float,
    mse: float = 0.1,
    seed: int = 0,
) -> RunInfo:
    config = load_config(make_config_dict(token_data, root, loss=loss, seed=seed))
    assert isinstance(config, Config)
    per_sae = {POS: {"l0": l0, "alive_dict_elements": 10, "explained_variance": 0.9, "mse": mse}}
    down = {
        "blocks.2.hook_resid_pre": {"layer": 2, "explained_variance": 0.8, "mse": mse * 1.1},
        "blocks.2.hook_resid_post": {"layer": 3, "explained_variance": 0.7, "mse": mse * 1.2},
    }
    ev = {"ce_loss_increase": ce, "n_tokens": 128, "per_sae": per_sae, "downstream": down}
    return RunInfo(root / name, config, ev)


def _local(coeff: float) -> dict:
    return {"sparsity": {"coeff": coeff}, "out_to_in": {"coeff": 1.0}}


def _e2e(coeff: float) -> dict:
    return {"sparsity": {"coeff": coeff}, "logits_kl": {"coeff": 1.0}}


def test_downstream_one_colour_per_run_and_full_names(token_data: Path, tmp_path: Path) -> None:
    runs = [
        _info(token_data, tmp_path, f"{LONG}-{i}", _e2e(c), 10, 0.1, mse=4.6 + 0.2 * i)
        for i, c in enumerate((0.5, 1.0, 2.0))
    ]
    fig = downstream_figure(runs)
    ax_ev, ax_mse = fig.axes
    colors = [line.get_color() for line in ax_ev.get_lines()]
    assert len(colors) == 3 and len(set(colors)) == 3
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == [f"e2e relu λ={c:g}" for c in (0.5, 1.0, 2.0)]  # full names: runs.md
    # The MSE axis is logarithmic over less than a decade: its labels are plain numbers.
    fig.canvas.draw()
    labels = [t.get_text() for t in ax_mse.get_yticklabels(which="both") if t.get_text()]
    assert ax_mse.get_yscale() == "log" and labels
    for label in labels:
        float(label)  # no '4.8×10⁰' mathtext


def test_tradeoff_draws_the_front_and_labels_points(token_data: Path, tmp_path: Path) -> None:
    # (L0, CE increase): (10, 0.4) and (40, 0.2) are the front; (20, 0.5) is beaten by (10, 0.4).
    runs = [
        _info(token_data, tmp_path, "a", _local(0.1), 40, 0.2),
        _info(token_data, tmp_path, "b", _local(0.5), 20, 0.5),
        _info(token_data, tmp_path, "c", _local(2.0), 10, 0.4),
    ]
    fig = tradeoff_figure(runs, "l0", "L0")
    (ax,) = fig.axes
    front, rest = ax.get_lines()
    assert list(front.get_xdata()) == [10, 40] and list(front.get_ydata()) == [0.4, 0.2]
    assert front.get_linestyle() == "-" and front.get_marker() == "o"
    assert list(rest.get_xdata()) == [20] and rest.get_linestyle() == "None"
    assert [t.get_text() for t in ax.texts] == ["λ=2", "λ=0.5", "λ=0.1"]  # sorted by L0
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "local · relu (3 runs)",
        "filled, joined: its group's Pareto front",
        "hollow: beaten in both by its group",
    ]


def test_eval_and_browse_count_dead_over_the_same_tokens(two_runs: list[Path], tmp_path) -> None:
    import re

    from e2e_sae.analysis.browser import write_browser
    from e2e_sae.eval.evaluate import evaluate_run
    from e2e_sae.eval.report import eval_table

    run = two_runs[1]
    result = evaluate_run(run, device="cpu")
    n = int(result.metrics["n_tokens"])
    dead = int(result.per_sae[POS]["dead_dict_elements"])
    assert f"(dead: fired on none of the {n:,} eval tokens)" in eval_table(result)
    write_browser(run, tmp_path / "b", device="cpu", ablate=0)
    page = (tmp_path / "b" / "data" / "index.js").read_text(encoding="utf-8").replace(",", "")
    m = re.search(
        r"(\d+) tokens scanned \([^)]*\); \d+ features (\d+) dead \(fired on none of them\)",
        page,
    )
    assert m is not None
    assert (int(m.group(1)), int(m.group(2))) == (n, dead)
    counts = result.feature_counts[POS]
    assert dead == int((counts == 0).sum())


# --- small things ---------------------------------------------------------------------------------
def test_train_takes_set_and_n_samples(config_dict, tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_dict(n_samples=64, eval_n_samples=4)))
    args = ["train", str(path), "--n-samples", "8", "--set", "loss.sparsity.coeff=2.5e-1"]
    assert main([*args, "--set", "run_name=tiny"]) == 0
    (run,) = (tmp_path / "runs").glob("tiny_*")
    final = yaml.safe_load((run / "final_config.yaml").read_text())
    assert final["n_samples"] == 8 and final["loss"]["sparsity"]["coeff"] == 0.25
    assert [p.name for p in run.glob("samples_*.safetensors")] == ["samples_8.safetensors"]
    assert main(["train", str(path), "--dry-run", "--set", "lr"]) == 2
    assert "--set: expected KEY=VALUE" in capsys.readouterr().err
    assert main(["train", str(path), "--dry-run", "--set", "saes.k=x"]) == 2
    assert "c.yaml (with --set / --n-samples): saes.k" in capsys.readouterr().err


def test_saes_are_indexed_by_hook_name_too(config_dict) -> None:
    from e2e_sae.lm.splice import SAETransformer

    model = SAETransformer.from_config(load_config(config_dict()), device="cpu")
    pos = "blocks.1.hook_resid_pre"
    assert model.saes[pos] is model.sae(pos) is model.saes["blocks-1-hook_resid_pre"]
    assert pos in model.saes and "blocks.2.hook_resid_pre" not in model.saes
    assert list(model.saes.keys()) == ["blocks-1-hook_resid_pre"]  # the original's keys
    with pytest.raises(KeyError, match=r"no SAE at 'blocks.2.hook_resid_pre'.*model.sae\("):
        model.saes["blocks.2.hook_resid_pre"]


def test_auxk_dead_threshold_defaults_to_the_runs_length(config_dict, caplog) -> None:
    from e2e_sae.lm.splice import SAETransformer
    from e2e_sae.saes import TopKSAE
    from e2e_sae.training.trainer import setup

    topk = {"sae_positions": ["blocks.1.hook_resid_pre"], "architecture": "topk", "k": 4}
    for arch in ("topk", "batchtopk", "matryoshka"):
        saes = {**topk, "architecture": arch}
        if arch == "matryoshka":
            saes["architecture_kwargs"] = {"matryoshka_widths": [16, 32]}
        cfg = load_config(config_dict(saes=saes, loss={"out_to_in": {"coeff": 1.0}}))
        sae = SAETransformer.from_config(cfg, device="cpu").sae("blocks.1.hook_resid_pre")
        assert isinstance(sae, TopKSAE)
        assert sae.dead_tokens_threshold == 32 * 16 // 10  # a tenth of 512 training tokens
    # Gao et al.'s 10M for long runs; a given threshold wins
    big = load_config(config_dict(saes=topk, n_samples=10**7, loss={"out_to_in": {"coeff": 1}}))
    assert SAETransformer.from_config(big, device="cpu").sae(
        "blocks.1.hook_resid_pre"
    ).dead_tokens_threshold == (10_000_000)
    fixed = {**topk, "architecture_kwargs": {"dead_tokens_threshold": 10_000}}
    cfg = load_config(config_dict(saes=fixed, loss={"out_to_in": {"coeff": 1.0}}))
    with caplog.at_level("WARNING"):
        setup(cfg, device="cpu")
    assert "AuxK can never act" in caplog.text and "run's 512 training tokens" in caplog.text
    # relu resampling that starts after the first half
    caplog.clear()
    late = {"sae_positions": ["blocks.1.hook_resid_pre"], "resample_every_n_samples": 20}
    with caplog.at_level("WARNING"):
        setup(load_config(config_dict(saes=late)), device="cpu")
    assert "resampling can never act" in caplog.text
