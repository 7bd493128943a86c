"""Plots over a set of run directories (PNG + SVG, matplotlib without a display).

Each run is summarised from its `final_config.yaml`, its `eval.json` (written by `e2e-sae eval`,
run here for runs that lack it) and its per-latent firing frequencies. Runs are named in figures by
short labels (`e2e relu λ=2`: type, architecture, sparsity; `e2e_sae.analysis.labels`) and in full
in the side table `runs.md` written next to the figures. Runs whose evaluations used different
data are refused; different token counts are stated on every figure.

Also here: the Pareto front of (L0, CE-loss increase) points and interpolation along it, for
comparisons at matched L0 / matched CE increase (the paper's Tables 2-3).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox
from torch import Tensor

from e2e_sae.analysis.labels import NAME_KEYS, TYPE_ORDER, runs_table, sae_type, unique_labels
from e2e_sae.config import Config, load_config
from e2e_sae.errors import UserError, check_output_folder
from e2e_sae.eval.evaluate import (
    EVAL_JSON,
    evaluate_run,
    read_eval,
    read_feature_frequency,
    write_eval,
)
from e2e_sae.lm.sites import hook_layer
from e2e_sae.runs.checkpoint import CONFIG_FILE, list_sae_checkpoints
from e2e_sae.training.curves import plain_log_axis

TYPE_COLORS = {"local": "tab:blue", "e2e": "tab:orange", "e2e+ds": "tab:green"}
TYPE_LINESTYLES = {"local": "-", "e2e": "--", "e2e+ds": ":"}
ARCH_MARKERS = {
    "relu": "o",
    "topk": "s",
    "batchtopk": "D",
    "matryoshka": "^",
    "jumprelu": "v",
    "gated": "P",
    "skip_transcoder": "X",
}
ARCH_ORDER = tuple(ARCH_MARKERS)
# Config keys that do not change what is learned (left out when grouping runs by seed).
_NAME_KEYS = ("seed", *NAME_KEYS)
PANEL = (4.6, 3.3)
"""Inches per panel (the legends get their own room next to or under them)."""
RUNS_TABLE = "runs.md"


@dataclass
class RunInfo:
    """What the plots need from one run directory."""

    run_dir: Path
    config: Config
    eval: dict[str, Any]
    frequencies: dict[str, Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def label(self) -> str:
        """Type, the full run directory name and (when not 0) seed, for legends."""
        seed = f" seed {self.config.seed}" if self.config.seed else ""
        return f"{self.sae_type}: {self.name}{seed}"

    @property
    def sparsity_label(self) -> str:
        """What sets the run's sparsity: `k=32` (TopK family) or `λ=0.5` (the sparsity coeff)."""
        if self.config.saes.k is not None:
            return f"k={self.config.saes.k}"
        sp = self.config.loss.sparsity
        return f"λ={sp.coeff:g}" if sp is not None else ""

    @property
    def sparsity_coeff(self) -> float | None:
        """The sparsity term's coefficient (None without one)."""
        sp = self.config.loss.sparsity
        return sp.coeff if sp is not None else None

    @property
    def sae_type(self) -> str:
        return sae_type(self.config)

    @property
    def architecture(self) -> str:
        return self.config.saes.architecture

    @property
    def positions(self) -> list[str]:
        return list(self.eval.get("per_sae", {}))

    @property
    def eval_tokens(self) -> int:
        """Tokens the run's evaluation scanned."""
        return int(self.eval.get("n_tokens", 0))

    @property
    def eval_data(self) -> str:
        """`dataset (split)` of the run's evaluation ('' when its eval.json does not say)."""
        s = self.eval.get("settings") or {}
        return f"{s['dataset']} ({s['split']})" if "dataset" in s else ""

    def sae(self, position: str) -> dict[str, float]:
        return self.eval["per_sae"][position]

    def n_layers(self) -> int:
        """The LM's layer count, from the eval's downstream hooks (no model is loaded)."""
        down = self.eval.get("downstream") or {}
        return max((int(d["layer"]) for d in down.values()), default=0)

    def learning_key(self) -> str:
        """The config without seed and names: runs that share it differ only by seed."""
        d = self.config.model_dump(mode="json", exclude=set(_NAME_KEYS))
        return json.dumps(d, sort_keys=True)


