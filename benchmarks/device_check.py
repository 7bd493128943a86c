"""One command for a machine with an accelerator (or a CPU): tokens/s and peak memory of the
straightforward path vs ours, in fp32 and bf16, for local, e2e and e2e+downstream steps and an
activation-cache build; then the CUDA-marked tests. No network: the model is built from a config
(random weights, GPT-2 small's shape by default on a GPU), the tokens are random.

    .venv/bin/python benchmarks/device_check.py                 # GPU: GPT-2-small shape, 8 x 1024
    .venv/bin/python benchmarks/device_check.py --device cpu    # CPU: a small model, 4 x 128

Variants (`--variants`, comma-separated; one process, same LM, same initial SAE, same batches,
steps interleaved and rotated so that load hits them alike):
  ref            the original library's straightforward path (`--reference` of bench_train.py:
                 a clean and a spliced TransformerLens pass from the tokens, fp32, full logits)
  fp32, bf16     ours (`precision: fp32` / `bf16`)
  auto           ours with `precision: auto` (what this device resolves it to is printed)
  fp32+compile, bf16+compile   ours with `compile: true` (torch.compile of the SAEs and the
                 hook-free LM blocks; give `--warmup 2` or more: the first steps compile); with
                 the same precision uncompiled beside it, the last column gives compile's speed-up
                 and loss difference (benchmarks/bench_compile.py runs this on the peers' setup)
Tokens/s comes from the median step time (on CUDA the step is timed between synchronisations).
Peak memory: CUDA: `torch.cuda.max_memory_allocated` over one step (all variants of a mode live in
one process and share the LM (the compiled variants a copy of it), so `peak` includes the LM,
every variant's SAE and Adam state;
`step` is the peak minus what was allocated before the step: what the step itself needs).
CPU: the peak resident set size over the step (VmHWM reset before it; the allocator's cached
blocks make it approximate: `bench_train.py --memory` measures one variant per process).
The loss column compares each variant's losses with `ref`'s (same weights at step 1, then each
trains its own copy): fp32 agrees up to float rounding.

Results: `--out` (default benchmarks/results/) gets `device-<device>-<stamp>.json` and `.md`.
`--tests` (default on) then runs `pytest -m cuda` (skipped without CUDA) and records its summary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402  (the shared config and model table)

from e2e_sae.training.engine import TrainState  # noqa: E402
from e2e_sae.training.trainer import Trainer, setup  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES = ("local", "e2e", "e2e_ds", "cache")
VARIANTS = ("ref", "fp32", "bf16", "auto", "fp32+compile", "bf16+compile")


# --- device helpers -------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mem_reset(device: str) -> float:
    """Start a peak-memory window; returns what is allocated now (MiB)."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    bt.peak_rss_reset()
    return bt.peak_rss_mib()


def mem_peak(device: str) -> float:
    if device.startswith("cuda"):
        sync(device)
        return torch.cuda.max_memory_allocated() / 2**20
    return bt.peak_rss_mib()


@functools.cache
def lm_on(model: str, device: str) -> Any:
    from e2e_sae.lm.load import load_tlens_model

    source = bt.MODELS[model][0]
    return load_tlens_model(
        source.get("tlens_model_name"), None, source.get("tlens_config"), device
    )


@functools.cache
def lm_copy(model: str, device: str) -> Any:
    """A second LM for the compiled variants: the lean forward's layout is cached per LM and
    precision, so compiling it on the shared LM would compile the uncompiled variants' too."""
    return copy.deepcopy(lm_on(model, device))


@contextlib.contextmanager
def lm_shared(model: str, device: str, compiled: bool = False) -> Iterator[None]:
    """Every variant splices its SAEs into the same LM (loaded once, on `device`); the compiled
    variants into a copy of it."""
    lm = lm_copy(model, device) if compiled else lm_on(model, device)
    with mock.patch("e2e_sae.lm.load.load_tlens_model", lambda *a, **k: lm):
        yield


def make_trainer(args: argparse.Namespace, mode: str, variant: str) -> Trainer:
    precision = "fp32" if variant == "ref" else variant.removesuffix("+compile")
    config = bt.make_config(args, mode, precision)
    if variant.endswith("+compile"):
        config = config.model_copy(update={"compile": True})
    with lm_shared(args.model, args.device, compiled=variant.endswith("+compile")):
        return setup(config, device=args.device, reference=variant == "ref")


