"""`e2e-sae activations RUN... --out DIR`: norms and cosines of the SAE outputs per position, the
residual's principal directions each run reconstructs, and resample-ablation KL per direction."""

from __future__ import annotations

import argparse

from e2e_sae.cli.paper_figures import add_analysis_options, load_analysed_runs


def cmd_activations(args: argparse.Namespace) -> int:
    from e2e_sae.analysis.activations import activation_analysis, write_activations

    runs = load_analysed_runs(args)
    report = activation_analysis(
        runs,
        n_tokens=args.n_tokens,
        n_directions=args.directions,
        seed=args.seed,
        device=args.device,
        progress=True,
    )
    paths = write_activations(report, args.out)
    print((args.out / "activations.md").read_text())
    for p in paths:
        print(p)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser(
        "activations",
        help="norms and cosines of SAE outputs, principal directions, resample-ablation KL",
    )
    add_analysis_options(a, tokens=True, umap=False)
    a.set_defaults(func=cmd_activations)
