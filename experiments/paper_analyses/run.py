"""e2e vs local vs e2e+ds SAEs on the built-in `shakespeare-lm` through the paper's analyses
(Braun et al. 2024): dictionary geometry (within, across types, across seeds, UMAP), activation
analysis (output norms and cosines per position, principal directions, resample ablation), and the
Pareto / downstream plots, all from `e2e_sae.analysis.paper.paper_figures`.

Exact command (repository root):

    .venv/bin/python experiments/paper_analyses/run.py

It trains five SAEs at `blocks.2.hook_resid_pre` (1024 latents, 150 steps of 8 x 128 tokens, the
settings of experiments/pareto/): local and e2e with seeds 0 and 1, e2e+ds with seed 2, at
sparsity coefficients chosen from experiments/pareto/ to land near L0 20 (local 6, e2e 1, e2e+ds
9). Different seeds matter: two SAEs with the same seed start from the same dictionary, so the
cross-type comparisons use pairs of different seeds. Then it evaluates each run on 16k validation
tokens, runs the activation analysis on the first 2,048 of them (16 principal directions; one
forward pass per direction, run and batch) and writes every figure and table with an index into
results/ (PNG + SVG, Markdown,
JSON; no weights), and results.md with the numbers the finding rests on. Run directories go to
runs/ (gitignored); finished runs are skipped when the script is started again.

`--quick` runs the pipeline on a random-weight model of the same shape with a few samples into a
scratch folder (a minute or two), to check the script.

Automated interpretability (issue 23, item 1) is not part of this run yet: its section goes where
results.md says "Autointerp".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from e2e_sae.analysis.paper import paper_figures
from e2e_sae.config import Config, load_config
from e2e_sae.eval.evaluate import EVAL_JSON, evaluate_run, write_eval
from e2e_sae.training.trainer import train

HERE = Path(__file__).resolve().parent
POSITION = "blocks.2.hook_resid_pre"
BASE = HERE.parent / "pareto" / "configs" / "base.yaml"
LOSSES: dict[str, dict[str, Any]] = {
    "local": {"sparsity": {"coeff": 6.0}, "out_to_in": {"coeff": 1.0}},
    "e2e": {"sparsity": {"coeff": 1.0}, "logits_kl": {"coeff": 1.0}, "out_to_in": {"coeff": 0.0}},
    "e2e_ds": {
        "sparsity": {"coeff": 9.0},
        "logits_kl": {"coeff": 0.5},
        "in_to_orig": {
            "hook_positions": ["blocks.3.hook_resid_pre", "blocks.3.hook_resid_post"],
            "total_coeff": 1.0,
        },
        "out_to_in": {"coeff": 0.0},
    },
}
# (loss, seed): two seeds of local and e2e (cross-seed geometry; cross-type pairs of different
# seeds), one e2e+ds run with a third seed (different from both).
RUNS = (("local", 0), ("local", 1), ("e2e", 0), ("e2e", 1), ("e2e_ds", 2))
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


def configs(quick: bool) -> dict[str, Config]:
    from e2e_sae.config import read_yaml

    base = read_yaml(BASE)
    assert isinstance(base, dict)
    out = {}
    for kind, seed in RUNS:
        raw = {**base, "loss": LOSSES[kind], "seed": seed, **(QUICK if quick else {})}
        raw["run_name"] = f"{kind}_s{seed}"
        cfg = load_config(raw)
        assert isinstance(cfg, Config)
        out[f"{kind}_s{seed}"] = cfg
    return out


def train_all(cfgs: dict[str, Config], runs_root: Path, device: str | None) -> dict[str, float]:
    """Train (or reuse) each run into runs_root/<name>; returns minutes per newly trained run."""
    minutes: dict[str, float] = {}
    for name, cfg in cfgs.items():
        run_dir = runs_root / name
        if (run_dir / EVAL_JSON).is_file():
            print(f"{name}: done before, reused", flush=True)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        train(cfg, run_dir, device=device, progress=False)
        write_eval(evaluate_run(run_dir, device=device), run_dir / EVAL_JSON)
        minutes[name] = (time.perf_counter() - t0) / 60
        print(f"{name}: trained and evaluated in {minutes[name]:.1f} min", flush=True)
    return minutes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="random-weight model, a few samples")
    p.add_argument("--out", type=Path, default=None, help="folder for runs/ and results/")
    p.add_argument("--device", default=None)
    p.add_argument("--n-tokens", type=int, default=2048, help="tokens of the activation analysis")
    p.add_argument(
        "--only",
        default=None,
        help="train only these runs (comma list, e.g. e2e_s1,e2e_ds_s2) and stop: to train in "
        "several processes, then run without --only for the figures",
    )
    args = p.parse_args(argv)
    root = args.out or (HERE / "quick" if args.quick else HERE)
    t0 = time.perf_counter()
    cfgs = configs(args.quick)
    if args.only is not None:
        names = args.only.split(",")
        unknown = [n for n in names if n not in cfgs]
        if unknown:
            p.error(f"--only: unknown run {unknown[0]} ({', '.join(cfgs)})")
        train_all({n: cfgs[n] for n in names}, root / "runs", args.device)
        return 0
    minutes = train_all(cfgs, root / "runs", args.device)
    t_train = time.perf_counter() - t0
    results = root / "results"
    shutil.rmtree(results, ignore_errors=True)
    paper_figures(
        [root / "runs" / n for n in cfgs],
        results,
        n_tokens=256 if args.quick else args.n_tokens,
        n_directions=4 if args.quick else 16,
        device=args.device,
        progress=True,
    )
    t_all = time.perf_counter() - t0
    timing = {"train_minutes": minutes, "train_wall_s": t_train, "total_wall_s": t_all}
    (results / "timing.json").write_text(json.dumps(timing, indent=2))
    print(f"\nwrote {results} in {t_all / 60:.1f} min (training {t_train / 60:.1f} min)")
    print(f"index: {results / 'index.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