# --- measurements ---------------------------------------------------------------------------------
def bench_mode(args: argparse.Namespace, mode: str) -> list[dict[str, Any]]:
    """Interleaved training steps of every variant; one peak-memory step each at the end."""
    trainers = {v: make_trainer(args, mode, v) for v in args.variants}
    resolved = {v: t.config.precision for v, t in trainers.items()}
    batches = bt.token_batches(args, args.warmup + args.steps + 1)
    states = {v: TrainState() for v in args.variants}
    losses: dict[str, list[float]] = {v: [] for v in args.variants}

    def step(v: str, i: int) -> float:
        sync(args.device)
        t0 = time.perf_counter()
        values = trainers[v].train_step(iter([batches[i]]), states[v])
        sync(args.device)
        dt = time.perf_counter() - t0
        losses[v].append(values["loss"])  # read outside the timed region
        return dt

    for i in range(args.warmup):
        for v in args.variants:
            step(v, i)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for i in range(args.steps):
        order = args.variants[i % len(args.variants) :] + args.variants[: i % len(args.variants)]
        for v in order:
            times[v].append(step(v, args.warmup + i))
    memory = {}
    for v in args.variants:
        before = mem_reset(args.device)
        trainers[v].train_step(iter([batches[-1]]), states[v])
        peak = mem_peak(args.device)
        memory[v] = (peak, peak - before)
    trainers.clear()  # (the next mode builds its own)
    rows = []
    tokens = args.batch_size * args.n_ctx
    for v in args.variants:
        med = statistics.median(times[v])
        row: dict[str, Any] = {
            "mode": mode,
            "variant": v if v != "auto" else f"auto ({resolved[v]})",
            "tokens_per_s": tokens / med,
            "step_s_median": med,
            "step_s_all": times[v],
            "peak_mib": memory[v][0],
            "step_mib": memory[v][1],
            "losses": losses[v],
        }
        if "ref" in times and v != "ref":
            row["speedup_vs_ref"] = statistics.median(
                r / t for r, t in zip(times["ref"], times[v], strict=True)
            )
            row["first_step_rel_loss_diff_vs_ref"] = bt.rel_diff(losses[v][0], losses["ref"][0])
            row["max_rel_loss_diff_vs_ref"] = max(
                bt.rel_diff(a, b) for a, b in zip(losses[v], losses["ref"], strict=True)
            )
        base = v.removesuffix("+compile")
        if base != v and base in times:  # compile on vs off, same precision
            row["speedup_vs_uncompiled"] = statistics.median(
                b / t for b, t in zip(times[base], times[v], strict=True)
            )
            row["max_rel_loss_diff_vs_uncompiled"] = max(
                bt.rel_diff(a, b) for a, b in zip(losses[v], losses[base], strict=True)
            )
        rows.append(row)
    return rows


def bench_cache_build(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`ActivationCache.build`: the clean LM over the batches, activations written to disk."""
    from e2e_sae.caches.activations import ActivationCache

    t = make_trainer(args, "local", "fp32")
    n = max(args.steps, 2)
    batches = bt.token_batches(args, n + 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ActivationCache.build(t.model, batches[:1], 1, Path(tmp) / "warm", progress=False)
        before = mem_reset(args.device)
        t0 = time.perf_counter()
        ActivationCache.build(t.model, batches[1:], n, Path(tmp) / "acts", progress=False)
        sync(args.device)
        dt = time.perf_counter() - t0
        peak = mem_peak(args.device)
    rows.append(
        {
            "mode": "cache",
            "variant": "cache-build (LM pass + write)",
            "tokens_per_s": n * args.batch_size * args.n_ctx / dt,
            "step_s_median": dt / n,
            "peak_mib": peak,
            "step_mib": peak - before,
        }
    )
    return rows


def run_cuda_tests(timeout: int) -> dict[str, Any]:
    """`pytest -m cuda` in a subprocess; its summary line and exit code."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd), "returncode": None, "summary": f"timed out ({timeout}s)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "summary": lines[-1] if lines else proc.stderr[-500:],
        "failed": failed,
    }


