"""Dictionary geometry across runs (Braun et al. 2024, section 3.4 and appendix): how close each
direction of one dictionary is to the directions of another, and where the directions of several
dictionaries lie relative to each other (UMAP).

A dictionary is the SAE's unit-norm decoder columns, [d_model, n_dict]; only the alive elements
(fired on at least one of the run's eval tokens, `eval.json`) are compared, as in the paper. For
each column a_i of A, `max_cosine_similarity(A, B)[i] = max_j <a_i, b_j>`. Comparisons:

- `within`: each dictionary with itself, a direction's nearest *other* direction (how spread out
  the dictionary is; lower = more orthogonal);
- `cross-type`: every run of one SAE type against every run of another type at the same position,
  in the paper's direction (e2e -> local, e2e+ds -> local, e2e+ds -> e2e: for each element of the
  first run, its nearest element in the second). Runs with the same seed start from the same
  dictionary (the seed sets the SAE's initialisation), which short runs never leave far, so the
  pooled cross-type histograms use the pairs with different seeds when there are any;
- `cross-seed`: runs whose configs differ only in their seed (how reproducible the dictionary is).

Every figure saves PNG + SVG through `plots.save_figure`; the tables are Markdown.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from e2e_sae.analysis.plots import (
    TYPE_COLORS,
    TYPE_ORDER,
    RunInfo,
    run_positions,
    run_types,
    save_figure,
)
from e2e_sae.analysis.plots import run_labels as plots_run_labels
from e2e_sae.errors import UserError
from e2e_sae.runs.checkpoint import list_checkpoints, read_tensors

logger = logging.getLogger(__name__)

COSINE_EDGES = np.linspace(-0.1, 1.0, 45).tolist()
WITHIN, CROSS_TYPE, CROSS_SEED = "within", "cross-type", "cross-seed"
# Colour maps per type for several runs of one type (sparse = dark, dense = light).
TYPE_CMAPS = {"local": "Blues_r", "e2e": "Oranges_r", "e2e+ds": "Greens_r"}


# --- computations ---------------------------------------------------------------------------------
def max_cosine_similarity(
    a: Tensor, b: Tensor, *, exclude_self: bool = False, chunk: int = 2048
) -> Tensor:
    """For each column of `a` [d, n_a], the largest cosine similarity to any column of `b` [d, n_b].

    `exclude_self` (a and b the same dictionary) skips the pairing of a column with itself.
    Columns are normalised here, so raw decoder weights may be passed. Returns [n_a] (float32)."""
    if a.shape[0] != b.shape[0]:
        raise UserError(f"dictionaries live in different spaces (d={a.shape[0]} vs d={b.shape[0]})")
    a = F.normalize(a.float(), dim=0)
    b = F.normalize(b.float(), dim=0)
    out = []
    for s in range(0, a.shape[1], chunk):
        sims = a[:, s : s + chunk].T @ b  # [chunk, n_b]
        if exclude_self:
            idx = torch.arange(s, min(s + chunk, a.shape[1]))
            sims[idx - s, idx] = float("-inf")
        out.append(sims.max(dim=1).values)
    return torch.cat(out)


def load_dictionary(run_dir: str | Path, position: str | None = None) -> tuple[str, Tensor]:
    """(position, unit-norm dictionary [d_out, n_dict]) of a run's newest checkpoint.

    Reads only the safetensors file (no LM is loaded); `position` may be omitted for one SAE."""

    path = Path(run_dir)
    ckpt = path if path.is_file() else (list_checkpoints(path) or [None])[-1]
    if ckpt is None:
        raise UserError(f"run directory {run_dir}: no samples_<N>.safetensors checkpoint")
    state = read_tensors(ckpt)
    decoders = {
        k.removesuffix(".decoder.weight"): v
        for k, v in state.items()
        if k.endswith(".decoder.weight")
    }
    positions = {k.replace("-", "."): k for k in decoders}
    if position is None:
        if len(decoders) != 1:
            raise UserError(f"{ckpt}: several SAEs ({', '.join(positions)}); name one position")
        position = next(iter(positions))
    if position not in positions:
        raise UserError(f"{ckpt}: no SAE at '{position}' (has {', '.join(positions)})")
    return position, F.normalize(decoders[positions[position]].float(), dim=0)


@dataclass(frozen=True)
class Dictionary:
    """The alive elements of one run's dictionary at one position."""

    run: RunInfo
    position: str
    elements: Tensor
    """[d, n_alive], unit-norm columns."""
    indices: Tensor
    """[n_alive]: the latent index of each column."""


