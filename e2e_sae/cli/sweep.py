"""`e2e-sae sweep SWEEP.yaml`: train a grid of configs (our sweep format or a W&B sweep)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_sweep(args: argparse.Namespace) -> int:
    from e2e_sae.config import parse_set
    from e2e_sae.eval.report import table
    from e2e_sae.training.sweep import (
        load_sweep,
        run_sweep,
        run_wandb_sweep,
        summary_rows,
    )

    overrides = parse_set(args.set)
    sweep = load_sweep(args.sweep, config=args.config, out_dir=args.out_dir, overrides=overrides)
    if sweep.method == "grid":
        print(f"sweep {sweep.name}: {len(sweep.runs)} runs into {sweep.out_dir}")
    else:  # (W&B picks the runs)
        combos = 1
        for values in sweep.grid.values():
            combos *= len(values)
        print(f"sweep {sweep.name}: {sweep.method} over {combos} combinations")
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
