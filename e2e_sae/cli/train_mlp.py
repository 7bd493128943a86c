"""`e2e-sae train-mlp CONFIG`: an MLP on digits (offline) / MNIST, then SAEs on its hidden
layers."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_train_mlp(args: argparse.Namespace) -> int:
    from e2e_sae.mlp import load_mlp_config, results_table, run_mlp_job

    config = load_mlp_config(args.config)
    if args.no_save:
        config = config.model_copy(update={"save_dir": None})
    result = run_mlp_job(config, device=args.device, progress=not args.quiet)
    print(results_table(result))
    if result.run_dir is not None:
        print(f"\nrun directory: {result.run_dir}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("train-mlp", help="train an MLP on digits/MNIST, then SAEs on it")
    m.add_argument("config", type=Path, help="YAML config (e.g. configs/mlp_digits.yaml)")
    m.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    m.add_argument("--no-save", action="store_true", help="write nothing to disk")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=cmd_train_mlp)