def alive_dictionary(run: RunInfo, position: str) -> Dictionary:
    """A run's dictionary at `position`, restricted to the latents that fired on its eval tokens
    (all latents when the run has no firing frequencies)."""
    _, d = load_dictionary(run.run_dir, position)
    freq = run.frequencies.get(position)
    keep = freq > 0 if freq is not None else torch.ones(d.shape[1], dtype=torch.bool)
    if keep.shape[0] != d.shape[1]:
        raise UserError(
            f"{run.run_dir}: eval.json counts {keep.shape[0]} latents at {position} but the "
            f"checkpoint has {d.shape[1]} (rerun `e2e-sae eval`)"
        )
    return Dictionary(run, position, d[:, keep], keep.nonzero().squeeze(1))


@dataclass(frozen=True)
class Comparison:
    """Max cosine similarity of each alive element of `a` to the alive elements of `b`."""

    kind: str
    """`within`, `cross-type` or `cross-seed`."""
    position: str
    a: RunInfo
    b: RunInfo
    sims: Tensor
    """[n_alive of a]."""

    @property
    def same_seed(self) -> bool:
        return self.a.config.seed == self.b.config.seed


def type_pairs(types: Sequence[str]) -> list[tuple[str, str]]:
    """The paper's directions between the types present: (e2e, local), (e2e+ds, local),
    (e2e+ds, e2e): each element of the first type against the second type's dictionary."""
    order = [t for t in TYPE_ORDER if t in types]
    return [(a, b) for i, b in enumerate(order) for a in order[i + 1 :]]


def geometry_comparisons(
    runs: Sequence[RunInfo], positions: Sequence[str] | None = None
) -> list[Comparison]:
    """Every comparison at every position two or more runs share (see the module docstring):
    each run with itself, every cross-type pair of runs, every pair of runs that differ only by
    seed. Dictionaries are loaded once each."""
    cache: dict[tuple[Path, str], Dictionary] = {}

    def dic(r: RunInfo, pos: str) -> Dictionary:
        key = (r.run_dir, pos)
        if key not in cache:
            cache[key] = alive_dictionary(r, pos)
        return cache[key]

    out: list[Comparison] = []
    for pos in positions or run_positions(runs):
        at = [r for r in runs if pos in r.positions]
        for r in at:
            e = dic(r, pos).elements
            if e.shape[1] >= 2:
                out.append(
                    Comparison(WITHIN, pos, r, r, max_cosine_similarity(e, e, exclude_self=True))
                )
        for ta, tb in type_pairs(run_types(at)):
            for a in (r for r in at if r.sae_type == ta):
                for b in (r for r in at if r.sae_type == tb):
                    ea, eb = dic(a, pos).elements, dic(b, pos).elements
                    if ea.shape[1] and eb.shape[1]:
                        out.append(Comparison(CROSS_TYPE, pos, a, b, max_cosine_similarity(ea, eb)))
        groups: dict[str, list[RunInfo]] = {}
        for r in at:
            groups.setdefault(r.learning_key(), []).append(r)
        for rs in groups.values():
            for a, b in itertools.combinations(sorted(rs, key=lambda r: r.config.seed), 2):
                ea, eb = dic(a, pos).elements, dic(b, pos).elements
                if a.config.seed != b.config.seed and ea.shape[1] and eb.shape[1]:
                    out.append(Comparison(CROSS_SEED, pos, a, b, max_cosine_similarity(ea, eb)))
    return out


def pooled_cross_type(comps: Sequence[Comparison], ta: str, tb: str, pos: str) -> list[Comparison]:
    """The cross-type comparisons ta -> tb at `pos` that the pooled histograms use: the pairs with
    different seeds when there are any (same-seed runs share their initial dictionary)."""
    pairs = [
        c
        for c in comps
        if c.kind == CROSS_TYPE and c.position == pos and (c.a.sae_type, c.b.sae_type) == (ta, tb)
    ]
    other = [c for c in pairs if not c.same_seed]
    return other or pairs


