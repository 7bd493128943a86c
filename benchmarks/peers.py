"""The peers side by side on one setup: SmolLM2-135M, an SAE at the input of block 6, batches of
4 x 128 Shakespeare tokens, 4608 latents, e2e. Each peer trains in its own virtualenv (their pins
may clash with ours) under benchmarks/.peers/ (ignored by git):

  original   the original e2e_sae 2.1.1 (PyPI `e2e-sae`), its training step (ReLU + L1: the
             original has no TopK SAE; fp32: it has no precision option)
  sparsify   EleutherAI sparsify 1.3.3 (PyPI `eai-sparsify`), its own `Trainer.fit` loop,
             `loss_fn=kl`, TopK k 32, its LM in bf16 and in fp32
  ours       this library's `train_step`, TopK k 32, `logits_kl`, fp32 and bf16

    .venv/bin/python benchmarks/peers.py setup       # venvs + the exported model and tokens (once)
    .venv/bin/python benchmarks/peers.py smoke       # every peer runs one step (no timing)
    .venv/bin/python benchmarks/peers.py run --rounds 2 --steps 8 --threads 2   # quiet machine!

`setup` exports, from our venv, SmolLM2 as a Hugging Face folder (for sparsify) and as
TransformerLens weights (for the original), and the token windows every peer reads. `run` starts
each peer in a fresh process per round (rounds rotate the order, so load from other processes hits
them alike), takes the median step time over the rounds' timed steps, and writes
benchmarks/results/peers-<stamp>.json and .md with each peer's ratio to ours in fp32 and bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS = HERE / ".peers"
RUNNERS = HERE / "peers"
RESULTS = HERE / "results"
# venv name -> what to install besides torch (the versions the issue names)
# (e2e-sae 2.1.1 pins nothing; with today's transformer-lens 4, transformers 5 and pyarrow it does
# not import: the pins are of its time, mid 2024)
VENVS: dict[str, list[str]] = {
    "original": [
        "e2e-sae==2.1.1",
        "transformer-lens==2.3.0",
        "transformers==4.44.2",
        "datasets<3",
        "pyarrow<17",
    ],
    "sparsify": ["eai-sparsify==1.3.3"],
}
# entry -> (venv or None for ours, runner, extra runner args)
ENTRIES: dict[str, tuple[str | None, str, list[str]]] = {
    "ours-fp32": (None, "run_ours.py", ["--precision", "fp32"]),
    "ours-bf16": (None, "run_ours.py", ["--precision", "bf16"]),
    "original-fp32": ("original", "run_original.py", []),
    "sparsify-fp32": ("sparsify", "run_sparsify.py", ["--precision", "fp32"]),
    "sparsify-bf16": ("sparsify", "run_sparsify.py", ["--precision", "bf16"]),
}
N_WINDOWS = 256  # 64 batches of 4


def python_of(venv: str | None) -> str:
    return sys.executable if venv is None else str(PEERS / f"venv-{venv}" / "bin" / "python")


def build_venvs(force: bool = False) -> None:
    import torch

    torch_spec = f"torch=={torch.__version__.split('+')[0]}"  # the torch our venv runs
    for name, specs in VENVS.items():
        venv = PEERS / f"venv-{name}"
        if (venv / "bin" / "python").exists() and not force:
            print(f"[peers] {venv} exists (--force to rebuild)")
            continue
        print(f"[peers] building {venv}: {torch_spec} {' '.join(specs)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, torch_spec, *specs], check=True)


def export_data(force: bool = False) -> None:
    """SmolLM2 as an HF folder and as TransformerLens weights; the token windows."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE))
    import bench_train as bt
    import torch

    from e2e_sae.lm.gguf import load_smollm2_hf
    from e2e_sae.lm.load import save_tlens_model

    PEERS.mkdir(parents=True, exist_ok=True)
    hf_dir, tl_dir = PEERS / "smollm2-hf", PEERS / "smollm2-tlens"
    tok = PEERS / "tokens.safetensors"
    if force or not (hf_dir / "config.json").exists():
        print(f"[peers] writing {hf_dir}", flush=True)
        hf = load_smollm2_hf()  # (marked as a GGUF-quantized model: a plain copy saves)
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        plain = type(hf)(type(hf.config).from_dict(cfg))
        plain.load_state_dict(hf.state_dict())
        plain.save_pretrained(str(hf_dir))
    if force or not (tl_dir / "model.safetensors").exists():
        print(f"[peers] writing {tl_dir}", flush=True)
        save_tlens_model(bt.shared_lm("smollm2-135m"), tl_dir)
    if force or not tok.exists():
        print(f"[peers] writing {tok}", flush=True)
        ns = argparse.Namespace(
            model="smollm2-135m", ratio=8.0, architecture="topk", k=32, batch_size=4, n_ctx=128
        )
        tokens = torch.cat(bt.token_batches(ns, N_WINDOWS // 4)).contiguous()
        save_file({"tokens": tokens}, str(tok))


def run_entry(entry: str, steps: int, warmup: int, threads: int | None) -> dict[str, Any]:
    venv, runner, extra = ENTRIES[entry]
    py = python_of(venv)
    if not Path(py).exists():
        raise SystemExit(f"{py} is missing: run `benchmarks/peers.py setup` first")
    cmd = [py, str(RUNNERS / runner), "--data", str(PEERS), "--steps", str(steps)]
    cmd += ["--warmup", str(warmup), *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # the peers' processes start in .peers/: the original is also named `e2e_sae`, and must not
    # find this repository's package on its path
    proc = subprocess.run(cmd, cwd=PEERS, env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PEER_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{entry} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("PEER_JSON "))


def summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for entry, rs in runs.items():
        steps = [t for r in rs for t in r["step_s"]]
        med = statistics.median(steps)
        rows.append(
            {
                "entry": entry,
                "sae": rs[0]["sae"],
                "precision": rs[0]["precision"],
                "tokens_per_s": rs[0]["tokens_per_step"] / med,
                "tokens_per_s_per_round": [
                    r["tokens_per_step"] / statistics.median(r["step_s"]) for r in rs
                ],
                "step_s_median": med,
                "versions": rs[0]["versions"],
                "threads": rs[0]["threads"],
            }
        )
    by = {r["entry"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        for ours in ("ours-fp32", "ours-bf16"):
            if ours in by:
                r[f"{ours}_vs_this"] = by[ours] / r["tokens_per_s"]
    return rows


def report(rows: list[dict[str, Any]], command: str, stamp: str, machine: dict[str, Any]) -> str:
    lines = [
        f"# Peers side by side ({stamp})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, ISA "
        f"{', '.join(machine['isa'])}; load average {machine['load_avg_start'][0]:.1f} at start, "
        f"{machine['load_avg_end'][0]:.1f} at end. SmolLM2-135M, SAE at the input of block 6, "
        "batch 4 x 128, 4608 latents, e2e; each peer in its own process and venv per round, "
        "rounds in rotated order; tokens/s from the median step time over all rounds.",
        "",
        "| peer | precision | SAE | tokens/s (per round) | ours fp32 / this | ours bf16 / this |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = ", ".join(f"{x:.0f}" for x in r["tokens_per_s_per_round"])
        lines.append(
            f"| {r['entry']} | {r['precision']} | {r['sae']} | {r['tokens_per_s']:.0f} ({per}) | "
            f"{r.get('ours-fp32_vs_this', float('nan')):.2f} | "
            f"{r.get('ours-bf16_vs_this', float('nan')):.2f} |"
        )
    lines += ["", "Versions: " + "; ".join(f"{r['entry']}: {r['versions']}" for r in rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("action", choices=("setup", "smoke", "run"))
    p.add_argument("--entries", default=",".join(ENTRIES))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps per peer and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads in every peer")
    p.add_argument("--force", action="store_true", help="setup: rebuild venvs and exports")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    entries = [e.strip() for e in args.entries.split(",") if e.strip()]
    if bad := [e for e in entries if e not in ENTRIES]:
        p.error(f"--entries: unknown {bad} (choose from {', '.join(ENTRIES)})")
    if args.action == "setup":
        build_venvs(args.force)
        export_data(args.force)
        return
    if args.action == "smoke":
        for e in entries:
            r = run_entry(e, steps=1, warmup=0, threads=args.threads)
            print(f"[peers] {e}: ran one step ({r['precision']}, {r['sae']}; {r['versions']})")
        return
    sys.path.insert(0, str(HERE))
    import bench_train as bt

    machine = bt.machine()
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in entries}
    for i in range(args.rounds):
        for e in entries[i % len(entries) :] + entries[: i % len(entries)]:
            print(f"[peers] round {i + 1}/{args.rounds}: {e}", file=sys.stderr, flush=True)
            runs[e].append(run_entry(e, args.steps, args.warmup, args.threads))
    machine["load_avg_end"] = os.getloadavg()
    rows = summarise(runs)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    command = " ".join(["benchmarks/peers.py", *(argv or sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"peers-{stamp}"
    data = {"machine": machine, "command": command, "rows": rows, "runs": runs}
    base.with_suffix(".json").write_text(json.dumps(data, indent=1))
    text = report(rows, command, stamp, machine)
    base.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
