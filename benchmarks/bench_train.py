"""Training-step throughput and peak memory: the fast paths side by side with the reference path.

    .venv/bin/python benchmarks/bench_train.py --model smollm2-135m \
        --modes local,e2e,e2e_ds,eval,cache --precision fp32,bf16 --steps 3 --memory

`--architecture topk --k 32` trains a TopK SAE instead of the ReLU one (no sparsity term; the
cache mode's sweep then varies the learning rate); `--topk-path dense|sparse` forces its forward.

The reference path does what the original library does: a clean and an SAE-spliced pass through
TransformerLens, each from the tokens, fp32, logits materialised, no reuse (`--reference` on by
default; `run_forward(..., reference=True)`). Variants of one mode share the LM and start from the
same SAE weights and batches; their steps are interleaved (ref, fast, bf16, then rotated) so load
from other processes on the machine hits them alike. Tokens/s comes from the median step time.
The loss of every step is compared with the reference's (same weights, same batch: equal up to
float rounding in fp32).

Peak memory (`--memory`): the peak resident set size (VmHWM, reset through /proc/self/clear_refs
before the step) during one training step, each variant in its own subprocess so layouts another
variant built do not count; it includes the model weights. Results go to benchmarks/results/
(`<model>-<stamp>.json` and `.md`) with a description of the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from e2e_sae.config import Config, load_config
from e2e_sae.saes import TopKSAE
from e2e_sae.training.engine import TrainState
from e2e_sae.training.trainer import Trainer, setup

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("local", "e2e", "e2e_ds", "eval", "cache", "teacher")
SMOLLM2_SHAPE: dict[str, Any] = dict(
    d_model=576,
    d_head=64,
    n_heads=9,
    d_mlp=1536,
    n_layers=30,
    n_ctx=2048,
    eps=1e-5,
    d_vocab=49152,
    act_fn="silu",
    n_key_value_heads=3,
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_adjacent_pairs=False,
    rotary_dim=64,
    rotary_base=100000.0,
    final_rms=True,
    gated_mlp=True,
    original_architecture="LlamaForCausalLM",
    seed=0,
)
TINY: dict[str, Any] = dict(
    d_model=256,
    d_head=32,
    n_heads=8,
    d_mlp=1024,
    n_layers=4,
    n_ctx=256,
    d_vocab=8192,
    act_fn="gelu",
    normalization_type="LN",
    seed=0,
)
# GPT-2 small's shape (random weights; benchmarks/device_check.py's GPU model)
GPT2_SMALL: dict[str, Any] = dict(
    d_model=768,
    d_head=64,
    n_heads=12,
    d_mlp=3072,
    n_layers=12,
    n_ctx=1024,
    d_vocab=50257,
    act_fn="gelu_new",
    normalization_type="LN",
    seed=0,
)
# model -> (config source, SAE layer, tokenizer for the Shakespeare corpus or None = random tokens)
MODELS: dict[str, tuple[dict[str, Any], int, str | None]] = {
    "smollm2-135m": ({"tlens_model_name": "smollm2-135m"}, 6, "smollm2-135m"),
    "smollm2-random": ({"tlens_config": SMOLLM2_SHAPE}, 6, None),
    "shakespeare-lm": ({"tlens_model_name": "shakespeare-lm"}, 2, "shakespeare-bpe"),
    "tiny": ({"tlens_config": TINY}, 2, None),
    "gpt2-small-random": ({"tlens_config": GPT2_SMALL}, 6, None),
}


# --- configs and shared pieces --------------------------------------------------------------------
def make_config(args: argparse.Namespace, mode: str, precision: str = "fp32") -> Config:
    source, layer, tokenizer = MODELS[args.model]
    n_layers = _n_layers(args.model)
    sparsity = {"coeff": 1.0}
    loss: dict[str, Any] = {
        "local": {"sparsity": sparsity, "out_to_in": {"coeff": 1.0}},
        "cache": {"sparsity": sparsity, "out_to_in": {"coeff": 1.0}},
        "e2e": {"sparsity": sparsity, "logits_kl": {"coeff": 1.0}},
        "eval": {"sparsity": sparsity, "logits_kl": {"coeff": 1.0}},
        "e2e_ds": {
            "sparsity": sparsity,
            "logits_kl": {"coeff": 0.5},
            "in_to_orig": {
                "hook_positions": [
                    f"blocks.{i}.hook_resid_pre" for i in range(layer + 1, n_layers)
                ],
                "total_coeff": 2.5,
            },
        },
    }[mode]
    saes: dict[str, Any] = {
        "sae_positions": [f"blocks.{layer}.hook_resid_pre"],
        "dict_size_to_input_ratio": args.ratio,
    }
    if args.architecture == "topk":  # k sets the sparsity: no sparsity term
        saes.update(architecture="topk", k=args.k)
        loss.pop("sparsity")
    data = {
        "dataset_name": "shakespeare",
        "is_tokenized": False,
        "tokenizer_name": tokenizer,
        "streaming": False,
        "split": "train",
        "n_ctx": args.n_ctx,
    }
    cfg = {
        **source,
        "n_samples": 10_000,
        "batch_size": args.batch_size,
        "lr": 1e-3,
        "lr_schedule": "constant",
        "max_grad_norm": 1.0,
        "loss": loss,
        "train_data": data if tokenizer else {"dataset_name": "unused", "n_ctx": args.n_ctx},
        "saes": saes,
        "precision": precision,
        "save_dir": None,
    }
    return load_config(cfg)


@functools.cache
def _n_layers(model: str) -> int:
    source = MODELS[model][0]
    if "tlens_config" in source:
        return int(source["tlens_config"]["n_layers"])
    return int(shared_lm(model).cfg.n_layers)


@functools.cache
def shared_lm(model: str) -> Any:
    from e2e_sae.lm.load import load_tlens_model

    source = MODELS[model][0]
    return load_tlens_model(source.get("tlens_model_name"), None, source.get("tlens_config"), "cpu")


def token_batches(args: argparse.Namespace, n: int, seed: int = 0) -> list[torch.Tensor]:
    """`n` batches [batch_size, n_ctx]: the Shakespeare corpus for real models, else random."""
    _, _, tokenizer = MODELS[args.model]
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        vocab = int(shared_lm(args.model).cfg.d_vocab)
        return [
            torch.randint(0, vocab, (args.batch_size, args.n_ctx), generator=g) for _ in range(n)
        ]
    from e2e_sae.data import create_data_loader

    cfg = make_config(args, "local")
    it = create_data_loader(cfg.train_data, args.batch_size, seed)
    return [next(it) for _ in range(n)]


@contextlib.contextmanager
def lm_shared(model: str) -> Iterator[None]:
    """`setup` loads the LM once per process: every variant splices SAEs into the same one."""
    lm = shared_lm(model)
    with mock.patch("e2e_sae.lm.load.load_tlens_model", lambda *a, **k: lm):
        yield


def make_trainer(args: argparse.Namespace, mode: str, variant: str) -> Trainer:
    precision = "bf16" if variant == "bf16" else "fp32"
    with lm_shared(args.model):
        return setup(make_config(args, mode, precision), device="cpu", reference=variant == "ref")


def cache_fed(args: argparse.Namespace, config: Config) -> Trainer:
    """A trainer of `config` (a local run) fed stored activations instead of the LM."""
    with lm_shared(args.model):
        return setup(config, device="cpu").fed_from_cache()


# --- measurements ---------------------------------------------------------------------------------
def peak_rss_reset() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(
    variants: dict[str, Callable[[int], Any]], steps: int
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Run step i of every variant for i in range(steps), rotating the order each round."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, list[Any]] = {n: [] for n in names}
    for i in range(steps):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            dt, out = timed(functools.partial(variants[n], i))
            times[n].append(dt)
            outs[n].append(out)
    return times, outs


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def bench_train_mode(args: argparse.Namespace, mode: str) -> list[dict[str, Any]]:
    """local / e2e / e2e_ds: interleaved train steps of the reference and fast variants."""
    variants = (["ref"] if args.reference else []) + [
        {"fp32": "fast", "bf16": "bf16"}[p] for p in args.precision
    ]
    trainers = {v: make_trainer(args, mode, v) for v in variants}
    batches = token_batches(args, args.warmup + args.steps)
    states = {v: TrainState() for v in variants}
    logs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}

    def step(v: str, i: int) -> dict[str, float]:
        out = trainers[v].train_step(iter([batches[i]]), states[v])
        logs[v].append(out)
        return out

    for i in range(args.warmup):
        for v in variants:
            step(v, i)
    fns = {v: (lambda i, v=v: step(v, args.warmup + i)) for v in variants}
    times, _ = interleaved(fns, args.steps)
    return summarise(args, mode, times, logs)


def summarise(
    args: argparse.Namespace,
    mode: str,
    times: dict[str, list[float]],
    logs: dict[str, list[dict[str, float]]] | None = None,
    tokens_per_call: int | None = None,
) -> list[dict[str, Any]]:
    tokens = tokens_per_call or args.batch_size * args.n_ctx
    ref_t = statistics.median(times["ref"]) if "ref" in times else None
    rows = []
    for v, ts in times.items():
        med = statistics.median(ts)
        row: dict[str, Any] = {
            "mode": mode,
            "variant": v,
            "tokens_per_s": tokens / med,
            # median over rounds of ref/variant within the round: robust to load that drifts
            "speedup_vs_ref": (
                statistics.median(r / t for r, t in zip(times["ref"], ts, strict=True))
                if ref_t
                else None
            ),
            "speedup_of_medians": (ref_t / med) if ref_t else None,
            "step_s_median": med,
            "step_s_all": ts,
        }
        if logs and "ref" in logs and v != "ref" and logs.get(v):
            diffs = [
                max(rel_diff(a[k], b[k]) for k in b if k in a and k != "grad_norm")
                for a, b in zip(logs[v], logs["ref"], strict=False)
            ]
            row["max_rel_loss_diff_vs_ref"] = max(diffs)
            row["first_step_rel_loss_diff_vs_ref"] = diffs[0]
        if logs and logs.get(v):
            row["losses"] = [d.get("loss") for d in logs[v]]
        rows.append(row)
    return rows


def bench_eval(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`evaluate` (CE, KL, L0, explained variance; no zero-ablation / downstream extras)."""
    import e2e_sae.eval.evaluate as ev
    from e2e_sae.objective.forward import run_forward

    t = make_trainer(args, "eval", "fast")
    batches = token_batches(args, args.eval_batches, seed=1)

    def run(reference: bool) -> Any:
        fwd = functools.partial(run_forward, reference=reference)
        with mock.patch.object(ev, "run_forward", fwd):
            return ev.evaluate(
                t.model,
                iter(batches),
                len(batches),
                t.eval_plan,
                t.loss_terms,
                zero_ablation=False,
                downstream=False,
            )

    run(False)  # warm up (layouts, allocator)
    run(True)
    times, outs = interleaved(
        {"ref": lambda i: run(True), "fast": lambda i: run(False)}, args.steps
    )
    rows = summarise(
        args, "eval", times, tokens_per_call=len(batches) * args.batch_size * args.n_ctx
    )
    ref_m, fast_m = outs["ref"][0].metrics, outs["fast"][0].metrics
    diff = max(rel_diff(fast_m[k], ref_m[k]) for k in ("ce_loss_clean", "ce_loss_with_saes", "kl"))
    rows[-1]["max_rel_metric_diff_vs_ref"] = diff
    return rows