def pooled_density(sims: Sequence[Tensor], edges: Sequence[float] = COSINE_EDGES) -> np.ndarray:
    """Histogram density over `edges`, each comparison weighted equally (so a pair with more
    alive elements does not dominate)."""
    e = np.asarray(edges)
    dens = [np.histogram(s.numpy(), bins=e, density=True)[0] for s in sims if s.numel()]
    return np.mean(dens, axis=0) if dens else np.zeros(len(e) - 1)


# --- UMAP -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Embedding:
    """A 2-d UMAP embedding of the alive elements of several dictionaries at one position."""

    position: str
    dictionaries: list[Dictionary]
    xy: np.ndarray
    """[n_points, 2]."""
    owner: np.ndarray
    """[n_points]: index into `dictionaries`."""
    latent: np.ndarray
    """[n_points]: latent index within its dictionary."""


UMAP_MISSING = (
    "UMAP needs the umap-learn package: pip install 'e2e-sae[umap]' (make install has it), "
    "or pass --no-umap"
)


def umap_available() -> bool:
    """Whether umap-learn is installed (an optional extra, `e2e-sae[umap]`)."""
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def umap_embedding(
    dictionaries: Sequence[Dictionary],
    *,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    max_per_run: int | None = 5000,
) -> Embedding:
    """UMAP (umap-learn, cosine metric) of the alive elements of `dictionaries` (one position),
    fitted jointly. `max_per_run` samples that many elements of a larger dictionary (seeded)."""
    if not umap_available():
        raise UserError(UMAP_MISSING)
    import umap  # umap-learn; numba compiles its kernels on first use (tens of seconds)

    if not dictionaries:
        raise UserError("umap: no dictionaries to embed")
    positions = {d.position for d in dictionaries}
    if len(positions) != 1:
        raise UserError(f"umap: dictionaries at different positions ({', '.join(positions)})")
    rng = np.random.default_rng(seed)
    cols, owner, latent = [], [], []
    for i, d in enumerate(dictionaries):
        n = d.elements.shape[1]
        pick = np.arange(n)
        if max_per_run is not None and n > max_per_run:
            pick = np.sort(rng.choice(n, max_per_run, replace=False))
        cols.append(d.elements[:, torch.from_numpy(pick)].T.numpy())
        owner.append(np.full(len(pick), i))
        latent.append(d.indices.numpy()[pick])
    x = np.concatenate(cols).astype(np.float32)
    if len(x) <= 2:
        raise UserError(f"umap: {len(x)} alive elements in all, too few to embed")
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(n_neighbors, len(x) - 1),
        min_dist=min_dist,
        metric="cosine",
        random_state=seed,
        n_jobs=1,  # random_state forces one job anyway; saying so keeps umap from warning
    )
    xy = np.asarray(reducer.fit_transform(x))
    return Embedding(
        positions.pop(), list(dictionaries), xy, np.concatenate(owner), np.concatenate(latent)
    )


# --- labels ---------------------------------------------------------------------------------------
def run_labels(runs: Sequence[RunInfo]) -> dict[Path, str]:
    """Each run's short label, as in the Pareto figures and runs.md (`plots.run_labels`: type,
    architecture, sparsity, plus what tells look-alike runs apart, e.g. `e2e relu λ=1, seed=1`)."""
    return dict(zip((r.run_dir for r in runs), plots_run_labels(runs), strict=True))


def short_position(position: str) -> str:
    """`blocks.2.hook_resid_pre` -> `L2 resid_pre` (titles)."""
    return position.replace("blocks.", "L").replace(".hook_", " ")


def type_shades(runs: Sequence[RunInfo], position: str) -> dict[Path, Any]:
    """A colour per run: its type's colour map, sparse (low L0) dark to dense light."""
    from matplotlib import colormaps

    out: dict[Path, Any] = {}
    for t in run_types(runs):
        mine = sorted(
            (r for r in runs if r.sae_type == t),
            key=lambda r: r.sae(position)["l0"] if position in r.positions else 0.0,
        )
        cmap = colormaps[TYPE_CMAPS[t]]
        for k, r in enumerate(mine):
            out[r.run_dir] = cmap(0.15 + 0.5 * k / max(1, len(mine) - 1))
    return out


# --- figures --------------------------------------------------------------------------------------
def _hist_axes(ax: Any, title: str, ylabel: bool = True) -> None:
    ax.set_xlim(COSINE_EDGES[0], COSINE_EDGES[-1])
    ax.set_xlabel("max cosine similarity")
    if ylabel:
        ax.set_ylabel("density (per unit cosine)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", frameon=False)


