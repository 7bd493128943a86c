"""Training step cost of an e2e transcoder set and a cross-layer transcoder against one e2e SAE
at layer 0 with the same total number of latents, side by side in one process.

    OMP_NUM_THREADS=4 .venv/bin/python benchmarks/bench_transcoders.py --modes local,e2e --steps 16

Variants (same model, same batches; all layers 0..L-1 of the model):
- `sae0`: one dictionary at `blocks.0.hook_mlp_out` with L x ratio x d_model latents (the issue's
  baseline: the same latents in one dictionary, the same spliced pass from layer 0);
- `tset`: a transcoder set (`saes.transcoder_set`, relu), ratio x d_model latents per layer, each
  reading `ln2.hook_normalized` and replacing `hook_mlp_out`: L dictionaries, one spliced pass;
- `clt`: a cross-layer transcoder over the same layers and widths (jumprelu): its decoders hold
  L(L+1)/2 x d_latents columns instead of L x d_latents, so it does more decoder FLOPs.

The target (issue 24): an e2e `tset` step costs at most 1.3x an e2e `sae0` step. Steps are
interleaved, the order rotated every round, so load from other processes hits every variant alike;
tokens/s comes from the median step time and `x sae0` is the median over rounds of the
within-round time ratio (variant / sae0: above 1 is slower). Run it on a quiet machine: timings
taken while other work runs are worthless. Results go to benchmarks/results/transcoders-<stamp>.json
with the command, threads, CPU count and load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from e2e_sae.config import Config, load_config
from e2e_sae.training.engine import TrainState
from e2e_sae.training.trainer import Trainer, setup

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("sae0", "tset", "clt")
MODES = ("local", "e2e", "e2e_ds")


def n_layers(model: str) -> int:
    """The number of blocks of a built-in model (its saved config)."""
    from e2e_sae.lm.load import MODEL_CONFIG, builtin_model_dir

    folder = builtin_model_dir(model)
    if folder is None:
        raise SystemExit(f"--model: {model} is not a built-in model")
    return int(json.loads((folder / MODEL_CONFIG).read_text())["n_layers"])


def make_config(args: argparse.Namespace, mode: str, variant: str) -> Config:
    sparsity = {"coeff": 1.0}
    loss: dict[str, Any] = {
        "local": {"sparsity": sparsity, "out_to_in": {"coeff": 1.0}},
        "e2e": {"sparsity": sparsity, "logits_kl": {"coeff": 1.0}},
        "e2e_ds": {
            "sparsity": sparsity,
            "logits_kl": {"coeff": 0.5},
            "in_to_orig": {
                "hook_positions": [f"blocks.{i}.hook_resid_post" for i in range(args.layers)],
                "total_coeff": 1.0,
            },
        },
    }[mode]
    if variant == "sae0":
        saes: dict[str, Any] = {
            "sae_positions": ["blocks.0.hook_mlp_out"],
            "dict_size_to_input_ratio": args.ratio * args.layers,
        }
    else:
        saes = {
            "transcoder_set": {"layers": "all"},
            "architecture": "clt" if variant == "clt" else "relu",
            "dict_size_to_input_ratio": args.ratio,
        }
    return load_config(
        {
            "tlens_model_name": args.model,
            "n_samples": 100_000,
            "batch_size": args.batch_size,
            "lr": 1e-3,
            "lr_schedule": "constant",
            "max_grad_norm": 1.0,
            "loss": loss,
            "train_data": {
                "dataset_name": "shakespeare",
                "is_tokenized": False,
                "tokenizer_name": args.tokenizer,
                "streaming": False,
                "split": "train",
                "n_ctx": args.n_ctx,
            },
            "saes": saes,
            "save_dir": None,
        }
    )


def bench_mode(args: argparse.Namespace, mode: str) -> list[dict[str, Any]]:
    trainers: dict[str, Trainer] = {
        v: setup(make_config(args, mode, v), device=args.device) for v in args.variants
    }
    first = trainers[args.variants[0]]
    it = first.batches(first.config.train_data, 0)
    batches = [next(it) for _ in range(args.warmup + args.steps)]
    states = {v: TrainState() for v in args.variants}

    def step(v: str, i: int) -> float:
        t0 = time.perf_counter()
        trainers[v].train_step(iter([batches[i]]), states[v])
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for i in range(args.warmup):
        for v in args.variants:
            step(v, i)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    names = list(args.variants)
    for i in range(args.steps):
        for v in names[i % len(names) :] + names[: i % len(names)]:
            times[v].append(step(v, args.warmup + i))
    tokens = args.batch_size * args.n_ctx
    base = "sae0" if "sae0" in times else names[0]
    rows = []
    for v, ts in times.items():
        model = trainers[v].model
        rows.append(
            {
                "mode": mode,
                "variant": v,
                "n_dictionaries": len(model.sae_positions),
                "latents_total": sum(model.sae(p).n_dict_components for p in model.sae_positions),
                "dictionary_params": sum(p.numel() for p in model.saes.parameters()),
                "tokens_per_s": tokens / statistics.median(ts),
                f"x_{base}": statistics.median(t / b for b, t in zip(times[base], ts, strict=True)),
                "step_s_median": statistics.median(ts),
                "step_s_all": ts,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    base = next(k for k in rows[0] if k.startswith("x_")).removeprefix("x_")
    lines = [
        f"| mode | variant | dictionaries | latents | parameters | tokens/s | step time x {base} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['variant']} | {r['n_dictionaries']} | {r['latents_total']} | "
            f"{r['dictionary_params']:,} | {r['tokens_per_s']:.0f} | {r[f'x_{base}']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--modes", default="local,e2e", help="local, e2e, e2e_ds (comma-separated)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--model", default="shakespeare-lm", help="a built-in model")
    p.add_argument("--tokenizer", default="shakespeare-bpe")
    p.add_argument("--steps", type=int, default=16, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--ratio", type=float, default=8.0, help="latents per layer / d_model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: results/...)")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS] + [
        m for m in args.modes if m not in MODES
    ]
    if bad:
        p.error(f"unknown variant/mode: {', '.join(bad)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.layers = n_layers(args.model)
    load_avg = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        rows += bench_mode(args, mode)
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"transcoders-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    command = " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])
    out.write_text(
        json.dumps(
            {
                "command": command,
                "model": args.model,
                "n_layers": args.layers,
                "ratio_per_layer": args.ratio,
                "batch": [args.batch_size, args.n_ctx],
                "device": args.device,
                "warmup": args.warmup,
                "steps": args.steps,
                "torch_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "load_avg_start": load_avg,
                "load_avg_end": os.getloadavg(),
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
