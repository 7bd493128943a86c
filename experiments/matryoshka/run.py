"""Matryoshka vs BatchTopK SAEs at the same k on `shakespeare-lm`, trained locally and end-to-end.

Exact command (repository root):

    PYTHONPATH=. .venv/bin/python experiments/matryoshka/run.py

Setup: the Pareto experiment's (experiments/pareto/configs/base.yaml): one SAE with 1024 latents
at blocks.2.hook_resid_pre, 150 steps of 8 x 128 tokens (e2e runs: 75), evaluation on 16k
validation tokens; here with k = 24, no sparsity term, AuxK with latents dead after 20k tokens,
and Matryoshka widths 64 / 256 / 1024. Runs: batchtopk and matryoshka, each local (MSE) and e2e
(KL); matryoshka e2e both ways ("all_prefixes": mean of the three prefixes' KLs, one batched
pass; "full_kl_inner_mse": KL of the full dictionary + MSE of the inner prefixes).

Per run it reports the library's evaluation (CE increase, L0, alive latents) and, on 4k
validation tokens, each nested prefix on its own (latents [0, w) decoded, the rest dropped; for
batchtopk the same index ranges, a control whose latents have no order): its CE increase and
explained variance, and the firing frequency of the latents in each band [w_{i-1}, w_i). Updates
results/results.json (`--table` prints the table of results.md from it; runs/ is gitignored).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from e2e_sae import SAETransformer, load_config
from e2e_sae.config import read_yaml
from e2e_sae.data import create_data_loader
from e2e_sae.eval.evaluate import EvalResult
from e2e_sae.training.trainer import train

HERE = Path(__file__).resolve().parent
BASE = HERE.parent / "pareto" / "configs" / "base.yaml"
POS = "blocks.2.hook_resid_pre"
K = 24
WIDTHS = [64, 256, 1024]
AUX = {"dead_tokens_threshold": 20_000}
# e2e runs get half the steps (75): on 2 shared cores the 150-step e2e runs did not fit the time.
RUNS: dict[str, dict[str, Any]] = {
    "batchtopk local": {"arch": "batchtopk", "loss": "local"},
    "matryoshka local": {"arch": "matryoshka", "loss": "local"},
    "batchtopk e2e": {"arch": "batchtopk", "loss": "e2e", "n_samples": 600},
    "matryoshka e2e (all_prefixes)": {"arch": "matryoshka", "loss": "e2e", "n_samples": 600},
    "matryoshka e2e (full_kl_inner_mse)": {
        "arch": "matryoshka",
        "loss": "e2e",
        "mode": "full_kl_inner_mse",
        "n_samples": 600,
    },
}
LOSSES = {"local": {"out_to_in": {"coeff": 1.0}}, "e2e": {"logits_kl": {"coeff": 1.0}}}


def config_for(
    name: str, spec: dict[str, Any], runs: Path, quick: bool, n_samples: int | None = None
) -> Any:
    raw = read_yaml(BASE)
    kwargs: dict[str, Any] = dict(AUX)
    if spec["arch"] == "matryoshka":
        kwargs["matryoshka_widths"] = WIDTHS
        kwargs["matryoshka_e2e"] = spec.get("mode", "all_prefixes")
    raw["saes"] = {
        **raw["saes"],
        "architecture": spec["arch"],
        "k": K,
        "architecture_kwargs": kwargs,
    }
    raw["loss"] = LOSSES[spec["loss"]]
    raw["save_dir"] = str(runs)
    raw["run_name"] = name.replace(" ", "_").replace("(", "").replace(")", "")
    n_samples = n_samples or spec.get("n_samples")
    if n_samples is not None:
        raw["n_samples"] = n_samples
    if quick:
        raw.update(n_samples=32, eval_n_samples=16, warmup_samples=0)
    return load_config(raw)


@torch.no_grad()
def prefix_metrics(model: SAETransformer, cfg: Any, n_batches: int) -> list[dict[str, float]]:
    """Each prefix [0, w) on its own: CE increase and explained variance on held-out tokens."""
    sae = model.sae(POS).eval()
    tl = model.tlens_model
    batches = create_data_loader(cfg.eval_data, cfg.batch_size, cfg.seed + 7)
    tokens = torch.cat([next(batches) for _ in range(n_batches)])
    store: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: Any) -> Tensor:
        store["x"] = x
        return x

    clean = tl.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(POS, keep)])
    x = store["x"]
    c = sae.encode(x)
    elements = sae.dict_elements
    out = []
    for w in WIDTHS:
        recon = F.linear(c[..., :w], elements[:, :w], sae.decoder.bias)
        ce = tl.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(POS, lambda a, hook, r=recon: r)]
        )
        resid = (x - recon).pow(2).sum()
        ev = 1 - resid / (x - x.mean(dim=(0, 1))).pow(2).sum()
        out.append({"width": w, "ce_increase": float(ce - clean), "explained_variance": float(ev)})
    return out


def bands(freq: Tensor) -> list[dict[str, float]]:
    """Per band [w_{i-1}, w_i): mean firing frequency, share of the L0, alive latents."""
    total = float(freq.sum())
    out, lo = [], 0
    for w in WIDTHS:
        f = freq[lo:w]
        out.append(
            {
                "band": f"{lo}-{w}",
                "mean_freq": float(f.mean()),
                "l0_share": float(f.sum()) / total if total else 0.0,
                "alive": int((f > 0).sum()),
            }
        )
        lo = w
    return out


def report(results: dict[str, Any]) -> str:
    """The markdown table of results.md."""
    head = ["run", "CE increase", "L0", "alive", "EV"]
    head += [f"CE inc. prefix {w}" for w in WIDTHS] + [f"EV prefix {w}" for w in WIDTHS[:-1]]
    head += [f"freq {b}" for b in ("0-64", "64-256", "256-1024")] + ["L0 share 0-64", "train s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [
            name,
            f"{r['ce_loss_increase']:.3f}",
            f"{r['l0']:.1f}",
            str(r["alive"]),
            f"{r['explained_variance']:.3f}",
        ]
        cells += [f"{p['ce_increase']:.3f}" for p in r["prefixes"]]
        cells += [f"{p['explained_variance']:.3f}" for p in r["prefixes"][:-1]]
        cells += [f"{b['mean_freq']:.4f}" for b in r["bands"]]
        cells += [f"{r['bands'][0]['l0_share']:.3f}", f"{r['train_wall_s']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few steps, to check the script")
    ap.add_argument("--only", nargs="*", help="run names to run (default: all)")
    ap.add_argument("--n-samples", type=int, help="training samples (default: RUNS, else 1200)")
    ap.add_argument("--results", default="results.json", help="file under results/ to update")
    ap.add_argument("--table", nargs="*", help="print the table of these results/ files")
    args = ap.parse_args()
    runs_root = HERE / "runs" / ("quick" if args.quick else "full")
    out_dir = runs_root if args.quick else HERE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.table is not None:
        merged: dict[str, Any] = {}
        for f in args.table or ["results.json"]:
            merged.update(json.loads((out_dir / f).read_text()))
        print(report(merged), end="")
        return
    path = out_dir / args.results
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    torch.set_num_threads(2)
    for name, spec in RUNS.items():
        if args.only and name not in args.only:
            continue
        cfg = config_for(name, spec, runs_root, args.quick, args.n_samples)
        got: dict[str, EvalResult] = {}
        t0 = time.perf_counter()
        run_dir = train(cfg, progress=False, on_eval=lambda r, g=got: g.__setitem__("r", r))
        wall = time.perf_counter() - t0
        ev = got["r"]
        model = SAETransformer.from_local_path(run_dir, device="cpu")
        results[name] = {
            "n_samples": cfg.n_samples,
            "train_wall_s": round(wall, 1),
            "ce_loss_increase": ev.metrics["ce_loss_increase"],
            "l0": ev.per_sae[POS]["l0"],
            "alive": ev.per_sae[POS]["alive_dict_elements"],
            "explained_variance": ev.per_sae[POS].get("explained_variance"),
            "bands": bands(ev.feature_frequency(POS)),
            "prefixes": prefix_metrics(model, cfg, 2 if args.quick else 4),
        }
        print(name, json.dumps(results[name]), flush=True)
        path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
