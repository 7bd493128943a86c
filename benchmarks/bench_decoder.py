"""Cost of the decoder parameterisation: the SAE training step alone (forward + MSE + backward +
Adam) with the original's normalisation inside the graph vs this library's old in-place scheme.

    .venv/bin/python benchmarks/bench_decoder.py [--threads 2] [--steps 30]

`graph` is the library's `forward` (dictionary = F.normalize(W_dec, dim=0) in the autograd graph);
`inplace` is the scheme it replaced (renormalise W_dec's columns in place before each forward,
then decode with W_dec as it is), written out here for the comparison. Both start from the same
weights and see the same batches; their steps are interleaved (order rotated every round) so load
from other processes hits them alike; the median step time is kept. Cases: the paper's relu SAE
(dense) and TopK k=32 on the sparse path, at SmolLM2-135M's d_in 576 with 8 x 576 latents and
512 tokens. The table is printed and written to benchmarks/results/decoder-<stamp>.txt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2e_sae.saes import SAE, SAEBase, TopKSAE
from e2e_sae.saes.sparse_ops import sparse_topk_forward
from e2e_sae.saes.topk import positive_values

RESULTS = Path(__file__).resolve().parent / "results"


def inplace_forward(sae: SAEBase, x: Tensor) -> tuple[Tensor, Tensor]:
    """The replaced scheme: W_dec renormalised in place, then differentiated as it is."""
    with torch.no_grad():
        sae.decoder.weight.data = F.normalize(sae.decoder.weight.data, dim=0)
    if isinstance(sae, TopKSAE) and sae.uses_sparse_path():
        enc = cast(nn.Linear, sae.encoder[0])
        w, b = sae.decoder.weight, sae.decoder.bias
        return sparse_topk_forward(x, enc.weight, enc.bias, w, b, sae.k, positive_values)
    c = sae.encode(x)
    return sae.decoder(c), c


def make(kind: str) -> SAEBase:
    torch.manual_seed(0)
    if kind == "relu":
        return SAE(576, 4608)
    sae = TopKSAE(576, 4608, k=32)
    sae.sparse_max_density = 1.0
    return sae


def time_case(kind: str, steps: int, warmup: int) -> dict[str, float]:
    fwd: dict[str, Callable[[SAEBase, Tensor], tuple[Tensor, Tensor]]] = {
        "graph": lambda s, x: s(x),
        "inplace": inplace_forward,
    }
    saes = {v: make(kind) for v in fwd}
    opts = {v: torch.optim.Adam(s.parameters(), lr=1e-4) for v, s in saes.items()}
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(512, 576, generator=g) for _ in range(4)]
    times: dict[str, list[float]] = {v: [] for v in fwd}
    names = list(fwd)
    for i in range(warmup + steps):
        for v in names[i % 2 :] + names[: i % 2]:
            t0 = time.perf_counter()
            out, c = fwd[v](saes[v], xs[i % len(xs)])
            loss = F.mse_loss(out, xs[i % len(xs)])
            if kind == "relu":
                loss = loss + 1e-3 * c.abs().sum(-1).mean()
            loss.backward()
            opts[v].step()
            opts[v].zero_grad(set_to_none=True)
            if i >= warmup:
                times[v].append(time.perf_counter() - t0)
    return {v: 1e3 * statistics.median(t) for v, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"# bench_decoder {datetime.now():%Y%m%d-%H%M%S}: SAE step (fwd + MSE + bwd + Adam), "
        f"d_in 576, d_sae 4608, 512 tokens, {args.threads} threads, median of {args.steps} "
        f"interleaved steps; load average {os.getloadavg()[0]:.1f} at start",
        "| case | inplace ms (old) | graph ms (original's math) | graph / inplace |",
        "|---|---|---|---|",
    ]
    for kind in ("relu", "topk32-sparse"):
        ms = time_case(kind, args.steps, args.warmup)
        ratio = ms["graph"] / ms["inplace"]
        lines.append(f"| {kind} | {ms['inplace']:.1f} | {ms['graph']:.1f} | {ratio:.3f} |")
    lines.append(f"load average {os.getloadavg()[0]:.1f} at end")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decoder-{datetime.now():%Y%m%d-%H%M%S}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
