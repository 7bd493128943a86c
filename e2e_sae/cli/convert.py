"""`e2e-sae convert RUN_DIR OUT`: rewrite a run directory of the original e2e_sae 2.1.1 as one of
ours."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_convert(args: argparse.Namespace) -> int:
    from e2e_sae.compat.convert import convert_original_run

    out = convert_original_run(args.run_dir, args.out, checkpoint=args.checkpoint)
    for f in sorted(out.iterdir()):
        print(f"wrote {f}")
    print(f'\nload with: SAETransformer.from_local_path("{out}")')
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "convert", help="rewrite an original e2e_sae run (samples_<N>.pt) as safetensors"
    )
    c.add_argument("run_dir", type=Path, help="original run directory (or one samples_<N>.pt)")
    c.add_argument("out", type=Path, help="new run directory (must not exist, or be empty)")
    c.add_argument("--checkpoint", default=None, help="samples_<N>.pt (default: newest intact)")
    c.set_defaults(func=cmd_convert)
