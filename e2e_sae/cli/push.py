"""`e2e-sae push PATH user/repo`: upload a run directory or an export to the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_push(args: argparse.Namespace) -> int:
    from e2e_sae.interop.hub import push_to_hub

    uri = push_to_hub(
        args.path,
        args.repo_id,
        args.path_in_repo,
        private=args.private,
        revision=args.revision,
        all_checkpoints=args.all_checkpoints,
    )
    print(f"pushed {args.path} -> {uri}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a run directory or an export to the Hugging Face Hub")
    p.add_argument("path", type=Path, help="run directory or `e2e-sae export` output")
    p.add_argument("repo_id", help="user/repo (created if missing)")
    p.add_argument("--path-in-repo", default=None, help="upload into this folder of the repo")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="upload every samples_<N>.safetensors, not only the newest",
    )
    p.set_defaults(func=cmd_push)
