"""EleutherAI sparsify 1.3.3's own training loop (`Trainer.fit`), run in its own venv
(benchmarks/peers.py): `loss_fn="kl"` (end-to-end: the KL of the spliced model's logits to the
clean ones), a TopK SAE (k 32) of 4608 latents on the output of `layers.5` (= our
`blocks.6.hook_resid_pre`), its default optimizer (SignSGD, schedule-free), batch 4 x 128. The LM
is loaded in `--precision` (bf16 or fp32); its SAEs are fp32 as sparsify makes them. A step's time
is the time between the ends of consecutive optimizer steps (the whole loop iteration: data, clean
pass, spliced pass, KL, backward, step, bookkeeping). Prints one line `PEER_JSON {...}`.
"""

import argparse
import json
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file
from sparsify import SaeConfig, TrainConfig, Trainer
from transformers import AutoModelForCausalLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--layer", type=int, default=6, help="SAE at the input of this block")
    p.add_argument("--latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(args.data / "smollm2-hf"), dtype=dtype)
    tokens = load_file(str(args.data / "tokens.safetensors"))["tokens"]
    batch = 4
    n = args.warmup + args.steps + 1  # +1: a step's time is measured from the previous step
    assert tokens.shape[0] >= n * batch, "benchmarks/peers.py setup wrote too few windows"
    dataset = Dataset.from_dict({"input_ids": tokens[: n * batch].tolist()}).with_format("torch")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            SaeConfig(num_latents=args.latents, k=args.k),
            batch_size=batch,
            loss_fn="kl",
            hookpoints=[f"layers.{args.layer - 1}"],
            log_to_wandb=False,
            save_every=10**9,
            save_dir=tmp,
        )
        trainer = Trainer(cfg, dataset, model)
        stamps: list[float] = []
        last = trainer.optimizers[-1]  # (the schedule-free wrapper has no step hooks)
        step = last.step

        def timed_step(*a, **k):
            out = step(*a, **k)
            stamps.append(time.perf_counter())
            return out

        last.step = timed_step
        trainer.fit()
    assert len(stamps) == n, f"expected {n} optimizer steps, saw {len(stamps)}"
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    print(
        "PEER_JSON "
        + json.dumps(
            {
                "peer": "sparsify",
                "precision": args.precision,
                "sae": f"TopK k={args.k}, {args.latents} latents (fp32), loss_fn=kl",
                "step_s": times[args.warmup :],
                "tokens_per_step": batch * tokens.shape[1],
                "versions": {k: version(k) for k in ("eai-sparsify", "transformers", "torch")},
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
