"""`compile: true` on / off, side by side: SmolLM2-135M, TopK SAE (k 32, 4608 latents) at
blocks.6.hook_resid_pre, batch 4 x 128, local and e2e steps, fp32 and bf16, interleaved in one
process (`device_check.py` with the compiled variants next to the uncompiled ones).

    .venv/bin/python benchmarks/bench_compile.py                  # CPU (a quiet machine!)
    .venv/bin/python benchmarks/bench_compile.py --device cuda

Extra arguments go to device_check.py (e.g. `--threads 2`, `--steps 10`, `--modes e2e`). The
report (benchmarks/results/device-*.md) gives, per compiled variant, its speed-up over the same
precision uncompiled and the largest relative loss difference (the same up to float rounding).
The first steps compile (a minute or more on a CPU): they are the warm-up, not timed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device_check  # noqa: E402

PRESET = [
    "--model",
    "smollm2-135m",
    "--architecture",
    "topk",
    "--k",
    "32",
    "--batch-size",
    "4",
    "--n-ctx",
    "128",
    "--modes",
    "local,e2e",
    "--variants",
    "fp32,fp32+compile,bf16,bf16+compile",
    "--warmup",
    "3",
    "--steps",
    "6",
    "--no-tests",
]

if __name__ == "__main__":
    if not any(a.startswith("--device") for a in sys.argv[1:]):
        PRESET = ["--device", "cpu", *PRESET]
    device_check.main(PRESET + sys.argv[1:])
