"""Figures rendered and checked as a reader sees them (in pixels, `layout.layout_problems`):
panels not squeezed, legends and labels not over each other or over the data, titles on one
line, axis labels with units; and what they encode (type, architecture, fronts per group, short
labels that tell runs apart, eval token counts)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import make_config_dict
from layout import layout_problems

from e2e_sae.analysis.labels import unique_labels
from e2e_sae.analysis.overlay import plot_curves_overlay
from e2e_sae.analysis.plots import (
    ARCH_MARKERS,
    TYPE_COLORS,
    RunInfo,
    density_figure,
    downstream_figure,
    load_runs,
    make_plots,
    tradeoff_figure,
)
from e2e_sae.cli import main
from e2e_sae.config import Config, load_config
from e2e_sae.errors import UserError
from e2e_sae.training.curves import training_curves_figure
from e2e_sae.training.trainer import train

POS = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
LONG = "a-run-directory-name-much-longer-than-anything-a-legend-should-hold"


def _local(coeff: float) -> dict[str, Any]:
    return {"sparsity": {"coeff": coeff}, "out_to_in": {"coeff": 1.0}}


def _e2e(coeff: float | None) -> dict[str, Any]:
    sparsity = {"sparsity": {"coeff": coeff}} if coeff is not None else {}
    return {**sparsity, "logits_kl": {"coeff": 1.0}}


def _ds(coeff: float) -> dict[str, Any]:
    down = {"hook_positions": ["blocks.2.hook_resid_post"], "total_coeff": 1.0}
    return {**_e2e(coeff), "in_to_orig": down}


# (loss, saes extra, seed, L0, CE increase): a demanding user's set of runs
SPECS: list[tuple[dict[str, Any], dict[str, Any], int, float, float]] = [
    (_local(0.5), {}, 0, 60.0, 0.10),
    (_local(2.0), {}, 0, 25.0, 0.22),
    (_local(8.0), {}, 0, 9.0, 0.60),
    (_local(1.0), {"architecture": "topk", "k": 16}, 0, 16.0, 0.15),
    (_local(1.0), {"architecture": "topk", "k": 32}, 0, 32.0, 0.09),
    (
        _local(1.0),
        {"architecture": "matryoshka", "k": 16, "architecture_kwargs": {"matryoshka_widths": [8]}},
        0,
        14.0,
        0.18,
    ),
    (_e2e(1.0), {}, 0, 20.0, 0.12),
    (_e2e(1.0), {}, 1, 21.0, 0.13),  # the same as the run above but for the seed
    (_e2e(3.0), {}, 0, 8.0, 0.25),
    (_e2e(None), {"architecture": "topk", "k": 16}, 0, 16.0, 0.11),
    (_ds(1.0), {}, 0, 30.0, 0.08),
]


def _runs(token_data: Path, root: Path, tokens: list[int] | None = None) -> list[RunInfo]:
    runs = []
    g = torch.Generator().manual_seed(0)
    for i, (loss, saes, seed, l0, ce) in enumerate(SPECS):
        saes = {"sae_positions": POS, "dict_size_to_input_ratio": 2.0, **saes}
        cfg = load_config(make_config_dict(token_data, root, loss=loss, saes=saes, seed=seed))
        assert isinstance(cfg, Config)
        n = tokens[i] if tokens else 4096
        per_sae = {
            p: {
                "l0": l0 * (1 + 0.1 * k),
                "alive_dict_elements": int(64 - l0),
                "explained_variance": 0.9 - 0.02 * i,
                "mse": 0.1 + 0.01 * i,
            }
            for k, p in enumerate(POS)
        }
        down = {
            "blocks.2.hook_resid_pre": {"layer": 2, "explained_variance": 0.8, "mse": 0.2 + i},
            "blocks.2.hook_resid_post": {"layer": 3, "explained_variance": 0.7, "mse": 0.3 + i},
        }
        settings = {"dataset": "shakespeare", "split": "validation", "n_tokens": n}
        ev = {
            "settings": settings,
            "ce_loss_increase": ce,
            "n_tokens": n,
            "per_sae": per_sae,
            "downstream": down,
        }
        freqs = {
            p: torch.rand(64, generator=g) ** 4 * (torch.rand(64, generator=g) > 0.2) for p in POS
        }
        runs.append(RunInfo(root / f"{LONG}-{i}", cfg, ev, freqs))
    return runs


def _lines(ax: Any) -> list[Any]:
    return [ln for ln in ax.get_lines() if len(ln.get_xdata())]


def test_tradeoff_encodes_type_and_architecture_with_a_front_per_group(
    token_data: Path, tmp_path: Path
) -> None:
    runs = _runs(token_data, tmp_path)
    fig = tradeoff_figure(runs, "l0", "L0 (active latents per token)")
    assert layout_problems(fig) == []
    for ax, pos in zip(fig.axes, POS, strict=True):
        assert ax.get_title() == pos
        assert "(nats / token)" in ax.get_ylabel() and "(" in ax.get_xlabel()
        for line in _lines(ax):
            # every drawn line holds the runs of one (type, architecture) group only
            pts = set(zip(line.get_xdata(), line.get_ydata(), strict=True))
            groups = {
                (r.sae_type, r.architecture)
                for r in runs
                if (r.sae(pos)["l0"], r.eval["ce_loss_increase"]) in pts
            }
            assert len(groups) == 1, groups
            (t, arch) = groups.pop()
            assert line.get_color() == TYPE_COLORS[t] and line.get_marker() == ARCH_MARKERS[arch]
        # the local relu front: L0 9 -> 25 -> 60 (all three on it); topk's front is its own
        local_relu = [
            ln for ln in _lines(ax) if ln.get_marker() == "o" and ln.get_color() == "tab:blue"
        ]
        assert [list(ln.get_xdata()) for ln in local_relu] == [
            [r.sae(pos)["l0"] for r in runs[2::-1]]
        ]
        labels = [t.get_text() for t in ax.texts]
        assert sorted(labels) == sorted(
            [
                "λ=0.5",
                "λ=2",
                "λ=8",
                "k=16",
                "k=32",
                "k=16",
                "λ=1, seed=0",
                "λ=1, seed=1",
                "λ=3",
                "k=16",
                "λ=1",
            ]
        )
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    assert "local · relu (3 runs)" in texts and "local · matryoshka (1 run)" in texts
    assert "e2e · topk (1 run)" in texts and "e2e+ds · relu (1 run)" in texts
    assert not any(LONG in t for t in texts)  # full names go to the side table
    assert (
        fig._supxlabel.get_text() == "evaluated on shakespeare (validation): 4,096 tokens per run"
    )  # noqa: SLF001


def test_alive_front_prefers_more_alive_latents(token_data: Path, tmp_path: Path) -> None:
    runs = _runs(token_data, tmp_path)[:3]  # local relu: alive 4, 39, 55; CE 0.10, 0.22, 0.60
    runs[1].eval["per_sae"][POS[0]]["alive_dict_elements"] = 3  # now beaten by (4, 0.10)
    fig = tradeoff_figure(runs, "alive_dict_elements", "alive latents (count)", True)
    assert layout_problems(fig) == []
    front, rest = _lines(fig.axes[0])
    assert list(front.get_xdata()) == [4, 55] and list(rest.get_xdata()) == [3]
    assert rest.get_markerfacecolor() == "white"


def test_density_and_downstream_layout(token_data: Path, tmp_path: Path) -> None:
    runs = _runs(token_data, tmp_path)
    fig = density_figure(runs)
    assert layout_problems(fig) == []
    assert len(fig.axes) == 2 * 3  # positions x types
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and "(fraction of eval tokens)" in ax.get_xlabel()
        legend = ax.get_legend()
        assert legend is not None
        for t in legend.get_texts():
            assert LONG not in t.get_text() and t.get_text().endswith(" dead")
    fig = downstream_figure(runs)
    assert layout_problems(fig) == []
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(texts) == sorted(unique_labels([r.config for r in runs]))
    assert len(set(texts)) == len(texts)
    # in legend order: by type, then architecture
    assert texts[:6] == [
        "local relu λ=0.5",
        "local relu λ=2",
        "local relu λ=8",
        "local topk k=16",
        "local topk k=32",
        "local matryoshka k=16",
    ]
    assert texts[-1] == "e2e+ds relu λ=1"


def test_different_eval_token_counts_are_said_on_the_figure(
    token_data: Path, tmp_path: Path
) -> None:
    tokens = [4096] * 8 + [24576] * 3
    runs = _runs(token_data, tmp_path, tokens)
    for fig in (tradeoff_figure(runs, "l0", "L0 (count)"), density_figure(runs)):
        note = fig._supxlabel  # noqa: SLF001
        assert note.get_text() == (
            "eval token counts differ between runs on shakespeare (validation): "
            "4,096 (8 runs), 24,576 (3 runs)"
        )
        assert note.get_color() == "tab:red"
        assert layout_problems(fig) == []


def test_unique_labels_tell_runs_apart(token_data: Path, tmp_path: Path) -> None:
    def cfg(**kw: Any) -> Config:
        c = load_config(make_config_dict(token_data, tmp_path, **kw))
        assert isinstance(c, Config)
        return c

    configs = [cfg(loss=_e2e(1.0)), cfg(loss=_e2e(1.0), seed=1), cfg(loss=_e2e(1.0), lr=0.01)]
    configs += [cfg(loss=_local(1.0)), cfg(loss=_local(1.0)), cfg(loss=_ds(1.0))]
    assert unique_labels(configs) == [
        "e2e relu λ=1, seed=0, lr=0.001",
        "e2e relu λ=1, seed=1, lr=0.001",
        "e2e relu λ=1, seed=0, lr=0.01",
        "local relu λ=1 #1",
        "local relu λ=1 #2",
        "e2e+ds relu λ=1",
    ]


# --- from real (tiny) runs: curves, overlay, the plot command -------------------------------------
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, token_data: Path) -> list[Path]:
    root = tmp_path_factory.mktemp("figure_runs")
    dirs = []
    specs = [
        (_local(0.1), {}, 48),
        (_e2e(1.0), {"sae_positions": POS}, 96),
        (_local(1.0), {"architecture": "topk", "k": 4}, 48),
    ]
    for i, (loss, saes, window) in enumerate(specs):
        cfg = make_config_dict(
            token_data,
            root,
            n_samples=16,
            eval_every_n_samples=8,
            run_name=f"{LONG}-{i}",
            act_frequency_n_tokens=window,
            loss=loss,
        )
        cfg["saes"].update(saes)
        config = load_config(cfg)
        assert isinstance(config, Config)
        dirs.append(train(config, device="cpu", progress=False))
    return dirs


def test_training_curves_have_readable_titles_and_units(tiny_runs: list[Path]) -> None:
    for d in tiny_runs:
        fig = training_curves_figure(d)
        assert layout_problems(fig, min_axes_px=(150, 100)) == []
        titles = [ax.get_title() for ax in fig.axes]
        assert "KL(clean ‖ spliced)" in titles or "reconstruction MSE" in titles
        assert not any("_" in t or t.startswith("eval/") for t in titles), titles
        assert all(ax.get_ylabel() for ax in fig.axes)
    one, two = training_curves_figure(tiny_runs[0]), training_curves_figure(tiny_runs[1])
    assert one._suptitle.get_text().endswith(": SAE at blocks.1.hook_resid_pre")  # noqa: SLF001
    assert [t.get_text() for t in two.legends[0].get_texts()] == POS  # one legend, by position


def test_overlay_names_runs_short_and_says_when_windows_differ(
    tiny_runs: list[Path], tmp_path: Path
) -> None:
    out = plot_curves_overlay(tiny_runs, tmp_path)
    assert out.figure is not None
    assert layout_problems(out.figure, min_axes_px=(150, 100)) == []
    assert out.labels == ["local relu λ=0.1", "e2e relu λ=1", "local topk k=4"]
    titles = {ax.get_title() for ax in out.figure.axes}
    assert "dead latents (train) (train window differ: see legend)" in titles
    texts = [t.get_text() for t in out.figure.legends[0].get_texts()]
    assert texts[:3] == [
        "local relu λ=0.1 (dead window 48 tokens)",
        "e2e relu λ=1 (dead window 96 tokens)",
        "local topk k=4 (dead window 48 tokens)",
    ]
    table = (tmp_path / "training_curves_overlay.md").read_text()
    assert all(str(d) in table for d in tiny_runs)
    # the same window everywhere: named in the title
    same = plot_curves_overlay([tiny_runs[0], tiny_runs[2]], tmp_path / "same")
    assert same.figure is not None
    assert "dead latents (none of the last 48 train tokens)" in {
        ax.get_title() for ax in same.figure.axes
    }


def test_plot_command_writes_the_side_table_and_refuses_mixed_data(
    tiny_runs: list[Path], tmp_path: Path, capsys
) -> None:
    dirs = []
    for d in tiny_runs:
        shutil.copytree(d, tmp_path / d.name)
        dirs.append(tmp_path / d.name)
    out = tmp_path / "plots"
    assert main(["plot", *map(str, dirs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "runs.md").read_text()
    assert table in printed
    assert "| local relu λ=0.1 | local | relu | λ=0.1 |" in table
    assert all(str(d) in table for d in dirs)
    runs = load_runs(dirs)
    for stem, fig in (
        ("pareto", tradeoff_figure(runs, "l0", "L0 (count)")),
        ("density", density_figure(runs)),
        ("downstream", downstream_figure(runs)),
    ):
        assert layout_problems(fig) == [], stem
    # an eval on another split does not go into the same figure
    ev = json.loads((dirs[0] / "eval.json").read_text())
    ev["settings"]["split"] = "test"
    (dirs[0] / "eval.json").write_text(json.dumps(ev))
    with pytest.raises(UserError, match="evaluated on different data"):
        load_runs(dirs)
    # nor does an eval of an older checkpoint than the run's newest
    ev["settings"].update(split="train", checkpoint="samples_8.safetensors")
    (dirs[0] / "eval.json").write_text(json.dumps(ev))
    with pytest.raises(UserError, match="measured samples_8.safetensors, not the newest"):
        load_runs(dirs)
    assert yaml.safe_load((dirs[0] / "final_config.yaml").read_text())["seed"] == 0
    assert make_plots  # the full set is drawn by `e2e-sae plot` above
