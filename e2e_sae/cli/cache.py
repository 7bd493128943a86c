"""`e2e-sae cache-acts CONFIG` and `e2e-sae train-cached CONFIG... --cache DIR`: run the LM once,
then train many local SAEs (e.g. a sparsity sweep) from the stored activations. `e2e-sae
cache-teacher CONFIG`: the clean model's top-k distributions for e2e runs (`teacher_cache`)
(`e2e_sae.caches.activations`, `e2e_sae.training.cached`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from e2e_sae.errors import UserError

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


def _load(path: Path) -> Config:
    from e2e_sae.config import Config, load_config

    config = load_config(path)
    assert isinstance(config, Config)
    return config


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


# --- cache-acts -----------------------------------------------------------------------------------
def default_cache_dir(
    config_path: Path, config: Config, n_windows: int, kind: str = "act_cache", tag: str = ""
) -> Path:
    """`<save_dir>/<kind>/<config name>-<tag><windows>w`."""
    name = f"{config_path.stem}-{tag}{n_windows}w"
    return Path(config.save_dir or ".").expanduser() / kind / name


def check_n_samples(args: argparse.Namespace) -> None:
    if args.n_samples is not None and args.n_samples < 1:
        raise UserError(f"--n-samples: expected a positive number, got {args.n_samples}")


def cache_summary(cache: ActivationCache) -> str:
    from e2e_sae.eval.report import table

    m = cache.meta
    rows = [[h, "x".join(map(str, m["shapes"][h])), m["dtype"]] for h in cache.hooks]
    n_tokens = len(cache) * int(m["n_ctx"])
    seconds = float(m.get("build_seconds", 0.0)) or float("nan")
    src = m.get("model_source", {})
    model = (
        src.get("tlens_model_name")
        or src.get("hf_model_name")
        or src.get("tlens_model_path")
        or m["model"]
    )
    return "\n".join(
        [
            table(["hook", "shape", "dtype"], rows),
            f"\n{len(cache)} windows x {m['n_ctx']} tokens of {model}, {_mib(cache.nbytes())} on "
            f"disk, {n_tokens / seconds:.0f} tokens/s",
            f"activation cache: {cache.path}",
        ]
    )


def cmd_cache_acts(args: argparse.Namespace) -> int:
    from e2e_sae.caches.activations import build_for_config, n_cache_batches

    check_n_samples(args)
    config = _load(args.config)
    n_windows = n_cache_batches(config, args.n_samples) * config.batch_size
    out = args.out or default_cache_dir(args.config, config, n_windows)
    if out.exists():
        raise UserError(f"--out: {out} already exists (delete it or pass another --out)")
    cache = build_for_config(config, out, args.n_samples, args.device, args.dtype)
    print(cache_summary(cache))
    print(f"\ntrain from it: e2e-sae train-cached {args.config} [CONFIG ...] --cache {out}")
    return 0


# --- cache-teacher --------------------------------------------------------------------------------
def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from e2e_sae.caches.activations import n_cache_batches
    from e2e_sae.caches.teacher import build_for_config

    check_n_samples(args)
    config = _load(args.config)
    n_windows = n_cache_batches(config, args.n_samples) * config.batch_size
    out = args.out or default_cache_dir(
        args.config, config, n_windows, "teacher_cache", f"k{args.k}-"
    )
    cache = build_for_config(config, out, args.k, args.n_samples, args.device)
    size = sum(f.stat().st_size for f in cache.path.iterdir())
    print(
        f"{cache.meta['n_windows']} windows, top {cache.k} of {cache.meta['d_vocab']} tokens, "
        f"{_mib(size)} on disk: {cache.path}"
    )
    print(
        f"\ntrain with it: add `teacher_cache: {cache.path}` to {args.config} "
        "(an approximate KL, see e2e_sae/caches/teacher.py)"
    )
    return 0


# --- train-cached ---------------------------------------------------------------------------------
def open_checked(paths: Sequence[Path], cache_dir: Path) -> tuple[list[Config], ActivationCache]:
    """Load every config and the cache and check them against each other (nothing written)."""
    from e2e_sae.caches.activations import ActivationCache, check_against_cache
    from e2e_sae.data import data_errors  # prefixes a user error with the config file here
    from e2e_sae.training.cached import check_same_batches

    configs = [_load(p) for p in paths]
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
    c = sub.add_parser(
        "cache-acts",
        help="run the LM once and store the activations that "
        "CONFIG's (local) SAEs read, for train-cached",
    )
    c.add_argument("config", type=Path, help="YAML config (its model, train_data, SAE hooks)")
    c.add_argument(
        "--out",
        type=Path,
        default=None,
        help="cache folder (default: <save_dir>/act_cache/<config>-<N>w)",
    )
    c.add_argument(
        "--n-samples",
        type=int,
        default=None,
        help="windows to cache, in whole batches (default: n_samples)",
    )
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    c.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16"],
        help="storage type of the activations (float16 halves the size)",
    )
    c.set_defaults(func=cmd_cache_acts)

    h = sub.add_parser(
        "cache-teacher",
        help="store the clean model's top-k next-token "
        "distributions of CONFIG's windows (for teacher_cache)",
    )
    h.add_argument("config", type=Path, help="YAML config of a logits_kl run (no in_to_orig)")
    h.add_argument("--k", type=int, default=64, help="tokens kept per position (default 64)")
    h.add_argument(
        "--out",
        type=Path,
        default=None,
        help="cache folder (default: <save_dir>/teacher_cache/<config>-k<K>-<N>w)",
    )
    h.add_argument(
        "--n-samples",
        type=int,
        default=None,
        help="windows to cache, in whole batches (default: n_samples)",
    )
    h.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    h.set_defaults(func=cmd_cache_teacher)

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
