"""Training curves of a run as one PNG, from its metrics.jsonl.

One panel per quantity, x = training samples. Keys of the form `name/<sae position>` share a
panel with one line per position; evaluation keys (`eval/...`) are drawn as points. Each panel is
titled by what it shows and its y axis says the unit (`PANELS`). Uses the Agg canvas directly (no
pyplot), so it works headless and leaves the global matplotlib state alone. `train` writes
RUN_DIR/training_curves.png at the end of every run; several runs overlaid (`e2e-sae plot --curves
RUN...`): `e2e_sae.analysis.overlay`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.ticker import LogFormatter

from e2e_sae.errors import UserError
from e2e_sae.training.runlog import read_metrics

CURVES_FILE = "training_curves.png"
# Counters and rates: the x axis or not worth a panel; eval values that repeat others (the CE
# increase and score hold the clean / with-SAE / zero-ablation CEs) or never change.
_SKIP = {
    "samples",
    "step",
    "tokens_per_s",
    "epoch",
    "eval/n_tokens",
    "dead_window_tokens",
    "eval/ce_loss_clean",
    "eval/ce_loss_with_saes",
    "eval/ce_loss_zero_abl",
    "eval/ce_loss_recovered",
    "eval/kl_zero_abl",
}
# Panels in this order first (those present), then the rest alphabetically.
_FIRST = [
    "loss",
    "logits_kl",
    "sparsity",
    "out_to_in",
    "in_to_orig",
    "out_to_orig",
    "l0",
    "dead_dict_elements",
    "eval/ce_loss_increase",
    "eval/kl",
    "eval/l0",
    "eval/explained_variance",
    "eval/alive_dict_elements",
    "lr",
]
MAX_PANELS = 12
X_LABEL = "training samples (windows of n_ctx tokens)"
_MSE = "activation units squared"
PANELS: dict[str, tuple[str, str]] = {
    "loss": ("total loss", "sum of the weighted terms"),
    "logits_kl": ("KL(clean ‖ spliced)", "nats / token"),
    "sparsity": ("sparsity penalty", "‖c‖ₚ / d_in per token"),
    "out_to_in": ("reconstruction MSE", _MSE),
    "in_to_orig": ("downstream MSE", _MSE),
    "out_to_orig": ("MSE to the clean activation", _MSE),
    "auxk": ("AuxK loss (weighted)", _MSE),
    "gated_aux": ("gate auxiliary loss (weighted)", _MSE),
    "matryoshka_inner": ("inner prefixes' MSE (weighted)", _MSE),
    "l0": ("L0 (train batches)", "active latents / token"),
    "dead_dict_elements": ("dead latents (train)", "latents"),
    "resampled": ("resampled latents", "latents"),
    "lr": ("learning rate", "learning rate"),
    "grad_norm": ("gradient norm", "norm before clipping"),
    "eval/ce_loss_increase": ("eval: CE loss increase", "nats / token"),
    "eval/ce_loss_score": ("eval: CE loss recovered", "fraction"),
    "eval/kl": ("eval: KL(clean ‖ spliced)", "nats / token"),
    "eval/kl_div_score": ("eval: KL score", "fraction"),
    "eval/top1_agreement": ("eval: top-1 agreement", "fraction of tokens"),
    "eval/tvd": ("eval: total variation", "per token"),
    "eval/l0": ("eval: L0", "active latents / token"),
    "eval/l1": ("eval: L1 of the code", "per token"),
    "eval/explained_variance": ("eval: explained variance", "fraction"),
    "eval/explained_variance_ln": ("eval: explained variance after LN", "fraction"),
    "eval/mse": ("eval: reconstruction MSE", _MSE),
    "eval/alive_dict_elements": ("eval: alive latents", "latents"),
    "eval/dead_dict_elements": ("eval: dead latents", "latents"),
    "eval/cossim": ("eval: cosine(input, output)", "per token"),
    "eval/l2_ratio": ("eval: ‖output‖ / ‖input‖", "per token"),
    "eval/relative_reconstruction_bias": ("eval: reconstruction bias", "ratio"),
    "eval/downstream_mse": ("eval: downstream MSE", _MSE),
    "eval/downstream_explained_variance": ("eval: downstream explained variance", "fraction"),
}
"""Per panel: (title, y-axis label with its unit). Eval losses (`eval/logits_kl`, ...) take their
training term's entry with `eval: ` in front."""


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


