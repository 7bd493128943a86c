"""`e2e-sae cache-teacher CONFIG`: the clean model's top-k next-token distributions of CONFIG's
windows, for an e2e run's `teacher_cache` (`e2e_sae.caches.teacher`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from e2e_sae.cli.cache_acts import (
    add_cache_options,
    check_n_samples,
    default_cache_dir,
    load_train_config,
    mib,
)


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from e2e_sae.caches.activations import n_cache_batches
    from e2e_sae.caches.teacher import build_for_config

    check_n_samples(args)
    config = load_train_config(args.config)
    n_windows = n_cache_batches(config, args.n_samples) * config.batch_size
    out = args.out or default_cache_dir(
        args.config, config, n_windows, "teacher_cache", f"k{args.k}-"
    )
    cache = build_for_config(config, out, args.k, args.n_samples, args.device)
    size = sum(f.stat().st_size for f in cache.path.iterdir())
    print(
        f"{cache.meta['n_windows']} windows, top {cache.k} of {cache.meta['d_vocab']} tokens, "
        f"{mib(size)} on disk: {cache.path}"
    )
    print(
        f"\ntrain with it: add `teacher_cache: {cache.path}` to {args.config} "
        "(an approximate KL, see e2e_sae/caches/teacher.py)"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser(
        "cache-teacher",
        help="store the clean model's top-k next-token "
        "distributions of CONFIG's windows (for teacher_cache)",
    )
    h.add_argument("config", type=Path, help="YAML config of a logits_kl run (no in_to_orig)")
    h.add_argument("--k", type=int, default=64, help="tokens kept per position (default 64)")
    add_cache_options(h, "<save_dir>/teacher_cache/<config>-k<K>-<N>w")
    h.set_defaults(func=cmd_cache_teacher)
