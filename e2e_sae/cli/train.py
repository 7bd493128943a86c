"""`e2e-sae train CONFIG`: train SAEs from a YAML config (no config: the demo)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from e2e_sae.errors import UserError


def cmd_train(args: argparse.Namespace) -> int:
    from e2e_sae.config import Config, config_to_yaml_dict, load_config, parse_model

    if args.config is None and args.resume not in (None, "latest"):
        args.config = Path(args.resume) / "final_config.yaml"  # resume a run with its own config
        if not args.config.is_file():
            raise UserError(
                f"--resume: {args.resume} is not a run directory (no {args.config.name})"
            )
    if args.config is None:
        from e2e_sae.cli.demo import cmd_demo

        return cmd_demo(args)
    source = config_with_overrides(args.config, args.set, args.n_samples)
    if isinstance(source, Path):
        config = load_config(source)
    else:
        config = parse_model(Config, source, source=f"{args.config} (with --set / --n-samples)")
    assert isinstance(config, Config)
    if args.dry_run:
        from e2e_sae.lm.dry_run import dry_run

        report = dry_run(config)  # what the real run would reject fails here
        if config.precision == "auto":
            from e2e_sae.lm.load import default_device
            from e2e_sae.resources import bf16_is_fast

            device = args.device or config.device or default_device()
            chosen = "bf16" if bf16_is_fast(device) else "fp32"
            report.append(f"precision: auto -> {chosen} on {device}")
        text = yaml.safe_dump(config_to_yaml_dict(config), sort_keys=False)
        # YAML comments after the config: the output stays a loadable config file
        print(text + "".join(f"# {line}\n" for line in report), end="", flush=True)
        return 0
    from e2e_sae.eval.report import eval_table
    from e2e_sae.training.trainer import train

    results = []
    run_dir = train(
        config,
        device=args.device,
        reference=args.reference,
        on_eval=results.append,
        resume=args.resume,
    )
    if results:
        print(eval_table(results[-1]))
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        from e2e_sae.training.curves import CURVES_FILE

        print(f"\nrun directory: {run_dir}")
        if (run_dir / CURVES_FILE).is_file():
            print(f"training curves: {run_dir / CURVES_FILE}")
    return 0


def config_with_overrides(
    path: Path, sets: list[str], n_samples: int | None = None
) -> Path | dict[str, Any]:
    """The config file, or its contents with `--set KEY=VALUE` (dotted keys, YAML values) and
    `--n-samples` applied."""
    if not sets and n_samples is None:
        return path
    from e2e_sae.config import apply_overrides, read_yaml

    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config keys")
    apply_overrides(raw, sets)
    if n_samples is not None:
        raw["n_samples"] = n_samples
    return raw


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train SAEs from a YAML config (no config: the demo)")
    t.add_argument("config", nargs="?", type=Path, help="YAML config")
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything that needs no weights or download, print the resolved config",
    )
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value, e.g. loss.sparsity.coeff=2); "
        "repeatable",
    )
    t.add_argument(
        "--n-samples", type=int, default=None, help="training windows (overrides n_samples)"
    )
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    t.add_argument(
        "--reference",
        action="store_true",
        help="use the straightforward two-pass e2e step (as the original library)",
    )
    t.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="RUN_DIR",
        help="continue RUN_DIR (alone: the newest run of CONFIG under save_dir) from "
        "its last checkpoint; the result equals an uninterrupted run",
    )
    t.set_defaults(func=cmd_train)
