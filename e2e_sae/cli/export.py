"""`e2e-sae export RUN_DIR --format saelens OUT`: a run's SAEs in SAELens' format."""

from __future__ import annotations

import argparse
from pathlib import Path

from e2e_sae.errors import UserError


def cmd_export(args: argparse.Namespace) -> int:
    from e2e_sae.interop.saelens import export_run_saelens

    if args.format != "saelens":
        raise UserError(f"--format: unknown '{args.format}' (saelens)")
    folders = export_run_saelens(
        args.run_dir,
        args.out,
        checkpoint=args.checkpoint,
        model_name=args.model_name,
        overwrite=args.overwrite,
    )
    for f in folders:
        print(f"wrote {f}")
    print(f'\nload with SAELens: SAE.load_from_disk("{folders[0]}")')
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="write a run's SAEs in another library's format")
    e.add_argument("run_dir", type=Path, help="run directory (or one of its checkpoints)")
    e.add_argument("out", type=Path, help="output folder (one subfolder per SAE)")
    e.add_argument("--format", default="saelens", choices=["saelens"])
    e.add_argument("--checkpoint", default=None, help="samples_<N>.safetensors (default: newest)")
    e.add_argument("--model-name", default=None, help="model name for cfg.json (default: config)")
    e.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty OUT (replaces SAE folders)"
    )
    e.set_defaults(func=cmd_export)