def load_runs(
    run_dirs: Sequence[str | Path],
    *,
    evaluate_missing: bool = True,
    n_tokens: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> list[RunInfo]:
    """Summaries of the runs; a run without `eval.json` is evaluated (and the file written). An
    eval.json of an older checkpoint than the run's newest, or runs evaluated on different data
    (dataset, split), are refused: their numbers do not compare."""

    runs = []
    for d in run_dirs:
        d = Path(d)
        if not (d / CONFIG_FILE).is_file():
            raise UserError(f"run directory {d}: no {CONFIG_FILE} (is it a training run?)")
        config = load_config(d / CONFIG_FILE)
        assert isinstance(config, Config)
        ev = read_eval(d)
        freqs = read_feature_frequency(d)
        if ev is None or not freqs:
            if not evaluate_missing:
                raise UserError(f"run directory {d}: no {EVAL_JSON}; run `e2e-sae eval {d}`")
            result = evaluate_run(d, n_tokens=n_tokens, device=device, progress=progress)
            write_eval(result, d / EVAL_JSON)
            ev, freqs = read_eval(d), read_feature_frequency(d)
            assert ev is not None
        measured = (ev.get("settings") or {}).get("checkpoint")
        newest = list_sae_checkpoints(d)
        if measured is not None and newest and measured != newest[-1].name:
            raise UserError(
                f"run directory {d}: {EVAL_JSON} measured {measured}, not the newest checkpoint "
                f"{newest[-1].name}; rerun `e2e-sae eval {d} --overwrite`"
            )
        runs.append(RunInfo(d, config, ev, freqs))
    data = Counter(r.eval_data for r in runs if r.eval_data)
    if len(data) > 1:
        which = "; ".join(f"{k}: {n} run{'s' * (n > 1)}" for k, n in data.items())
        raise UserError(
            f"plot: the runs were evaluated on different data ({which}); evaluate them on the "
            "same (`e2e-sae eval RUN --data D --split S --overwrite`)"
        )
    return runs


def train_minutes(run_dir: Path) -> float:
    """Minutes from a run's final_config.yaml (written at the start) to its eval.json (written at
    the end); nan if either is missing."""
    start, end = run_dir / "final_config.yaml", run_dir / "eval.json"
    if not (start.exists() and end.exists()):
        return math.nan
    return (end.stat().st_mtime - start.stat().st_mtime) / 60


# --- Pareto fronts and matched comparisons --------------------------------------------------------
def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats in both x and y (lower is better), by x."""
    order = sorted(range(len(x)), key=lambda i: (x[i], y[i]))
    front: list[int] = []
    best = math.inf
    for i in order:
        if y[i] < best:
            front.append(i)
            best = y[i]
    return front


def _front(x: Sequence[float], y: Sequence[float], log_x: bool) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto front's points as arrays (x as log x when `log_x`)."""
    front = pareto_front(x, y)
    xs = np.array([x[i] for i in front], dtype=float)
    ys = np.array([y[i] for i in front], dtype=float)
    return (np.log(xs) if log_x else xs), ys


def interpolate_y_at_x(
    x: Sequence[float], y: Sequence[float], at: float, log_x: bool = True
) -> float:
    """y on the Pareto front of (x, y) at x = `at`, linear in log x; nan outside the front."""
    xs, ys = _front(x, y, log_x)
    if log_x:
        at = math.log(at)
    if len(xs) == 0 or at < xs[0] - 1e-12 or at > xs[-1] + 1e-12:
        return math.nan
    return float(np.interp(at, xs, ys))


def interpolate_x_at_y(
    x: Sequence[float], y: Sequence[float], at: float, log_x: bool = True
) -> float:
    """x on the Pareto front of (x, y) where y = `at` (y falls as x grows); nan outside it."""
    xs, ys = _front(x, y, log_x)
    if len(ys) == 0 or at < ys[-1] - 1e-12 or at > ys[0] + 1e-12:
        return math.nan
    v = float(np.interp(at, ys[::-1], xs[::-1]))
    return math.exp(v) if log_x else v


# --- figures --------------------------------------------------------------------------------------
def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    for p in paths:
        fig.savefig(p, dpi=130, bbox_inches="tight")
    return paths


def new_figure(width: float, height: float) -> Figure:
    """A figure with constrained layout (legends outside the axes get their own room) on an Agg
    canvas (no pyplot, no display)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def run_positions(runs: Sequence[RunInfo]) -> list[str]:
    """The SAE positions of `runs`, in order of first appearance."""
    seen: list[str] = []
    for r in runs:
        seen += [p for p in r.positions if p not in seen]
    return seen


def run_types(runs: Sequence[RunInfo]) -> list[str]:
    """The SAE types of `runs` (local, e2e, e2e+ds, ...), in TYPE_ORDER."""
    present = {r.sae_type for r in runs}
    return [t for t in TYPE_ORDER if t in present]


def _groups(runs: Sequence[RunInfo]) -> list[tuple[str, str]]:
    """The (type, architecture) pairs present, types in TYPE_ORDER, architectures in ARCH_ORDER."""
    present = {(r.sae_type, r.architecture) for r in runs}
    arch_rank = {a: i for i, a in enumerate(ARCH_ORDER)}
    return sorted(present, key=lambda g: (TYPE_ORDER.index(g[0]), arch_rank.get(g[1], 99), g[1]))


def figure_grid(n: int, width: float = 4.8, height: float = 3.8) -> tuple[Figure, list[Axes]]:
    fig = new_figure(width * n, height)
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    return fig, axes


def _run_color(i: int, n: int) -> Any:
    """Distinct colours for n runs (tab10, then tab20)."""
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20"](i % 20)


def _short(position: str) -> str:
    return position.replace("blocks.", "L").replace(".hook_", " ")


def _legend_below(ax: Axes, **kw: Any) -> None:
    """A legend under the axes (saved with bbox_inches='tight', so long run names are not cut)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.24), fontsize=7, frameon=False, **kw)


