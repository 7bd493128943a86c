"""Local vs e2e vs e2e+ds SAEs on the built-in `shakespeare-lm`: Pareto plots and the paper's
matched-L0 / matched-CE comparisons (Braun et al. 2024, Tables 2-3).

Exact command (repository root; 6 min on an idle 2-core CPU, 22 min on a busy one):

    .venv/bin/python experiments/pareto/run.py

It trains the three sweeps in configs/ (one SAE at blocks.2.hook_resid_pre; 3-4 sparsity
coefficients per type, plus a second seed of one local and one e2e run for the cross-seed geometry),
evaluates each run on the validation split, and writes into results/: the plots of `e2e-sae plot`
(PNG + SVG), pareto.md (per-run table, matched-L0 and matched-CE tables) and results.json. Run
directories go to runs/ (gitignored); finished runs are skipped when the script is started again.

`--quick` runs the same pipeline on a random-weight model of the same shape with a few samples, into
a scratch folder, to check the script in a minute or two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from e2e_sae.analysis.geometry import plot_geometry
from e2e_sae.analysis.matched import matched_tables, md_table
from e2e_sae.analysis.plots import TYPE_ORDER, RunInfo, load_runs, make_plots, train_minutes
from e2e_sae.eval.report import table
from e2e_sae.training.sweep import Sweep, load_sweep, run_sweep

HERE = Path(__file__).resolve().parent
SWEEPS = {"local": "local.yaml", "e2e": "e2e.yaml", "e2e+ds": "e2e_ds.yaml"}
SEED_TYPES = ("local", "e2e")  # types that also get runs with other seeds (cross-seed geometry)
POSITION = "blocks.2.hook_resid_pre"
# The architecture of shakespeare-lm (experiments/small_lm/shakespeare_lm.yaml), random weights.
QUICK_MODEL = {
    "n_layers": 4,
    "d_model": 128,
    "n_heads": 4,
    "d_head": 32,
    "d_mlp": 512,
    "n_ctx": 128,
    "d_vocab": 4096,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "seed": 0,
}
QUICK = {
    "tlens_model_name": None,
    "tlens_config": QUICK_MODEL,
    "n_samples": 32,
    "batch_size": 8,
    "warmup_samples": 0,
    "eval_n_samples": 8,
}


def build_sweeps(runs_root: Path, overrides: dict[str, Any], seeds: int) -> list[Sweep]:
    sweeps = []
    for kind, file in SWEEPS.items():
        sweep = load_sweep(
            HERE / "configs" / file,
            out_dir=runs_root / file.removesuffix(".yaml"),
            overrides=overrides,
        )
        for seed in range(1, seeds if kind in SEED_TYPES else 1):  # at a middle coefficient
            extra = load_sweep(
                HERE / "configs" / file,
                out_dir=runs_root / f"{file.removesuffix('.yaml')}_seed{seed}",
                overrides={**overrides, "seed": seed},
            )
            mid = extra.runs[(len(extra.runs) - 1) // 2]
            sweep.runs.append(dataclasses.replace(mid, index=len(sweep.runs)))
        sweeps.append(sweep)
    return sweeps


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}g}"


def markdown(
    runs: list[RunInfo], matched: dict[str, Any], wall_s: float, meta: dict[str, Any]
) -> str:
    clean = runs[0].eval["ce_loss_clean"]
    lines = [
        "# Local vs e2e vs e2e+ds SAEs on shakespeare-lm",
        "",
        f"Command: `.venv/bin/python experiments/pareto/run.py{meta['args']}` — wall time "
        f"{wall_s / 60:.1f} min on {meta['cpus']} CPU cores ({meta['device']}), shared with "
        f"other jobs (15-min load average {meta['timing']['load_average_15min']:.1f} at the "
        f"end, {meta['timing']['finished']}).",
        f"SAE at `{POSITION}`, {meta['d_sae']} latents, {meta['n_samples']} training windows of "
        f"{meta['n_ctx']} tokens; eval on {int(runs[0].eval['n_tokens'])} validation tokens. "
        f"Clean CE loss {clean:.3f} nats.",
        "",
        "## Runs",
        "",
    ]
    rows = []
    for r in sorted(
        runs, key=lambda r: (TYPE_ORDER.index(r.sae_type), r.config.seed, r.sae(POSITION)["l0"])
    ):
        s = r.sae(POSITION)
        down = r.eval.get("downstream", {})
        last = (
            down[max(down, key=lambda h: down[h]["layer"])]["explained_variance"]
            if down
            else math.nan
        )
        rows.append(
            [
                r.sae_type,
                str(r.config.seed),
                _f(r.sparsity_coeff),
                _f(s["l0"]),
                str(int(s["alive_dict_elements"])),
                _f(r.eval["ce_loss_increase"]),
                _f(r.eval["kl"]),
                _f(r.eval.get("ce_loss_score", math.nan)),
                _f(s["explained_variance"]),
                _f(s["explained_variance_ln"]),
                _f(last),
                _f(r.eval.get("train_minutes", math.nan), 2),
            ]
        )
    headers = [
        "type",
        "seed",
        "sparsity coeff",
        "L0",
        "alive",
        "CE increase",
        "KL",
        "CE recovered",
        "EV",
        "EV (LN)",
        "EV last layer",
        "train+eval min",
    ]
    lines.append(md_table(headers, rows))
    kinds = matched["types"]
    lines += ["", "## Same L0: CE-loss increase (interpolated on each type's Pareto front)", ""]
    if matched["same_l0"]:
        rows = []
        for row in matched["same_l0"]:
            r = [_f(row["l0"])] + [_f(row[k]) for k in kinds]
            r += [_f(row[k] / row["local"], 2) for k in kinds if k != "local" and "local" in row]
            rows.append(r)
        ratios = [f"{k} / local" for k in kinds if k != "local" and "local" in kinds]
        lines.append(md_table(["L0", *kinds, *ratios], rows))
    else:
        lines.append("The types' L0 ranges do not overlap.")
    lines += ["", "## Same CE-loss increase: L0 (alive elements), interpolated", ""]
    if matched["same_ce"]:
        rows = []
        for row in matched["same_ce"]:
            r = [_f(row["ce_loss_increase"])]
            r += [f"{_f(row[k])} ({row[f'{k}_alive']:.0f})" for k in kinds]
            r += [_f(row["local"] / row[k], 2) for k in kinds if k != "local" and "local" in row]
            rows.append(r)
        ratios = [f"local / {k} L0" for k in kinds if k != "local" and "local" in kinds]
        lines.append(md_table(["CE increase", *kinds, *ratios], rows))
    else:
        lines.append("The types' CE-increase ranges do not overlap.")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in meta["plots"] if p.endswith(".png")), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="random tiny-budget check of the script")
    p.add_argument(
        "--out-root",
        type=Path,
        default=None,
        help="folder for runs/ and results/ (default: here; --quick: /tmp)",
    )
    p.add_argument("--n-samples", type=int, default=None, help="training windows per run")
    p.add_argument("--seeds", type=int, default=2, help="seeds of a middle local / e2e run")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at a time")
    args = p.parse_args(argv)
    import os

    import torch

    root = args.out_root or (Path("/tmp/e2e_sae_pareto_quick") if args.quick else HERE)
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.n_samples:
        overrides["n_samples"] = args.n_samples
    t0 = time.perf_counter()
    sweeps = build_sweeps(root / "runs", overrides, args.seeds)
    n = sum(len(s.runs) for s in sweeps)
    print(f"{n} runs; {torch.get_num_threads()} torch threads", flush=True)
    done = trained = 0
    for sweep in sweeps:

        def report(run, rec) -> None:  # noqa: ANN001
            nonlocal done
            done += 1
            err = f" {rec.get('error')}" if rec.get("error") else ""
            print(
                f"[{done}/{n}] {time.perf_counter() - t0:7.0f}s {run.run_dir.name}: "
                f"{rec['status']}{err}",
                flush=True,
            )

        records = run_sweep(sweep, parallel=args.parallel, progress=False, on_done=report)
        done += sum(r["status"] == "skipped" for r in records)
        trained += sum(r["status"] == "ok" for r in records)
        failed = [r for r in records if r["status"] == "failed"]
        if failed:
            print(f"failed: {failed[0]['run_dir']}: {failed[0]['error']}", file=sys.stderr)
            return 1
    runs = load_runs([r.run_dir for s in sweeps for r in s.runs])
    for r in runs:
        r.eval["train_minutes"] = train_minutes(r.run_dir)
    results = root / "results"
    files = make_plots(runs, results) + plot_geometry(runs, results)
    plots = [str(p.relative_to(root)) for p in files]
    matched = matched_tables(runs, POSITION)
    wall = time.perf_counter() - t0
    # The wall time of an invocation that trained every run; a later one that reuses the runs
    # (e.g. to redraw the plots) reports that measurement.
    timing_file = results / "timing.json"
    if trained == n:
        timing = {
            "wall_s": wall,
            "load_average_15min": os.getloadavg()[2],
            "finished": time.strftime("%Y-%m-%d %H:%M"),
        }
        timing_file.write_text(json.dumps(timing, indent=2))
    elif timing_file.exists():
        timing = json.loads(timing_file.read_text())
    else:
        timing = {"wall_s": math.nan, "load_average_15min": math.nan, "finished": "?"}
    cfg = runs[0].config
    meta = {
        "args": (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "cpus": os.cpu_count(),
        "device": str(runs[0].config.device or "cpu"),
        "d_sae": int(cfg.saes.dict_size_to_input_ratio * 128),
        "n_samples": cfg.n_samples,
        "n_ctx": cfg.train_data.n_ctx,
        "plots": plots,
        "timing": timing,
    }
    (results / "pareto.md").write_text(markdown(runs, matched, timing["wall_s"], meta))
    summary = {
        "meta": meta,
        "matched": matched,
        "runs": [
            {
                "run": r.name,
                "type": r.sae_type,
                "seed": r.config.seed,
                "sparsity_coeff": r.sparsity_coeff,
                "eval": r.eval,
            }
            for r in runs
        ],
    }
    (results / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    headers = ["type", "seed", "L0", "alive", "CE increase", "KL"]
    rows = [
        [
            r.sae_type,
            r.config.seed,
            r.sae(POSITION)["l0"],
            r.sae(POSITION)["alive_dict_elements"],
            r.eval["ce_loss_increase"],
            r.eval["kl"],
        ]
        for r in runs
    ]
    print(table(headers, rows))
    print(f"\nwrote {results / 'pareto.md'} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
