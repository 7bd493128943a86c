"""Old code vs this checkout in ONE process: the same step kinds interleaved pairwise (order
alternating) on the same LM, SAE weights and batches, so machine load hits both alike.

    .venv/bin/python benchmarks/bench_paired.py --old ../e2e_sae-old --model smollm2-135m \
        --steps 30 --modes cache,local,e2e

`--old` is another checkout of this repository (e.g. `git worktree add ../old <rev>`); its
`e2e_sae` package is copied to a temporary folder as `e2e_sae_old` and imported beside ours.
Printed per step kind: the median, min and max over pairs of old step time / new step time
(> 1: this checkout is faster). Timings on shared machines move by ±15% run to run; the paired
ratio moves far less, which is what a 3% regression check needs.

Step kinds: `local` / `e2e` (LM-fed `train_step`), `cached_step` (one config from stored
activations), `sweep_round` (4 configs on one LM pass per batch) and `lm_pass` (the clean pass
that feeds the cache and the sweep), from `--modes cache`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_train as bt  # noqa: E402

from e2e_sae.caches.activations import lm_activation_batches  # noqa: E402
from e2e_sae.training.engine import TrainState  # noqa: E402
from e2e_sae.training.trainer import setup  # noqa: E402


def import_old(checkout: Path) -> dict[str, ModuleType]:
    """The old checkout's package as `e2e_sae_old` (module paths of either layout)."""
    tmp = Path(tempfile.mkdtemp(prefix="e2e_sae_old-"))
    shutil.copytree(checkout / "e2e_sae", tmp / "e2e_sae_old")
    for p in (tmp / "e2e_sae_old").rglob("*.py"):
        p.write_text(re.sub(r"\be2e_sae\b", "e2e_sae_old", p.read_text()))
    sys.path.insert(0, str(tmp))

    def first(*names: str) -> ModuleType:
        for name in names:
            try:
                return importlib.import_module(f"e2e_sae_old.{name}")
            except ModuleNotFoundError:
                continue
        raise ModuleNotFoundError(names[0])

    return {
        "config": first("config"),
        "trainer": first("training.trainer", "train"),
        "cached": first("training.cached", "cached_train"),
        "engine": first("training.engine", "training.trainer", "train"),
        "acts": first("caches.activations", "act_cache"),
        "load": first("lm.load", "models"),
    }


def paired(old: Callable[[int], Any], new: Callable[[int], Any], n: int) -> list[float]:
    """(median, min, max) over `n` pairs of old time / new time (after one warm-up call each)."""
    old(0)
    new(0)
    ratios = []
    for i in range(n):
        order = [("o", old), ("n", new)] if i % 2 == 0 else [("n", new), ("o", old)]
        t: dict[str, float] = {}
        for key, fn in order:
            t0 = time.perf_counter()
            fn(i + 1)
            t[key] = time.perf_counter() - t0
        ratios.append(t["o"] / t["n"])
    return [round(statistics.median(ratios), 3), round(min(ratios), 3), round(max(ratios), 3)]


def lm_fed(old: dict[str, ModuleType], was: Any, new: Any, batches: list, n: int) -> list[float]:
    """An LM-fed `train_step` of the old and the new trainer."""
    so, sn = old["trainer"].TrainState(), TrainState()
    return paired(
        lambda i: was.train_step(iter([batches[i % len(batches)]]), so),
        lambda i: new.train_step(iter([batches[i % len(batches)]]), sn),
        n,
    )


