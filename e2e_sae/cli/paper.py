"""`e2e-sae paper-figures`, `e2e-sae geometry`, `e2e-sae activations` (the paper's analyses of run
directories) and `e2e-sae pretrained` (the paper's SAEs by name)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _load(args: argparse.Namespace):  # noqa: ANN202
    from e2e_sae.analysis.plots import load_runs
    from e2e_sae.errors import check_output_folder

    check_output_folder(args.out, "--out")  # before evaluating any run
    return load_runs(args.run_dirs, device=args.device, progress=True)


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


def cmd_geometry(args: argparse.Namespace) -> int:
    from e2e_sae.analysis.geometry import write_geometry

    runs = _load(args)
    paths = write_geometry(runs, args.out, umap=args.umap, seed=args.seed)
    print((args.out / "geometry.md").read_text())
    for p in paths:
        print(p)
    return 0


def cmd_activations(args: argparse.Namespace) -> int:
    from e2e_sae.analysis.activations import activation_analysis, write_activations

    runs = _load(args)
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


def cmd_pretrained(args: argparse.Namespace) -> int:
    from e2e_sae.eval.report import table
    from e2e_sae.interop.pretrained import PAPER_SAES, write_paper_run

    if args.name is None:
        rows = [
            [s.name, s.sae_type, s.matched, s.position, s.saelens_release]
            for s in PAPER_SAES.values()
        ]
        print(table(["name", "type", "matched on", "position", "SAELens release"], rows))
        print("\nwrite one as a run directory: e2e-sae pretrained NAME --out DIR")
        return 0
    if args.out is None:
        from e2e_sae.errors import UserError

        raise UserError("pretrained: --out DIR is needed to write a run directory")
    out = write_paper_run(args.name, args.out, revision=args.revision)
    print(f"wrote {out}")
    print(f"\nnext: e2e-sae eval {out}   (then plot / paper-figures / browse)")
    return 0


def _common(p: argparse.ArgumentParser, *, tokens: bool) -> None:
    p.add_argument("run_dirs", type=Path, nargs="+", help="run directories (evaluated if needed)")
    p.add_argument("--out", type=Path, required=True, help="folder for the figures and tables")
    p.add_argument("--seed", type=int, default=0, help="seed of UMAP and of the permutations")
    if tokens:
        p.add_argument("--n-tokens", type=int, default=8192, help="eval tokens (default 8192)")
        p.add_argument(
            "--directions", type=int, default=16, help="principal directions (default 16)"
        )
    p.add_argument("--device", default=None)


def register(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "paper-figures",
        help="every figure and table of the paper's analyses for a set of runs, with an index",
    )
    _common(f, tokens=True)
    f.add_argument(
        "--umap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="UMAP figures (default: when umap-learn is installed)",
    )
    f.set_defaults(func=cmd_paper_figures)

    g = sub.add_parser(
        "geometry", help="dictionary geometry across runs: max cosine similarities, UMAP"
    )
    _common(g, tokens=False)
    g.add_argument(
        "--umap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="UMAP figures (default: when umap-learn is installed)",
    )
    g.set_defaults(func=cmd_geometry)

    a = sub.add_parser(
        "activations",
        help="norms and cosines of SAE outputs, principal directions, resample-ablation KL",
    )
    _common(a, tokens=True)
    a.set_defaults(func=cmd_activations)

    p = sub.add_parser("pretrained", help="list the paper's SAEs, or write one as a run directory")
    p.add_argument("name", nargs="?", default=None, help="e.g. e2e_similar_ce_layer_6")
    p.add_argument("--out", type=Path, default=None, help="run directory to write")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.set_defaults(func=cmd_pretrained)