def run_labels(runs: Sequence[RunInfo]) -> list[str]:
    """Each run's short label (`unique_labels`), as in every figure and the side table."""
    return unique_labels([r.config for r in runs])


def _detail(run: RunInfo, label: str) -> str:
    """The part of a run's label after its type and architecture (`λ=2, seed=1`), for point
    labels in a figure whose colour and marker already show those."""
    return label.removeprefix(f"{run.sae_type} {run.architecture}").strip()


def eval_note(runs: Sequence[RunInfo]) -> tuple[str, bool]:
    """(a one-line statement of what the runs were evaluated on, whether their token counts
    differ). The figures show it under their panels."""
    tokens = Counter(r.eval_tokens for r in runs)
    data = {r.eval_data for r in runs if r.eval_data}
    where = f" on {next(iter(data))}" if len(data) == 1 else ""
    if len(tokens) == 1:
        return f"evaluated{where}: {next(iter(tokens)):,} tokens per run", False
    counts = ", ".join(f"{n:,} ({c} run{'s' * (c > 1)})" for n, c in sorted(tokens.items()))
    return f"eval token counts differ between runs{where}: {counts}", True


def _caption(fig: Figure, runs: Sequence[RunInfo]) -> None:
    note, differs = eval_note(runs)
    fig.supxlabel(note, fontsize=8, color="tab:red" if differs else "0.35")


def _boxes_overlap(a: Bbox, b: Bbox) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


# Offsets (points) and alignments tried in turn for a point's label.
_LABEL_SPOTS = (
    (5, 4, "left", "bottom"),
    (5, -4, "left", "top"),
    (-5, 4, "right", "bottom"),
    (-5, -4, "right", "top"),
    (0, 8, "center", "bottom"),
    (0, -8, "center", "top"),
    (8, 0, "left", "center"),
    (-8, 0, "right", "center"),
)


