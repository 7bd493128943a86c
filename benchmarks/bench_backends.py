"""Training throughput of the LM backends on SmolLM2-135M, side by side in one process.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_backends.py --modes local,e2e --steps 8

Variants (one SAE at `blocks.6.hook_resid_pre`, same init, same batches):
- `lean`: backend hooked with the fast path (`fastlm` lean forward, shared prefix, chunked KL),
  what `backend: auto` gives for smollm2-135m;
- `hooked`: backend hooked without the lean forward (TransformerLens with `start_at_layer`);
- `bridge`: backend bridge (TransformerBridge around the Hugging Face model: full passes from the
  tokens, logits materialised).

The HookedTransformer and the bridge are built from one dequantized HF model (the same weights).
Steps are interleaved, the order rotated every round, so load from other processes hits every
variant alike; tokens/s comes from the median step time, `x lean` is the median over rounds of
the within-round time ratio. The first timed step's loss is compared with lean's (same weights and
batch: equal up to float rounding). Results go to benchmarks/results/backends-<stamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from e2e_sae.config import Config, load_config
from e2e_sae.lm.fastlm import LeanLM
from e2e_sae.lm.runner import HookedRunner
from e2e_sae.objective.forward import with_runner
from e2e_sae.training.engine import TrainState
from e2e_sae.training.trainer import Trainer, setup

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("lean", "hooked", "bridge")
LAYER = 6


class NoLeanRunner(HookedRunner):
    """A HookedTransformer without the lean forward: TransformerLens runs every pass."""

    def lean(self, precision: str = "fp32") -> LeanLM | None:
        return None


def make_config(args: argparse.Namespace, mode: str, backend: str) -> Config:
    sparsity = {"coeff": 1.0}
    loss: dict[str, Any] = {
        "local": {"sparsity": sparsity, "out_to_in": {"coeff": 1.0}},
        "e2e": {"sparsity": sparsity, "logits_kl": {"coeff": 1.0}},
        "e2e_ds": {
            "sparsity": sparsity,
            "logits_kl": {"coeff": 0.5},
            "in_to_orig": {
                "hook_positions": [f"blocks.{i}.hook_resid_pre" for i in range(LAYER + 1, 30)],
                "total_coeff": 2.5,
            },
        },
    }[mode]
    return load_config(
        {
            "tlens_model_name": "smollm2-135m",
            "backend": backend,
            "n_samples": 10_000,
            "batch_size": args.batch_size,
            "lr": 1e-3,
            "lr_schedule": "constant",
            "max_grad_norm": 1.0,
            "loss": loss,
            "train_data": {
                "dataset_name": "shakespeare",
                "is_tokenized": False,
                "tokenizer_name": "smollm2-135m",
                "streaming": False,
                "split": "train",
                "n_ctx": args.n_ctx,
            },
            "saes": {
                "sae_positions": [f"blocks.{LAYER}.hook_resid_pre"],
                "dict_size_to_input_ratio": args.ratio,
            },
            "save_dir": None,
        }
    )


def load_models() -> dict[str, Any]:
    """{"hooked": HookedTransformer, "bridge": TransformerBridge} over the same HF weights."""
    from e2e_sae.lm.bridge import smollm2_bridge_from_hf
    from e2e_sae.lm.gguf import load_smollm2_hf, smollm2_from_hf

    hf_model = load_smollm2_hf()
    hooked = smollm2_from_hf(hf_model)  # before the bridge wraps the HF modules in place
    return {"hooked": hooked, "bridge": smollm2_bridge_from_hf(hf_model)}


@contextlib.contextmanager
def shared_lm(lm: Any) -> Iterator[None]:
    with mock.patch("e2e_sae.lm.load.load_lm", lambda *a, **k: lm):
        yield


def make_trainer(args: argparse.Namespace, mode: str, variant: str, lms: dict[str, Any]) -> Trainer:
    backend = "bridge" if variant == "bridge" else "hooked"
    with shared_lm(lms[backend]):
        t = setup(make_config(args, mode, backend), device="cpu")
    if variant == "hooked":
        t.model.lm = NoLeanRunner(lms["hooked"])  # and the plans' runner chosen again for it
        t.plan, t.eval_plan = with_runner(t.model, t.plan), with_runner(t.model, t.eval_plan)
    assert t.model.backend == backend
    return t


def token_batches(args: argparse.Namespace, n: int) -> list[torch.Tensor]:
    from e2e_sae.data import create_data_loader

    it = create_data_loader(make_config(args, "local", "hooked").train_data, args.batch_size, 0)
    return [next(it) for _ in range(n)]


def bench_mode(
    args: argparse.Namespace, mode: str, lms: dict[str, Any], batches: list[torch.Tensor]
) -> list[dict[str, Any]]:
    trainers = {v: make_trainer(args, mode, v, lms) for v in args.variants}
    states = {v: TrainState() for v in args.variants}
    losses: dict[str, list[float]] = {v: [] for v in args.variants}

    def step(v: str, i: int) -> float:
        t0 = time.perf_counter()
        out = trainers[v].train_step(iter([batches[i]]), states[v])
        dt = time.perf_counter() - t0
        losses[v].append(out["loss"])
        return dt

    for i in range(args.warmup):
        for v in args.variants:
            step(v, i)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    names = list(args.variants)
    for i in range(args.steps):
        for v in names[i % len(names) :] + names[: i % len(names)]:
            times[v].append(step(v, args.warmup + i))
    tokens = args.batch_size * args.n_ctx
    base = "lean" if "lean" in times else names[0]
    rows = []
    for v, ts in times.items():
        first = losses[v][args.warmup] if args.steps else losses[v][0]
        ref = losses[base][args.warmup] if args.steps else losses[base][0]
        rows.append(
            {
                "mode": mode,
                "variant": v,
                "tokens_per_s": tokens / statistics.median(ts),
                f"x_{base}": statistics.median(b / t for b, t in zip(times[base], ts, strict=True)),
                "step_s_median": statistics.median(ts),
                "step_s_all": ts,
                "first_timed_loss": first,
                f"rel_loss_diff_vs_{base}": abs(first - ref) / max(abs(ref), 1e-30),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    base = next(k for k in rows[0] if k.startswith("x_")).removeprefix("x_")
    lines = [
        f"| mode | variant | tokens/s | x {base} | median step s | loss rel. diff vs {base} |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['variant']} | {r['tokens_per_s']:.0f} | {r[f'x_{base}']:.2f} | "
            f"{r['step_s_median']:.3f} | {r[f'rel_loss_diff_vs_{base}']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--modes", default="local,e2e", help="local, e2e, e2e_ds (comma-separated)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--ratio", type=float, default=8.0, help="dictionary size / d_model")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: results/...)")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS] + [
        m for m in args.modes if m not in ("local", "e2e", "e2e_ds")
    ]
    if bad:
        p.error(f"unknown variant/mode: {', '.join(bad)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_avg = os.getloadavg()
    t0 = time.perf_counter()
    lms = load_models()
    load_s = time.perf_counter() - t0
    batches = token_batches(args, args.warmup + args.steps)
    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        rows += bench_mode(args, mode, lms, batches)
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"backends-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    command = " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])
    out.write_text(
        json.dumps(
            {
                "command": command,
                "model": "smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32)",
                "sae": f"relu at blocks.{LAYER}.hook_resid_pre, ratio {args.ratio}",
                "batch": [args.batch_size, args.n_ctx],
                "warmup": args.warmup,
                "steps": args.steps,
                "torch_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "load_avg_start": load_avg,
                "load_avg_end": os.getloadavg(),
                "model_load_s": load_s,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
