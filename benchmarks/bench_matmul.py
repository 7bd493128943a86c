"""GEMM throughput of this CPU per dtype, at the shapes of a SmolLM2 e2e step (GFLOP/s).

    .venv/bin/python benchmarks/bench_matmul.py [--threads 1,2] [--reps 5]

Tells whether lower precision can pay off here at all: `bf16` / `fp16` are F.linear on tensors of
that dtype (oneDNN kernels), `fp32` is MKL SGEMM, `fp32->bf16` is fp32 tensors with
`torch.backends.mkldnn.matmul.fp32_precision = "bf16"` (oneDNN down-converts internally).
Dtypes are interleaved per repetition and the best repetition is kept (others share the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

# (tokens, in, out): attention qkv / MLP up / MLP down / SAE encoder / unembedding
SHAPES = [(512, 576, 960), (512, 576, 1536), (512, 1536, 576), (512, 576, 4608), (512, 576, 49152)]


@contextlib.contextmanager
def fp32_precision(mode: str) -> Iterator[None]:
    backend: Any = getattr(torch.backends.mkldnn, "matmul")  # noqa: B009 (not in the stubs)
    old = backend.fp32_precision
    backend.fp32_precision = mode
    try:
        yield
    finally:
        backend.fp32_precision = old


def best_time(fn: Callable[[], object], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    out = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for m, k, n in SHAPES:
            x, w = torch.randn(m, k), torch.randn(n, k)
            cases: dict[str, Callable[[], object]] = {
                name: functools.partial(F.linear, x.to(dt), w.to(dt))
                for name, dt in (
                    ("fp32", torch.float32),
                    ("bf16", torch.bfloat16),
                    ("fp16", torch.float16),
                )
            }

            def down(x: torch.Tensor = x, w: torch.Tensor = w) -> object:
                with fp32_precision("bf16"):
                    return F.linear(x, w)

            cases["fp32->bf16"] = down
            for fn in cases.values():  # warm up (oneDNN JIT, caches)
                fn()
            best = {name: float("inf") for name in cases}
            for _ in range(args.reps):
                for name, fn in cases.items():
                    best[name] = min(best[name], best_time(fn, 1))
            gflops = {name: 2 * m * k * n / t / 1e9 for name, t in best.items()}
            row = {"threads": threads, "shape": [m, k, n], "gflops": gflops}
            out.append(row)
            print(
                f"threads {threads} {m}x{k}x{n}: "
                + "  ".join(f"{name} {g:6.1f}" for name, g in gflops.items())
            )
    print(json.dumps({"load_avg": os.getloadavg(), "rows": out}))


if __name__ == "__main__":
    main()
