"""Grid sweeps over config values: expand a sweep file into run configs and train them.

Two sweep file formats are read.

Ours::

    base_config: ../configs/demo.yaml   # relative to the sweep file (or pass --config)
    name: demo-sparsity                 # optional; default: the sweep file's stem
    out_dir: runs/demo-sparsity         # optional; default: <base save_dir>/<name>
    parameters:
      loss.sparsity.coeff: [0.5, 1.0, 2.0]   # dotted key: a list of values
      seed: {values: [0, 1]}                 # or W&B-style {values: [...]} / {value: x}
      loss:                                  # or nested W&B-style {parameters: {...}}
        parameters:
          logits_kl: {values: [null, {coeff: 0.5}]}

The original W&B sweep format (`method: grid`, `parameters` nested with `parameters:` / `values:`,
`program` / `command`). Its base config is the last `.yaml` argument of `command` when that file
exists (relative to the sweep file or the working directory), else `--config`.

Every combination of values (the cartesian product, in file order) becomes one run in
`<out_dir>/<index>_<varied values>`. A finished run leaves `eval.json` (its final evaluation) and is
skipped when the sweep is started again.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import re
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from e2e_sae.config import (
    MODEL_SOURCES,
    Config,
    config_to_yaml_dict,
    load_config,
    path_component_problem,
    read_yaml,
    set_dotted,
)
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.eval.evaluate import EVAL_JSON, EvalResult, read_eval, write_eval
from e2e_sae.lm.dry_run import check_hooks, hook_names
from e2e_sae.runs.wandb import load_dotenv_file
from e2e_sae.training.runlog import read_metrics
from e2e_sae.training.trainer import train

logger = logging.getLogger(__name__)

MAX_SWEEP_RUNS = 10_000
"""The most runs a grid may have (each is validated before any trains; larger grids are split)."""
WANDB_KEYS = {"method", "program", "command", "metric", "early_terminate", "project", "entity"}


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid: the values it sets (dotted keys) and its validated config."""

    index: int
    overrides: dict[str, Any]
    config: Config
    run_dir: Path


@dataclass
class Sweep:
    name: str
    out_dir: Path
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    """Dotted config key -> values, in file order."""
    runs: list[SweepRun]
    wandb_format: bool = False
    method: str = "grid"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def varied(self) -> list[str]:
        """The keys that take more than one value."""
        return [k for k, v in self.grid.items() if len(v) > 1]


# --- reading a sweep file -------------------------------------------------------------------------
def flatten_parameters(params: Any, source: str, prefix: str = "") -> dict[str, list[Any]]:
    """Sweep `parameters` -> {dotted key: [values]} (W&B nesting and dotted keys both allowed)."""
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: parameters{'.' + prefix if prefix else ''} must be a mapping")
    out: dict[str, list[Any]] = {}
    for key, spec in params.items():
        path = f"{prefix}{key}"
        if isinstance(spec, dict) and "values" in spec:
            values = spec["values"]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{source}: parameters.{path}.values must be a non-empty list")
            out[path] = list(values)
        elif isinstance(spec, dict) and "value" in spec:
            out[path] = [spec["value"]]
        elif isinstance(spec, dict) and "parameters" in spec:
            out.update(flatten_parameters(spec["parameters"], source, path + "."))
        elif isinstance(spec, dict) and ({"distribution", "min", "max"} & set(spec)):
            raise ConfigError(
                f"{source}: parameters.{path}: distributions need a W&B sweep (--wandb); "
                "local sweeps take `values` lists"
            )
        elif isinstance(spec, dict):
            raise ConfigError(
                f"{source}: parameters.{path}: expected `values`, `value` or `parameters`"
            )
        elif isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{source}: parameters.{path} is an empty list")
            out[path] = list(spec)
        else:
            out[path] = [spec]
    return out


def _label(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list | tuple):
        text = "+".join(_label(v) for v in value)
    elif isinstance(value, dict):
        text = "-".join(f"{k}{_label(v)}" for k, v in value.items())
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "", text.replace("hook_", ""))[:40] or "none"


