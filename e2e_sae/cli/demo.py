"""`e2e-sae demo` (also `e2e-sae train` with no config) and `e2e-sae train-lm CONFIG.yaml`.

The demo trains an end-to-end SAE (KL to the clean logits + L1 sparsity) on the built-in
`shakespeare-lm` with the built-in Shakespeare corpus: no network, a few minutes on 2 CPU cores.
It then prints the evaluation table, the run directory and a PNG of the training curves.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def demo_config_path() -> Path:
    """The packaged demo config (e2e_sae/configs/demo.yaml)."""
    from e2e_sae.config import DEMO_CONFIG

    return DEMO_CONFIG


def demo_config_dict(
    save_dir: Path | None = None, n_samples: int | None = None, eval_n_samples: int | None = None
) -> dict[str, Any]:
    """The demo config as a dict, with the CLI overrides applied."""
    from e2e_sae.config import demo_config

    cfg = demo_config()
    if save_dir is not None:
        cfg["save_dir"] = str(save_dir)
    if n_samples is not None:
        cfg["n_samples"] = n_samples
        # Keep warmup a small fraction of a short run.
        cfg["warmup_samples"] = min(int(cfg.get("warmup_samples", 0)), n_samples // 10)
    if eval_n_samples is not None:
        cfg["eval_n_samples"] = eval_n_samples
    return cfg


def cmd_demo(args: argparse.Namespace) -> int:
    from e2e_sae.config import Config, load_config
    from e2e_sae.eval.evaluate import EvalResult
    from e2e_sae.eval.report import eval_table
    from e2e_sae.training.curves import CURVES_FILE, plot_training_curves
    from e2e_sae.training.trainer import train

    overrides = demo_config_dict(
        getattr(args, "save_dir", None),
        getattr(args, "n_samples", None),
        getattr(args, "eval_n_samples", None),
    )
    from e2e_sae.training.sweep import parse_set, set_dotted

    for key, value in parse_set(getattr(args, "set", None) or []).items():
        set_dotted(overrides, key, value)  # `e2e-sae train --set KEY=VALUE` without a config
    config = load_config(overrides)
    assert isinstance(config, Config)
    print(
        f"e2e-sae demo: e2e SAE (logits KL + L1) at {', '.join(config.saes.sae_positions)} of "
        f"{config.tlens_model_name}, {config.n_samples} Shakespeare windows of "
        f"{config.train_data.n_ctx} tokens",
        flush=True,
    )
    t0 = time.perf_counter()
    results: list[EvalResult] = []
    run_dir = train(config, device=getattr(args, "device", None), on_eval=results.append)
    plot = run_dir / CURVES_FILE  # train writes it
    if not plot.is_file():
        plot = plot_training_curves(run_dir)
    if results:
        print()
        print(eval_table(results[-1]))
    print(f"\nrun directory:   {run_dir}")
    print(f"training curves: {plot}")
    print(f"time: {time.perf_counter() - t0:.0f} s")
    return 0


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
    d = sub.add_parser(
        "demo", help="train an e2e SAE on the built-in Shakespeare LM (offline, a few minutes)"
    )
    d.add_argument("--save-dir", type=Path, default=None, help="where runs go (default: runs)")
    d.add_argument(
        "--n-samples", type=int, default=None, help="training windows of 128 tokens (default 4000)"
    )
    d.add_argument(
        "--eval-n-samples", type=int, default=None, help="evaluation windows (default 192)"
    )
    d.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train-lm", help="train a TransformerLens language model from scratch")
    t.add_argument("config", type=Path, help="YAML config (see experiments/small_lm/)")
    t.add_argument("--dry-run", action="store_true", help="validate and print the resolved config")
    t.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    t.set_defaults(func=cmd_train_lm)
