"""Does the e2e advantage grow with training? Local, e2e and e2e+ds SAEs on `shakespeare-lm` at
four token budgets spanning 32x (Braun et al. 2024 report, on GPT-2 small at ~410M tokens: at equal
L0 e2e SAEs increase the CE loss by < 0.45x of a local SAE's; local SAEs need 2.2-2.6x the L0).

Exact command (repository root; about 70 min on an idle 2-core CPU):

    .venv/bin/python experiments/budget/run.py --parallel 2

The runs are the Pareto experiment's (experiments/pareto/configs: one SAE with 1024 latents at
blocks.2.hook_resid_pre, 4 local / 3 e2e / 3 e2e+ds sparsity coefficients, batch 8 windows of 128
tokens, lr 3e-3, cosine decay to 10%) at n_samples = 366 / 1171 / 3660 / 11714 windows (47k / 150k
/ 468k / 1.5M tokens; 11714 windows is one pass over the training split, so no window is seen
twice). Every budget is trained from scratch: the cosine schedule depends on the run's length, so
a shorter run is not a prefix of a longer one and resuming it would not give the longer budget's
run. The warmup is 10% of each budget. At the largest budget every configuration is also trained
with seed 1 (the error bars).

Writes into results/: budget.md (per-budget matched-L0 / matched-CE tables, the seed spread, the
command and wall time), ratios.png/.svg (the ratios per budget, with the paper's values as
reference lines), pareto_by_budget.png/.svg and results.json. Run directories go to runs/
(gitignored); finished runs are skipped when the script is started again (e.g. to redraw).

`--quick` runs the same pipeline on a random-weight model of the same shape with a few samples,
into a scratch folder, to check the script in a minute or two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from e2e_sae.analysis.matched import (
    PAPER_CE_RATIO_AT_L0,
    PAPER_L0_RATIO_AT_CE,
    matched_tables,
    md_table,
    points,
    ratios,
)
from e2e_sae.analysis.plots import (
    TYPE_COLORS,
    TYPE_ORDER,
    RunInfo,
    figure_grid,
    load_runs,
    save_figure,
    train_minutes,
)
from e2e_sae.training.sweep import Sweep, SweepRun, load_sweep, run_sweep

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "pareto" / "configs"
SWEEPS = {"local": "local.yaml", "e2e": "e2e.yaml", "e2e+ds": "e2e_ds.yaml"}
POSITION = "blocks.2.hook_resid_pre"
TRAIN_WINDOWS = 11714  # windows of 128 tokens in the Shakespeare train split
BUDGETS = [366, 1171, 3660, TRAIN_WINDOWS]  # n_samples: 47k ... 1.5M tokens (32x)
WARMUP_FRACTION = 0.1
SEEDS_AT_LARGEST = (0, 1)
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
    "batch_size": 4,
    "eval_n_samples": 8,
}
QUICK_BUDGETS = [8, 16, 32, 64]


def plan(runs_root: Path, budgets: list[int], overrides: dict[str, Any]) -> Sweep:
    """Every run of the study as one sweep, longest first (so that parallel workers finish
    together)."""
    runs: list[SweepRun] = []
    for n in budgets:
        seeds = SEEDS_AT_LARGEST if n == budgets[-1] else (0,)
        for seed in seeds:
            for kind, file in SWEEPS.items():
                stem = file.removesuffix(".yaml")
                extra = {
                    **overrides,
                    "n_samples": n,
                    "seed": seed,
                    "warmup_samples": int(n * WARMUP_FRACTION),
                }
                sweep = load_sweep(
                    CONFIGS / file, out_dir=runs_root / f"n{n}" / f"{stem}_s{seed}", overrides=extra
                )
                runs += [
                    dataclasses.replace(
                        r, overrides={**r.overrides, "n_samples": n, "seed": seed, "type": kind}
                    )
                    for r in sweep.runs
                ]
    cost = {"local": 1.0, "e2e": 6.0, "e2e+ds": 6.5}  # relative time per token (measured)
    runs.sort(key=lambda r: -r.config.n_samples * cost[str(r.overrides["type"])])  # type: ignore[operator]
    runs = [dataclasses.replace(r, index=i) for i, r in enumerate(runs)]
    return Sweep("budget", runs_root, {}, {}, runs)


# --- results --------------------------------------------------------------------------------------
def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}g}"


def _gmean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else math.nan


def budget_summary(runs: list[RunInfo], seed: int) -> dict[str, Any]:
    """Matched tables of one budget and seed, and the geometric mean / range of each ratio."""
    matched = matched_tables(runs, POSITION, seed=seed)
    out: dict[str, Any] = {"matched": matched}
    for kind in ("e2e", "e2e+ds"):
        if kind in matched["types"] and "local" in matched["types"]:
            r = ratios(matched, kind)
            out[kind] = {
                name: {
                    "values": v,
                    "gmean": _gmean(v),
                    "min": min(v, default=math.nan),
                    "max": max(v, default=math.nan),
                }
                for name, v in r.items()
            }
    return out


def _run_row(r: RunInfo) -> list[str]:
    s = r.sae(POSITION)
    down = r.eval.get("downstream", {})
    last = (
        down[max(down, key=lambda h: down[h]["layer"])]["explained_variance"] if down else math.nan
    )
    return [
        r.sae_type,
        str(r.config.seed),
        _f(r.sparsity_coeff),
        _f(s["l0"]),
        str(int(s["alive_dict_elements"])),
        _f(r.eval["ce_loss_increase"]),
        _f(r.eval["kl"]),
        _f(s["explained_variance"]),
        _f(last),
        _f(train_minutes(r.run_dir), 2),
    ]


def plot_ratios(summary: dict[str, Any], budgets: list[int], out_dir: Path) -> list[Path]:
    fig, axes = figure_grid(2, 5.5, 4.2)
    tokens = [n * 128 for n in budgets]
    panels = [
        ("ce_at_l0", "CE-loss increase / local's, at equal L0", PAPER_CE_RATIO_AT_L0),
        ("l0_at_ce", "local's L0 / L0, at equal CE-loss increase", PAPER_L0_RATIO_AT_CE),
    ]
    for ax, (key, title, paper) in zip(axes, panels, strict=True):
        for kind in ("e2e", "e2e+ds"):
            ys, lo, hi, xs = [], [], [], []
            for n, t in zip(budgets, tokens, strict=True):
                rec = summary[str(n)]["seeds"]["0"].get(kind)
                if rec and rec[key]["gmean"] == rec[key]["gmean"]:
                    xs.append(t)
                    ys.append(rec[key]["gmean"])
                    lo.append(rec[key]["gmean"] - rec[key]["min"])
                    hi.append(rec[key]["max"] - rec[key]["gmean"])
            ax.errorbar(
                xs,
                ys,
                yerr=[lo, hi],
                marker="o",
                capsize=3,
                color=TYPE_COLORS[kind],
                label=f"{kind} (seed 0; bars: range over the matched points)",
            )
            other = summary[str(budgets[-1])]["seeds"].get("1", {}).get(kind)
            if other and other[key]["gmean"] == other[key]["gmean"]:
                ax.plot(
                    [tokens[-1] * 1.08],
                    [other[key]["gmean"]],
                    marker="s",
                    linestyle="none",
                    color=TYPE_COLORS[kind],
                    label=f"{kind} seed 1",
                )
        if isinstance(paper, tuple):
            ax.axhspan(*paper, color="grey", alpha=0.25, label="paper (GPT-2, 410M tokens)")
        else:
            ax.axhline(paper, color="grey", linestyle="--", label="paper bound (GPT-2)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlim(tokens[0] / 1.5, tokens[-1] * 1.5)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir, "ratios")


def plot_fronts(runs: list[RunInfo], budgets: list[int], out_dir: Path) -> list[Path]:
    fig, axes = figure_grid(len(budgets), 4.0, 3.8)
    for ax, n in zip(axes, budgets, strict=True):
        for kind in TYPE_ORDER:
            for seed, marker in ((0, "o"), (1, "s")):
                at = [r for r in runs if r.config.n_samples == n]
                l0, ce, _ = points(at, kind, POSITION, seed)
                if not l0:
                    continue
                order = sorted(range(len(l0)), key=lambda i: l0[i])
                ax.plot(
                    [l0[i] for i in order],
                    [ce[i] for i in order],
                    marker=marker,
                    color=TYPE_COLORS[kind],
                    alpha=1.0 if seed == 0 else 0.5,
                    linestyle="-" if seed == 0 else ":",
                    label=f"{kind}" + (" seed 1" if seed else ""),
                )
        ax.set_xscale("log")
        if all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):  # type: ignore[union-attr]
            ax.set_yscale("log")
        ax.set_title(f"{n * 128 / 1e3:,.0f}k tokens ({n} windows)", fontsize=10)
        ax.set_xlabel("L0")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("CE-loss increase (nats)")
    axes[-1].legend(fontsize=7)
    return save_figure(fig, out_dir, "pareto_by_budget")


def plot_by_coefficient(runs: list[RunInfo], budgets: list[int], out_dir: Path) -> list[Path]:
    """L0 and CE-loss increase of each (type, sparsity coefficient) against the token budget."""
    fig, axes = figure_grid(2, 5.5, 4.2)
    seed0 = [r for r in runs if r.config.seed == 0]
    for kind in TYPE_ORDER:
        coeffs = sorted({c for r in seed0 if r.sae_type == kind and (c := r.sparsity_coeff)})
        for j, c in enumerate(coeffs):
            rs = sorted(
                (r for r in seed0 if r.sae_type == kind and r.sparsity_coeff == c),
                key=lambda r: r.config.n_samples or 0,
            )
            xs = [(r.config.n_samples or 0) * 128 for r in rs]
            color, alpha = TYPE_COLORS[kind], 0.45 + 0.55 * (j + 1) / len(coeffs)
            axes[0].plot(
                xs,
                [r.sae(POSITION)["l0"] for r in rs],
                label=f"{kind} λ={c:g}",
                color=color,
                marker="o",
                alpha=alpha,
            )
            axes[1].plot(
                xs, [r.eval["ce_loss_increase"] for r in rs], color=color, marker="o", alpha=alpha
            )
    for ax, label in zip(axes, ("L0", "CE-loss increase (nats)"), strict=True):
        ax.set_xscale("log")
        if all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):  # type: ignore[union-attr]
            ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Each sparsity coefficient across budgets (seed 0)", fontsize=10)
    return save_figure(fig, out_dir, "by_coefficient")


def write_results(sweep: Sweep, root: Path, budgets: list[int], argv: list[str]) -> None:
    runs = load_runs([r.run_dir for r in sweep.runs])
    results = root / "results"
    summary: dict[str, Any] = {}
    for n in budgets:
        at = [r for r in runs if r.config.n_samples == n]
        seeds = sorted({r.config.seed for r in at})
        summary[str(n)] = {
            "tokens": n * 128,
            "seeds": {str(s): budget_summary(at, s) for s in seeds},
        }
    plots = (
        plot_ratios(summary, budgets, results)
        + plot_fronts(runs, budgets, results)
        + plot_by_coefficient(runs, budgets, results)
    )
    timing_file = results / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    clean = runs[0].eval["ce_loss_clean"]
    wall = timing.get("wall_s", math.nan) / 60
    lines = [
        "# Budget study: local vs e2e vs e2e+ds SAEs on shakespeare-lm at 4 token budgets",
        "",
        f"Command: `.venv/bin/python experiments/budget/run.py {' '.join(argv)}`",
        "",
        f"Wall time {wall:.1f} min for all {len(runs)} runs ({timing.get('parallel', '?')} at a "
        f"time, {os.cpu_count()} CPU cores, finished {timing.get('finished', '?')}; 15-min load "
        f"average at the end {timing.get('load_average_15min', math.nan):.1f}). Clean CE loss "
        f"{clean:.3f} nats; eval on {int(runs[0].eval['n_tokens'])} validation tokens.",
        "",
        "## The two ratios per budget (seed 0; geometric mean over the matched points, [min, max])",
        "",
    ]
    rows = []
    for n in budgets:
        for seed, rec in summary[str(n)]["seeds"].items():
            row = [f"{n * 128:,}", seed]
            for kind in ("e2e", "e2e+ds"):
                for key in ("ce_at_l0", "l0_at_ce"):
                    r = rec.get(kind, {}).get(key)
                    row.append(
                        f"{_f(r['gmean'], 2)} [{_f(r['min'], 2)}, {_f(r['max'], 2)}]"
                        if r and r["values"]
                        else "n/a"
                    )
            rows.append(row)
    lines.append(
        md_table(
            [
                "tokens",
                "seed",
                "e2e / local CE at equal L0",
                "local / e2e L0 at equal CE",
                "e2e+ds / local CE at equal L0",
                "local / e2e+ds L0 at equal CE",
            ],
            rows,
        )
    )
    lines += [
        "",
        f"Paper (GPT-2 small, ~410M tokens): CE ratio < {PAPER_CE_RATIO_AT_L0}, "
        f"L0 ratio {PAPER_L0_RATIO_AT_CE[0]}-{PAPER_L0_RATIO_AT_CE[1]}.",
        "",
    ]
    for n in budgets:
        lines += [f"## {n * 128:,} tokens ({n} windows)", ""]
        at = [r for r in runs if r.config.n_samples == n]
        for seed, rec in summary[str(n)]["seeds"].items():
            m = rec["matched"]
            kinds = m["types"]
            if m["same_l0"]:
                lines += [f"Same L0, CE-loss increase (seed {seed}):", ""]
                lines.append(
                    md_table(
                        ["L0", *kinds, "e2e / local", "e2e+ds / local"],
                        [
                            [
                                _f(row["l0"]),
                                *(_f(row[k]) for k in kinds),
                                *(_f(row[k] / row["local"], 2) for k in ("e2e", "e2e+ds")),
                            ]
                            for row in m["same_l0"]
                        ],
                    )
                )
                lines.append("")
            if m["same_ce"]:
                lines += [f"Same CE-loss increase, L0 (alive latents) (seed {seed}):", ""]
                lines.append(
                    md_table(
                        ["CE increase", *kinds, "local / e2e", "local / e2e+ds"],
                        [
                            [
                                _f(row["ce_loss_increase"]),
                                *(f"{_f(row[k])} ({_f(row[f'{k}_alive'], 4)})" for k in kinds),
                                *(_f(row["local"] / row[k], 2) for k in ("e2e", "e2e+ds")),
                            ]
                            for row in m["same_ce"]
                        ],
                    )
                )
                lines.append("")
        lines += ["Runs:", ""]
        ordered = sorted(
            at, key=lambda r: (TYPE_ORDER.index(r.sae_type), r.config.seed, r.sae(POSITION)["l0"])
        )
        lines.append(
            md_table(
                [
                    "type",
                    "seed",
                    "sparsity coeff",
                    "L0",
                    "alive",
                    "CE increase",
                    "KL",
                    "EV",
                    "EV last layer",
                    "train+eval min",
                ],
                [_run_row(r) for r in ordered],
            )
        )
        lines.append("")
    lines += ["Plots: " + ", ".join(f"`{p.name}`" for p in plots if p.suffix == ".png"), ""]
    (results / "budget.md").write_text("\n".join(lines))
    out = {
        "budgets": budgets,
        "summary": summary,
        "timing": timing,
        "runs": [
            {
                "run": str(r.run_dir.relative_to(root)),
                "type": r.sae_type,
                "seed": r.config.seed,
                "n_samples": r.config.n_samples,
                "sparsity_coeff": r.sparsity_coeff,
                "train_minutes": train_minutes(r.run_dir),
                "eval": r.eval,
            }
            for r in runs
        ],
    }
    (results / "results.json").write_text(json.dumps(out, indent=2, default=str))
    print((results / "budget.md").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="random tiny-budget check of the script")
    p.add_argument(
        "--out-root",
        type=Path,
        default=None,
        help="folder for runs/ and results/ (default: here; --quick: /tmp)",
    )
    p.add_argument("--parallel", type=int, default=1, help="runs trained at a time")
    p.add_argument("--train-only", action="store_true", help="train, do not write results")
    args = p.parse_args(argv)
    root = args.out_root or (Path("/tmp/e2e_sae_budget_quick") if args.quick else HERE)
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    sweep = plan(root / "runs", budgets, dict(QUICK) if args.quick else {})
    n = len(sweep.runs)
    t0 = time.perf_counter()
    print(f"{n} runs, {args.parallel} at a time", flush=True)
    done = 0

    def report(run: SweepRun, rec: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        err = f" {rec.get('error')}" if rec.get("error") else ""
        print(
            f"[{done}/{n}] {time.perf_counter() - t0:7.0f}s "
            f"{run.run_dir.relative_to(root)}: {rec['status']}{err}",
            flush=True,
        )

    records = run_sweep(sweep, parallel=args.parallel, progress=False, on_done=report)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        print(f"failed: {failed[0]['run_dir']}: {failed[0]['error']}", file=sys.stderr)
        return 1
    trained = sum(r["status"] == "ok" for r in records)
    results = root / "results"
    results.mkdir(parents=True, exist_ok=True)
    timing_file = results / "timing.json"
    wall = time.perf_counter() - t0
    if trained == n:  # the wall time of the invocation that trained every run
        timing_file.write_text(
            json.dumps(
                {
                    "wall_s": wall,
                    "parallel": args.parallel,
                    "load_average_15min": os.getloadavg()[2],
                    "finished": time.strftime("%Y-%m-%d %H:%M"),
                },
                indent=2,
            )
        )
    if args.train_only:
        return 0
    write_results(sweep, root, budgets, argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
