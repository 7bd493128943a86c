"""`e2e-sae plot RUN_DIR... --out DIR`: Pareto, density, downstream and geometry plots of runs
(`--curves`: their training curves overlaid)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_plot(args: argparse.Namespace) -> int:
    if args.curves:
        from e2e_sae.analysis.overlay import plot_curves_overlay

        paths = plot_curves_overlay(args.run_dirs, args.out).paths
    else:
        from e2e_sae.analysis.geometry import plot_geometry
        from e2e_sae.analysis.plots import load_runs, make_plots
        from e2e_sae.errors import check_output_folder

        check_output_folder(args.out, "--out")  # before evaluating any run
        runs = load_runs(args.run_dirs, n_tokens=args.n_tokens, device=args.device, progress=True)
        paths = make_plots(runs, args.out) + plot_geometry(runs, args.out)
    for t in (p for p in paths if p.suffix == ".md"):  # the runs as the figures name them
        print(t.read_text(encoding="utf-8"))
    for p in paths:
        print(p)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="Pareto, density, downstream and geometry plots of runs")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG/SVG files")
    p.add_argument(
        "--n-tokens",
        type=int,
        default=None,
        help="tokens for runs still to evaluate (default: the run's)",
    )
    p.add_argument(
        "--curves",
        action="store_true",
        help="overlay the runs' training curves instead (loss terms, L0, dead latents, "
        "CE increase at eval points; read from metrics.jsonl)",
    )
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_plot)
