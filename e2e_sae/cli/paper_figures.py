"""`e2e-sae paper-figures RUN... --out DIR`: every figure and table of the paper's analyses for a
set of runs (Pareto, downstream, dictionary geometry, activation analysis), with an index page."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def load_analysed_runs(args: argparse.Namespace) -> list[Any]:
    """The runs of an analysis command, evaluated where needed (after checking `--out`)."""
    from e2e_sae.analysis.plots import load_runs
    from e2e_sae.errors import check_output_folder

    check_output_folder(args.out, "--out")  # before evaluating any run
    return load_runs(args.run_dirs, device=args.device, progress=True)


def add_analysis_options(p: argparse.ArgumentParser, *, tokens: bool, umap: bool) -> None:
    """The options the paper's analysis commands share."""
    p.add_argument("run_dirs", type=Path, nargs="+", help="run directories (evaluated if needed)")
    p.add_argument("--out", type=Path, required=True, help="folder for the figures and tables")
    p.add_argument("--seed", type=int, default=0, help="seed of UMAP and of the permutations")
    if tokens:
        p.add_argument("--n-tokens", type=int, default=8192, help="eval tokens (default 8192)")
        p.add_argument(
            "--directions", type=int, default=16, help="principal directions (default 16)"
        )
    if umap:
        p.add_argument(
            "--umap",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="UMAP figures (default: when umap-learn is installed)",
        )
    p.add_argument("--device", default=None)


def cmd_paper_figures(args: argparse.Namespace) -> int:
    from e2e_sae.analysis.paper import paper_figures

    paths = paper_figures(
        args.run_dirs,
        args.out,
        n_tokens=args.n_tokens,
        n_directions=args.directions,
        umap=args.umap,
        seed=args.seed,
        device=args.device,
        progress=True,
    )
    for p in paths:
        print(p)
    print(f"\nindex: {args.out / 'index.html'} (also index.md)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "paper-figures",
        help="every figure and table of the paper's analyses for a set of runs, with an index",
    )
    add_analysis_options(f, tokens=True, umap=True)
    f.set_defaults(func=cmd_paper_figures)
