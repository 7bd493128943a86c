"""`e2e-sae pretrained [NAME --out DIR]`: list the paper's SAEs, or write one as a run directory."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrained", help="list the paper's SAEs, or write one as a run directory")
    p.add_argument("name", nargs="?", default=None, help="e.g. e2e_similar_ce_layer_6")
    p.add_argument("--out", type=Path, default=None, help="run directory to write")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.set_defaults(func=cmd_pretrained)
