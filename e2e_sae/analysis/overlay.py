"""Several runs' training curves overlaid (`e2e-sae plot --curves RUN... --out DIR`): each loss
term, L0 (train and eval), dead latents (train window and eval) and the CE-loss increase at the
eval points, from each run's metrics.jsonl.

One colour per run, named by its short label (`e2e relu λ=2`, `e2e_sae.analysis.labels`); one
line style per SAE position. The legend under the panels names the runs; the side table
`training_curves_overlay.md` gives each label's run directory. A dead-latent count is only
comparable over the same window: when the runs' windows differ the panel says so and each run's
legend entry names its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from e2e_sae.analysis.labels import runs_table, unique_labels
from e2e_sae.config import Config, load_config
from e2e_sae.errors import UserError
from e2e_sae.runs.checkpoint import CONFIG_FILE
from e2e_sae.training.curves import (
    collect_series,
    panel_info,
    panel_title,
    style_panel,
)
from e2e_sae.training.runlog import read_metrics

OVERLAY_FILE = "training_curves_overlay"
_LOSS_TERMS = ("loss", "sparsity", "logits_kl", "in_to_orig", "out_to_orig", "out_to_in")
_OVERLAY_PANELS = (
    "l0",
    "eval/l0",
    "dead_dict_elements",
    "eval/dead_dict_elements",
    "eval/ce_loss_increase",
)
_LINESTYLES = ("-", "--", ":", "-.")
# per panel: the metrics key holding the window its counts were taken over
_WINDOW_KEYS = {
    "dead_dict_elements": "dead_window_tokens",
    "eval/dead_dict_elements": "eval/n_tokens",
}


@dataclass
class Overlay:
    """What `plot_curves_overlay` drew: the files, per panel the (run, SAE position) of each line
    in drawing order (position '' for run-level values), and each run's label."""

    paths: list[Path]
    lines: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    figure: Figure | None = None


def _window(records: list[dict[str, Any]], key: str) -> int | None:
    return next((int(r[key]) for r in records if isinstance(r.get(key), int | float)), None)


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Short labels from the runs' configs (the directory name for a run without one)."""
    configs = []
    for d in run_dirs:
        cfg = load_config(d / CONFIG_FILE) if (d / CONFIG_FILE).is_file() else None
        configs.append(cfg if isinstance(cfg, Config) else None)
    if all(c is not None for c in configs):
        return unique_labels([c for c in configs if c is not None])
    return [d.name for d in run_dirs]


def overlay_title(name: str, runs: Sequence[list[dict[str, Any]]]) -> str:
    """The panel's title; a count over a window names the window when every run shares it."""
    key = _WINDOW_KEYS.get(name)
    if key is None:
        return panel_title(name, runs[0])
    windows = {_window(recs, key) for recs in runs}
    if len(windows) == 1:
        return panel_title(name, runs[0])
    what = "train window" if name == "dead_dict_elements" else "eval tokens"
    return f"{panel_info(name)[0]} ({what} differ: see legend)"


def plot_curves_overlay(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Overlay:
    """Overlay the curves of several runs (module docstring). Writes
    OUT_DIR/training_curves_overlay.png and .svg, and the side table .md."""
    if not run_dirs:
        raise UserError("plot --curves: no run directories given")
    dirs = [Path(d) for d in run_dirs]
    records = [read_metrics(d) for d in dirs]
    series = [collect_series(recs) for recs in records]
    for d, panels in zip(dirs, series, strict=True):
        if not panels:
            raise UserError(f"run directory {d}: no metrics to plot in metrics.jsonl")
    labels = _labels(dirs)
    present = {name for panels in series for name in panels}
    names = [n for n in (*_LOSS_TERMS, *_OVERLAY_PANELS) if n in present]
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.2 * nrows + 0.25 * len(dirs) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(dirs))]
    positions = sorted({lbl for p in series for n in names for lbl in p.get(n, {}) if lbl})
    style = {pos: _LINESTYLES[i % len(_LINESTYLES)] for i, pos in enumerate(positions)}
    result = Overlay([], labels=labels, figure=fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        is_eval = name.startswith("eval/")
        drawn = result.lines.setdefault(name, [])
        for d, panels, color in zip(dirs, series, colors, strict=True):
            for label, (xs, ys) in panels.get(name, {}).items():
                ax.plot(
                    xs,
                    ys,
                    color=color,
                    ls=style.get(label, "-"),
                    lw=1.3,
                    marker="o" if is_eval else None,
                    ms=3.5,
                )
                drawn.append((d.name, label))
        merged: dict[str, Any] = {}
        for k, panels in enumerate(series):
            merged.update({f"{k}/{lb}": v for lb, v in panels.get(name, {}).items()})
        style_panel(ax, name, overlay_title(name, records), merged)
    handles = []
    for label, recs, color in zip(labels, records, colors, strict=True):
        extra = []
        for name, key in _WINDOW_KEYS.items():
            if name in names and "differ" in overlay_title(name, records):
                n = _window(recs, key)
                what = "dead window" if key == "dead_window_tokens" else "eval"
                extra.append(f"{what} {n:,} tokens" if n else f"{what}: none")
        text = f"{label} ({'; '.join(extra)})" if extra else label
        handles.append(Line2D([], [], color=color, lw=2, label=text))
    if len(positions) > 1:
        handles += [Line2D([], [], color="gray", ls=style[p], label=p) for p in positions]
    ncol = 1 if len(handles) <= 4 else 2
    fig.legend(handles=handles, loc="outside lower center", ncols=ncol, fontsize=8, frameon=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        path = out / f"{OVERLAY_FILE}.{ext}"
        fig.savefig(path, dpi=110)
        result.paths.append(path)
    table = out / f"{OVERLAY_FILE}.md"
    table.write_text(runs_table(labels, dirs), encoding="utf-8")
    result.paths.append(table)
    return result