# --- report ---------------------------------------------------------------------------------------
def describe_device(device: str) -> dict[str, Any]:
    out = bt.machine()
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        out.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return out


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None or x != x else format(x, spec)


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['torch_threads']} threads)"
    lines = [
        f"# device_check: {args.model} on {args.device} ({result['stamp']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Device: {where}; torch {m['torch']}. Batch {args.batch_size} x {args.n_ctx} tokens, "
        f"{args.architecture} SAE (dict ratio {args.ratio}) at layer {bt.MODELS[args.model][1]}, "
        f"{args.warmup} warmup + {args.steps} timed steps per variant, interleaved. `x ref`: the "
        "median over rounds of the within-round time ratio. Memory: see the script's docstring.",
        "",
        "| mode | variant | tokens/s | x ref | median step s | peak MiB | step MiB "
        "| loss rel. diff vs ref (step 1; max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        diff = ""
        if "first_step_rel_loss_diff_vs_ref" in r:
            diff = (
                f"{r['first_step_rel_loss_diff_vs_ref']:.1e}; {r['max_rel_loss_diff_vs_ref']:.1e}"
            )
        if "speedup_vs_uncompiled" in r:
            diff += (
                f" (vs uncompiled: {r['speedup_vs_uncompiled']:.2f}x, loss "
                f"{r['max_rel_loss_diff_vs_uncompiled']:.1e})"
            )
        lines.append(
            f"| {r['mode']} | {r['variant']} | {fmt(r['tokens_per_s'], '.0f')} | "
            f"{fmt(r.get('speedup_vs_ref'), '.2f')} | {fmt(r.get('step_s_median'), '.3f')} | "
            f"{fmt(r.get('peak_mib'), '.0f')} | {fmt(r.get('step_mib'), '.0f')} | {diff} |"
        )
    tests = result.get("cuda_tests")
    if tests:
        lines += ["", f"CUDA-marked tests (`{tests['command']}`): {tests['summary']}"]
        lines += [f"- {ln}" for ln in tests.get("failed", [])]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument(
        "--model",
        choices=sorted(bt.MODELS),
        default=None,
        help="default: gpt2-small-random on CUDA, tiny on CPU",
    )
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--variants", default="ref,fp32,bf16")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on CUDA, 4 on CPU")
    p.add_argument("--n-ctx", type=int, default=None, help="default 1024 on CUDA, 128 on CPU")
    p.add_argument("--ratio", type=float, default=8.0, help="dictionary size / d_model")
    p.add_argument("--architecture", choices=("relu", "topk"), default="relu")
    p.add_argument("--k", type=int, default=32, help="latents per token for --architecture topk")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--tests",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the CUDA-marked tests after the measurements",
    )
    p.add_argument("--tests-timeout", type=int, default=240)
    p.add_argument("--out", type=Path, default=bt.RESULTS)
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not cuda:
        p.error("--device cuda: torch sees no CUDA device (use --device cpu)")
    args.model = args.model or ("gpt2-small-random" if on_cuda else "tiny")
    args.batch_size = args.batch_size or (8 if on_cuda else 4)
    args.n_ctx = args.n_ctx or (1024 if on_cuda else 128)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name, got, allowed in (
        ("--modes", args.modes, MODES),
        ("--variants", args.variants, VARIANTS),
    ):
        if bad := [x for x in got if x not in allowed]:
            p.error(f"{name}: unknown {bad} (choose from {', '.join(allowed)})")
    args.topk_path = "auto"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    # bench_train's helpers (layer count, vocabulary) read the one LM this process loads
    bt.shared_lm = lambda model: lm_on(model, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {
        "machine": describe_device(args.device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "command": " ".join(["benchmarks/device_check.py", *(argv or sys.argv[1:])]),
        "stamp": stamp,
        "rows": [],
    }
    started = time.perf_counter()
    for mode in args.modes:
        print(f"[device_check] {args.model} on {args.device}: {mode}", file=sys.stderr, flush=True)
        rows = bench_cache_build(args) if mode == "cache" else bench_mode(args, mode)
        result["rows"] += rows
        for r in rows:
            print(f"  {r['variant']:>30}: {r['tokens_per_s']:9.0f} tokens/s", file=sys.stderr)
    if args.tests:
        print("[device_check] pytest -m cuda", file=sys.stderr, flush=True)
        result["cuda_tests"] = run_cuda_tests(args.tests_timeout)
    result["wall_s"] = time.perf_counter() - started
    result["machine"]["load_avg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"device-{args.device.replace(':', '')}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=1))
    text = report(args, result)
    base.with_suffix(".md").write_text(text)
    print(text)
    print(f"written: {base}.json, {base}.md ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
