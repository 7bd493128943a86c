"""`e2e-sae autointerp RUN [--compare RUN2 ...]`: explain a sample of each run's features with a
language model, score the explanations (simulation, detection) and compare the runs."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any


def _backend(kind: str, model: str | None, args: argparse.Namespace) -> Any:
    from e2e_sae.analysis.autointerp.backends import HttpChat, LocalChat

    if kind == "http":
        return HttpChat.from_env(model, timeout=args.timeout, retries=args.retries)
    return LocalChat.load(model, device=args.device)


def _ci(d: dict[str, Any]) -> str:
    if d["mean"] is None or math.isnan(d["mean"]):
        return "–"
    return f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def _print_run(res: dict[str, Any], folder: Path) -> None:
    from e2e_sae.eval.report import table

    s = res["summary"]
    print(
        f"\n{res['run']} ({res['sae_type']}, {res['position']}, L0 {res['l0']:.3g}): "
        f"{res['n_features']} features of {res['n_eligible']} eligible / {res['n_alive']} alive"
    )
    print(
        table(
            ["score", "mean [95% CI]", "features"],
            [
                ["simulation (Pearson r)", _ci(s["simulation"]), str(s["simulation"]["n"])],
                [
                    "detection accuracy",
                    _ci(s["detection_accuracy"]),
                    str(s["detection_accuracy"]["n"]),
                ],
                ["detection AUC", _ci(s["detection_auc"]), str(s["detection_auc"]["n"])],
            ],
        )
    )
    rows = [
        [
            str(b["stratum"]),
            f"{b['frequency_low']:.2g}–{b['frequency_high']:.2g}",
            str(b["n"]),
            "–" if b["simulation"] is None else f"{b['simulation']:.3f}",
            "–" if b["detection_auc"] is None else f"{b['detection_auc']:.3f}",
        ]
        for b in res["by_stratum"]
    ]
    print(table(["stratum", "frequency", "features", "simulation", "detection AUC"], rows))
    best = sorted(
        (r for r in res["features"] if r["simulation"] is not None),
        key=lambda r: -r["simulation"],
    )[:5]
    for r in best:
        print(f"  #{r['feature']} (sim {r['simulation']:.2f}): {r['explanation']}")
    print(f"results: {folder}")


def cmd_autointerp(args: argparse.Namespace) -> int:
    from e2e_sae.analysis.autointerp import store
    from e2e_sae.analysis.autointerp.pipeline import make_settings, run_autointerp
    from e2e_sae.analysis.autointerp.report import autointerp_figures, compare, comparison_table
    from e2e_sae.errors import UserError, check_output_folder

    runs = [args.run, *(args.compare or [])]
    for r in runs:
        if not Path(r).is_dir():
            raise UserError(f"{r}: not a run directory")
    if args.out is not None:
        check_output_folder(args.out, "--out")
    settings = make_settings(
        n_features=args.n_features,
        seed=args.seed,
        n_strata=args.n_strata,
        n_explain=args.n_explain,
        n_score_top=args.n_score_top,
        n_random=args.n_random,
        n_nonactivating=args.n_nonactivating,
        n_tokens=args.n_tokens,
        skip_first=args.skip_first,
    )
    explainer = _backend(args.backend, args.model, args)
    scorer = _backend(args.backend, args.scorer_model, args) if args.scorer_model else explainer
    folders = []
    names: set[str] = set()
    for r in runs:
        name = Path(r).name
        if args.out is None:
            folders.append(store.default_folder(r))
        else:
            sub = name if name not in names else f"{name}-{len(names) + 1}"
            folders.append(Path(args.out) / sub)
        names.add(name)
    results = []
    for r, folder in zip(runs, folders, strict=True):
        res = run_autointerp(
            r,
            explainer,
            scorer,
            settings=settings,
            out=folder,
            position=args.sae,
            device=args.device,
            overwrite=args.overwrite,
            progress=True,
        )
        autointerp_figures([res], folder, settings.seed, settings.n_resamples)
        _print_run(res, folder)
        results.append(res)
    if len(results) > 1:
        out = Path(args.out) if args.out is not None else folders[0] / "compare"
        paths = autointerp_figures(results, out, settings.seed, settings.n_resamples)
        print()
        print(comparison_table(compare(results, settings.seed, settings.n_resamples)))
        for p in paths:
            print(p)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser(
        "autointerp",
        help="explain and score SAE features with a language model (simulation, detection)",
        description=__doc__,
    )
    a.add_argument("run", type=Path, help="run directory")
    a.add_argument(
        "--compare", nargs="+", type=Path, metavar="RUN", help="more runs: a comparison table"
    )
    a.add_argument("--n-features", type=int, default=None, help="features per run (default 40)")
    a.add_argument("--seed", type=int, default=None, help="sampling and bootstrap seed (0)")
    a.add_argument(
        "--backend",
        choices=("local", "http"),
        default="local",
        help="local: a model run here (default smollm2-135m, offline); http: an "
        "OpenAI-compatible chat endpoint (AUTOINTERP_BASE_URL, AUTOINTERP_API_KEY, "
        "AUTOINTERP_MODEL from the environment or .env)",
    )
    a.add_argument(
        "--model", default=None, help="explainer (and scorer) model: a name or local folder"
    )
    a.add_argument("--scorer-model", default=None, help="a different model for the scorers")
    a.add_argument("--out", type=Path, default=None, help="results folder (default RUN/autointerp)")
    a.add_argument("--sae", default=None, help="SAE position (needed when the run has several)")
    a.add_argument("--n-tokens", type=int, default=None, help="tokens scanned for examples")
    a.add_argument("--n-strata", type=int, default=None, help="frequency strata (4)")
    a.add_argument("--n-explain", type=int, default=None, help="top examples explained from (8)")
    a.add_argument("--n-score-top", type=int, default=None, help="held-out top examples (5)")
    a.add_argument("--n-random", type=int, default=None, help="random windows simulated (5)")
    a.add_argument(
        "--n-nonactivating", type=int, default=None, help="silent windows for detection (5)"
    )
    a.add_argument(
        "--skip-first",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="leave sequences' first position out of the examples (default: as browse decides)",
    )
    a.add_argument("--overwrite", action="store_true", help="replace results of other settings")
    a.add_argument("--timeout", type=float, default=120.0, help="http: seconds per request")
    a.add_argument("--retries", type=int, default=5, help="http: retries per request")
    a.add_argument("--device", default=None)
    a.set_defaults(func=cmd_autointerp)
