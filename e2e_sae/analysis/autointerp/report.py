"""Autointerp across runs (the paper's comparison: e2e vs local vs e2e+ds at similar L0 or similar
CE increase): a table of each run's mean scores with bootstrap intervals and each run's difference
from the first run, and a figure of the per-feature scores.

`autointerp_figures(results, out_dir)` writes both (`paper-figures` calls it); `results` are
`results.json` contents (`run_autointerp`'s return value, or `store.read_results`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from e2e_sae.analysis.autointerp import store
from e2e_sae.analysis.autointerp.metrics import bootstrap_ci, bootstrap_diff_ci
from e2e_sae.analysis.plots import TYPE_COLORS, save_figure

SCORES = (
    ("simulation", "simulation score (Pearson r)"),
    ("detection_accuracy", "detection accuracy"),
    ("detection_auc", "detection AUC"),
)


def _values(res: dict[str, Any], key: str) -> list[float]:
    return [math.nan if r[key] is None else float(r[key]) for r in res["features"]]


def load_run_results(run_dirs: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The `<run>/autointerp/results.json` of each run that has one, and the names of those
    that have none."""
    found, missing = [], []
    for d in run_dirs:
        path = store.default_folder(d) / store.RESULTS
        if path.is_file():
            found.append(store.read_json(path))
        else:
            missing.append(Path(d).name)
    return found, missing


def short_label(res: dict[str, Any], i: int) -> str:
    """`1. e2e, L0 16.2`: the run's place in the comparison, its type and L0."""
    return f"{i + 1}. {res.get('sae_type', '?')}, L0 {res.get('l0', math.nan):.3g}"


def compare(
    results: Sequence[dict[str, Any]], seed: int = 0, n_resamples: int = 10_000
) -> dict[str, Any]:
    """Per run: its mean scores with bootstrap 95% intervals; for every run after the first, the
    difference of its mean from the first run's, with a two-sample bootstrap interval."""
    rows = []
    for i, res in enumerate(results):
        row: dict[str, Any] = {
            "label": short_label(res, i),
            "run": res.get("run"),
            "run_dir": res.get("run_dir"),
            "sae_type": res.get("sae_type"),
            "position": res.get("position"),
            "l0": res.get("l0"),
            "ce_loss_increase": res.get("ce_loss_increase"),
            "n_features": len(res["features"]),
        }
        for key, _ in SCORES:
            mean, lo, hi = bootstrap_ci(_values(res, key), seed, n_resamples)
            row[key] = {"mean": mean, "low": lo, "high": hi}
            if i > 0:
                d, dlo, dhi = bootstrap_diff_ci(
                    _values(res, key), _values(results[0], key), seed, n_resamples
                )
                row[f"{key}_diff"] = {"mean": d, "low": dlo, "high": dhi}
        rows.append(row)
    first = results[0] if results else {}
    return {
        "explainer": first.get("explainer"),
        "scorer": first.get("scorer"),
        "seed": seed,
        "n_resamples": n_resamples,
        "runs": rows,
    }


def _ci(d: dict[str, float] | None, digits: int = 2) -> str:
    if not d or d["mean"] is None or math.isnan(d["mean"]):
        return "–"
    return f"{d['mean']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def _num(x: Any, fmt: str = ".3g") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def comparison_table(cmp: dict[str, Any]) -> str:
    """Markdown: one row per run (mean [95% CI]) and the differences from run 1."""
    head = [
        "run",
        "type",
        "L0",
        "CE increase",
        "features",
        "simulation",
        "detection acc.",
        "detection AUC",
        "Δ simulation vs 1",
        "Δ AUC vs 1",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(cmp["runs"]):
        cells = [
            f"{i + 1}. {r['run']}",
            str(r["sae_type"]),
            _num(r["l0"]),
            _num(r["ce_loss_increase"]),
            str(r["n_features"]),
            _ci(r["simulation"]),
            _ci(r["detection_accuracy"]),
            _ci(r["detection_auc"]),
            _ci(r.get("simulation_diff")) if i else "",
            _ci(r.get("detection_auc_diff")) if i else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ex, sc = cmp.get("explainer") or {}, cmp.get("scorer") or {}
    lines.append("")
    lines.append(
        f"Mean over the explained features [95% percentile bootstrap interval, "
        f"{cmp['n_resamples']} resamples, seed {cmp['seed']}]. Explainer: {ex.get('model')} "
        f"({ex.get('kind')}); scorer: {sc.get('model')} ({sc.get('kind')}). L0 over the "
        "scanned tokens; CE increase from the run's eval.json, else its last in-training "
        "evaluation (– where it has neither)."
    )
    return "\n".join(lines)


def scores_figure(results: Sequence[dict[str, Any]], seed: int = 0) -> Figure:
    """Per run the per-feature simulation scores and detection AUCs (dots, jittered) with the
    mean and its bootstrap 95% interval (black); then simulation score vs firing frequency."""
    fig = Figure(figsize=(13.5, 4.2))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    rng = np.random.default_rng(seed)
    labels = [short_label(r, i) for i, r in enumerate(results)]
    for ax, (key, ylabel) in zip(axes[:2], (SCORES[0], SCORES[2]), strict=True):
        for i, res in enumerate(results):
            v = np.array(_values(res, key))
            v = v[np.isfinite(v)]
            color = TYPE_COLORS.get(res.get("sae_type", ""), "tab:gray")
            ax.scatter(i + rng.uniform(-0.18, 0.18, v.size), v, s=12, alpha=0.55, color=color)
            mean, lo, hi = bootstrap_ci(v.tolist(), seed)
            if not math.isnan(mean):
                ax.errorbar(
                    [i + 0.3],
                    [mean],
                    yerr=[[mean - lo], [hi - mean]],
                    fmt="o",
                    color="black",
                    capsize=4,
                    markersize=5,
                )
        ax.set_xticks(range(len(results)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(results) - 0.3)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[1].axhline(0.5, color="gray", lw=0.8, ls="--")
    axes[0].set_title("simulation (mean, 95% CI in black)", fontsize=10)
    axes[1].set_title("detection (0.5 = chance)", fontsize=10)
    ax = axes[2]
    for i, res in enumerate(results):
        f = np.array([r["frequency"] for r in res["features"]], dtype=float)
        v = np.array(_values(res, "simulation"))
        ok = np.isfinite(v) & (f > 0)
        color = TYPE_COLORS.get(res.get("sae_type", ""), "tab:gray")
        marker = "os^Dvp*"[i % 7]  # runs of one type share a colour
        ax.scatter(f[ok], v[ok], s=14, alpha=0.6, color=color, marker=marker, label=labels[i])
    ax.set_xscale("log")
    ax.set_xlabel("firing frequency (fraction of tokens)")
    ax.set_ylabel(SCORES[0][1])
    ax.set_title("simulation score vs frequency", fontsize=10)
    ax.grid(alpha=0.3)
    if results:
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(0, -0.16))
    fig.tight_layout()
    return fig


def autointerp_figures(
    results: Sequence[dict[str, Any]], out_dir: str | Path, seed: int = 0, n_resamples: int = 10_000
) -> list[Path]:
    """Write `autointerp_scores.png/.svg`, `autointerp_comparison.md` and `.json` for these
    runs' results into `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmp = compare(results, seed, n_resamples)
    paths = save_figure(scores_figure(results, seed), out, "autointerp_scores")
    md = out / "autointerp_comparison.md"
    md.write_text("# Autointerp comparison\n\n" + comparison_table(cmp) + "\n", encoding="utf-8")
    js = out / "autointerp_comparison.json"
    store.write_json(js, cmp)
    return [*paths, md, js]
