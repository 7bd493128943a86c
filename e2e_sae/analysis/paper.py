"""`e2e-sae paper-figures RUN... --out DIR`: every figure and table of the paper's analyses for a
set of runs, each file named for what it shows, with an index page (index.md and index.html).

Sections run in order (`SECTIONS`); each takes a `PaperContext` and returns the `Artifact`s it
wrote. Another analysis joins with `register_section(title, fn)` (or `sections=` per call), e.g.
automated interpretability once it exposes a figure function of this shape.
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from e2e_sae.analysis.activations import activation_analysis, write_activations
from e2e_sae.analysis.geometry import UMAP_MISSING, run_labels, umap_available, write_geometry
from e2e_sae.analysis.matched import matched_tables, md_table
from e2e_sae.analysis.plots import (
    RunInfo,
    load_runs,
    plot_alive_vs_ce,
    plot_downstream,
    plot_feature_density,
    plot_pareto,
)
from e2e_sae.errors import UserError, check_output_folder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    """One file of the output folder and what it shows (one line, for the index)."""

    path: Path
    caption: str


@dataclass
class PaperContext:
    """What every section gets: the runs (evaluated), the output folder and the options."""

    runs: list[RunInfo]
    out: Path
    n_tokens: int = 8192
    """Eval tokens for the activation analysis."""
    n_directions: int = 16
    umap: bool | None = None
    """UMAP figures: True, False, or None = when umap-learn is installed."""
    seed: int = 0
    device: str | None = None
    progress: bool = False
    notes: list[str] = field(default_factory=list)
    """Lines for the index page (e.g. why a figure is missing)."""


Section = Callable[[PaperContext], list[Artifact]]


def _files(paths: Sequence[Path], captions: dict[str, str]) -> list[Artifact]:
    """Artifacts for the PNGs and tables among `paths` (SVGs are listed with their PNG)."""
    out = []
    for p in paths:
        if p.suffix == ".svg":
            continue
        out.append(Artifact(p, captions.get(p.stem, p.stem.replace("_", " "))))
    return out


def runs_section(ctx: PaperContext) -> list[Artifact]:
    """runs.md: every run with its short label, directory and eval metrics."""
    labels = run_labels(ctx.runs)
    rows = []
    for r in ctx.runs:
        for pos in r.positions:
            s = r.sae(pos)
            rows.append(
                [
                    labels[r.run_dir],
                    f"`{os.path.relpath(r.run_dir, ctx.out)}`",
                    r.sae_type,
                    str(r.config.seed),
                    pos,
                    f"{s['l0']:.3g}",
                    f"{int(s['alive_dict_elements'])}",
                    f"{r.eval['ce_loss_increase']:.4g}",
                    f"{s['explained_variance']:.3g}",
                    f"{int(r.eval.get('n_tokens', 0)):,}",
                ]
            )
    headers = [
        "label",
        "run directory",
        "type",
        "seed",
        "position",
        "L0",
        "alive",
        "CE increase (nats)",
        "explained variance",
        "eval tokens",
    ]
    path = ctx.out / "runs.md"
    path.write_text("# Runs\n\n" + md_table(headers, rows) + "\n")
    return [
        Artifact(path, "The runs: short labels used in every figure, directories, eval metrics")
    ]


def tradeoff_section(ctx: PaperContext) -> list[Artifact]:
    """The existing plots (Pareto, alive, density, downstream) and the matched tables."""
    paths = plot_pareto(ctx.runs, ctx.out)
    paths += plot_alive_vs_ce(ctx.runs, ctx.out)
    paths += plot_feature_density(ctx.runs, ctx.out)
    paths += plot_downstream(ctx.runs, ctx.out)
    captions = {
        "pareto_l0_ce_increase": "CE-loss increase against L0, per SAE type (Pareto fronts)",
        "alive_vs_ce_increase": "CE-loss increase against alive dictionary elements",
        "feature_density": "Firing frequency of each latent on the eval tokens",
        "downstream_reconstruction": "How well later layers are recovered with the SAE spliced in",
    }
    arts = _files(paths, captions)
    positions = list(dict.fromkeys(p for r in ctx.runs for p in r.positions))
    lines = ["# Matched comparisons", ""]
    for pos in positions:
        m = matched_tables(ctx.runs, pos, seed=None)
        if len(m["types"]) < 2:
            continue
        lines += [f"## {pos}", ""]
        if m["same_l0"]:
            lines += ["CE-loss increase at the same L0 (interpolated on each type's front):", ""]
            rows = [[f"{r['l0']:.3g}", *(f"{r[t]:.4g}" for t in m["types"])] for r in m["same_l0"]]
            lines += [md_table(["L0", *m["types"]], rows), ""]
        if m["same_ce"]:
            lines += ["L0 at the same CE-loss increase:", ""]
            rows = [
                [f"{r['ce_loss_increase']:.4g}", *(f"{r[t]:.3g}" for t in m["types"])]
                for r in m["same_ce"]
            ]
            lines += [md_table(["CE increase", *m["types"]], rows), ""]
        if not (m["same_l0"] or m["same_ce"]):
            lines += ["The types' Pareto fronts do not overlap in L0 or CE increase.", ""]
    if len(lines) > 2:
        path = ctx.out / "matched.md"
        path.write_text("\n".join(lines))
        arts.append(Artifact(path, "CE increase at equal L0 and L0 at equal CE increase, per type"))
    return arts


def geometry_section(ctx: PaperContext) -> list[Artifact]:
    paths = write_geometry(ctx.runs, ctx.out, umap=ctx.umap, seed=ctx.seed)
    captions = {
        "dictionary_geometry": "Max cosine similarity of alive dictionary elements: within a "
        "dictionary, across SAE types, across seeds (pooled)",
        "geometry_within_dictionary": "Each element's nearest other element in its own "
        "dictionary, per run",
        "geometry_all_pairs": "Mean max cosine similarity between every two runs",
        "geometry": "Geometry tables: pooled means and every comparison",
    }
    for pos in {p for r in ctx.runs for p in r.positions}:
        stem = "geometry_umap_" + pos.replace(".", "_")
        captions[stem] = f"UMAP of the alive dictionary elements at {pos}, coloured by run"
    if ctx.umap is False:
        ctx.notes.append("UMAP skipped (--no-umap).")
    elif ctx.umap is None and not umap_available():
        ctx.notes.append(f"UMAP skipped: {UMAP_MISSING}.")
    return [a for a in _files(paths, captions) if a.path.suffix != ".json"]


def activations_section(ctx: PaperContext) -> list[Artifact]:
    report = activation_analysis(
        ctx.runs,
        n_tokens=ctx.n_tokens,
        n_directions=ctx.n_directions,
        seed=ctx.seed,
        device=ctx.device,
        progress=ctx.progress,
    )
    paths = write_activations(report, ctx.out)
    captions = {
        "activation_norms_by_position": "Norm ratio and cosine of SAE output vs input per "
        "position in the context",
        "activation_norm_scatter": "‖SAE output‖ against ‖input‖ per token",
        "principal_directions_reconstructed": "Variance of the input's top principal directions "
        "and how much of it each SAE reconstructs",
        "resample_ablation_kl": "KL when one principal direction is resample-ablated: clean "
        "model and each SAE spliced in",
        "activations": "Activation tables: norm ratios, cosines, per-direction results",
    }
    return [a for a in _files(paths, captions) if a.path.suffix != ".json"]


SECTIONS: list[tuple[str, Section]] = [
    ("Runs", runs_section),
    ("Sparsity and faithfulness", tradeoff_section),
    ("Dictionary geometry", geometry_section),
    ("Activations and principal directions", activations_section),
]


def register_section(title: str, fn: Section) -> None:
    """Add a section to every later `paper_figures` call (after the built-in ones)."""
    if any(t == title for t, _ in SECTIONS):
        raise UserError(f"paper-figures: a section '{title}' is already registered")
    SECTIONS.append((title, fn))


def write_index(
    out: Path, done: Sequence[tuple[str, list[Artifact]]], notes: Sequence[str]
) -> list[Path]:
    """index.md and index.html listing every artifact under its section, figures shown inline."""
    md = ["# Paper figures", ""]
    body = ["<h1>Paper figures</h1>"]
    for n in notes:
        md.append(f"> {n}")
        body.append(f"<p><em>{html.escape(n)}</em></p>")
    for title, arts in done:
        md += ["", f"## {title}", ""]
        body.append(f"<h2>{html.escape(title)}</h2>")
        for a in arts:
            rel = a.path.relative_to(out).as_posix()
            if a.path.suffix == ".png":
                svg = a.path.with_suffix(".svg").name
                md += [f"**{a.caption}** (`{rel}`, [SVG]({svg}))", "", f"![{a.caption}]({rel})", ""]
                body.append(
                    f'<figure><img src="{html.escape(rel)}" alt="{html.escape(a.caption)}">'
                    f'<figcaption>{html.escape(a.caption)} — <a href="{html.escape(rel)}">PNG</a>'
                    f' · <a href="{html.escape(svg)}">SVG</a></figcaption></figure>'
                )
            else:
                md.append(f"- [{rel}]({rel}): {a.caption}")
                link = f'<a href="{html.escape(rel)}">{html.escape(rel)}</a>'
                body.append(f"<p>{link}: {html.escape(a.caption)}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "img{max-width:100%;border:1px solid #ddd}figure{margin:1.5em 0}"
        "figcaption{font-size:.9em;color:#333}"
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Paper figures</title>"
        f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
    (out / "index.md").write_text("\n".join(md) + "\n")
    (out / "index.html").write_text(page)
    return [out / "index.md", out / "index.html"]


def paper_figures(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    *,
    sections: Sequence[tuple[str, Section]] | None = None,
    n_tokens: int = 8192,
    n_directions: int = 16,
    umap: bool | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = False,
) -> list[Path]:
    """Every section's figures and tables for `run_dirs` into `out`, then the index. Runs
    without `eval.json` are evaluated first (written into the run). Returns the files written."""
    if not run_dirs:
        raise UserError("paper-figures: no run directories given")
    out = Path(out).expanduser()
    check_output_folder(out, "--out")
    runs = load_runs(run_dirs, device=device, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    ctx = PaperContext(list(runs), out, n_tokens, n_directions, umap, seed, device, progress)
    done: list[tuple[str, list[Artifact]]] = []
    for title, fn in sections if sections is not None else SECTIONS:
        logger.info("paper-figures: %s", title)
        done.append((title, fn(ctx)))
    index = write_index(out, done, ctx.notes)
    files = [a.path for _, arts in done for a in arts]
    svgs = [p.with_suffix(".svg") for p in files if p.suffix == ".png"]
    return [*files, *(p for p in svgs if p.exists()), *index]
