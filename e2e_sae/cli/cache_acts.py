"""`e2e-sae cache-acts CONFIG`: run the LM once and store the activations that CONFIG's local SAEs
read (`e2e_sae.caches.activations`), for `e2e-sae train-cached`; and what the cache commands share.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from e2e_sae.errors import UserError

if TYPE_CHECKING:
    from e2e_sae.caches.activations import ActivationCache
    from e2e_sae.config import Config


def load_train_config(path: Path) -> Config:
    from e2e_sae.config import Config, load_config

    config = load_config(path)
    assert isinstance(config, Config)
    return config


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


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
            f"\n{len(cache)} windows x {m['n_ctx']} tokens of {model}, {mib(cache.nbytes())} on "
            f"disk, {n_tokens / seconds:.0f} tokens/s",
            f"activation cache: {cache.path}",
        ]
    )


def cmd_cache_acts(args: argparse.Namespace) -> int:
    from e2e_sae.caches.activations import build_for_config, n_cache_batches

    check_n_samples(args)
    config = load_train_config(args.config)
    n_windows = n_cache_batches(config, args.n_samples) * config.batch_size
    out = args.out or default_cache_dir(args.config, config, n_windows)
    if out.exists():
        raise UserError(f"--out: {out} already exists (delete it or pass another --out)")
    cache = build_for_config(config, out, args.n_samples, args.device, args.dtype)
    print(cache_summary(cache))
    print(f"\ntrain from it: e2e-sae train-cached {args.config} [CONFIG ...] --cache {out}")
    return 0


def add_cache_options(p: argparse.ArgumentParser, default_out: str) -> None:
    """--out, --n-samples and --device of the commands that build a cache from a config."""
    p.add_argument("--out", type=Path, default=None, help=f"cache folder (default: {default_out})")
    p.add_argument(
        "--n-samples",
        type=int,
        default=None,
        help="windows to cache, in whole batches (default: n_samples)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "cache-acts",
        help="run the LM once and store the activations that "
        "CONFIG's (local) SAEs read, for train-cached",
    )
    c.add_argument("config", type=Path, help="YAML config (its model, train_data, SAE hooks)")
    add_cache_options(c, "<save_dir>/act_cache/<config>-<N>w")
    c.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16"],
        help="storage type of the activations (float16 halves the size)",
    )
    c.set_defaults(func=cmd_cache_acts)
