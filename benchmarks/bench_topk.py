"""TopK SAE training step alone (forward + MSE + backward + Adam), dense vs sparse path.

    .venv/bin/python benchmarks/bench_topk.py [--threads 1,2] [--ks 32] [--steps 15]

`dense` is `SAEBase.forward` (dense code, dense decode, autograd GEMMs); `sparse` is
`TopKSAE.forward` on the k selected latents (`e2e_sae.saes.sparse_ops`). Both start from the same
weights and see the same batches; their steps are interleaved and the median is kept. `--x-grad`
also times the case where the input needs a gradient (an SAE downstream of another in e2e).
`--bf16`: the forward under bf16 autocast (`precision: bf16`); `--fused-adam`: Adam(fused=True)
(train.py uses the default Adam). `--ks 32,64,128,256,512,1024` measures the crossover that sets
`topk.SPARSE_MAX_DENSITY`.
The table is printed and written to benchmarks/results/topk-<stamp>.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from e2e_sae.saes import TopKSAE

RESULTS = Path(__file__).resolve().parent / "results"


def make_sae(d_in: int, d_sae: int, k: int, sparse: bool) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(d_in, d_sae, k=k)
    sae.sparse_max_density = 1.0 if sparse else 0.0
    return sae


def time_steps(args: argparse.Namespace, k: int, x_grad: bool) -> dict[str, float]:
    """Median ms per step for each path at this k."""
    saes = {v: make_sae(args.d_in, args.d_sae, k, v == "sparse") for v in ("dense", "sparse")}
    opts = {
        v: torch.optim.Adam(s.parameters(), lr=1e-4, fused=args.fused_adam or None)
        for v, s in saes.items()
    }
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(args.tokens, args.d_in, generator=g) for _ in range(4)]

    def step(v: str, i: int) -> None:
        x = xs[i % len(xs)].clone().requires_grad_(x_grad)
        with amp:
            out, _ = saes[v](x)
        F.mse_loss(out.float(), x.detach()).backward()
        opts[v].step()
        opts[v].zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {v: [] for v in saes}
    names = list(saes)
    for i in range(args.warmup + args.steps):
        for v in names[i % 2 :] + names[: i % 2]:
            t0 = time.perf_counter()
            step(v, i)
            if i >= args.warmup:
                times[v].append(time.perf_counter() - t0)
    return {v: 1e3 * statistics.median(ts) for v, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--ks", default="32")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--x-grad", action="store_true", help="also time with x.requires_grad")
    p.add_argument("--bf16", action="store_true", help="SAE forward under bf16 autocast")
    p.add_argument("--fused-adam", action="store_true", help="torch.optim.Adam(fused=True)")
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    lines = [
        f"bench_topk {datetime.now():%Y-%m-%d %H:%M:%S}: SAE step (forward + MSE + backward + "
        f"{'fused ' if args.fused_adam else ''}Adam{', bf16 autocast' if args.bf16 else ''}), "
        f"d_in {args.d_in}, d_sae {args.d_sae}, {args.tokens} tokens, torch "
        f"{torch.__version__}, median of {args.steps} interleaved steps",
        "",
        f"{'threads':>7} {'k':>5} {'k/d_sae':>8} {'x grad':>6} {'dense ms':>9} {'sparse ms':>9} "
        f"{'speedup':>7}",
    ]
    print("\n".join(lines), flush=True)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for k in [int(s) for s in args.ks.split(",")]:
            for x_grad in [False, True] if args.x_grad else [False]:
                ms = time_steps(args, k, x_grad)
                row = (
                    f"{threads:>7} {k:>5} {k / args.d_sae:>8.4f} {'yes' if x_grad else 'no':>6} "
                    f"{ms['dense']:>9.1f} {ms['sparse']:>9.1f} {ms['dense'] / ms['sparse']:>6.2f}x"
                )
                print(row, flush=True)
                lines.append(row)
    lines += ["", f"load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"topk-{datetime.now():%Y%m%d-%H%M%S}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(lines[-1], f"\nwritten to {out}", sep="\n")


if __name__ == "__main__":
    main()