def place_point_labels(ax: Axes, items: Sequence[tuple[float, float, str, Any]]) -> None:
    """Label points (x, y, text, colour) next to them, each at the first of a few spots where it
    overlaps no other label or point and stays inside the axes (else the first spot). Needs the
    axes' final limits and position (call after the figure has been drawn once)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    inside = ax.get_window_extent(renderer)
    pad = 4.0 * fig.dpi / 72  # a marker's half size, in pixels
    taken: list[Bbox] = []
    for x, y in ax.transData.transform([(x, y) for x, y, _, _ in items] or np.empty((0, 2))):
        taken.append(Bbox.from_extents(x - pad, y - pad, x + pad, y + pad))
    for x, y, text, color in items:
        for spot in _LABEL_SPOTS:
            ann = _annotate(ax, x, y, text, color, spot)
            box = ann.get_window_extent(renderer)
            fits = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if fits and not any(_boxes_overlap(box, t) for t in taken):
                taken.append(box)
                break
            ann.remove()
        else:  # nowhere free: the first spot
            ann = _annotate(ax, x, y, text, color, _LABEL_SPOTS[0])
            taken.append(ann.get_window_extent(renderer))


def _annotate(
    ax: Axes, x: float, y: float, text: str, color: Any, spot: tuple[int, int, str, str]
) -> Any:
    dx, dy, ha, va = spot
    return ax.annotate(
        text,
        (x, y),
        textcoords="offset points",
        xytext=(dx, dy),
        ha=ha,
        va=va,
        fontsize=7,
        color=color,
    )


def plot_tradeoff(
    runs: Sequence[RunInfo],
    out_dir: Path,
    x_key: str,
    stem: str,
    x_label: str,
    higher_x_better: bool = False,
) -> list[Path]:
    """`tradeoff_figure` saved as OUT_DIR/STEM.png and .svg."""
    return save_figure(tradeoff_figure(runs, x_key, x_label, higher_x_better), out_dir, stem)


def tradeoff_figure(
    runs: Sequence[RunInfo], x_key: str, x_label: str, higher_x_better: bool = False
) -> Figure:
    """CE-loss increase vs a per-SAE metric, one panel per SAE position. Colour: the SAE type;
    marker: the architecture. Each (type, architecture) group has its own Pareto front (lower CE
    increase, and lower x unless `higher_x_better`), drawn as filled points joined by a line;
    the group's other runs are hollow. Every point is labelled by what tells it apart within its
    group (`λ=2`, `k=16`, `seed=1`)."""
    positions = run_positions(runs)
    fig = new_figure(PANEL[0] * len(positions) + 2.4, PANEL[1] + 0.5)
    axes = list(fig.subplots(1, len(positions), squeeze=False)[0])
    labels = run_labels(runs)
    groups = _groups(runs)
    to_label: list[list[tuple[float, float, str, Any]]] = []
    for ax, pos in zip(axes, positions, strict=True):
        items = []
        for t, arch in groups:
            pts = sorted(
                (r.sae(pos)[x_key], r.eval["ce_loss_increase"], _detail(r, lb))
                for r, lb in zip(runs, labels, strict=True)
                if r.sae_type == t and r.architecture == arch and pos in r.positions
            )
            if not pts:
                continue
            xs, ys, details = zip(*pts, strict=True)
            color, marker = TYPE_COLORS[t], ARCH_MARKERS.get(arch, "*")
            front = sorted(pareto_front([-x if higher_x_better else x for x in xs], ys))
            rest = [i for i in range(len(xs)) if i not in front]
            ax.plot(
                [xs[i] for i in front],
                [ys[i] for i in front],
                "-",
                marker=marker,
                color=color,
                ms=6,
                label=f"{t} · {arch}",
            )
            if rest:
                ax.plot(
                    [xs[i] for i in rest],
                    [ys[i] for i in rest],
                    ls="none",
                    marker=marker,
                    mfc="white",
                    color=color,
                    ms=6,
                )
            items += [(x, y, d, color) for x, y, d in pts if d]
        ax.margins(x=0.12, y=0.15)  # room for the point labels
        ax.set_xlabel(x_label)
        ax.set_ylabel("CE loss increase (nats / token)")
        ax.set_title(pos, fontsize=10)
        ax.grid(alpha=0.3)
        to_label.append(items)
    handles: list[Any] = []
    for t, arch in groups:
        n = sum(r.sae_type == t and r.architecture == arch for r in runs)
        handles.append(
            Line2D(
                [],
                [],
                color=TYPE_COLORS[t],
                marker=ARCH_MARKERS.get(arch, "*"),
                label=f"{t} · {arch} ({n} run{'s' * (n > 1)})",
            )
        )
    handles += [
        Line2D([], [], color="0.4", marker="o", label="filled, joined: its group's Pareto front"),
        Line2D(
            [],
            [],
            color="0.4",
            marker="o",
            ls="none",
            mfc="white",
            label="hollow: beaten in both by its group",
        ),
    ]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    _caption(fig, runs)
    fig.canvas.draw()  # final limits and layout, then the labels
    for ax, items in zip(axes, to_label, strict=True):
        place_point_labels(ax, items)
    return fig


def plot_pareto(runs: Sequence[RunInfo], out_dir: Path) -> list[Path]:
    """L0 vs CE-loss increase per SAE type and architecture (the paper's Figure 1)."""
    return plot_tradeoff(
        runs, out_dir, "l0", "pareto_l0_ce_increase", "L0 (active latents per token)"
    )


def plot_alive_vs_ce(runs: Sequence[RunInfo], out_dir: Path) -> list[Path]:
    """Alive dictionary elements vs CE-loss increase per SAE type and architecture (the front:
    more alive latents, lower CE increase)."""
    return plot_tradeoff(
        runs,
        out_dir,
        "alive_dict_elements",
        "alive_vs_ce_increase",
        "alive latents (fired on the eval tokens; count)",
        higher_x_better=True,
    )


def plot_feature_density(runs: Sequence[RunInfo], out_dir: Path, bins: int = 40) -> list[Path]:
    """`density_figure` saved as OUT_DIR/feature_density.png and .svg."""
    return save_figure(density_figure(runs, bins), out_dir, "feature_density")


def density_figure(runs: Sequence[RunInfo], bins: int = 40) -> Figure:
    """Histograms of each latent's firing frequency over the eval tokens (log x axis): one row of
    panels per SAE position, one panel per SAE type, one line per run. Dead latents (frequency
    0) cannot be drawn on a log axis: each run's legend entry counts them."""
    positions, types = run_positions(runs), run_types(runs)
    labels = run_labels(runs)
    per_type = {t: max(sum(r.sae_type == t for r in runs), 1) for t in types}
    legend_h = 0.2 * max(per_type.values()) + 0.3
    fig = new_figure(PANEL[0] * len(types), (PANEL[1] + legend_h) * len(positions) + 0.3)
    grid = fig.subplots(len(positions), len(types), squeeze=False)
    for i, pos in enumerate(positions):
        series = [
            (r, lb, r.frequencies[pos])
            for r, lb in zip(runs, labels, strict=True)
            if pos in r.frequencies
        ]
        alive = [f[f > 0].double().numpy() for _, _, f in series]
        lo = min((float(np.log10(v.min())) for v in alive if v.size), default=-6.0)
        edges = np.logspace(math.floor(lo), 0.0, bins + 1)
        for j, t in enumerate(types):
            ax = grid[i][j]
            mine = sorted(  # sparse to dense
                (
                    (r, lb, f, a)
                    for (r, lb, f), a in zip(series, alive, strict=True)
                    if r.sae_type == t
                ),
                key=lambda x: x[0].sae(pos)["l0"],
            )
            for k, (_r, lb, f, a) in enumerate(mine):
                ax.hist(
                    a,
                    bins=edges,
                    histtype="step",
                    lw=1.3,
                    color=_run_color(k, len(mine)),
                    ls=TYPE_LINESTYLES[t],
                    label=f"{lb.removeprefix(t + ' ')}: {int((f == 0).sum()):,} dead",
                )
            ax.set_xscale("log")
            ax.set_xlabel("firing frequency (fraction of eval tokens)")
            ax.set_ylabel("latents (count)")
            ax.set_title(f"{t}, {pos}", fontsize=10)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if mine:
                ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.2), fontsize=7, frameon=False)
    _caption(fig, runs)
    return fig


