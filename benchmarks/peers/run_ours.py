"""Our training step on the peers' setup (benchmarks/peers.py), in our venv: SmolLM2-135M, a TopK
SAE (k 32, 4608 latents) at blocks.6.hook_resid_pre, e2e (`logits_kl`), batch 4 x 128 from the
same token windows the peers read. Prints one line `PEER_JSON {...}`."""

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_train as bt  # noqa: E402

from e2e_sae.training.engine import TrainState  # noqa: E402
from e2e_sae.training.trainer import setup  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = argparse.Namespace(
        model="smollm2-135m", ratio=8.0, architecture="topk", k=32, batch_size=4, n_ctx=128
    )
    config = bt.make_config(ns, "e2e", args.precision)
    if args.compile:
        config = config.model_copy(update={"compile": True})
    with bt.lm_shared("smollm2-135m"):  # (the LM make_config loaded; not a second copy)
        trainer = setup(config, device="cpu")
    tokens = load_file(str(args.data / "tokens.safetensors"))["tokens"]
    n = args.warmup + args.steps
    assert tokens.shape[0] >= n * 4, "benchmarks/peers.py setup wrote too few windows"
    state = TrainState()
    times, losses = [], []
    for i in range(n):
        t0 = time.perf_counter()
        values = trainer.train_step(iter([tokens[i * 4 : (i + 1) * 4]]), state)
        times.append(time.perf_counter() - t0)
        losses.append(values["loss"])
    print(
        "PEER_JSON "
        + json.dumps(
            {
                "peer": "ours",
                "precision": trainer.config.precision + (" + compile" if args.compile else ""),
                "sae": "TopK k=32, 4608 latents, logits_kl",
                "step_s": times[args.warmup :],
                "tokens_per_step": 4 * tokens.shape[1],
                "losses": losses,
                "versions": {k: version(k) for k in ("e2e_sae", "torch")},
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
