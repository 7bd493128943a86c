"""Plots over a set of run directories (PNG + SVG, matplotlib without a display).

Each run is summarised from its `final_config.yaml`, its `eval.json` (written by `e2e-sae eval`,
run here for runs that lack it) and its per-latent firing frequencies. The SAE type comes from the
loss config: `e2e+ds` when an `in_to_orig` (downstream) term is set, `e2e` when `logits_kl` is set,
`local` otherwise.

Also here: the Pareto front of (L0, CE-loss increase) points and interpolation along it, for
comparisons at matched L0 / matched CE increase (the paper's Tables 2-3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

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
from e2e_sae.runs.checkpoint import CONFIG_FILE
from e2e_sae.training.curves import plain_log_axis

TYPE_ORDER = ("local", "e2e", "e2e+ds")
TYPE_COLORS = {"local": "tab:blue", "e2e": "tab:orange", "e2e+ds": "tab:green"}
# Config keys that do not change what is learned (left out when grouping runs by seed).
_NAME_KEYS = (
    "seed",
    "run_name",
    "wandb_run_name",
    "wandb_run_name_prefix",
    "save_dir",
    "wandb_project",
)


def sae_type(config: Config) -> str:
    """`local`, `e2e` or `e2e+ds`, from which loss terms the run optimised (coefficient > 0)."""
    loss = config.loss
    if loss.in_to_orig is not None and loss.in_to_orig.total_coeff > 0:
        return "e2e+ds"
    if loss.logits_kl is not None and loss.logits_kl.coeff > 0:
        return "e2e"
    return "local"


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
    def positions(self) -> list[str]:
        return list(self.eval.get("per_sae", {}))

    def sae(self, position: str) -> dict[str, float]:
        return self.eval["per_sae"][position]

    def n_layers(self) -> int:
        """The LM's layer count, from the eval's downstream hooks (no model is loaded)."""
        down = self.eval.get("downstream") or {}
        return max((int(d["layer"]) for d in down.values()), default=0)

    def learning_key(self) -> str:
        """The config without seed and names: runs that share it differ only by seed."""
        import json

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
    """Summaries of the runs; a run without `eval.json` is evaluated (and the file written)."""

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
        runs.append(RunInfo(d, config, ev, freqs))
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


def interpolate_y_at_x(
    x: Sequence[float], y: Sequence[float], at: float, log_x: bool = True
) -> float:
    """y on the Pareto front of (x, y) at x = `at`, linear in log x; nan outside the front."""
    front = pareto_front(x, y)
    xs = np.array([x[i] for i in front], dtype=float)
    ys = np.array([y[i] for i in front], dtype=float)
    if log_x:
        xs, at = np.log(xs), math.log(at)
    if len(xs) == 0 or at < xs[0] - 1e-12 or at > xs[-1] + 1e-12:
        return math.nan
    return float(np.interp(at, xs, ys))


def interpolate_x_at_y(
    x: Sequence[float], y: Sequence[float], at: float, log_x: bool = True
) -> float:
    """x on the Pareto front of (x, y) where y = `at` (y falls as x grows); nan outside it."""
    front = pareto_front(x, y)
    xs = np.array([x[i] for i in front], dtype=float)
    ys = np.array([y[i] for i in front], dtype=float)
    if log_x:
        xs = np.log(xs)
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


def _positions(runs: Sequence[RunInfo]) -> list[str]:
    seen: list[str] = []
    for r in runs:
        seen += [p for p in r.positions if p not in seen]
    return seen


def _types(runs: Sequence[RunInfo]) -> list[str]:
    present = {r.sae_type for r in runs}
    return [t for t in TYPE_ORDER if t in present]


def figure_grid(n: int, width: float = 4.8, height: float = 3.8) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width * n, height))
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


def plot_tradeoff(
    runs: Sequence[RunInfo], out_dir: Path, x_key: str, stem: str, x_label: str
) -> list[Path]:
    """`tradeoff_figure` saved as OUT_DIR/STEM.png and .svg."""
    return save_figure(tradeoff_figure(runs, x_key, x_label), out_dir, stem)


def tradeoff_figure(runs: Sequence[RunInfo], x_key: str, x_label: str) -> Figure:
    """CE-loss increase vs a per-SAE metric, one panel per SAE position, one colour per type:
    every run a point labelled by its sparsity coefficient, the Pareto front (lower is better in
    both) as filled points joined by a line, the other points hollow."""
    positions = _positions(runs)
    fig, axes = figure_grid(len(positions))
    for ax, pos in zip(axes, positions, strict=True):
        for t in _types(runs):
            pts = sorted(
                (r.sae(pos)[x_key], r.eval["ce_loss_increase"], r.sparsity_label)
                for r in runs
                if r.sae_type == t and pos in r.positions
            )
            if not pts:
                continue
            xs, ys, labels = zip(*pts, strict=True)
            color = TYPE_COLORS[t]
            front = pareto_front(xs, ys)
            rest = [i for i in range(len(xs)) if i not in front]
            ax.plot(
                [xs[i] for i in front],
                [ys[i] for i in front],
                "o-",
                color=color,
                ms=6,
                label=f"{t} ({len(pts)} runs): Pareto front, {len(front)} "
                f"point{'s' if len(front) > 1 else ''}",
            )
            if rest:
                ax.plot(
                    [xs[i] for i in rest],
                    [ys[i] for i in rest],
                    "o",
                    mfc="none",
                    color=color,
                    ms=6,
                    label=f"{t}: other runs",
                )
            for x, y, lbl in pts:
                ax.annotate(
                    lbl, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color
                )
        ax.margins(x=0.08, y=0.12)  # room for the point labels
        ax.set_xlabel(x_label)
        ax.set_ylabel("CE loss increase (nats)")
        ax.set_title(_short(pos))
        ax.grid(alpha=0.3)
        _legend_below(ax)
    fig.tight_layout()
    return fig


def plot_pareto(runs: Sequence[RunInfo], out_dir: Path) -> list[Path]:
    """L0 vs CE-loss increase per SAE type (the paper's Figure 1)."""
    return plot_tradeoff(
        runs, out_dir, "l0", "pareto_l0_ce_increase", "L0 (active latents / token)"
    )


def plot_alive_vs_ce(runs: Sequence[RunInfo], out_dir: Path) -> list[Path]:
    """Alive dictionary elements vs CE-loss increase per SAE type."""
    return plot_tradeoff(
        runs, out_dir, "alive_dict_elements", "alive_vs_ce_increase", "alive dictionary elements"
    )


def plot_feature_density(runs: Sequence[RunInfo], out_dir: Path, bins: int = 40) -> list[Path]:
    """Histograms of log10 firing frequency per latent over the eval tokens: one row of panels per
    SAE position, one panel per type, runs coloured from sparse (dark) to dense (light) by L0.
    Dead latents are counted in the legend, not drawn (their log frequency is -inf)."""
    from matplotlib import colormaps

    positions, types = _positions(runs), _types(runs)
    fig = Figure(figsize=(4.8 * len(types), 3.8 * len(positions)))
    for i, pos in enumerate(positions):
        series = [(r, r.frequencies[pos]) for r in runs if pos in r.frequencies]
        alive = [np.log10(f[f > 0].double().numpy()) for _, f in series]
        lo = min((float(v.min()) for v in alive if v.size), default=-6.0)
        edges = np.linspace(math.floor(lo), 0.0, bins + 1).tolist()
        for j, t in enumerate(types):
            ax = fig.add_subplot(len(positions), len(types), i * len(types) + j + 1)
            mine = sorted(
                ((r, f, a) for (r, f), a in zip(series, alive, strict=True) if r.sae_type == t),
                key=lambda x: x[0].sae(pos)["l0"],
            )
            cmap = colormaps[{"local": "Blues_r", "e2e": "Oranges_r", "e2e+ds": "Greens_r"}[t]]
            for k, (r, f, logs) in enumerate(mine):
                color = cmap(0.1 + 0.6 * k / max(1, len(mine) - 1))
                ax.hist(
                    logs,
                    bins=edges,
                    histtype="step",
                    color=color,
                    label=f"{r.label}: L0 {r.sae(pos)['l0']:.3g}, dead {int((f == 0).sum())} "
                    f"(of {int(r.eval.get('n_tokens', 0)):,} eval tokens)",
                )
            ax.set_xlabel("log10 firing frequency")
            ax.set_ylabel("latents")
            ax.set_title(f"{t}, {_short(pos)}")
            _legend_below(ax)
    fig.tight_layout()
    return save_figure(fig, out_dir, "feature_density")


def plot_downstream(runs: Sequence[RunInfo], out_dir: Path) -> list[Path]:
    """`downstream_figure` saved as OUT_DIR/downstream_reconstruction.png and .svg."""
    return save_figure(downstream_figure(runs), out_dir, "downstream_reconstruction")


def downstream_figure(runs: Sequence[RunInfo]) -> Figure:
    """Explained variance and MSE of the SAE-spliced run vs the clean run at each later
    residual-stream position (x: residual index; `hook_resid_pre` of block i is i). For one-SAE
    runs the first point is the SAE's own reconstruction at its position."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax_ev, ax_mse) = figure_grid(2)
    styles = {"local": "-", "e2e": "--", "e2e+ds": ":"}
    for i, r in enumerate(runs):
        down = r.eval.get("downstream") or {}
        if not down:
            continue
        pts = sorted((d["layer"], d["explained_variance"], d["mse"]) for d in down.values())
        if len(r.positions) == 1:
            (pos,) = r.positions
            layer = hook_layer(pos, r.n_layers()) + ("resid_post" in pos)
            pts.insert(0, (layer, r.sae(pos)["explained_variance"], r.sae(pos)["mse"]))
        layers, ev, mse = zip(*pts, strict=True)
        # One colour per run (the type is the line style), so runs of one type stay apart.
        kw = {
            "color": _run_color(i, len(runs)),
            "ls": styles[r.sae_type],
            "marker": "o",
            "alpha": 0.8,
        }
        ax_ev.plot(layers, ev, label=f"{r.label} ({r.sparsity_label})", **kw)
        ax_mse.plot(layers, mse, **kw)
    ax_ev.set_ylabel("explained variance (spliced vs clean)")
    ax_mse.set_ylabel("MSE (spliced vs clean)")
    plain_log_axis(ax_mse)
    for ax in (ax_ev, ax_mse):
        ax.set_xlabel("residual stream position (layer)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend_below(ax_ev)
    fig.tight_layout()
    return fig


def make_plots(runs: Sequence[RunInfo], out_dir: str | Path) -> list[Path]:
    """The Pareto, alive, density and downstream plots of these runs into `out_dir`; returns the
    files written. (Dictionary geometry: `e2e_sae.analysis.geometry.plot_geometry`.)"""
    out = Path(out_dir)
    if not runs:
        raise UserError("plot: no run directories given")
    check_output_folder(out, "--out")
    paths: list[Path] = []
    paths += plot_pareto(runs, out)
    paths += plot_alive_vs_ce(runs, out)
    paths += plot_feature_density(runs, out)
    paths += plot_downstream(runs, out)
    return paths
