"""`e2e-sae eval RUN_DIR`: load a run, splice all its SAEs in, measure on held-out data.

Writes RUN_DIR/eval.json (or --out) and, next to it, the per-latent firing frequencies
(`eval.feature_frequency.safetensors`) that `e2e-sae plot` draws density histograms from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from e2e_sae.evaluate import EVAL_JSON, eval_dataset

__all__ = ["eval_dataset", "run_eval_command"]


def run_eval_command(args: argparse.Namespace) -> int:
    from e2e_sae.evaluate import evaluate_run, write_eval
    from e2e_sae.report import downstream_table, eval_table

    result = evaluate_run(
        args.run_dir,
        data=args.data,
        split=args.split,
        n_tokens=args.n_tokens,
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
    )
    out = write_eval(result, args.out or Path(args.run_dir) / EVAL_JSON)
    print(eval_table(result))
    if result.downstream:
        print("\ndownstream reconstruction (SAE-spliced vs clean run)")
        print(downstream_table(result))
    print(f"\nwrote {out}")
    return 0
