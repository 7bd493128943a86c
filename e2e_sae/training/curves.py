"""Training curves of a run as one PNG, from its metrics.jsonl; and several runs overlaid.

One panel per quantity, x = training samples. Keys of the form `name/<sae position>` share a
panel with one line per position; evaluation keys (`eval/...`) are drawn as points. Uses the Agg
canvas directly (no pyplot), so it works headless and leaves the global matplotlib state alone.
`train` writes RUN_DIR/training_curves.png at the end of every run; `plot_curves_overlay` (`e2e-sae
plot --curves RUN...`) draws the loss terms, L0, dead latents and CE increase of several runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.ticker import LogFormatter

from e2e_sae.errors import UserError
from e2e_sae.training.runlog import read_metrics

CURVES_FILE = "training_curves.png"
# Counters and rates: the x axis or not worth a panel.
_SKIP = {"samples", "step", "tokens_per_s", "epoch", "eval/n_tokens", "dead_window_tokens"}
# Panels in this order first (those present), then the rest alphabetically.
_FIRST = [
    "loss",
    "logits_kl",
    "sparsity",
    "out_to_in",
    "in_to_orig",
    "out_to_orig",
    "dead_dict_elements",
    "lr",
    "eval/ce_loss_increase",
    "eval/kl",
    "eval/l0",
    "eval/explained_variance",
    "eval/alive_dict_elements",
]
MAX_PANELS = 12


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _split_key(key: str) -> tuple[str, str]:
    """('eval/l0', 'blocks.2.hook_resid_pre') for 'eval/l0/blocks.2.hook_resid_pre'."""
    head = 2 if key.startswith("eval/") else 1
    parts = key.split("/", head)
    return "/".join(parts[:head]), parts[head] if len(parts) > head else ""


def collect_series(
    records: list[dict[str, Any]],
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{panel: {line label: (samples, values)}} from metrics records (records without `samples`
    are placed by their `step`)."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for rec in records:
        x = rec.get("samples", rec.get("step"))
        if x is None or not _is_number(x):
            continue
        for key, v in rec.items():
            if key in _SKIP or not _is_number(v):
                continue
            panel, label = _split_key(key)
            xs, ys = panels.setdefault(panel, {}).setdefault(label, ([], []))
            xs.append(float(x))
            ys.append(float(v))
    return panels


def _panel_order(names: list[str]) -> list[str]:
    first = [n for n in _FIRST if n in names]
    return first + sorted(n for n in names if n not in first)


def panel_title(name: str, records: list[dict[str, Any]]) -> str:
    """The panel's title; dead-latent counts name the window they were counted over."""
    if name == "dead_dict_elements":
        window = next((r["dead_window_tokens"] for r in records if "dead_window_tokens" in r), None)
        return (
            f"dead latents (none of the last {window:,} train tokens)"
            if window
            else "dead latents (train)"
        )
    if name == "eval/dead_dict_elements":
        n = next((r["eval/n_tokens"] for r in records if "eval/n_tokens" in r), None)
        return f"eval dead latents (none of {int(n):,} eval tokens)" if n else name
    return _TITLES.get(name, name)


_TITLES = {
    "eval/l0": "eval L0 (active latents / token)",
    "eval/ce_loss_increase": "eval CE loss increase (nats)",
}


class PlainLogFormatter(LogFormatter):
    """Log-axis labels as plain numbers ('4.8', '0.002'), not '4.8×10⁰'; which ticks get a label
    is still matplotlib's choice."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:.3g}" if super().__call__(x, pos) else ""


def plain_log_axis(ax: Any, axis: str = "y") -> None:
    """Put a log scale on `axis` of `ax` with plain-number labels."""
    getattr(ax, f"set_{axis}scale")("log")
    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_formatter(PlainLogFormatter())
    a.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def plot_training_curves(run_dir: Path, out: Path | None = None) -> Path:
    """Write the curves of `run_dir` to `out` (default RUN_DIR/training_curves.png); returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    panels = collect_series(records)
    if not panels:
        raise UserError(f"run directory {run_dir}: no metrics to plot in metrics.jsonl")
    names = _panel_order(list(panels))[:MAX_PANELS]
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.9 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        is_eval = name.startswith("eval/")
        for label, (xs, ys) in panels[name].items():
            ax.plot(xs, ys, marker="o" if is_eval else None, ms=3, lw=1.2, label=label or None)
        if any(panels[name]):  # some line is labelled by its SAE position
            ax.legend(fontsize=6)
        ys_all = [y for _, ys in panels[name].values() for y in ys]
        if min(ys_all) > 0 and max(ys_all) > 20 * min(ys_all):  # early losses dwarf the rest
            plain_log_axis(ax)
        ax.set_title(panel_title(name, records), fontsize=9)
        ax.set_xlabel("training samples", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name, fontsize=9)
    out = Path(out) if out is not None else run_dir / CURVES_FILE
    fig.savefig(out, dpi=110)
    return out


# --- several runs ---------------------------------------------------------------------------------
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


@dataclass
class Overlay:
    """What `plot_curves_overlay` drew: the files, and per panel the (run, SAE position) of each
    line in drawing order (position '' for run-level values)."""

    paths: list[Path]
    lines: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def plot_curves_overlay(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Overlay:
    """Overlay the curves of several runs: each loss term, eval L0, dead latents (train window and
    eval), CE-loss increase at the eval points. One colour per run (named in full in one legend
    under the panels), one line style per SAE position. Writes OUT_DIR/training_curves_overlay.png
    and .svg."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not run_dirs:
        raise UserError("plot --curves: no run directories given")
    runs = [(Path(d), read_metrics(Path(d))) for d in run_dirs]
    series = [(d, recs, collect_series(recs)) for d, recs in runs]
    for d, _, panels in series:
        if not panels:
            raise UserError(f"run directory {d}: no metrics to plot in metrics.jsonl")
    present = {name for _, _, panels in series for name in panels}
    names = [n for n in (*_LOSS_TERMS, *_OVERLAY_PANELS) if n in present]
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.1 * nrows + 0.3 * len(runs) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    positions = sorted({lbl for _, _, p in series for n in names for lbl in p.get(n, {}) if lbl})
    style = {pos: _LINESTYLES[i % len(_LINESTYLES)] for i, pos in enumerate(positions)}
    result = Overlay([])
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        is_eval = name.startswith("eval/")
        drawn = result.lines.setdefault(name, [])
        for (d, _, panels), color in zip(series, colors, strict=True):
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
        ys_all = [y for _, _, p in series for _, ys in p.get(name, {}).values() for y in ys]
        if ys_all and min(ys_all) > 0 and max(ys_all) > 20 * min(ys_all):
            plain_log_axis(ax)
        ax.set_title(panel_title(name, runs[0][1]), fontsize=9)
        ax.set_xlabel("training samples", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color=c, lw=2, label=d.name) for (d, _), c in zip(runs, colors, strict=True)
    ]
    if len(positions) > 1:
        handles += [Line2D([], [], color="gray", ls=style[p], label=p) for p in positions]
    fig.legend(handles=handles, loc="outside lower center", ncols=1, fontsize=8, frameon=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        path = out / f"{OVERLAY_FILE}.{ext}"
        fig.savefig(path, dpi=110)
        result.paths.append(path)
    return result