def drop_repeats(panels: dict[str, dict[str, tuple[list[float], list[float]]]]) -> list[str]:
    """Panel names to draw: `loss` is left out when it repeats the only loss term."""
    names = list(panels)
    if "loss" in panels:
        same = [n for n in names if n != "loss" and panels[n] == panels["loss"]]
        if same:
            names.remove("loss")
    return names


def panel_info(name: str) -> tuple[str, str]:
    """(title, y label) of a panel; unknown keys get their name and a generic label."""
    if name in PANELS:
        return PANELS[name]
    if name.startswith("eval/") and name[5:] in PANELS:
        title, unit = PANELS[name[5:]]
        return f"eval: {title}", unit
    return name.replace("eval/", "eval: ").replace("_", " "), "value (logged)"


def _window(records: list[dict[str, Any]], key: str) -> int | None:
    return next((int(r[key]) for r in records if key in r and _is_number(r[key])), None)


def panel_title(name: str, records: list[dict[str, Any]]) -> str:
    """The panel's title; dead-latent counts name the window they were counted over."""
    if name == "dead_dict_elements":
        window = _window(records, "dead_window_tokens")
        return (
            f"dead latents (none of the last {window:,} train tokens)"
            if window
            else ("dead latents (train)")
        )
    if name == "eval/dead_dict_elements":
        n = _window(records, "eval/n_tokens")
        return f"eval dead latents (none of {n:,} eval tokens)" if n else "eval: dead latents"
    return panel_info(name)[0]


class PlainLogFormatter(LogFormatter):
    """Log-axis labels as plain numbers ('4.8', '0.002'), not '4.8×10⁰'; which ticks get a label
    is still matplotlib's choice."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        if not super().__call__(x, pos):
            return ""
        return f"{x:,.0f}" if x >= 1000 and x == round(x) else f"{x:.3g}"


def plain_log_axis(ax: Any, axis: str = "y") -> None:
    """Put a log scale on `axis` of `ax` with plain-number labels."""
    getattr(ax, f"set_{axis}scale")("log")
    a = ax.yaxis if axis == "y" else ax.xaxis
    a.set_major_formatter(PlainLogFormatter())
    a.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def style_panel(ax: Any, name: str, title: str, series: dict[str, Any]) -> None:
    """Title, axis labels (with units), log scale where early values dwarf the rest, grid."""
    ys_all = [y for _, ys in series.values() for y in ys]
    if ys_all and min(ys_all) > 0 and max(ys_all) > 20 * min(ys_all):
        plain_log_axis(ax)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(X_LABEL, fontsize=8)
    ax.set_ylabel(panel_info(name)[1], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def plot_training_curves(run_dir: Path, out: Path | None = None) -> Path:
    """Write the curves of `run_dir` to `out` (default RUN_DIR/training_curves.png); returns it."""
    fig = training_curves_figure(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / CURVES_FILE
    fig.savefig(out, dpi=110)
    return out


def training_curves_figure(run_dir: Path) -> Any:
    """One panel per logged quantity (at most MAX_PANELS), x = training samples; evaluations are
    points. Lines are labelled by SAE position when the run has several SAEs (one SAE: its
    position is in the figure's title)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    panels = collect_series(records)
    if not panels:
        raise UserError(f"run directory {run_dir}: no metrics to plot in metrics.jsonl")
    names = _panel_order(drop_repeats(panels))[:MAX_PANELS]
    positions = sae_positions(panels)
    color = {pos: f"C{i % 10}" for i, pos in enumerate(positions)}
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.0 * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        is_eval = name.startswith("eval/")
        for label, (xs, ys) in panels[name].items():
            ax.plot(xs, ys, marker="o" if is_eval else None, ms=3, lw=1.2, color=color.get(label))
        style_panel(ax, name, panel_title(name, records), panels[name])
    if len(positions) > 1:  # one legend for all panels: the colour of each SAE position
        handles = [Line2D([], [], color=color[p], lw=2, label=p) for p in positions]
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=min(4, len(handles)),
            fontsize=8,
            frameon=False,
        )
    where = f": SAE at {positions[0]}" if len(positions) == 1 else ""
    fig.suptitle(f"{run_dir.name}{where}", fontsize=9)
    return fig


def sae_positions(panels: dict[str, dict[str, Any]]) -> list[str]:
    """The run's SAE positions: the lines of its per-SAE panels (not the downstream hooks)."""
    per_sae = ("l0", "eval/l0", "dead_dict_elements", "eval/dead_dict_elements")
    return sorted({label for n in per_sae for label in panels.get(n, {}) if label})