def bench_cache(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Local training from an activation cache vs with the LM; a 4-config sparsity sweep from one
    LM pass per batch vs 4 separate fast local runs."""
    from e2e_sae.caches.activations import ActivationCache, lm_activation_batches

    n = args.warmup + args.steps
    batches = token_batches(args, n)
    variants = ["ref", "fast"] if args.reference else ["fast"]
    trainers = {v: make_trainer(args, "local", v) for v in variants}
    model = trainers["fast"].model
    hooks = [model.sites[p].input_hook for p in model.sae_positions]
    with tempfile.TemporaryDirectory() as tmp:
        build_s, cache = timed(
            lambda: ActivationCache.build(model, batches, n, Path(tmp) / "acts", progress=False)
        )
        cfg = trainers["fast"].config
        cached = cache_fed(args, cfg)  # the same initial SAE weights
        cache_batches = cache.batches(args.batch_size, seed=None)
        states = {v: TrainState() for v in [*variants, "cache"]}
        fns: dict[str, Callable[[int], Any]] = {
            v: (lambda i, v=v: trainers[v].train_step(iter([batches[i]]), states[v]))
            for v in variants
        }
        fns["cache"] = lambda i: cached.train_step(cache_batches, states["cache"], stats=True)
        for i in range(args.warmup):
            for f in fns.values():
                f(i)
        times, _ = interleaved(
            {k: (lambda i, f=f: f(args.warmup + i)) for k, f in fns.items()}, args.steps
        )
        rows = summarise(args, "cache", times)
        rows[-1]["speedup_vs_fast_lm"] = statistics.median(
            f / c for f, c in zip(times["fast"], times["cache"], strict=True)
        )
        rows.append(
            {
                "mode": "cache",
                "variant": "cache-build (LM pass + write)",
                "tokens_per_s": n * args.batch_size * args.n_ctx / build_s,
            }
        )
    # sweep: K configs on the same batches from one LM pass (sparsity coeffs; lrs for TopK)
    k = 4
    if cfg.loss.sparsity is None:
        sweep_cfgs = [cfg.model_copy(update={"lr": cfg.lr * f}) for f in (0.5, 1.0, 2.0, 4.0)]
    else:
        sweep_cfgs = [
            cfg.model_copy(
                update={
                    "loss": cfg.loss.model_copy(
                        update={"sparsity": cfg.loss.sparsity.model_copy(update={"coeff": c})}
                    )
                }
            )
            for c in (0.5, 1.0, 2.0, 4.0)
        ]
    members = [cache_fed(args, c) for c in sweep_cfgs]
    member_states = [TrainState() for _ in members]
    acts = lm_activation_batches(model, iter(batches * 2), hooks)

    def sweep_round(i: int = 0) -> None:
        """One LM pass, then one step of every member on its activations."""
        micro = next(acts)
        for m, st in zip(members, member_states, strict=True):
            m.train_step(iter([micro]), st, stats=True)

    for i in range(args.warmup):
        sweep_round(i)
    sweep_t, _ = interleaved(
        {
            "sweep": sweep_round,
            "fast": lambda i: trainers["fast"].train_step(iter([batches[i]]), TrainState()),
        },
        args.steps,
    )
    med_sweep, med_fast = statistics.median(sweep_t["sweep"]), statistics.median(sweep_t["fast"])
    rows.append(
        {
            "mode": "cache",
            "variant": f"sweep-{k}-one-LM-pass",
            "tokens_per_s": k * args.batch_size * args.n_ctx / med_sweep,
            "speedup_vs_separate_fast_runs": k * med_fast / med_sweep,
            "step_s_median": med_sweep,
        }
    )
    return rows


def bench_teacher(args: argparse.Namespace) -> list[dict[str, Any]]:
    """e2e steps against a teacher cache (top-k clean distributions) vs with the clean pass, and
    the approximation's effect on the KL: KL~ vs the exact KL for the same SAE and batches."""
    from e2e_sae.caches.teacher import TeacherCache, kl_topk
    from e2e_sae.objective.forward import run_forward
    from e2e_sae.objective.losses import kl_from_final

    n = args.warmup + args.steps
    batches = token_batches(args, n)
    fast = make_trainer(args, "e2e", "fast")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ks = [int(k) for k in args.teacher_k.split(",")]
        caches = {}
        for k in ks:
            build_s, caches[k] = timed(
                lambda k=k: TeacherCache.build(
                    fast.model, batches, n, Path(tmp) / f"t{k}", k=k, progress=False
                )
            )
            rows.append(
                {
                    "mode": "teacher",
                    "variant": f"teacher-build k={k}",
                    "tokens_per_s": n * args.batch_size * args.n_ctx / build_s,
                }
            )
        # the approximation, for the (untrained) SAE spliced in, on every cached batch
        for k in ks:
            errs, exact_kls = [], []
            for b in batches:
                with torch.no_grad():
                    inp = run_forward(fast.model, b, fast.plan)
                    assert inp.orig_final is not None and inp.new_final is not None
                    assert inp.unembed is not None
                    exact = float(kl_from_final(inp.orig_final, inp.new_final, inp.unembed))
                    approx = float(kl_topk(caches[k].lookup(b), inp.new_final, inp.unembed))
                errs.append((exact - approx) / exact)
                exact_kls.append(exact)
            tail = float(np.asarray(caches[k].tail, dtype=np.float64).mean())
            rows.append(
                {
                    "mode": "teacher",
                    "variant": f"KL~ k={k}",
                    "kl_exact": statistics.mean(exact_kls),
                    "kl_rel_error_mean": statistics.mean(errs),
                    "kl_rel_error_max": max(errs),
                    "mean_tail_mass": tail,
                    "tokens_per_s": float("nan"),
                }
            )
        k = ks[-1]
        cfg = make_config(args, "e2e").model_copy(update={"teacher_cache": Path(tmp) / f"t{k}"})
        with lm_shared(args.model):
            taught = setup(cfg, device="cpu")
        states = {"fast": TrainState(), "teacher": TrainState()}
        trainers = {"fast": fast, "teacher": taught}
        for i in range(args.warmup):
            for v, t in trainers.items():
                t.train_step(iter([batches[i]]), states[v])
        times, _ = interleaved(
            {
                v: (
                    lambda i, v=v: trainers[v].train_step(
                        iter([batches[args.warmup + i]]), states[v]
                    )
                )
                for v in trainers
            },
            args.steps,
        )
        med_f, med_t = statistics.median(times["fast"]), statistics.median(times["teacher"])
        rows.append(
            {
                "mode": "teacher",
                "variant": f"e2e step with teacher k={k} (x = vs fast)",
                "tokens_per_s": args.batch_size * args.n_ctx / med_t,
                "step_s_median": med_t,
                "speedup_vs_fast": statistics.median(
                    f / t for f, t in zip(times["fast"], times["teacher"], strict=True)
                ),
                "fast_step_s_median": med_f,
            }
        )
    return rows


def bench_profile(args: argparse.Namespace, mode: str, variant: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    t = make_trainer(args, mode, variant)
    batches = token_batches(args, 2)
    t.train_step(iter(batches[:1]), TrainState())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t.train_step(iter(batches[1:]), TrainState())
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return f"### profile: {mode} / {variant}\n\n```\n{table}\n```\n"


# --- memory, one variant per process --------------------------------------------------------------
def memory_child(args: argparse.Namespace) -> None:
    """Child process: one variant, each mode: warm up, reset the peak, one step, report."""
    out = {}
    for mode in args.modes:
        if mode not in ("local", "e2e", "e2e_ds"):
            continue
        t = make_trainer(args, mode, args.memory_variant)
        batches = token_batches(args, 2)
        t.train_step(iter(batches[:1]), TrainState())
        peak_rss_reset()
        before = peak_rss_mib()
        t.train_step(iter(batches[1:]), TrainState())
        out[mode] = {"peak_rss_mib": peak_rss_mib(), "rss_before_step_mib": before}
        del t
    print("MEMORY_JSON " + json.dumps(out))


def bench_memory(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    variants = (["ref"] if args.reference else []) + [
        {"fp32": "fast", "bf16": "bf16"}[p] for p in args.precision
    ]
    res: dict[str, dict[str, Any]] = {v: {} for v in variants}
    # One process per (variant, mode): what one step allocates must not depend on what an
    # earlier mode left in the allocator.
    for mode in [m for m in args.modes if m in ("local", "e2e", "e2e_ds")]:
        for v in variants:
            cmd = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--modes",
                mode,
                "--batch-size",
                str(args.batch_size),
                "--n-ctx",
                str(args.n_ctx),
                "--ratio",
                str(args.ratio),
                "--memory-variant",
                v,
                "--architecture",
                args.architecture,
                "--k",
                str(args.k),
                "--topk-path",
                args.topk_path,
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            out = proc.stdout.splitlines()
            line = next((ln for ln in out if ln.startswith("MEMORY_JSON ")), None)
            if line is None:
                raise RuntimeError(f"memory child {v}/{mode} failed:\n{proc.stderr[-2000:]}")
            res[v].update(json.loads(line.removeprefix("MEMORY_JSON ")))
    return res


# --- machine and report ---------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu, flags = platform.processor(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"}),
        "memory": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg_start": os.getloadavg(),
    }


def write_report(args: argparse.Namespace, result: dict[str, Any], profiles: list[str]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = RESULTS / f"{args.model}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=1))
    m = result["machine"]
    sae_desc = "ReLU SAE"
    if args.architecture == "topk":
        sae_desc = f"TopK SAE (k {args.k}, {args.topk_path} path)"
    lines = [
        f"# bench_train: {args.model} ({stamp})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with "
        f"{m['torch_threads']} threads, ISA {', '.join(m['isa'])}; load average "
        f"{m['load_avg_start'][0]:.1f} at start, {m['load_avg_end'][0]:.1f} at end "
        "(shared machine: compare ratios within one run).",
        "",
        f"Batch {args.batch_size} x {args.n_ctx} tokens, dict ratio {args.ratio}, {sae_desc}, "
        f"SAE at layer {MODELS[args.model][1]}, {args.warmup} warmup + {args.steps} timed steps "
        "per variant "
        "(interleaved; `x ref` is the median over rounds of the within-round time ratio). "
        "Variants: `ref` = reference path (TransformerLens, two passes from the "
        "tokens, fp32); `fast` = fastlm + shared prefix + chunked KL, fp32; `bf16` = fast, "
        "bf16.",
        "",
        "| mode | variant | tokens/s | x ref | median step s | peak RSS MiB | loss rel. diff |",
        "|---|---|---|---|---|---|---|",
    ]
    mem = result.get("memory", {})
    for r in result["rows"]:
        peak = mem.get(r["variant"], {}).get(r["mode"], {}).get("peak_rss_mib")
        sp = (
            r.get("speedup_vs_ref")
            or r.get("speedup_vs_separate_fast_runs")
            or r.get("speedup_vs_fast")
        )
        if "kl_rel_error_mean" in r:
            r = {
                **r,
                "variant": f"{r['variant']}: KL~ {r['kl_rel_error_mean']:.1e} below exact "
                f"(max {r['kl_rel_error_max']:.1e}), tail mass {r['mean_tail_mass']:.3f}",
            }
        if r.get("speedup_vs_fast_lm"):
            sp_fast = r["speedup_vs_fast_lm"]
            r = {**r, "variant": f"{r['variant']} ({sp_fast:.2f}x fast-with-LM)"}
        diff = r.get("max_rel_loss_diff_vs_ref", r.get("max_rel_metric_diff_vs_ref"))
        med = r.get("step_s_median")
        tps = "" if r["tokens_per_s"] != r["tokens_per_s"] else f"{r['tokens_per_s']:.0f}"
        lines.append(
            f"| {r['mode']} | {r['variant']} | {tps} | "
            f"{'' if sp is None else f'{sp:.2f}'} | "
            f"{'' if med is None else f'{med:.3f}'} | "
            f"{'' if peak is None else f'{peak:.0f}'} | {'' if diff is None else f'{diff:.1e}'} |"
        )
    if result.get("quality"):
        lines += [
            "",
            "Quality (bf16 vs fp32 training, evaluated in fp32):",
            "",
            "```",
            json.dumps(result["quality"], indent=1),
            "```",
        ]
    lines += ["", *profiles]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return base


def bench_quality(args: argparse.Namespace) -> dict[str, Any]:
    """Train `--quality-steps` e2e steps in fp32 and in bf16 from the same init on the same
    batches; evaluate both in fp32 on held-out batches; compare the CE-loss increase."""
    import e2e_sae.eval.evaluate as ev

    batches = token_batches(args, args.quality_steps)
    held_out = token_batches(args, args.eval_batches, seed=7)
    out: dict[str, Any] = {"steps": args.quality_steps}
    for v in ("fast", "bf16"):
        t = make_trainer(args, "e2e", v)
        state = TrainState()
        for b in batches:
            t.train_step(iter([b]), state)
        r = ev.evaluate(
            t.model,
            iter(held_out),
            len(held_out),
            t.eval_plan,
            t.loss_terms,
            zero_ablation=False,
            downstream=False,
        )
        out[v] = {
            k: r.metrics[k]
            for k in ("ce_loss_clean", "ce_loss_with_saes", "ce_loss_increase", "kl")
        }
    out["ce_increase_rel_diff"] = rel_diff(
        out["bf16"]["ce_loss_increase"], out["fast"]["ce_loss_increase"]
    )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--modes", default="local,e2e,e2e_ds,eval,cache")
    p.add_argument("--precision", default="fp32,bf16", help="fast-path precisions (fp32,bf16)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-ctx", type=int, default=128)
    p.add_argument("--ratio", type=float, default=8.0, help="dictionary size / d_model")
    p.add_argument("--architecture", choices=("relu", "topk"), default="relu")
    p.add_argument("--k", type=int, default=32, help="latents per token for --architecture topk")
    p.add_argument(
        "--topk-path",
        choices=("auto", "sparse", "dense"),
        default="auto",
        help="TopK forward: by k / d_sae (auto), or forced (saes/sparse_ops.py)",
    )
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--memory", action="store_true", help="peak RSS per variant (subprocesses)")
    p.add_argument("--memory-only", action="store_true", help="only the peak RSS measurement")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of an e2e step")
    p.add_argument("--quality-steps", type=int, default=0, help="bf16 vs fp32 CE-increase check")
    p.add_argument("--teacher-k", default="16,64,256", help="top-k sizes for --modes teacher")
    p.add_argument("--memory-variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.precision = [x.strip() for x in args.precision.split(",") if x.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad} (choose from {', '.join(MODES)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.topk_path != "auto":
        TopKSAE.sparse_max_density = 1.0 if args.topk_path == "sparse" else 0.0
    if args.memory_variant:
        memory_child(args)
        return
    command = " ".join(["benchmarks/bench_train.py", *sys.argv[1:]])
    result: dict[str, Any] = {
        "machine": machine(),
        "args": vars(args),
        "rows": [],
        "command": command,
    }
    for mode in [] if args.memory_only else args.modes:
        print(f"[bench] {args.model}: {mode}", file=sys.stderr, flush=True)
        if mode == "eval":
            rows = bench_eval(args)
        elif mode == "cache":
            rows = bench_cache(args)
        elif mode == "teacher":
            rows = bench_teacher(args)
        else:
            rows = bench_train_mode(args, mode)
        result["rows"] += rows
        for r in rows:
            print(f"  {r['variant']:>28}: {r['tokens_per_s']:8.0f} tokens/s", file=sys.stderr)
    profiles = []
    if args.profile:
        for v in ["ref", "fast"] + (["bf16"] if "bf16" in args.precision else []):
            profiles.append(bench_profile(args, "e2e", v))
    if args.quality_steps:
        result["quality"] = bench_quality(args)
    if args.memory or args.memory_only:
        result["memory"] = bench_memory(args)
        if args.memory_only:
            result["rows"] = [
                {"mode": m, "variant": v, "tokens_per_s": float("nan")}
                for m in args.modes
                for v in result["memory"]
            ]
    result["machine"]["load_avg_end"] = os.getloadavg()
    base = write_report(args, result, profiles)
    print(base.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
