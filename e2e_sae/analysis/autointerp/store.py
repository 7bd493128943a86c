"""Autointerp results on disk (JSON), read by the pipeline, the comparison and the browser.

A results folder (default `<run>/autointerp/`) holds `settings.json` (what the results depend on:
the run, the SAE position, the example settings and the backends), `features/<id>.json` (one per
explained feature: explanation, scores, examples, every prompt and raw reply) and `results.json`
(the summary and one compact row per feature). This module imports nothing heavy, so the browser
can read the results without the pipeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from e2e_sae.errors import UserError

FOLDER = "autointerp"
SETTINGS = "settings.json"
RESULTS = "results.json"
FEATURES = "features"


def default_folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / FOLDER


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON through a temporary file renamed into place (a killed run never
    leaves a torn file; NaN is written as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_nan_to_none(obj), indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON") from None


def feature_path(folder: Path, feature: int) -> Path:
    return folder / FEATURES / f"{feature}.json"


def read_results(folder: str | Path) -> dict[str, Any]:
    """`results.json` of a results folder (or of `<run>/autointerp/` when given a run)."""
    folder = Path(folder)
    for f in (folder / RESULTS, folder / FOLDER / RESULTS):
        if f.is_file():
            return read_json(f)
    raise UserError(f"{folder}: no autointerp results ({RESULTS}); run `e2e-sae autointerp`")


def explanations_for_run(run_dir: str | Path, position: str) -> dict[int, dict[str, Any]] | None:
    """Per explained feature of the SAE at `position`: {explanation, simulation,
    detection_accuracy, detection_auc}, from `<run>/autointerp/results.json`; None without one."""
    path = default_folder(run_dir) / RESULTS
    if not path.is_file():
        return None
    res = read_json(path)
    if res.get("position") != position:
        return None
    return {int(r["feature"]): r for r in res.get("features", [])}
