"""`e2e-sae demo` (also `e2e-sae train` with no config).

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
    from e2e_sae.config import Config, apply_overrides, load_config
    from e2e_sae.eval.evaluate import EvalResult
    from e2e_sae.eval.report import eval_table
    from e2e_sae.training.curves import CURVES_FILE, plot_training_curves
    from e2e_sae.training.trainer import train

    overrides = demo_config_dict(
        getattr(args, "save_dir", None),
        getattr(args, "n_samples", None),
        getattr(args, "eval_n_samples", None),
    )
    # `e2e-sae train --set KEY=VALUE` without a config
    config = load_config(apply_overrides(overrides, getattr(args, "set", None) or []))
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
