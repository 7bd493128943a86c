"""`e2e-sae export RUN_DIR --format saelens|circuit-tracer OUT`: a run's SAEs in another library's
format (SAELens: one folder per SAE; circuit-tracer: a transcoder set or cross-layer transcoder)."""

from __future__ import annotations

import argparse
from pathlib import Path

from e2e_sae.errors import UserError

FORMATS = ("saelens", "circuit-tracer")


def cmd_export(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise UserError(f"--format: unknown '{args.format}' ({', '.join(FORMATS)})")
    if args.format == "circuit-tracer":
        from e2e_sae.interop.circuits import WORKER, export_run_circuit_tracer

        if args.model_name is not None:
            raise UserError("--model-name: only for --format saelens")
        out = export_run_circuit_tracer(
            args.run_dir,
            args.out,
            checkpoint=args.checkpoint,
            overwrite=args.overwrite,
            with_lm=not args.no_lm,
        )
        print(f"wrote {out} (config.yaml + circuit-tracer's safetensors files)")
        if not args.no_lm:
            print(f"      {out / 'lm'} (the LM as we run it, for ReplacementModel.from_config)")
        print(
            "\nattribution graphs, in circuit-tracer's environment (.venv-ct, `make install-ct`):"
            f"\n  e2e-sae graph {out} 'To be, or not to be'"
            f"\n  (or: .venv-ct/bin/python {WORKER} graphs {out} PROMPTS.json)"
        )
        return 0
    from e2e_sae.interop.saelens import export_run_saelens

    if args.no_lm:
        raise UserError("--no-lm: only for --format circuit-tracer")
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
    e.add_argument("out", type=Path, help="output folder (saelens: one subfolder per SAE)")
    e.add_argument("--format", default="saelens", choices=list(FORMATS))
    e.add_argument("--checkpoint", default=None, help="samples_<N>.safetensors (default: newest)")
    e.add_argument("--model-name", default=None, help="model name for cfg.json (default: config)")
    e.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty OUT (replaces its files)"
    )
    e.add_argument(
        "--no-lm",
        action="store_true",
        help="circuit-tracer: do not write the LM (weights, config, tokenizer) into OUT/lm",
    )
    e.set_defaults(func=cmd_export)