def run_label(overrides: dict[str, Any], varied: Iterable[str]) -> str:
    """Short name from the varied values, e.g. `coeff-0.5_seed-1` (the last key component, or the
    last two where the last alone is ambiguous)."""
    varied = list(varied)
    lasts = [k.split(".")[-1] for k in varied]
    parts = []
    for k, last in zip(varied, lasts, strict=True):
        short = last if lasts.count(last) == 1 else ".".join(k.split(".")[-2:])
        parts.append(f"{short}-{_label(overrides[k])}")
    return "_".join(parts) or "run"


def _base_config_path(raw: dict[str, Any], path: Path, config: Path | None) -> Path:
    if config is not None:
        return config
    candidates: list[str] = []
    if "base_config" in raw:
        candidates.append(str(raw["base_config"]))
    command = raw.get("command")
    if isinstance(command, list):
        candidates += [str(c) for c in reversed(command) if str(c).endswith((".yaml", ".yml"))]
    for c in candidates:
        for p in (path.parent / c, Path(c)):
            if p.is_file():
                return p
    if candidates:
        raise ConfigError(
            f"{path}: base config '{candidates[0]}' not found (relative to the sweep file or the "
            "working directory); pass --config CONFIG"
        )
    raise ConfigError(f"{path}: no base_config; set `base_config:` or pass --config CONFIG")


