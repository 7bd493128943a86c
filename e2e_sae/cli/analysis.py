"""`e2e-sae sweep`, `e2e-sae plot`, `e2e-sae browse` (thin: parse, call the library, print)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def cmd_sweep(args: argparse.Namespace) -> int:
    from e2e_sae.eval.report import table
    from e2e_sae.training.sweep import (
        load_sweep,
        parse_set,
        run_sweep,
        run_wandb_sweep,
        summary_rows,
    )

    overrides = parse_set(args.set)
    sweep = load_sweep(args.sweep, config=args.config, out_dir=args.out_dir, overrides=overrides)
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs into {sweep.out_dir}")
    if args.wandb:
        sweep_id = run_wandb_sweep(
            sweep, project=args.project, count=args.count, device=args.device
        )
        print(f"W&B sweep {sweep_id} finished")
        return 0
    if sweep.method != "grid":
        from e2e_sae.errors import UserError

        raise UserError(f"{args.sweep}: method '{sweep.method}' needs --wandb (local sweeps: grid)")
    if args.dry_run:
        rows = [
            [r.run_dir.name, *(json.dumps(r.overrides[k]) for k in sweep.varied)]
            for r in sweep.runs
        ]
        print(table(["run", *sweep.varied], rows))
        return 0

    def done(run, rec) -> None:  # noqa: ANN001
        extra = f": {rec['error']}" if rec.get("error") else ""
        print(
            f"[{run.index + 1}/{len(sweep.runs)}] {run.run_dir.name} {rec['status']}{extra}",
            flush=True,
        )

    records = run_sweep(
        sweep,
        parallel=args.parallel,
        device=args.device,
        force=args.force,
        on_done=done,
        progress=args.parallel == 1,
    )
    headers, rows = summary_rows(sweep, records)
    print()
    print(table(headers, rows))
    summary = sweep.out_dir / "sweep_summary.json"
    summary.write_text(json.dumps(records, indent=2, default=str))
    print(f"\nwrote {summary}")
    return 1 if any(r["status"] == "failed" for r in records) else 0


def cmd_plot(args: argparse.Namespace) -> int:
    if args.curves:
        from e2e_sae.analysis.overlay import plot_curves_overlay

        paths = plot_curves_overlay(args.run_dirs, args.out).paths
    else:
        from e2e_sae.analysis.plots import load_runs, make_plots
        from e2e_sae.errors import check_output_folder

        check_output_folder(args.out, "--out")  # before evaluating any run
        runs = load_runs(args.run_dirs, n_tokens=args.n_tokens, device=args.device, progress=True)
        paths = make_plots(runs, args.out)
    tables = [p for p in paths if p.suffix == ".md"]
    for t in tables:  # the runs as the figures name them
        print(t.read_text(encoding="utf-8"))
    for p in paths:
        print(p)
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from e2e_sae.analysis.browser import parse_features, write_browser

    t0 = time.perf_counter()
    out = write_browser(
        args.run_dir,
        args.out,
        position=args.sae,
        n_tokens=args.n_tokens,
        features=parse_features(args.features),
        top_k=args.top_k,
        batch_size=args.batch_size,
        data=args.data,
        split=args.split,
        device=args.device,
        progress=True,
        skip_first=args.skip_first,
        compare=args.compare,
        compare_browser=args.compare_browser,
        page_size=args.page_size,
        ablate=args.ablate,
    )
    files = [p for p in out.parent.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files) / 1e6
    print(f"wrote {out} ({len(files)} files, {size:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="train a grid of configs (our sweep format or a W&B sweep)")
    s.add_argument("sweep", type=Path, help="sweep YAML (see e2e_sae.training.sweep)")
    s.add_argument("--config", type=Path, default=None, help="base config (overrides the file's)")
    s.add_argument("--out-dir", type=Path, default=None, help="where the run directories go")
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config value (YAML value); repeatable",
    )
    s.add_argument("--parallel", type=int, default=1, help="train this many runs at a time")
    s.add_argument("--device", default=None)
    s.add_argument("--force", action="store_true", help="retrain runs that already have eval.json")
    s.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    s.add_argument("--wandb", action="store_true", help="hand the sweep to wandb.sweep/agent")
    s.add_argument("--project", default=None, help="W&B project (with --wandb)")
    s.add_argument("--count", type=int, default=None, help="W&B agent: at most this many runs")
    s.set_defaults(func=cmd_sweep)

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

    b = sub.add_parser("browse", help="write a static HTML feature browser for one SAE")
    b.add_argument("run_dir", type=Path)
    b.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder to write (index.html + data/, opens from disk)",
    )
    b.add_argument("--sae", default=None, help="SAE position (needed when the run has several)")
    b.add_argument(
        "--n-tokens",
        type=int,
        default=None,
        help="tokens to scan (default: as many as `e2e-sae eval` uses, so both count "
        "the same dead latents)",
    )
    b.add_argument("--features", default=None, help="K (the first K) or a comma list of indices")
    b.add_argument("--top-k", type=int, default=8, help="snippets per feature")
    b.add_argument("--batch-size", type=int, default=None)
    b.add_argument("--data", default=None, help="dataset name or path (default: the run's eval)")
    b.add_argument("--split", default=None)
    b.add_argument(
        "--skip-first",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="leave each sequence's first position and the special tokens out of the "
        "examples and histograms (default: on when every sequence starts with BOS or "
        "the first position's mean activation norm is > 3x the others')",
    )
    b.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="a second run: list each feature's nearest decoder directions in its SAE "
        "at the same position",
    )
    b.add_argument(
        "--compare-browser",
        type=Path,
        default=None,
        help="the --compare run's browser folder, where its features are linked (default: a "
        "folder named after that run next to --out)",
    )
    b.add_argument("--page-size", type=int, default=256, help="features per lazily loaded file")
    b.add_argument(
        "--ablate",
        type=int,
        default=64,
        help="true ablation KL for this many of the most frequent features, over the "
        "first 512 scanned tokens (one forward pass each; 0: none)",
    )
    b.add_argument("--device", default=None)
    b.set_defaults(func=cmd_browse)
