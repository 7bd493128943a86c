"""`e2e-sae train-lm CONFIG.yaml`: train a TransformerLens language model from scratch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_train_lm(args: argparse.Namespace) -> int:
    from e2e_sae.eval.report import table
    from e2e_sae.training.train_lm import load_train_lm_config, train_lm

    config = load_train_lm_config(args.config)
    if args.dry_run:
        import yaml

        from e2e_sae.config import config_to_yaml_dict

        print(yaml.safe_dump(config_to_yaml_dict(config), sort_keys=False), end="")
        return 0
    result = train_lm(config, device=args.device)
    rows: list[list[Any]] = [
        ["parameters", result.n_params],
        ["train tokens", result.n_train_tokens],
    ]
    rows += [[f"eval CE epoch {i + 1}", ce] for i, ce in enumerate(result.eval_ce)]
    if result.unigram_ce is not None:
        rows.append(["eval CE unigram baseline", result.unigram_ce])
    print(table(["metric", "value"], rows))
    print(f"\nmodel: {result.model_dir}  (use it as tlens_model_path)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train-lm", help="train a TransformerLens language model from scratch")
    t.add_argument("config", type=Path, help="YAML config (see experiments/small_lm/)")
    t.add_argument("--dry-run", action="store_true", help="validate and print the resolved config")
    t.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    t.set_defaults(func=cmd_train_lm)
