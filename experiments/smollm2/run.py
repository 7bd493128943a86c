"""A local and an e2e SAE on SmolLM2-135M-Instruct at one layer, at matched L0 (offline, CPU).

Exact command (repository root; about 35 min on an idle 2-core CPU):

    .venv/bin/python experiments/smollm2/run.py

The model is `smollm2-135m` (SmolLM2-135M-Instruct from its Q4_1 GGUF, dequantized to fp32), the
SAE (ReLU + L1, 16 x 576 = 9216 latents) reads `blocks.15.hook_resid_pre` (the middle of 30 layers),
the data is the built-in Shakespeare corpus in windows of 128 tokens (SmolLM2's tokenizer), batch 8,
Adam lr 1e-3 with 10% warmup and cosine decay to 10% (configs/smollm2_e2e.yaml, scaled down).

1. e2e calibration: two short e2e runs at sparsity coefficients 1 and 4; the coefficient for the
   target L0 (40) is interpolated in log-log space.
2. The e2e SAE at that coefficient (KL + L1), `--e2e-windows` windows.
3. The same windows' activations are cached once (`e2e-sae cache-acts`), and local SAEs (MSE + L1)
   train from the cache: a short calibration of 4 coefficients, then 3 full-length runs whose L0
   brackets the e2e SAE's (0.7x, 1x, 1.4x), all on the same batches as the e2e run.
4. Every SAE is evaluated on the validation split; the local CE-loss increase at the e2e SAE's L0
   is interpolated (linear in log L0) on the local runs.

Writes results/smollm2.md (tables, commands, wall times) and results/results.json; run
directories go to runs/ (gitignored). A finished phase is not redone when the script is started
again. `--quick` runs the pipeline on a random-weight model in a scratch folder (a minute or two).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from e2e_sae.analysis.matched import md_table
from e2e_sae.analysis.plots import interpolate_y_at_x
from e2e_sae.config import Config, load_config

HERE = Path(__file__).resolve().parent
POSITION = "blocks.15.hook_resid_pre"
TARGET_L0 = 40.0
E2E_CALIB_COEFFS = (1.0, 4.0)
LOCAL_CALIB_COEFFS = (0.3, 1.0, 3.0, 10.0)
L0_BRACKET = (0.7, 1.0, 1.4)
DATA = {
    "dataset_name": "shakespeare",
    "is_tokenized": False,
    "tokenizer_name": "smollm2-135m",
    "streaming": False,
    "n_ctx": 128,
}
BASE: dict[str, Any] = {
    "tlens_model_name": "smollm2-135m",
    "seed": 0,
    "batch_size": 8,
    "lr": 1e-3,
    "lr_schedule": "cosine",
    "min_lr_factor": 0.1,
    "max_grad_norm": 1.0,
    "log_every_n_grad_steps": 10,
    "act_frequency_n_tokens": 100_000,
    "train_data": {**DATA, "split": "train"},
    "eval_data": {**DATA, "split": "validation"},
    "saes": {"sae_positions": [POSITION], "dict_size_to_input_ratio": 16.0},
}
QUICK_MODEL = {
    "n_layers": 4,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "d_mlp": 256,
    "n_ctx": 128,
    "d_vocab": 4096,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "seed": 0,
}


def e2e_loss(coeff: float) -> dict[str, Any]:
    return {"sparsity": {"coeff": coeff}, "logits_kl": {"coeff": 1.0}, "out_to_in": {"coeff": 0.0}}


def local_loss(coeff: float) -> dict[str, Any]:
    return {"sparsity": {"coeff": coeff}, "out_to_in": {"coeff": 1.0}}


class Study:
    def __init__(self, root: Path, quick: bool, e2e_windows: int, eval_windows: int) -> None:
        self.root, self.quick = root, quick
        self.runs = root / "runs"
        self.e2e_windows, self.eval_windows = e2e_windows, eval_windows
        self.base = dict(BASE)
        if quick:
            self.base.update(
                tlens_model_name=None,
                tlens_config=QUICK_MODEL,
                saes={
                    "sae_positions": ["blocks.2.hook_resid_pre"],
                    "dict_size_to_input_ratio": 4.0,
                },
                train_data={**DATA, "split": "train", "tokenizer_name": "shakespeare-bpe"},
                eval_data={**DATA, "split": "validation", "tokenizer_name": "shakespeare-bpe"},
            )
        self.position = self.base["saes"]["sae_positions"][0]
        self.timings: dict[str, float] = {}

    def config(self, name: str, loss: dict[str, Any], n: int, n_eval: int | None) -> Config:
        cfg = {
            **self.base,
            "loss": loss,
            "n_samples": n,
            "warmup_samples": n // 10,
            "eval_n_samples": n_eval,
            "run_name": name,
            "save_dir": str(self.runs),
        }
        config = load_config(cfg)
        assert isinstance(config, Config)
        return config

    def phase(self, name: str, fn: Any) -> Any:
        """Run `fn` unless an earlier invocation stored its result; time it."""
        done = self.runs / f"{name}.json"
        if done.exists():
            return json.loads(done.read_text())
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        result = fn()
        result["wall_s"] = time.perf_counter() - t0
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(result, indent=2, default=float))
        return result

    def summary(self, run_dir: Path, ev: dict[str, Any], config: Config) -> dict[str, Any]:
        s = ev["per_sae"][self.position]
        down = ev.get("downstream", {})
        last = max(down, key=lambda h: down[h]["layer"]) if down else None
        sp = config.loss.sparsity
        return {
            "run_dir": str(run_dir.relative_to(self.root)),
            "coeff": sp.coeff if sp else None,
            "n_samples": config.n_samples,
            "l0": s["l0"],
            "alive": s["alive_dict_elements"],
            "ce_clean": ev["ce_loss_clean"],
            "ce_increase": ev["ce_loss_increase"],
            "kl": ev["kl"],
            "ev_sae": s["explained_variance"],
            "ev_last": down[last]["explained_variance"] if last else math.nan,
            "last_hook": last,
        }

    def train_lm_fed(self, config: Config) -> dict[str, Any]:
        from e2e_sae.eval.evaluate import EVAL_JSON, EvalResult, write_eval
        from e2e_sae.training.trainer import train

        run_dir = self.runs / str(config.run_name)
        results: list[EvalResult] = []
        t0 = time.perf_counter()
        train(config, run_dir, progress=True, on_eval=results.append)
        write_eval(results[-1], run_dir / EVAL_JSON)
        out = self.summary(run_dir, json.loads((run_dir / EVAL_JSON).read_text()), config)
        return {**out, "minutes": (time.perf_counter() - t0) / 60}

    def train_cached(self, configs: list[Config]) -> list[dict[str, Any]]:
        from e2e_sae.eval.evaluate import EVAL_JSON, write_eval
        from e2e_sae.training.cached import train_from_cache

        t0 = time.perf_counter()
        runs = train_from_cache(configs, self.runs / "act_cache", progress=True)
        minutes = (time.perf_counter() - t0) / 60
        out = []
        for r in runs:
            assert r.run_dir is not None and r.eval is not None
            write_eval(r.eval, r.run_dir / EVAL_JSON)
            ev = json.loads((r.run_dir / EVAL_JSON).read_text())
            out.append({**self.summary(r.run_dir, ev, r.config), "minutes": minutes})
        return out

    def build_cache(self, config: Config) -> dict[str, Any]:
        from e2e_sae.caches.activations import build_for_config

        build_for_config(config, self.runs / "act_cache", dtype="float16", progress=True)
        return {}


def log_interp(xs: list[float], ys: list[float], at: float) -> float:
    """x where y = `at`, linear in (log x, log y) through the sorted points (extrapolated at the
    ends, clamped to 10x beyond the range)."""
    order = np.argsort(ys)
    lx, ly = np.log(np.array(xs)[order]), np.log(np.array(ys)[order])
    if len(lx) == 1:
        return float(xs[0])
    i = int(np.clip(np.searchsorted(ly, math.log(at)), 1, len(ly) - 1))
    slope = (lx[i] - lx[i - 1]) / (ly[i] - ly[i - 1]) if ly[i] != ly[i - 1] else 0.0
    v = lx[i - 1] + slope * (math.log(at) - ly[i - 1])
    return float(np.exp(np.clip(v, lx.min() - math.log(10), lx.max() + math.log(10))))


def distinct(coeffs: list[float]) -> list[float]:
    """The coefficients, spread to 0.5x / 1x / 2x of the middle one when interpolation gave two
    within 5% of each other (flat calibration curve)."""
    cs = sorted(coeffs)
    if all(b > a * 1.05 for a, b in zip(cs, cs[1:], strict=False)):
        return coeffs
    mid = cs[len(cs) // 2]
    return [mid * 2.0, mid, mid * 0.5]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="random tiny model, a few samples")
    p.add_argument("--out-root", type=Path, default=None)
    p.add_argument("--e2e-windows", type=int, default=None, help="training windows (default 800)")
    p.add_argument("--calib-windows", type=int, default=None, help="per calibration run (120)")
    p.add_argument(
        "--e2e-coeff",
        type=float,
        default=None,
        help="use this e2e sparsity coefficient instead of the calibrated one",
    )
    p.add_argument("--eval-windows", type=int, default=None, help="validation windows (64)")
    args = p.parse_args(argv)
    root = args.out_root or (Path("/tmp/e2e_sae_smollm2_quick") if args.quick else HERE)
    n_train = args.e2e_windows or (48 if args.quick else 800)
    n_calib = args.calib_windows or (16 if args.quick else 120)
    n_eval = args.eval_windows or (8 if args.quick else 64)
    st = Study(root, args.quick, n_train, n_eval)
    t0 = time.perf_counter()

    def e2e_calibration() -> dict[str, Any]:
        runs = [
            st.train_lm_fed(st.config(f"e2e_calib_c{c:g}", e2e_loss(c), n_calib, n_eval // 2))
            for c in E2E_CALIB_COEFFS
        ]
        coeff = log_interp([r["coeff"] for r in runs], [r["l0"] for r in runs], TARGET_L0)
        return {"runs": runs, "coeff": coeff}

    calib = st.phase("e2e_calibration", e2e_calibration)
    e2e_coeff = args.e2e_coeff or float(f"{calib['coeff']:.3g}")
    e2e = st.phase(
        "e2e",
        lambda: st.train_lm_fed(
            st.config(f"e2e_c{e2e_coeff:g}", e2e_loss(e2e_coeff), n_train, n_eval)
        ),
    )
    st.phase(
        "act_cache", lambda: st.build_cache(st.config("cache", local_loss(1.0), n_train, None))
    )

    def local_calibration() -> dict[str, Any]:
        configs = [
            st.config(f"local_calib_c{c:g}", local_loss(c), n_calib, n_eval // 2)
            for c in LOCAL_CALIB_COEFFS
        ]
        runs = st.train_cached(configs)
        coeffs = [
            log_interp([r["coeff"] for r in runs], [r["l0"] for r in runs], e2e["l0"] * f)
            for f in L0_BRACKET
        ]
        return {"runs": runs, "coeffs": distinct(coeffs)}

    lcal = st.phase("local_calibration", local_calibration)
    coeffs = [float(f"{c:.3g}") for c in lcal["coeffs"]]
    local = st.phase(
        "local",
        lambda: {
            "runs": st.train_cached(
                [st.config(f"local_c{c:g}", local_loss(c), n_train, n_eval) for c in coeffs]
            )
        },
    )
    write_results(st, calib, e2e, lcal, local["runs"], time.perf_counter() - t0, argv)
    return 0


def write_results(
    st: Study,
    calib: dict[str, Any],
    e2e: dict[str, Any],
    lcal: dict[str, Any],
    local: list[dict[str, Any]],
    wall_s: float,
    argv: list[str] | None,
) -> None:
    def f(v: Any, d: int = 3) -> str:
        return "n/a" if v is None or v != v else f"{v:.{d}g}" if isinstance(v, float) else str(v)

    at_l0 = interpolate_y_at_x(
        [r["l0"] for r in local], [r["ce_increase"] for r in local], e2e["l0"]
    )
    kl_at_l0 = interpolate_y_at_x([r["l0"] for r in local], [r["kl"] for r in local], e2e["l0"])
    names = ("e2e_calibration", "e2e", "act_cache", "local_calibration", "local")
    phases = {n: json.loads((st.runs / f"{n}.json").read_text())["wall_s"] for n in names}
    rows = [
        [
            "e2e",
            f(e2e["coeff"]),
            f(e2e["l0"]),
            f(e2e["alive"]),
            f(e2e["ce_increase"]),
            f(e2e["kl"]),
            f(e2e["ev_sae"]),
            f(e2e["ev_last"]),
            f(e2e["minutes"], 2),
        ]
    ]
    rows += [
        [
            "local",
            f(r["coeff"]),
            f(r["l0"]),
            f(r["alive"]),
            f(r["ce_increase"]),
            f(r["kl"]),
            f(r["ev_sae"]),
            f(r["ev_last"]),
            f(r["minutes"], 2),
        ]
        for r in sorted(local, key=lambda r: r["l0"])
    ]
    headers = [
        "type",
        "sparsity coeff",
        "L0",
        "alive",
        "CE increase",
        "KL",
        "EV at SAE",
        f"EV {e2e['last_hook']}",
        "train+eval min",
    ]
    calib_rows = [
        ["e2e", f(r["coeff"]), f(r["n_samples"]), f(r["l0"]), f(r["ce_increase"])]
        for r in calib["runs"]
    ]
    calib_rows += [
        ["local", f(r["coeff"]), f(r["n_samples"]), f(r["l0"]), f(r["ce_increase"])]
        for r in lcal["runs"]
    ]
    model = "random-weight test model (--quick)" if st.quick else "SmolLM2-135M-Instruct"
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# Local vs e2e SAE on {model} at `{st.position}`",
        "",
        f"Command: `.venv/bin/python experiments/smollm2/run.py{' ' + cmd if cmd else ''}`",
        "",
        f"Wall time {wall_s / 60:.1f} min for this invocation; phases (min): "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in phases.items())
        + f". {os.cpu_count()} CPU cores, 15-min load average at the end "
        f"{os.getloadavg()[2]:.1f}.",
        "",
        f"{st.e2e_windows} training windows of 128 tokens ({st.e2e_windows * 128:,} tokens) per "
        f"SAE, all SAEs on the same batches; eval on {st.eval_windows} validation windows. Clean "
        f"CE loss {e2e['ce_clean']:.3f} nats.",
        "",
        "## Runs",
        "",
        md_table(headers, rows),
        "",
        "## Matched L0",
        "",
        f"Local SAEs' CE-loss increase interpolated at the e2e SAE's L0 ({e2e['l0']:.1f}): "
        f"{f(at_l0)} nats (KL {f(kl_at_l0)}), against {f(e2e['ce_increase'])} for e2e: ratio "
        f"e2e / local = {f(e2e['ce_increase'] / at_l0, 2)}.",
        "",
        "## Calibration runs",
        "",
        md_table(["type", "sparsity coeff", "windows", "L0", "CE increase"], calib_rows),
        "",
        f"e2e coefficient for L0 {TARGET_L0:g}: {f(calib['coeff'])}; local coefficients for "
        f"{', '.join(f'{x:g}' for x in L0_BRACKET)} x the e2e L0: "
        + ", ".join(f(c) for c in lcal["coeffs"])
        + ".",
        "",
    ]
    out = st.root / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "smollm2.md").write_text("\n".join(lines))
    (out / "results.json").write_text(
        json.dumps(
            {
                "e2e": e2e,
                "local": local,
                "e2e_calibration": calib,
                "local_calibration": lcal,
                "local_ce_increase_at_e2e_l0": at_l0,
                "local_kl_at_e2e_l0": kl_at_l0,
                "phases_wall_s": phases,
                "wall_s": wall_s,
            },
            indent=2,
            default=float,
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