def load_sweep(
    path: str | Path,
    config: str | Path | None = None,
    out_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Sweep:
    """Read a sweep file and expand its grid into validated run configs (nothing is trained).

    `overrides` ({dotted key: value}) change the base config before the grid is applied."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict) or "parameters" not in raw:
        raise ConfigError(f"{path}: a sweep file needs a `parameters:` mapping")
    wandb_format = bool(WANDB_KEYS & set(raw))
    method = str(raw.get("method", "grid"))
    base_path = _base_config_path(raw, path, Path(config) if config is not None else None)
    base = read_yaml(base_path)
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: expected a mapping of config keys")
    for k, v in (overrides or {}).items():
        set_dotted(base, k, v)
    grid = flatten_parameters(raw["parameters"], str(path))
    name = str(raw.get("name") or path.stem)
    if (problem := path_component_problem(name)) is not None:
        raise ConfigError(f"{path}: name: {name[:40]!r} {problem}")
    n_runs = math.prod(len(v) for v in grid.values())
    if method == "grid" and n_runs > MAX_SWEEP_RUNS:
        sizes = " x ".join(str(len(v)) for v in grid.values())
        raise ConfigError(
            f"{path}: parameters: the grid has {n_runs:,} runs ({sizes}), over the "
            f"{MAX_SWEEP_RUNS:,} one sweep may hold; split it into smaller sweeps"
        )
    if out_dir is None:
        out_dir = raw.get("out_dir")
        out_dir = path.parent / out_dir if out_dir else Path(base.get("save_dir") or "runs") / name
    sweep = Sweep(name, Path(out_dir), base, grid, [], wandb_format, method, raw)
    if method != "grid":  # (W&B samples the runs itself; each is validated when it comes)
        return sweep
    keys = list(grid)
    for i, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        overrides = dict(zip(keys, combo, strict=True))
        cfg = copy.deepcopy(base)
        for k, v in overrides.items():
            set_dotted(cfg, k, v)
        label = run_label(overrides, sweep.varied)
        cfg["run_name"] = f"{name}_{label}"
        src = f"{path} (run {i}: {label})"
        try:
            config_obj = load_config(cfg)
        except ConfigError as err:
            raise ConfigError(f"{src}: {str(err).removeprefix('config: ')}") from None
        assert isinstance(config_obj, Config)
        sweep.runs.append(SweepRun(i, overrides, config_obj, sweep.out_dir / f"{i:02d}_{label}"))
    check_runs(sweep, path)
    return sweep


def check_runs(sweep: Sweep, path: Path) -> None:
    """Resolve every run's hooks against its model's config, as `train --dry-run` does, so that
    a run the model would refuse stops the sweep before any run trains (each model's hook names
    are read once; runs that differ only in other values are checked once)."""
    names: dict[str, list[str] | None] = {}
    checked: set[str] = set()
    for run in sweep.runs:
        cfg = config_to_yaml_dict(run.config)
        model = json.dumps({k: cfg.get(k) for k in (*MODEL_SOURCES, "backend")}, sort_keys=True)
        hooks = json.dumps([model, cfg["saes"], cfg["loss"].get("in_to_orig")], sort_keys=True)
        if hooks in checked:
            continue
        checked.add(hooks)
        if model not in names:
            try:
                names[model] = hook_names(run.config)
            except ConfigError as err:
                raise ConfigError(f"{path} (run {run.index}: {run.run_dir.name}): {err}") from None
            except UserError:  # (the model's config cannot be had here: train checks them)
                names[model] = None
        known = names[model]
        if known is None:
            continue
        try:
            check_hooks(run.config, known)
        except UserError as err:
            raise ConfigError(f"{path} (run {run.index}: {run.run_dir.name}): {err}") from None


# --- running it -----------------------------------------------------------------------------------
def _train_one(
    config_dict: dict[str, Any], run_dir: str, device: str | None, threads: int, progress: bool
) -> dict[str, Any]:
    """Train one run and write its final evaluation; returns a JSON-able record (never raises)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    record: dict[str, Any] = {"run_dir": run_dir, "status": "ok"}
    try:
        config = load_config(config_dict)
        assert isinstance(config, Config)
        results: list[EvalResult] = []
        out = train(config, Path(run_dir), device=device, progress=progress, on_eval=results.append)
        if results:
            write_eval(results[-1], out / EVAL_JSON)
            record["eval"] = results[-1].to_json()
    except UserError as err:
        record.update(status="failed", error=str(err))
    except Exception as err:  # noqa: BLE001 - one broken run must not end the sweep
        logger.error("run %s failed:\n%s", run_dir, traceback.format_exc())
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
    return record


def run_sweep(
    sweep: Sweep,
    parallel: int = 1,
    device: str | None = None,
    progress: bool = True,
    force: bool = False,
    on_done: Callable[[SweepRun, dict[str, Any]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Train every run of the grid, `parallel` processes at a time (1: in this process, in order).

    Runs whose directory already holds `eval.json` are skipped unless `force`. Returns one record
    per run (in grid order): `run_dir`, `status` (ok / failed / skipped), `error`, `eval`
    (the final `eval.json` contents) and `overrides`."""

    if parallel < 1:
        raise UserError(f"--parallel: expected a positive number of processes, got {parallel}")
    records: dict[int, dict[str, Any]] = {}
    todo: list[SweepRun] = []
    for run in sweep.runs:
        done = read_eval(run.run_dir) if not force else None
        if done is not None:
            records[run.index] = {"run_dir": str(run.run_dir), "status": "skipped", "eval": done}
        else:
            todo.append(run)
    sweep.out_dir.mkdir(parents=True, exist_ok=True)

    def finish(run: SweepRun, rec: dict[str, Any]) -> None:
        rec["overrides"] = run.overrides
        records[run.index] = rec
        if on_done is not None:
            on_done(run, rec)

    if parallel == 1 or len(todo) <= 1:
        for run in todo:
            args = (config_to_yaml_dict(run.config), str(run.run_dir), device, 0, progress)
            finish(run, _train_one(*args))
    else:
        threads = max(1, (os.cpu_count() or 1) // parallel)
        with ProcessPoolExecutor(parallel, mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(
                    _train_one,
                    config_to_yaml_dict(run.config),
                    str(run.run_dir),
                    device,
                    threads,
                    False,
                ): run
                for run in todo
            }
            for fut in as_completed(futures):
                finish(futures[fut], fut.result())
    for run in sweep.runs:
        records[run.index].setdefault("overrides", run.overrides)
    return [records[r.index] for r in sweep.runs]


def summary_rows(sweep: Sweep, records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """A table of the runs' final eval metrics: one row per run and SAE position."""
    headers = [
        "run",
        *sweep.varied,
        "status",
        "sae_position",
        "l0",
        "alive",
        "explained_variance",
        "ce_loss_increase",
        "kl",
        "ce_loss_score",
    ]
    rows: list[list[Any]] = []
    for run, rec in zip(sweep.runs, records, strict=True):
        head = [run.run_dir.name, *(_label(run.overrides[k]) for k in sweep.varied), rec["status"]]
        ev = rec.get("eval") or {}
        model_level = [ev.get(k, "") for k in ("ce_loss_increase", "kl", "ce_loss_score")]
        per_sae = ev.get("per_sae") or {"": {}}
        for pos, d in per_sae.items():
            rows.append(
                [
                    *head,
                    pos,
                    d.get("l0", ""),
                    d.get("alive_dict_elements", ""),
                    d.get("explained_variance", ""),
                    *model_level,
                ]
            )
    return headers, rows


# --- W&B ------------------------------------------------------------------------------------------
def _nest(flat: dict[str, list[Any]]) -> dict[str, Any]:
    """{dotted key: values} -> W&B's nested `parameters` mapping."""
    out: dict[str, Any] = {}
    for key, values in flat.items():
        *parents, last = key.split(".")
        cur = out
        for p in parents:
            cur = cur.setdefault(p, {"parameters": {}})["parameters"]
        cur[last] = {"values": values}
    return out


def wandb_sweep_config(sweep: Sweep) -> dict[str, Any]:
    """The sweep as W&B expects it (keeps `method` / `metric` of a W&B-format file)."""
    cfg: dict[str, Any] = {"name": sweep.name, "method": sweep.method}
    if "metric" in sweep.raw:
        cfg["metric"] = sweep.raw["metric"]
    cfg["parameters"] = _nest(sweep.grid)
    return cfg


def _unflatten_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """W&B hands nested parameters back as nested dicts; return {dotted key: value} leaves."""
    out: dict[str, Any] = {}

    def walk(d: Any, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v and not k.startswith("_"):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(run_config, "")
    return out


def run_wandb_sweep(
    sweep: Sweep, project: str | None = None, count: int | None = None, device: str | None = None
) -> str:
    """Register the sweep with W&B and run an agent here; returns the sweep id.

    Each agent run merges its parameters into the base config, trains with local logging, then
    replays `metrics.jsonl` and the final eval into the W&B run."""

    load_dotenv_file()
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb: wandb is not installed (pip install wandb)") from None
    try:
        logged_in = bool(wandb.login(verify=False, prompt=False))
    except Exception:  # noqa: BLE001 - any failure means "not set up"
        logged_in = False
    if not logged_in:
        raise UserError("--wandb: W&B is not set up (run `wandb login` or set WANDB_API_KEY)")
    project = project or sweep.raw.get("project") or sweep.base.get("wandb_project") or sweep.name
    entity = os.environ.get("WANDB_ENTITY")
    sweep_id = wandb.sweep(wandb_sweep_config(sweep), project=project, entity=entity)

    def agent_run() -> None:
        run = wandb.init()
        cfg = copy.deepcopy(sweep.base)
        overrides = _unflatten_run_config(dict(run.config))
        for k, v in overrides.items():
            set_dotted(cfg, k, v)
        cfg["wandb_project"] = None  # this process logs to the agent's run itself (below)
        cfg["run_name"] = f"{sweep.name}_{run.id}"
        config = load_config(cfg)
        assert isinstance(config, Config)
        results: list[Any] = []
        run_dir = train(config, sweep.out_dir / str(run.id), device=device, on_eval=results.append)
        for rec in read_metrics(run_dir):
            run.log(rec, step=rec.get("samples"))
        if results:
            write_eval(results[-1], run_dir / EVAL_JSON)
            run.summary.update(results[-1].flat())
        run.finish()

    wandb.agent(sweep_id, function=agent_run, project=project, entity=entity, count=count)
    return str(sweep_id)