def summary_figure(runs: Sequence[RunInfo], comps: Sequence[Comparison]) -> Figure | None:
    """One row per position: (1) each direction's nearest other direction in its own dictionary,
    pooled per type; (2) the nearest direction in another type's dictionary, per type pair,
    pooled over the run pairs (different seeds when any); (3) the nearest direction in the same
    config's dictionary with another seed, per type. Dashed lines: means. None: nothing to draw."""
    positions = [p for p in run_positions(runs) if any(c.position == p for c in comps)]
    if not positions:
        return None
    fig = Figure(figsize=(13.5, 3.6 * len(positions)))
    centers = (np.asarray(COSINE_EDGES[:-1]) + np.asarray(COSINE_EDGES[1:])) / 2
    for row, pos in enumerate(positions):
        mine = [c for c in comps if c.position == pos]
        types = run_types([c.a for c in mine])
        axes = [fig.add_subplot(len(positions), 3, 3 * row + i + 1) for i in range(3)]
        sp = short_position(pos)
        for t in types:
            series = [c.sims for c in mine if c.kind == WITHIN and c.a.sae_type == t]
            _pooled_line(axes[0], centers, series, TYPE_COLORS[t], t, len(series), "run")
        for ta, tb in type_pairs(types):
            pooled = pooled_cross_type(mine, ta, tb, pos)
            color = TYPE_COLORS[ta]
            ls = "-" if tb == "local" else "--"
            label = f"{ta} → {tb}"
            _pooled_line(
                axes[1], centers, [c.sims for c in pooled], color, label, len(pooled), "pair", ls
            )
        for t in types:
            series = [c.sims for c in mine if c.kind == CROSS_SEED and c.a.sae_type == t]
            _pooled_line(axes[2], centers, series, TYPE_COLORS[t], t, len(series), "pair")
        _hist_axes(axes[0], f"{sp}: within a dictionary")
        _hist_axes(axes[1], f"{sp}: across SAE types", ylabel=False)
        _hist_axes(axes[2], f"{sp}: across seeds", ylabel=False)
        for ax in axes:
            if not ax.lines:
                ax.text(
                    0.5,
                    0.5,
                    "no runs to compare",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    color="0.5",
                )
            _legend(ax)
    fig.tight_layout()
    return fig


def _pooled_line(
    ax: Any,
    centers: np.ndarray,
    sims: Sequence[Tensor],
    color: Any,
    label: str,
    n: int,
    unit: str,
    ls: str = "-",
) -> None:
    if not sims:
        return
    mean = float(np.mean([float(s.mean()) for s in sims]))
    ax.plot(
        centers,
        pooled_density(sims),
        ls=ls,
        color=color,
        label=f"{label}: mean {mean:.2f} ({n} {unit}{'s' if n != 1 else ''})",
    )
    ax.axvline(mean, color=color, ls=":", lw=1)


def within_figure(runs: Sequence[RunInfo], comps: Sequence[Comparison]) -> Figure | None:
    """Per position and type, one histogram per run of each direction's nearest other direction
    in its own dictionary (runs shaded sparse = dark to dense = light)."""
    cells = [
        (pos, t)
        for pos in run_positions(runs)
        for t in run_types(runs)
        if any(c.kind == WITHIN and c.position == pos and c.a.sae_type == t for c in comps)
    ]
    if not cells:
        return None
    labels = run_labels(runs)
    ncols = min(3, len(cells))
    nrows = math.ceil(len(cells) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows))
    for i, (pos, t) in enumerate(cells):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        shades = type_shades(runs, pos)
        for c in (c for c in comps if c.kind == WITHIN and c.position == pos and c.a.sae_type == t):
            ax.hist(
                c.sims.numpy(),
                bins=COSINE_EDGES,
                histtype="step",
                density=True,
                color=shades[c.a.run_dir],
                label=f"{labels[c.a.run_dir]}: mean {float(c.sims.mean()):.2f}",
            )
        _hist_axes(ax, f"{t}, {short_position(pos)}: nearest other element", ylabel=i % ncols == 0)
        _legend(ax)
    fig.tight_layout()
    return fig


