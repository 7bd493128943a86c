"""`e2e-sae train-cached CONFIG... --cache DIR`: train many local SAEs (e.g. a sparsity sweep) from
the activations `e2e-sae cache-acts` stored (`e2e_sae.training.cached`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from e2e_sae.cli.cache_acts import load_train_config

if TYPE_CHECKING:
    from e2e_sae.caches.activations import ActivationCache
    from e2e_sae.config import Config
    from e2e_sae.training.loop import Run

TRAIN_CACHED_HELP = """\
Train each CONFIG's SAEs from the activation cache DIR (built by `e2e-sae cache-acts`), all on the
same batches, and write a run directory per config as `e2e-sae train` does (final_config.yaml,
metrics.jsonl, the final samples_<N>.safetensors; `e2e-sae eval` / `export` / from_local_path
work on it), then evaluate each with the LM if it has eval_data and eval_n_samples. Each run has
what `e2e-sae train` gives it: periodic checkpoints and evaluations (save_every_n_samples,
eval_every_n_samples), resampling, the divergence guard, SIGINT / SIGTERM saving, and --resume
(each config's latest run, or one RUN_DIR per config in order). Only local losses (sparsity,
out_to_in, out_to_orig); the configs need the same batch_size and effective_batch_size, and the
cache's train_data.n_ctx, model and hooks. One process (no torchrun)."""


def open_checked(paths: Sequence[Path], cache_dir: Path) -> tuple[list[Config], ActivationCache]:
    """Load every config and the cache and check them against each other (nothing written)."""
    from e2e_sae.caches.activations import ActivationCache, check_against_cache
    from e2e_sae.data import data_errors  # prefixes a user error with the config file here
    from e2e_sae.training.cached import check_same_batches

    configs = [load_train_config(p) for p in paths]
    cache = ActivationCache(cache_dir)
    check_same_batches(configs)
    for path, config in zip(paths, configs, strict=True):
        with data_errors(str(path)):
            check_against_cache(config, cache)
    return configs, cache


def run_table(run: Run) -> str:
    from e2e_sae.eval.report import table

    return table(["metric", "value"], [[k, v] for k, v in run.final_values().items()])


def cmd_train_cached(args: argparse.Namespace) -> int:
    from e2e_sae.eval.report import eval_table
    from e2e_sae.training.cached import train_from_cache

    configs, cache = open_checked(args.configs, args.cache)
    needed = max(c.n_grad_steps * (c.effective_batch_size or c.batch_size) for c in configs)
    if needed > len(cache):
        print(
            f"note: the cache holds {len(cache)} windows and the runs need {needed}: later "
            "passes over it are reshuffled",
            flush=True,
        )
    resume = None if args.resume is None else (args.resume or "latest")
    runs = train_from_cache(configs, cache, device=args.device, resume=resume)
    for path, run in zip(args.configs, runs, strict=True):
        print(f"\n== {path}: {run.state.step} steps, {run.n_samples} samples")
        print(run_table(run))
        if run.eval is not None:
            print(f"\nevaluation ({run.eval.metrics.get('n_tokens', 0):g} tokens, with the LM)")
            print(eval_table(run.eval))
    print("\nrun directories:")
    for run in runs:
        print(f"  {run.run_dir}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train-cached",
        description=TRAIN_CACHED_HELP,
        help="train the local SAEs of one or more configs from an activation "
        "cache (a run directory each)",
    )
    t.add_argument("configs", nargs="+", type=Path, metavar="CONFIG", help="YAML config(s)")
    t.add_argument(
        "--cache", type=Path, required=True, metavar="DIR", help="folder written by cache-acts"
    )
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    t.add_argument(
        "--resume",
        nargs="*",
        default=None,
        type=Path,
        metavar="RUN_DIR",
        help="continue the runs exactly: alone, each config's latest run; else one "
        "run directory per config, in order",
    )
    t.set_defaults(func=cmd_train_cached)