class CacheFed:
    """A cache-fed trainer of one side with its own counters: `step(micro)` takes one engine
    step on activations {hook: tensor} (`Trainer.fed_from_cache`; a checkout from before it had
    `training.cached.CachedTrainer`)."""

    def __init__(self, side: dict[str, ModuleType], trainer: Any, lm: Any) -> None:
        if hasattr(side["cached"], "CachedTrainer"):
            self.t = side["cached"].CachedTrainer.from_model(trainer.config, trainer.model)
        else:
            with mock.patch.object(side["load"], "load_tlens_model", lambda *_, **__: lm):
                self.t = side["trainer"].setup(trainer.config, device="cpu").fed_from_cache()
            self.t.saes.load_state_dict(trainer.model.saes.state_dict())
        self.state = side["engine"].TrainState()

    def step(self, micro: Any) -> None:
        self.t.train_step(iter([micro]), self.state, stats=True)


def cache_kinds(
    old: dict[str, ModuleType], was: Any, new: Any, batches: list, n: int, lm: Any
) -> dict[str, list[float]]:
    """One config from stored activations, a 4-config sweep round, the clean LM pass."""
    names = {"cached": "training.cached", "trainer": "training.trainer", "load": "lm.load"}
    ours = {k: importlib.import_module(f"e2e_sae.{m}") for k, m in names.items()}
    ours["engine"] = importlib.import_module("e2e_sae.training.engine")
    hooks = [h for q in new.model.sae_positions for h in new.model.sites[q].hooks]
    acts = next(lm_activation_batches(new.model, iter(batches), hooks))
    co, cn = CacheFed(old, was, lm), CacheFed(ours, new, lm)
    mo = [CacheFed(old, was, lm) for _ in range(4)]
    mn = [CacheFed(ours, new, lm) for _ in range(4)]
    ao = old["acts"].lm_activation_batches(was.model, iter(batches * 100), hooks)
    an = lm_activation_batches(new.model, iter(batches * 100), hooks)

    def round_of(members: list[CacheFed], stream: Any) -> None:
        micro = next(stream)  # one LM pass, then every member's step on it
        for m in members:
            m.step(micro)

    return {
        "cached_step": paired(lambda i: co.step(acts), lambda i: cn.step(acts), n),
        "sweep_round": paired(lambda i: round_of(mo, ao), lambda i: round_of(mn, an), n),
        "lm_pass": paired(lambda i: next(ao), lambda i: next(an), n),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="another checkout of this repository")
    p.add_argument("--model", choices=sorted(bt.MODELS), default="smollm2-135m")
    p.add_argument("--steps", type=int, default=30, help="pairs per step kind (e2e: a quarter)")
    p.add_argument("--modes", default="cache,local,e2e")
    a = p.parse_args()
    old = import_old(a.old.resolve())
    args = argparse.Namespace(
        model=a.model,
        batch_size=4,
        n_ctx=128,
        ratio=8.0,
        architecture="relu",
        k=32,
        topk_path="auto",
    )
    batches = bt.token_batches(args, a.steps + 3)
    lm = bt.shared_lm(a.model)

    def both(mode: str) -> tuple[Any, Any]:
        cfg = bt.make_config(args, mode)
        with mock.patch("e2e_sae.lm.load.load_tlens_model", lambda *_, **__: lm):
            new = setup(cfg, device="cpu")
        # what the benchmark set (keys the old code lacks stay at their defaults here)
        old_cfg = old["config"].load_config(cfg.model_dump(mode="json", exclude_unset=True))
        with mock.patch.object(old["load"], "load_tlens_model", lambda *_, **__: lm):
            was = old["trainer"].setup(old_cfg, device="cpu")
        was.model.saes.load_state_dict(new.model.saes.state_dict())
        return was, new

    out: dict[str, list[float]] = {}
    for mode in a.modes.split(","):
        if mode in ("local", "e2e"):
            n = a.steps if mode == "local" else max(4, a.steps // 4)
            out[mode] = lm_fed(old, *both(mode), batches, n)
        elif mode == "cache":
            out.update(cache_kinds(old, *both("local"), batches, a.steps, lm))
        else:
            p.error(f"--modes: unknown '{mode}' (cache, local, e2e)")
    print(json.dumps({"model": a.model, "old": str(a.old), "old_time/new_time": out}))


if __name__ == "__main__":
    main()