def pairs_figure(runs: Sequence[RunInfo], comps: Sequence[Comparison]) -> Figure | None:
    """Per position, a matrix of the mean max cosine similarity between every two runs: row a,
    column b = mean over a's alive elements of the nearest element of b (both directions of
    every pair; the diagonal is the within-dictionary value). Same-seed pairs are marked `*`."""
    positions = [p for p in run_positions(runs) if sum(c.position == p for c in comps) > 1]
    if not positions:
        return None
    labels = run_labels(runs)
    fig = Figure(
        figsize=(max(5.0, 0.9 * len(runs) + 3) * len(positions), max(4.0, 0.7 * len(runs) + 2.5))
    )
    for k, pos in enumerate(positions):
        at = sorted(
            (r for r in runs if pos in r.positions),
            key=lambda r: (TYPE_ORDER.index(r.sae_type), r.sparsity_label, r.config.seed),
        )
        dicts = {r.run_dir: alive_dictionary(r, pos) for r in at}
        m = np.full((len(at), len(at)), np.nan)
        for i, a in enumerate(at):
            for j, b in enumerate(at):
                ea, eb = dicts[a.run_dir].elements, dicts[b.run_dir].elements
                if ea.shape[1] == 0 or eb.shape[1] < (2 if i == j else 1):
                    continue
                m[i, j] = float(max_cosine_similarity(ea, eb, exclude_self=i == j).mean())
        ax = fig.add_subplot(1, len(positions), k + 1)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for i, j in itertools.product(range(len(at)), repeat=2):
            if not math.isnan(m[i, j]):
                mark = "*" if i != j and at[i].config.seed == at[j].config.seed else ""
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}{mark}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if m[i, j] < 0.6 else "black",
                )
        names = [labels[r.run_dir] for r in at]
        ax.set_xticks(range(len(at)), names, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(at)), names, fontsize=8)
        ax.set_xlabel("dictionary searched (b)")
        ax.set_ylabel("elements compared (a)")
        ax.set_title(f"{short_position(pos)}: mean max cosine a → b (* same seed)", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="mean max cosine similarity")
    fig.tight_layout()
    return fig


def umap_figure(emb: Embedding, labels: dict[Path, str] | None = None) -> Figure:
    """The UMAP points coloured by run (runs of one type in shades of the type's colour)."""
    runs = [d.run for d in emb.dictionaries]
    labels = labels or run_labels(runs)
    shades = type_shades(runs, emb.position)
    fig = Figure(figsize=(6.4, 5.6))
    ax = fig.add_subplot(1, 1, 1)
    # Draw the largest set first so smaller ones stay visible on top.
    order = sorted(range(len(runs)), key=lambda i: -int((emb.owner == i).sum()))
    for i in order:
        pts = emb.xy[emb.owner == i]
        ax.scatter(
            pts[:, 0],
            pts[:, 1],
            s=3,
            alpha=0.45,
            color=shades[runs[i].run_dir],
            label=f"{labels[runs[i].run_dir]} ({len(pts)} alive)",
            rasterized=True,
        )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1 (no units)")
    ax.set_ylabel("UMAP 2 (no units)")
    ax.set_title(f"{short_position(emb.position)}: UMAP of alive dictionary elements", fontsize=10)
    leg = ax.legend(fontsize=7, markerscale=3, loc="best", frameon=True)
    for h in leg.legend_handles:
        if h is not None:
            h.set_alpha(1)
    fig.tight_layout()
    return fig


# --- tables ---------------------------------------------------------------------------------------
def comparison_rows(runs: Sequence[RunInfo], comps: Sequence[Comparison]) -> list[dict[str, Any]]:
    """One row per comparison: kind, position, runs (short labels and directories), number of
    elements, mean / median max cosine, fraction above 0.9 and below 0.5."""
    labels = run_labels(runs)
    rows = []
    for c in comps:
        s = c.sims
        rows.append(
            {
                "kind": c.kind,
                "position": c.position,
                "a": labels[c.a.run_dir],
                "b": labels[c.b.run_dir],
                "a_dir": c.a.run_dir.name,
                "b_dir": c.b.run_dir.name,
                "same_seed": c.same_seed,
                "n": int(s.numel()),
                "mean": float(s.mean()),
                "median": float(s.median()),
                "frac_above_0.9": float((s > 0.9).float().mean()),
                "frac_below_0.5": float((s < 0.5).float().mean()),
            }
        )
    return rows


