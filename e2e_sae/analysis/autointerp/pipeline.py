"""Automated interpretability of one run's SAE: sample features, explain, score, summarise.

`run_autointerp(run, explainer)` scans the run's eval tokens with the feature browser's scan,
samples `n_features` eligible features (those whose top-k list is full: they fire in at least
n_explain + n_score_top scanned sequences) stratified by firing frequency, and per feature asks
the explainer for an explanation and the scorer (default: the explainer) to simulate and to
detect (`scorers`). Every feature's result is written to `features/<id>.json` as soon as it is
done, so an interrupted or extended run (a larger `n_features` with the same seed keeps the
sample so far) only does the features that are missing. `results.json` holds the summary with
bootstrap intervals.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from e2e_sae.analysis.autointerp import store
from e2e_sae.analysis.autointerp.backends import ChatBackend
from e2e_sae.analysis.autointerp.examples import (
    Example,
    FeatureExamples,
    build_examples,
    n_activating_sequences,
    random_windows,
    window_codes,
)
from e2e_sae.analysis.autointerp.metrics import bootstrap_ci
from e2e_sae.analysis.autointerp.sampling import sample_features
from e2e_sae.analysis.autointerp.scorers import detect, explain, score_simulation, simulate
from e2e_sae.analysis.browser import (
    FeatureData,
    _tokenizer_for,
    collect_feature_data,
    readable,
    token_text,
)
from e2e_sae.analysis.plots import sae_type
from e2e_sae.config import parse_model
from e2e_sae.data import eval_batches
from e2e_sae.errors import UserError
from e2e_sae.eval.evaluate import (
    check_finite_weights,
    eval_dataset,
    eval_request,
    read_eval,
)
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.training.runlog import read_metrics

logger = logging.getLogger(__name__)

# Random windows drawn once per run: the first n_random are scored for simulation, and each
# feature's non-activating contexts are the first windows of this pool where it is silent.
RANDOM_POOL = 64


class AutointerpSettings(BaseModel):
    """What is explained and scored (everything but `n_features` and `n_resamples` fixes the
    results of a feature, and must match the settings of a results folder being resumed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_features: int = Field(default=40, ge=1)
    seed: int = 0
    n_strata: int = Field(default=4, ge=1)
    n_explain: int = Field(default=8, ge=1, description="top examples shown to the explainer")
    n_score_top: int = Field(default=5, ge=1, description="held-out top examples scored")
    n_random: int = Field(default=5, ge=0, le=RANDOM_POOL, description="random windows simulated")
    n_nonactivating: int = Field(default=5, ge=1, description="silent windows for detection")
    before: int = Field(default=12, ge=0, description="tokens before an example's peak")
    after: int = Field(default=4, ge=0, description="tokens after it")
    n_tokens: int | None = Field(
        default=None, ge=1, description="tokens scanned (default: as eval)"
    )
    skip_first: bool | None = None
    n_resamples: int = Field(default=10_000, ge=100)

    def key(self) -> dict[str, Any]:
        return self.model_dump(exclude={"n_features", "n_resamples"})


def make_settings(**kw: Any) -> AutointerpSettings:
    """Settings from keyword arguments (None: the default), one-line error on a bad value."""
    return parse_model(
        AutointerpSettings, {k: v for k, v in kw.items() if v is not None}, "autointerp"
    )


def _texts(tokenizer: Any):  # noqa: ANN202
    def texts(ids: list[int]) -> list[str]:
        if tokenizer is None:
            return [f"<{i}>" for i in ids]
        return [readable(token_text(tokenizer, i)) for i in ids]

    return texts


def _ex_json(ex: Example, **extra: Any) -> dict[str, Any]:
    return {**ex.to_json(), **extra}


def run_autointerp(
    run: str | Path,
    explainer: ChatBackend,
    scorer: ChatBackend | None = None,
    *,
    settings: AutointerpSettings | None = None,
    out: str | Path | None = None,
    position: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Explain and score a sample of the run's features; returns (and writes) `results.json`'s
    contents. `out`: the results folder (default `<run>/autointerp`)."""
    settings = settings or AutointerpSettings()
    scorer = scorer or explainer
    run_dir = Path(run)
    folder = Path(out) if out is not None else store.default_folder(run_dir)
    model = SAETransformer.from_local_path(run_dir, device=device)
    config = model.run_config
    if config is None:
        raise UserError(f"{run_dir}: no run config (not a run directory?)")
    check_finite_weights(model.saes, run_dir)
    if position is None:
        if len(model.sae_positions) != 1:
            raise UserError(f"--sae: the run has several SAEs ({', '.join(model.sae_positions)})")
        position = model.sae_positions[0]
    elif position not in model.sites:
        raise UserError(f"--sae: no SAE at '{position}' (has {', '.join(model.sae_positions)})")
    ident = {
        "run": run_dir.name,
        "position": position,
        "checkpoint": _checkpoint_name(model),
        "settings": settings.key(),
        "explainer": explainer.describe(),
        "scorer": scorer.describe(),
    }
    _check_folder(folder, ident, overwrite)

    fd, tokenizer = scan(model, position, settings, progress)
    freq = fd.frequency.tolist()
    top_k = settings.n_explain + settings.n_score_top
    n_act = n_activating_sequences(fd).tolist()
    eligible = [j for j in range(len(freq)) if n_act[j] >= top_k]
    sample = sample_features(freq, eligible, settings.n_features, settings.seed, settings.n_strata)
    if not sample.features:
        raise UserError(
            f"{run_dir.name}: no feature fires in {top_k} of the {fd.tokens.shape[0]} scanned "
            "sequences (scan more tokens with --n-tokens, or lower --n-explain / --n-score-top)"
        )
    width = min(settings.before + settings.after + 1, fd.tokens.shape[1])  # as the scan
    n_seq, seq_len = fd.tokens.shape
    windows = random_windows(n_seq, seq_len, width, RANDOM_POOL, settings.seed, fd.skip_first)
    todo = [f for f in sample.features if not store.feature_path(folder, f).is_file()]
    codes = window_codes(model, position, fd.tokens, windows, width, todo) if todo else None
    store.write_json(folder / store.SETTINGS, ident)
    done = len(sample.features) - len(todo)
    if done:
        logger.info("%s: %d of %d features already done", folder, done, len(sample.features))
    bar = tqdm(total=len(sample.features), initial=done, desc="autointerp", disable=not progress)
    rows = []
    for f, stratum in zip(sample.features, sample.strata, strict=True):
        path = store.feature_path(folder, f)
        if path.is_file():
            rows.append(_row(store.read_json(path)))
            continue
        assert codes is not None
        ex = build_examples(
            fd,
            f,
            _texts(tokenizer),
            n_score_top=settings.n_score_top,
            random_windows=windows,
            random_acts=codes[:, :, todo.index(f)],
            n_random=settings.n_random,
            n_nonactivating=settings.n_nonactivating,
        )
        record = explain_and_score(ex, explainer, scorer, seed=settings.seed * 100_003 + f)
        record = {"feature": f, "frequency": freq[f], "stratum": stratum, **record}
        store.write_json(path, record)
        rows.append(_row(record))
        bar.update(1)
        bar.set_postfix(sim=f"{record['simulation']['score']:.2f}")
    bar.close()
    ce, ce_source = ce_increase(run_dir)
    results = {
        **ident,
        "run_dir": str(run_dir),
        "sae_type": sae_type(config),
        "l0": float(fd.counts.sum()) / fd.n_tokens,
        "ce_loss_increase": ce,
        "ce_loss_increase_source": ce_source,
        "n_tokens_scanned": fd.n_tokens,
        "n_alive": int((fd.counts > 0).sum()),
        "n_eligible": len(eligible),
        "n_features": len(rows),
        "strata_bounds": sample.bounds,
        "summary": summarise(rows, settings.seed, settings.n_resamples),
        "by_stratum": by_stratum(rows, sample.bounds),
        "features": rows,
    }
    store.write_json(folder / store.RESULTS, results)
    return store.read_json(folder / store.RESULTS)


def scan(
    model: SAETransformer, position: str, settings: AutointerpSettings, progress: bool
) -> tuple[FeatureData, Any]:
    """The browser's scan of the run's eval tokens (as many as `e2e-sae eval` uses unless
    `settings.n_tokens`), keeping each feature's top n_explain + n_score_top windows; and the
    tokenizer that shows the tokens."""
    config = model.run_config
    assert config is not None
    ds = eval_dataset(config, None, None) if config.eval_data else config.train_data
    asked = eval_request(config, settings.n_tokens)
    n_tokens = settings.n_tokens or (config.eval_n_samples or 50) * ds.n_ctx  # as evaluate_run
    bs = config.batch_size
    n_batches = max(1, math.ceil(n_tokens / (bs * ds.n_ctx)))
    batches, n_batches = eval_batches(ds, bs, config.seed + 42, n_batches, asked)
    model.eval()
    tokenizer = _tokenizer_for(model, ds.tokenizer_name)
    fd = collect_feature_data(
        model,
        position,
        batches,
        n_batches,
        None,
        settings.n_explain + settings.n_score_top,
        settings.before,
        settings.after,
        progress=progress,
        skip_first=settings.skip_first,
        special_ids=list(getattr(tokenizer, "all_special_ids", None) or []),
        bos_id=getattr(tokenizer, "bos_token_id", None),
    )
    return fd, tokenizer


def explain_and_score(
    ex: FeatureExamples, explainer: ChatBackend, scorer: ChatBackend, seed: int
) -> dict[str, Any]:
    """One feature's explanation, simulation and detection, with every example, prompt and raw
    reply (the record written to `features/<id>.json`)."""
    explanation, explain_rec = explain(explainer, ex.explain + ex.quantile)
    sim_examples = ex.score_top + ex.score_random
    sim = simulate(scorer, explanation, sim_examples)
    det = detect(scorer, explanation, ex.score_top, ex.nonactivating, seed=seed)
    kinds = ["top"] * len(ex.score_top) + ["random"] * len(ex.score_random)
    contexts = [*ex.score_top, *ex.nonactivating]
    return {
        "explanation": explanation,
        "simulation": {
            "score": score_simulation(sim_examples, sim),
            "unparsed_tokens": sim.unparsed_tokens,
            "examples": [
                _ex_json(e, kind=k, predicted=list(pred))
                for e, k, pred in zip(sim_examples, kinds, sim.predicted, strict=True)
            ],
        },
        "detection": {
            "accuracy": det.accuracy,
            "auc": det.auc,
            "unparsed": det.unparsed,
            "contexts": [
                _ex_json(contexts[i], label=lab, score=s)
                for i, lab, s in zip(det.order, det.labels, det.scores, strict=True)
            ],
        },
        "explain_examples": [e.to_json() for e in ex.explain],
        "quantile_examples": [e.to_json() for e in ex.quantile],
        "records": {"explain": explain_rec, "simulation": sim.records, "detection": det.records},
    }


def ce_increase(run_dir: Path) -> tuple[float | None, str | None]:
    """The run's CE-loss increase with its SAEs spliced in: from `eval.json`, else the last
    in-training evaluation in `metrics.jsonl`; (None, None) when there is neither."""
    ev = read_eval(run_dir)
    if ev and ev.get("ce_loss_increase") is not None:
        return float(ev["ce_loss_increase"]), "eval.json"
    for rec in reversed(read_metrics(run_dir)):
        if rec.get("eval/ce_loss_increase") is not None:
            return float(rec["eval/ce_loss_increase"]), "metrics.jsonl (last in-training eval)"
    return None, None


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """The compact per-feature row of results.json (and the browser)."""
    return {
        "feature": record["feature"],
        "frequency": record["frequency"],
        "stratum": record["stratum"],
        "explanation": record["explanation"],
        "simulation": record["simulation"]["score"],
        "detection_accuracy": record["detection"]["accuracy"],
        "detection_auc": record["detection"]["auc"],
    }


def _val(x: Any) -> float:
    return float("nan") if x is None else float(x)


def summarise(rows: Sequence[dict[str, Any]], seed: int, n_resamples: int) -> dict[str, Any]:
    """Mean and bootstrap 95% interval over features of each score (NaN scores left out)."""
    out: dict[str, Any] = {}
    for key in ("simulation", "detection_accuracy", "detection_auc"):
        vals = [_val(r[key]) for r in rows]
        mean, lo, hi = bootstrap_ci(vals, seed, n_resamples)
        out[key] = {"mean": mean, "low": lo, "high": hi, "n": sum(v == v for v in vals)}
    return out


def by_stratum(
    rows: Sequence[dict[str, Any]], bounds: Sequence[tuple[float, float]]
) -> list[dict[str, Any]]:
    """Mean scores per frequency stratum."""
    out = []
    for s, (lo, hi) in enumerate(bounds):
        rs = [r for r in rows if r["stratum"] == s]

        def mean(key: str, rs: list[dict[str, Any]] = rs) -> float:
            v = [x for x in (_val(r[key]) for r in rs) if not math.isnan(x)]
            return sum(v) / len(v) if v else float("nan")

        out.append(
            {
                "stratum": s,
                "frequency_low": lo,
                "frequency_high": hi,
                "n": len(rs),
                "simulation": mean("simulation"),
                "detection_auc": mean("detection_auc"),
            }
        )
    return out


def _checkpoint_name(model: SAETransformer) -> str | None:
    return model.checkpoint_path.name if model.checkpoint_path else None


def _check_folder(folder: Path, ident: dict[str, Any], overwrite: bool) -> None:
    """A results folder may be resumed only with the same run, SAE, checkpoint, settings and
    backends; `overwrite` empties it instead."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out: {folder} is a file, not a folder")
    path = folder / store.SETTINGS
    if not path.is_file():
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            if not (folder / store.FEATURES).is_dir():
                raise UserError(f"--out: {folder} exists and holds no autointerp results")
        return
    old = store.read_json(path)
    if old == ident:
        return
    if overwrite:
        shutil.rmtree(folder / store.FEATURES, ignore_errors=True)
        (folder / store.RESULTS).unlink(missing_ok=True)
        return
    diff = sorted(k for k in ident if old.get(k) != ident[k])
    raise UserError(
        f"--out: {folder} holds autointerp results made with other {', '.join(diff)}; "
        "pass --overwrite to replace them or --out for another folder"
    )