def plot_downstream(runs: Sequence[RunInfo], out_dir: Path) -> list[Path]:
    """`downstream_figure` saved as OUT_DIR/downstream_reconstruction.png and .svg."""
    return save_figure(downstream_figure(runs), out_dir, "downstream_reconstruction")


def downstream_figure(runs: Sequence[RunInfo]) -> Figure:
    """Explained variance and MSE of the SAE-spliced run vs the clean run at each later
    residual-stream position (x: residual index; `hook_resid_pre` of block i is i). For one-SAE
    runs the first point is the SAE's own reconstruction at its position. One colour per run,
    line style by type, marker by architecture."""
    fig = new_figure(2 * PANEL[0] + 2.4, PANEL[1] + 0.5)
    ax_ev, ax_mse = fig.subplots(1, 2)
    labels = run_labels(runs)
    rank = {g: i for i, g in enumerate(_groups(runs))}
    order = sorted(
        range(len(runs)), key=lambda i: (rank[runs[i].sae_type, runs[i].architecture], labels[i])
    )
    for i, (r, lb) in enumerate((runs[j], labels[j]) for j in order):
        down = r.eval.get("downstream") or {}
        if not down:
            continue
        pts = sorted((d["layer"], d["explained_variance"], d["mse"]) for d in down.values())
        if len(r.positions) == 1:
            (pos,) = r.positions
            layer = hook_layer(pos, r.n_layers()) + ("resid_post" in pos)
            pts.insert(0, (layer, r.sae(pos)["explained_variance"], r.sae(pos)["mse"]))
        layers, ev, mse = zip(*pts, strict=True)
        kw = {
            "color": _run_color(i, len(runs)),
            "ls": TYPE_LINESTYLES[r.sae_type],
            "marker": ARCH_MARKERS.get(r.architecture, "*"),
            "ms": 4,
            "alpha": 0.85,
        }
        ax_ev.plot(layers, ev, label=lb, **kw)
        ax_mse.plot(layers, mse, **kw)
    ax_ev.set_title("explained variance vs the clean run", fontsize=10)
    ax_mse.set_title("MSE vs the clean run", fontsize=10)
    ax_ev.set_ylabel("explained variance (fraction)")
    ax_mse.set_ylabel("MSE (activation units squared)")
    plain_log_axis(ax_mse)
    for ax in (ax_ev, ax_mse):
        ax.set_xlabel("residual stream position (layer index)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if ax_ev.get_legend_handles_labels()[0]:
        fig.legend(
            *ax_ev.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False
        )
    _caption(fig, runs)
    return fig


def write_runs_table(runs: Sequence[RunInfo], out_dir: Path) -> Path:
    """OUT_DIR/runs.md: each run's label (as in the figures), what it is and its directory."""
    positions = run_positions(runs)
    rows = []
    for r in runs:
        pos = next((p for p in positions if p in r.positions), None)
        l0 = r.sae(pos)["l0"] if pos else math.nan
        alive = r.sae(pos)["alive_dict_elements"] if pos else math.nan
        checkpoint = (r.eval.get("settings") or {}).get("checkpoint", "")
        rows.append(
            [
                r.sae_type,
                r.architecture,
                r.sparsity_label,
                r.config.seed,
                f"{l0:.3g}",
                alive,
                f"{r.eval['ce_loss_increase']:.4g}",
                f"{r.eval_tokens:,}",
                checkpoint,
            ]
        )
    headers = [
        "type",
        "architecture",
        "sparsity",
        "seed",
        "L0",
        "alive",
        "CE increase",
        "eval tokens",
        "checkpoint",
    ]
    text = runs_table(run_labels(runs), [r.run_dir for r in runs], rows, headers)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUNS_TABLE
    path.write_text(text, encoding="utf-8")
    return path


def make_plots(runs: Sequence[RunInfo], out_dir: str | Path) -> list[Path]:
    """The Pareto, alive, density and downstream plots of these runs into `out_dir`, and the side
    table `runs.md` naming each run's directory; returns the files written. (Dictionary geometry:
    `e2e_sae.analysis.geometry.plot_geometry`.)"""
    out = Path(out_dir)
    if not runs:
        raise UserError("plot: no run directories given")
    check_output_folder(out, "--out")
    paths: list[Path] = []
    paths += plot_pareto(runs, out)
    paths += plot_alive_vs_ce(runs, out)
    paths += plot_feature_density(runs, out)
    paths += plot_downstream(runs, out)
    paths.append(write_runs_table(runs, out))
    return paths
