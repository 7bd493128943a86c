"""Training curves of a run as one PNG, from its metrics.jsonl.

One panel per quantity, x = training samples. Keys of the form `name/<sae position>` share a
panel with one line per position; evaluation keys (`eval/...`) are drawn as points. Uses the Agg
canvas directly (no pyplot), so it works headless and leaves the global matplotlib state alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from e2e_sae.errors import UserError
from e2e_sae.runlog import read_metrics

CURVES_FILE = "training_curves.png"
# Counters and rates: the x axis or not worth a panel.
_SKIP = {"samples", "step", "tokens_per_s", "epoch", "eval/n_tokens"}
# Panels in this order first (those present), then the rest alphabetically.
_FIRST = [
    "loss", "logits_kl", "sparsity", "out_to_in", "in_to_orig", "out_to_orig",
    "dead_dict_elements", "lr", "eval/ce_loss_increase", "eval/kl", "eval/l0",
    "eval/explained_variance", "eval/alive_dict_elements",
]  # fmt: skip
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


def plot_training_curves(run_dir: Path, out: Path | None = None) -> Path:
    """Write the curves of `run_dir` to `out` (default RUN_DIR/training_curves.png); returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    panels = collect_series(read_metrics(run_dir))
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
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training samples", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name, fontsize=9)
    out = Path(out) if out is not None else run_dir / CURVES_FILE
    fig.savefig(out, dpi=110)
    return out
