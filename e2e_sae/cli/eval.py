"""`e2e-sae eval RUN_DIR`: load a run, splice all its SAEs in, measure on held-out data.

Writes RUN_DIR/eval.json (or --out) and, next to it, the per-latent firing frequencies
(`eval.feature_frequency.safetensors`) that `e2e-sae plot` draws density histograms from. The file
records its settings (dataset, split, tokens, checkpoint, ...); one of other settings is replaced
only with --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run_eval_command"]


def run_eval_command(args: argparse.Namespace) -> int:
    from e2e_sae.errors import UserError, check_output_folder
    from e2e_sae.eval.evaluate import EVAL_JSON, evaluate_run, write_eval
    from e2e_sae.eval.report import downstream_table, eval_table

    out = args.out or Path(args.run_dir) / EVAL_JSON
    if args.out is not None:  # before the evaluation, not after it
        if out.is_dir():
            raise UserError(f"--out: {out} is a folder; give a file name (e.g. {out / EVAL_JSON})")
        check_output_folder(out.parent, "--out")
    result = evaluate_run(
        args.run_dir,
        data=args.data,
        split=args.split,
        n_tokens=args.n_tokens,
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
    )
    out = write_eval(result, out, overwrite=args.overwrite)
    print(eval_table(result))
    if result.downstream:
        print("\ndownstream reconstruction (SAE-spliced vs clean run)")
        print(downstream_table(result))
    print(f"\nwrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate a trained run on held-out data")
    e.add_argument("run_dir", type=Path)
    e.add_argument(
        "--data", default=None, help="dataset name or path (default: the run's eval_data)"
    )
    e.add_argument("--split", default=None, help="dataset split (default: the run's)")
    e.add_argument("--n-tokens", type=int, default=None, help="evaluate on about this many tokens")
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument(
        "--out", type=Path, default=None, help="write JSON here (default RUN_DIR/eval.json)"
    )
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing eval file that records other settings (split, tokens, "
        "checkpoint, ...); without it that is an error",
    )
    e.add_argument("--device", default=None)
    e.set_defaults(func=run_eval_command)
