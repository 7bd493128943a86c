"""The paper-scale comparison on one GPU: local, e2e and e2e+ds SAEs with the paper's ratio-60
dictionaries on SmolLM2-135M(-Instruct), 3 sparsity levels per type, ~100M training tokens each,
then the Pareto plots and the matched-L0 / matched-CE tables (Braun et al. 2024, Tables 2-3).

Exact command (repository root, a machine with one CUDA GPU):

    .venv/bin/python experiments/smollm2/paper_scale.py --device cuda

Phases (each skipped when an earlier invocation finished it):
1. Calibration: per type, two short runs (`--calib-tokens`, default 2M tokens) at two sparsity
   coefficients; the coefficients for the target L0s (20, 40, 80) are interpolated in log-log
   space (`run.log_interp`), so nothing has to be guessed for a new model or layer.
2. The 9 full runs (`--tokens`, default 100M tokens each), one after another, bf16 autocast.
3. Evaluation on the validation split, then results/paper_scale/: paper_scale.md (per-run table,
   matched tables with the paper's values, commands and wall times), results.json and the plots of
   `e2e-sae plot` (Pareto, alive latents, density, downstream reconstruction, geometry).

Settings follow the paper where SmolLM2 allows: SAE at `blocks.15.hook_resid_pre` (the middle of
30 layers), 60 x 576 = 34,560 latents, context 1024, batch 8 with effective batch 16, Adam lr 5e-4,
warmup 5% of the run, cosine to 10%, gradient clipping 10 (all types); e2e+ds: KL
0.5 + MSE at every later block's resid_post (total 1.0). Data: `--dataset` (default the built-in
Shakespeare corpus, ~1.6M SmolLM2 tokens, so 100M tokens repeat it ~60 times; point it at a local
folder of text / a saved dataset, or a hub name when online, for a real corpus).

`--tiny` runs every phase on CPU with a few windows of 64 tokens (minutes) to check the script.
No number in this file has been measured on a GPU yet (no GPU was available when it was written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import log_interp  # noqa: E402  (the calibration helper of the CPU study next to this file)

from e2e_sae.analysis.geometry import plot_geometry  # noqa: E402
from e2e_sae.analysis.matched import (  # noqa: E402
    PAPER_CE_RATIO_AT_L0,
    PAPER_L0_RATIO_AT_CE,
    matched_tables,
    md_table,
)
from e2e_sae.analysis.plots import TYPE_ORDER, RunInfo, load_runs, make_plots  # noqa: E402
from e2e_sae.config import Config, load_config  # noqa: E402
from e2e_sae.training.sweep import Sweep, SweepRun, run_sweep  # noqa: E402

POSITION = "blocks.15.hook_resid_pre"
N_LAYERS = 30
TARGET_L0 = (20.0, 40.0, 80.0)
# Two calibration coefficients per type (they bracket L0 40 for ratio-16 SAEs in the CPU study's
# calibration; log-log interpolation/extrapolation takes it from there).
CALIB_COEFFS = {"local": (0.5, 4.0), "e2e": (0.5, 4.0), "e2e+ds": (1.0, 8.0)}


def losses(kind: str, coeff: float, n_layers: int, layer: int) -> dict[str, Any]:
    sparsity = {"coeff": coeff}
    if kind == "local":
        return {"sparsity": sparsity, "out_to_in": {"coeff": 1.0}}
    if kind == "e2e":
        return {"sparsity": sparsity, "logits_kl": {"coeff": 1.0}, "out_to_in": {"coeff": 0.0}}
    later = [f"blocks.{i}.hook_resid_post" for i in range(layer, n_layers)]
    return {
        "sparsity": sparsity,
        "logits_kl": {"coeff": 0.5},
        "out_to_in": {"coeff": 0.0},
        "in_to_orig": {"hook_positions": later, "total_coeff": 1.0},
    }


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    data = {
        "dataset_name": args.dataset,
        "is_tokenized": False,
        "streaming": False,
        "tokenizer_name": "smollm2-135m",
        "n_ctx": args.n_ctx,
    }
    cfg: dict[str, Any] = {
        "tlens_model_name": "smollm2-135m",
        "seed": 0,
        "batch_size": args.batch_size,
        "effective_batch_size": 2 * args.batch_size,
        "lr": 5e-4,
        "lr_schedule": "cosine",
        "min_lr_factor": 0.1,
        "max_grad_norm": 10.0,
        "log_every_n_grad_steps": 50,
        "eval_n_samples": args.eval_windows,
        "device": args.device,
        "precision": args.precision,
        "train_data": {**data, "split": "train"},
        "eval_data": {**data, "split": "validation"},
        "saes": {"sae_positions": [args.position], "dict_size_to_input_ratio": args.ratio},
    }
    if args.tiny:  # a random-weight model of SmolLM2's family would need the hub: keep smollm2
        cfg.update(effective_batch_size=None, log_every_n_grad_steps=1)
    return cfg


def run_config(args: argparse.Namespace, kind: str, coeff: float, tokens: float) -> Config:
    n = max(int(tokens // args.n_ctx), 2 * args.batch_size)
    layer = int(args.position.split(".")[1])
    cfg = {
        **base_config(args),
        "loss": losses(kind, coeff, args.n_layers, layer),
        "n_samples": n,
        "warmup_samples": n // 20,
        "run_name": f"{kind}_c{coeff:g}",
    }
    config = load_config(cfg)
    assert isinstance(config, Config)
    return config


def train_all(configs: list[tuple[str, Config, Path]], device: str | None) -> None:
    runs = [SweepRun(i, {"type": k}, c, d) for i, (k, c, d) in enumerate(configs)]
    sweep = Sweep("paper_scale", configs[0][2].parent, {}, {}, runs)
    t0 = time.perf_counter()

    def report(run: SweepRun, rec: dict[str, Any]) -> None:
        print(
            f"{time.perf_counter() - t0:8.0f}s {run.run_dir.name}: {rec['status']} "
            f"{rec.get('error', '')}",
            flush=True,
        )

    records = run_sweep(sweep, parallel=1, device=device, progress=True, on_done=report)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        raise SystemExit(f"failed: {failed[0]['run_dir']}: {failed[0]['error']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default: cuda when available)")
    p.add_argument("--tokens", type=float, default=100e6, help="training tokens per final run")
    p.add_argument("--calib-tokens", type=float, default=2e6, help="per calibration run")
    p.add_argument("--dataset", default="shakespeare", help="train_data.dataset_name")
    p.add_argument("--ratio", type=float, default=60.0, help="dict_size_to_input_ratio")
    p.add_argument("--position", default=POSITION)
    p.add_argument("--n-layers", type=int, default=N_LAYERS)
    p.add_argument("--n-ctx", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=500)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--out-root", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="a CPU check: a few 64-token windows")
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens, args.calib_tokens, args.n_ctx, args.batch_size = 512, 256, 64, 2
        args.eval_windows, args.ratio, args.precision = 2, 2.0, "fp32"
        args.device = args.device or "cpu"
    root = args.out_root or (Path("/tmp/e2e_sae_paper_scale_tiny") if args.tiny else HERE)
    runs_dir = root / "runs" / "paper_scale"
    t0 = time.perf_counter()

    # 1. calibration
    calib = [
        (k, run_config(args, k, c, args.calib_tokens), runs_dir / "calib" / f"{k}_c{c:g}")
        for k in TYPE_ORDER
        for c in CALIB_COEFFS[k]
    ]
    train_all(calib, args.device)
    t_calib = time.perf_counter() - t0
    cal_runs = load_runs([d for _, _, d in calib])
    chosen: dict[str, list[float]] = {}
    for kind in TYPE_ORDER:
        rs = [r for r in cal_runs if r.sae_type == kind]
        xs = [r.config.loss.sparsity.coeff for r in rs if r.config.loss.sparsity]
        ys = [max(r.sae(args.position)["l0"], 1e-3) for r in rs]
        chosen[kind] = sorted({float(f"{log_interp(xs, ys, t):.3g}") for t in TARGET_L0})

    # 2. the final runs
    final = [
        (k, run_config(args, k, c, args.tokens), runs_dir / "final" / f"{k}_c{c:g}")
        for k in TYPE_ORDER
        for c in chosen[k]
    ]
    train_all(final, args.device)
    wall = time.perf_counter() - t0

    # 3. results
    runs = load_runs([d for _, _, d in final])
    out = root / "results" / "paper_scale"
    plots = make_plots(runs, out) + plot_geometry(runs, out)
    matched = matched_tables(runs, args.position)
    write_report(args, runs, cal_runs, chosen, matched, plots, out, t_calib, wall, argv)
    return 0


def write_report(
    args: argparse.Namespace,
    runs: list[RunInfo],
    cal_runs: list[RunInfo],
    chosen: dict[str, list[float]],
    matched: dict[str, Any],
    plots: list[Path],
    out: Path,
    t_calib: float,
    wall: float,
    argv: list[str] | None,
) -> None:
    def f(v: float | None, d: int = 3) -> str:
        return "n/a" if v is None or v != v else f"{v:.{d}g}"

    def row(r: RunInfo) -> list[str]:
        s = r.sae(args.position)
        down = r.eval.get("downstream", {})
        last = max(down, key=lambda h: down[h]["layer"]) if down else None
        return [
            r.sae_type,
            f(r.sparsity_coeff),
            f(s["l0"]),
            str(int(s["alive_dict_elements"])),
            f(r.eval["ce_loss_increase"]),
            f(r.eval["kl"]),
            f(s["explained_variance"]),
            f(down[last]["explained_variance"] if last else float("nan")),
        ]

    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    kinds = matched["types"]
    lines = [
        "# Paper-scale local vs e2e vs e2e+ds SAEs on SmolLM2-135M-Instruct",
        "",
        f"Command: `.venv/bin/python experiments/smollm2/paper_scale.py {cmd}`",
        "",
        f"Wall time {wall / 60:.1f} min (calibration {t_calib / 60:.1f} min) on "
        f"{args.device or 'auto'}; {args.tokens:,.0f} tokens per run, windows of {args.n_ctx}, "
        f"{int(args.ratio * 576)} latents at `{args.position}`, data `{args.dataset}`, "
        f"{args.precision}. {os.cpu_count()} CPU cores.",
        "",
        "## Runs",
        "",
        md_table(
            [
                "type",
                "sparsity coeff",
                "L0",
                "alive",
                "CE increase",
                "KL",
                "EV at SAE",
                "EV last layer",
            ],
            [row(r) for r in runs],
        ),
        "",
        "## Same L0: CE-loss increase",
        "",
        md_table(
            ["L0", *kinds, *(f"{k} / local" for k in kinds if k != "local")],
            [
                [
                    f(m["l0"]),
                    *(f(m[k]) for k in kinds),
                    *(f(m[k] / m["local"], 2) for k in kinds if k != "local"),
                ]
                for m in matched["same_l0"]
            ],
        )
        if matched["same_l0"]
        else "No common L0 range.",
        "",
        f"Paper (GPT-2 small): e2e / local < {PAPER_CE_RATIO_AT_L0}.",
        "",
        "## Same CE-loss increase: L0",
        "",
        md_table(
            ["CE increase", *kinds, *(f"local / {k}" for k in kinds if k != "local")],
            [
                [
                    f(m["ce_loss_increase"]),
                    *(f(m[k]) for k in kinds),
                    *(f(m["local"] / m[k], 2) for k in kinds if k != "local"),
                ]
                for m in matched["same_ce"]
            ],
        )
        if matched["same_ce"]
        else "No common CE range.",
        "",
        f"Paper: local needs {PAPER_L0_RATIO_AT_CE[0]}-{PAPER_L0_RATIO_AT_CE[1]}x the L0.",
        "",
        "## Calibration",
        "",
        md_table(
            ["type", "sparsity coeff", "L0", "CE increase"],
            [
                [
                    r.sae_type,
                    f(r.sparsity_coeff),
                    f(r.sae(args.position)["l0"]),
                    f(r.eval["ce_loss_increase"]),
                ]
                for r in cal_runs
            ],
        ),
        "",
        "Chosen coefficients (target L0 "
        + ", ".join(f"{t:g}" for t in TARGET_L0)
        + "): "
        + "; ".join(f"{k} {', '.join(f'{c:g}' for c in cs)}" for k, cs in chosen.items()),
        "",
        "Plots: " + ", ".join(f"`{p.name}`" for p in plots if p.suffix == ".png"),
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_scale.md").write_text("\n".join(lines))
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "chosen": chosen,
                "matched": matched,
                "wall_s": wall,
                "calibration_s": t_calib,
                "runs": [{"run": r.name, "type": r.sae_type, "eval": r.eval} for r in runs],
            },
            indent=2,
            default=str,
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