def geometry_markdown(runs: Sequence[RunInfo], comps: Sequence[Comparison]) -> str:
    """The comparisons as Markdown: a pooled summary per position, then every comparison."""
    lines = ["# Dictionary geometry", ""]
    lines += [
        "Max cosine similarity of each alive dictionary element to the nearest element of the "
        "other dictionary (`within`: the nearest *other* element of its own). Cross-type "
        "directions follow the paper (each element of the first type searched in the second's "
        "dictionary); pooled means use pairs with different seeds when there are any.",
        "",
    ]
    for pos in run_positions(runs):
        mine = [c for c in comps if c.position == pos]
        if not mine:
            continue
        lines += [
            f"## {pos}",
            "",
            "| comparison | runs / pairs | mean max cosine |",
            "|---|---|---|",
        ]
        for t in run_types([c.a for c in mine]):
            w = [float(c.sims.mean()) for c in mine if c.kind == WITHIN and c.a.sae_type == t]
            if w:
                lines.append(f"| within {t} | {len(w)} | {np.mean(w):.3f} |")
        for ta, tb in type_pairs(run_types([c.a for c in mine])):
            pooled = pooled_cross_type(mine, ta, tb, pos)
            if pooled:
                same = " (same seed)" if all(c.same_seed for c in pooled) else ""
                v = np.mean([float(c.sims.mean()) for c in pooled])
                lines.append(f"| {ta} → {tb}{same} | {len(pooled)} | {v:.3f} |")
        for t in run_types([c.a for c in mine]):
            s = [float(c.sims.mean()) for c in mine if c.kind == CROSS_SEED and c.a.sae_type == t]
            if s:
                lines.append(f"| {t} across seeds | {len(s)} | {np.mean(s):.3f} |")
        lines.append("")
    rows = comparison_rows(runs, comps)
    if rows:
        lines += [
            "## Every comparison",
            "",
            "| kind | position | a | b | same seed | alive in a | mean | median | > 0.9 | < 0.5 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['kind']} | {r['position']} | {r['a']} | {r['b']} | "
                f"{'yes' if r['same_seed'] else 'no'} | {r['n']} | {r['mean']:.3f} | "
                f"{r['median']:.3f} | {r['frac_above_0.9']:.2f} | {r['frac_below_0.5']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


# --- one call for all of it -----------------------------------------------------------------------
def plot_geometry(runs: Sequence[RunInfo], out_dir: Path) -> list[Path]:
    """`summary_figure` as OUT_DIR/dictionary_geometry.png and .svg (`e2e-sae plot`); nothing when
    there is nothing to compare."""
    fig = summary_figure(runs, geometry_comparisons(runs))
    return save_figure(fig, Path(out_dir), "dictionary_geometry") if fig is not None else []


def write_geometry(
    runs: Sequence[RunInfo],
    out_dir: str | Path,
    *,
    umap: bool | None = None,
    seed: int = 0,
    max_per_run: int | None = 5000,
) -> list[Path]:
    """Every geometry figure and table of `runs` into `out_dir`: dictionary_geometry (summary),
    geometry_within_dictionary, geometry_all_pairs, geometry_umap_<position> (`umap`: True, or
    None = when umap-learn is installed), geometry.md and geometry.json. Returns the files
    written."""
    import json

    if umap is None:
        umap = umap_available()
    elif umap and not umap_available():
        raise UserError(UMAP_MISSING)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comps = geometry_comparisons(runs)
    paths: list[Path] = []
    for stem, fig in (
        ("dictionary_geometry", summary_figure(runs, comps)),
        ("geometry_within_dictionary", within_figure(runs, comps)),
        ("geometry_all_pairs", pairs_figure(runs, comps)),
    ):
        if fig is not None:
            paths += save_figure(fig, out, stem)
    if umap:
        labels = run_labels(runs)
        for pos in run_positions(runs):
            dicts = [alive_dictionary(r, pos) for r in runs if pos in r.positions]
            dicts = [d for d in dicts if d.elements.shape[1] > 0]
            if sum(d.elements.shape[1] for d in dicts) <= 2:
                continue
            emb = umap_embedding(dicts, seed=seed, max_per_run=max_per_run)
            stem = "geometry_umap_" + pos.replace(".", "_")
            paths += save_figure(umap_figure(emb, labels), out, stem)
    md = out / "geometry.md"
    md.write_text(geometry_markdown(runs, comps))
    js = out / "geometry.json"
    js.write_text(json.dumps(comparison_rows(runs, comps), indent=2))
    return paths + [md, js]
