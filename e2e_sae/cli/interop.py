"""`e2e-sae export` (SAELens format), `e2e-sae push` (Hugging Face Hub), `e2e-sae train-mlp`."""

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

    m = sub.add_parser("train-mlp", help="train an MLP on digits/MNIST, then SAEs on it")
    m.add_argument("config", type=Path, help="YAML config (e.g. configs/mlp_digits.yaml)")
    m.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    m.add_argument("--no-save", action="store_true", help="write nothing to disk")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=cmd_train_mlp)
