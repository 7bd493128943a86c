"""`e2e-sae geometry RUN... --out DIR`: dictionary geometry across runs (max cosine similarities
within and across dictionaries, UMAP)."""

from __future__ import annotations

import argparse

from e2e_sae.cli.paper_figures import add_analysis_options, load_analysed_runs


def cmd_geometry(args: argparse.Namespace) -> int:
    from e2e_sae.analysis.geometry import write_geometry

    runs = load_analysed_runs(args)
    paths = write_geometry(runs, args.out, umap=args.umap, seed=args.seed)
    print((args.out / "geometry.md").read_text())
    for p in paths:
        print(p)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "geometry", help="dictionary geometry across runs: max cosine similarities, UMAP"
    )
    add_analysis_options(g, tokens=False, umap=True)
    g.set_defaults(func=cmd_geometry)
