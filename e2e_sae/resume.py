"""Exact resume and clean stops: what a checkpoint holds beyond the SAE weights, and how a run
continues from it.

A resume point N is two files in the run directory, written in this order (each atomically):
  resume_<N>.safetensors   Adam moments (tensors) + JSON metadata: optimizer param groups, scheduler
                           state, python / numpy / torch RNG states, the step / sample / batch
                           counters (the batch counter is the data position) and the batch layout
  samples_<N>.safetensors  SAE weights and buffers (what `load_run` and evaluation read)
A point counts only when both files exist, so a run killed at any moment (SIGKILL) resumes from its
last complete point. Only safetensors and JSON are read back: no pickle.

SIGINT / SIGTERM do not kill a training run: the current step finishes, a resume point is written,
and `TrainingInterrupted` ends the run (the CLI exits 128 + signal number: 130 / 143).
"""

from __future__ import annotations

import json
import logging
import random
import re
import signal
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from e2e_sae.checkpoint import (
    CONFIG_FILE,
    atomic_save_tensors,
    atomic_write_bytes,
    load_sae_weights,
    read_tensors,
    save_checkpoint,
    write_config,
)
from e2e_sae.config import Config, config_to_yaml_dict, load_config
from e2e_sae.distributed import Dist, broadcast_str, max_over_ranks
from e2e_sae.errors import ConfigError, TrainingInterrupted, UserError

if TYPE_CHECKING:
    from e2e_sae.train import Trainer

logger = logging.getLogger(__name__)

FORMAT = "e2e_sae.resume/1"
META_KEY = "e2e_sae.resume"
LATEST = "latest"
_SAMPLES_RE = re.compile(r"^samples_(\d+)\.safetensors$")
_RESUME_RE = re.compile(r"^resume_(\d+)\.safetensors$")
_TMP_RE = re.compile(r"^\..+\.tmp\d+$")

# Config keys that may change between the interrupted run and its continuation: they steer logging,
# saving, evaluation, length, or where / how memory-frugally the same step runs. (`batch_size` /
# `effective_batch_size` may change with the number of ranks as long as the global batch stays the
# same; checked separately.) Changing n_samples, device, compile or kl_chunk_tokens gives a valid
# continuation that is no longer bit-identical to an uninterrupted run.
RESUMABLE_CHANGES = frozenset({
    "n_samples", "save_every_n_samples", "keep_last_n_checkpoints", "eval_every_n_samples",
    "eval_n_samples", "eval_data", "log_every_n_grad_steps", "act_frequency_n_tokens",
    "collect_act_frequency_every_n_samples", "wandb_project", "wandb_run_name",
    "wandb_run_name_prefix", "run_name", "save_dir", "device", "compile", "kl_chunk_tokens",
    "batch_size", "effective_batch_size",
})  # fmt: skip


@dataclass(frozen=True)
class ResumePoint:
    run_dir: Path
    n_samples: int

    @property
    def samples_path(self) -> Path:
        return self.run_dir / f"samples_{self.n_samples}.safetensors"

    @property
    def resume_path(self) -> Path:
        return self.run_dir / f"resume_{self.n_samples}.safetensors"


def _indices(run_dir: Path, pattern: re.Pattern[str]) -> set[int]:
    return {int(m.group(1)) for p in run_dir.iterdir() if (m := pattern.match(p.name))}


def resume_points(run_dir: Path) -> list[ResumePoint]:
    """Complete resume points of a run (both files present), oldest first."""
    if not run_dir.is_dir():
        return []
    both = _indices(run_dir, _SAMPLES_RE) & _indices(run_dir, _RESUME_RE)
    return [ResumePoint(run_dir, n) for n in sorted(both)]


# --- which run to continue -----------------------------------------------------------------------
def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """Dotted path of the first field where two config dicts differ (None if equal)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            if not path and key in RESUMABLE_CHANGES:
                continue
            sub = first_difference(old.get(key), new.get(key), f"{path}{key}.")
            if sub is not None:
                return sub
        return None
    return None if old == new else path.rstrip(".")


def run_config(run_dir: Path) -> Config:
    """The config a run directory was trained with."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"--resume: {run_dir} is not a run directory (no {CONFIG_FILE})")
    config = load_config(path)
    assert isinstance(config, Config)
    return config


def check_same_run(run_dir: Path, config: Config) -> None:
    """The given config must train the same thing as the run's own config (one-line error)."""
    old = config_to_yaml_dict(run_config(run_dir))
    new = config_to_yaml_dict(config)
    diff = first_difference(old, new)
    if diff is not None:

        def pick(d: Any) -> Any:
            for part in diff.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return d

        raise ConfigError(
            f"--resume: config differs from {run_dir / CONFIG_FILE} at '{diff}' "
            f"({pick(old)!r} there, {pick(new)!r} now); resume with the run's own config"
        )


def find_run_dir(resume: str | Path, config: Config) -> Path:
    """The run directory to continue: the one given, or (`latest`) the newest run under
    `save_dir` whose config matches."""
    if str(resume) != LATEST:
        run_dir = Path(resume).expanduser()
        if not run_dir.is_dir():
            raise UserError(f"--resume: run directory {run_dir} does not exist")
        check_same_run(run_dir, config)
        return run_dir
    save_dir = Path(config.save_dir or ".").expanduser()
    found: list[tuple[float, Path]] = []
    if save_dir.is_dir():
        for d in save_dir.iterdir():
            if not (d / CONFIG_FILE).is_file():
                continue
            try:
                check_same_run(d, config)
            except UserError:
                continue
            points = resume_points(d)
            newest = points[-1].samples_path if points else d / CONFIG_FILE
            found.append((newest.stat().st_mtime, d))
    if not found:
        raise UserError(
            f"--resume: no run of this config under save_dir {save_dir} (pass --resume RUN_DIR)"
        )
    return max(found)[1]


def find_resume(resume: str | Path, config: Config) -> tuple[Path, ResumePoint | None]:
    """The run directory to continue and its newest complete point (None: start it over at step
    0, e.g. a run killed before its first checkpoint). Reads only; nothing is written."""
    run_dir = find_run_dir(resume, config)
    points = resume_points(run_dir)
    return run_dir, points[-1] if points else None


def prepare_run_dir(
    config: Config, run_dir: Path | None, point: ResumePoint | None, resuming: bool, d: Dist
) -> Path:
    """Rank 0 writes the config (and, when resuming, drops metric records past the checkpoint and
    stale temp files); every rank learns the directory's path."""
    if d.is_main:
        assert run_dir is not None
        write_config(run_dir, config)
        if resuming:
            clean_stale_temp_files(run_dir)
            truncate_metrics(run_dir, point_step(point) if point is not None else 0)
    path = broadcast_str(str(run_dir) if run_dir is not None else None, d)
    assert path is not None
    return Path(path)


def point_step(point: ResumePoint) -> int:
    return int(_read_meta(point.resume_path)["state"]["step"])


def clean_stale_temp_files(run_dir: Path) -> None:
    """Temp files of writes that a kill interrupted (never renamed, so never read)."""
    for p in run_dir.iterdir():
        if _TMP_RE.match(p.name):
            p.unlink(missing_ok=True)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the metrics.jsonl records up to `step` (later ones will be logged again)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept: list[str] = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if not isinstance(rec, dict) or int(rec.get("step", 0)) <= step:
            kept.append(line)
    atomic_write_bytes(path, "".join(f"{ln}\n" for ln in kept).encode())


# --- writing -------------------------------------------------------------------------------------
def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def _param_names(t: Trainer) -> list[str]:
    """Names of the optimizer's parameters in its own order (checked again on load)."""
    names = {id(p): n for n, p in t.model.saes.named_parameters()}
    return [names.get(id(p), "?") for g in t.optimizer.param_groups for p in g["params"]]


def save_point(run_dir: Path, t: Trainer, state: Any, d: Dist, final: bool = False) -> Path | None:
    """Write resume_<N> then samples_<N> (rank 0 only) and drop old points; returns samples_<N>."""
    if not d.is_main:
        return None
    n = int(state.n_samples)
    opt = t.optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optimizer.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    rng_tensors, rng_meta = _rng_state()
    tensors.update(rng_tensors)
    meta = {
        "format": FORMAT,
        "state": {f.name: getattr(state, f.name) for f in fields(state)},
        "param_names": _param_names(t),
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
        "scheduler": t.scheduler.state_dict(),
        "rng": rng_meta,
        "layout": _layout(t, d),
    }
    atomic_save_tensors(tensors, run_dir / f"resume_{n}.safetensors", {META_KEY: json.dumps(meta)})
    path = save_checkpoint(run_dir, t.model, n)
    keep = t.config.keep_last_n_checkpoints
    if keep is not None:
        prune_points(run_dir, keep + (1 if final else 0))
    return path


def _layout(t: Trainer, d: Dist) -> dict[str, int]:
    cfg = t.config
    return {
        "world_size": d.world_size,
        "global_batch": cfg.batch_size * d.world_size,
        "global_effective_batch": (cfg.effective_batch_size or cfg.batch_size) * d.world_size,
    }


def prune_points(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (samples first: a samples file always has its
    resume file)."""
    found = sorted(_indices(run_dir, _SAMPLES_RE) | _indices(run_dir, _RESUME_RE))
    for n in found[: max(0, len(found) - keep)]:
        (run_dir / f"samples_{n}.safetensors").unlink(missing_ok=True)
        (run_dir / f"resume_{n}.safetensors").unlink(missing_ok=True)


# --- reading -------------------------------------------------------------------------------------
def _read_meta(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as err:  # noqa: BLE001 - any parse failure of a user file is one line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"resume file {path}: not a readable safetensors file ({first})") from None
    if raw is None:
        raise UserError(f"resume file {path}: no '{META_KEY}' metadata (not a resume checkpoint)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"resume file {path}: metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"resume file {path}: unknown format (expected {FORMAT})")
    return meta


def restore_point(t: Trainer, point: ResumePoint, state: Any, d: Dist) -> None:
    """Load SAE weights, optimizer, scheduler, RNG states and counters of `point` into `t` and
    `state`. Any inconsistency is a one-line UserError naming the file."""
    path = point.resume_path
    meta = _read_meta(path)
    tensors = read_tensors(path, "resume file")
    try:
        _check_layout(meta["layout"], _layout(t, d), path)
        load_sae_weights(t.model, point.samples_path)
        _load_optimizer(t, meta, tensors, path)
        t.scheduler.load_state_dict(meta["scheduler"])
        _set_rng(meta["rng"], tensors)
        for f in fields(state):  # a counter added after the file was written keeps its default
            value = getattr(state, f.name)
            setattr(state, f.name, type(value)(meta["state"].get(f.name, value)))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise UserError(f"resume file {path}: inconsistent contents ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None  # fmt: skip


def _check_layout(old: dict[str, int], new: dict[str, int], path: Path) -> None:
    for key in ("global_batch", "global_effective_batch"):
        if old[key] != new[key]:
            raise UserError(
                f"resume file {path}: the run used a {key.replace('_', ' ')} of {old[key]} "
                f"(world_size {old['world_size']}), now {new[key]}; keep world_size x batch_size"
            )


def _load_optimizer(t: Trainer, meta: dict[str, Any], tensors: dict[str, Tensor], path: Path):
    names = _param_names(t)
    if meta["param_names"] != names:
        raise UserError(f"resume file {path}: optimizer parameters {meta['param_names'][:3]}... "
                        f"do not match this config's {names[:3]}...")  # fmt: skip
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("optimizer."):
            continue
        _, pid, name = key.split(".", 2)
        i = int(pid)
        if v.dim() > 0 and v.shape != params[i].shape:
            raise UserError(
                f"resume file {path}: '{key}' has shape {tuple(v.shape)} but {names[i]} is "
                f"{tuple(params[i].shape)}"
            )
        state.setdefault(i, {})[name] = v
    for pid, extra in meta["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    t.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})


def _set_rng(meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --- clean stops ---------------------------------------------------------------------------------
class StopOnSignal:
    """After `install()`, SIGINT / SIGTERM only set `signum`; the loop checks `requested()` after
    each step, saves, and raises `interrupted()`. The handlers are removed after the first signal,
    so a second one acts as usual (KeyboardInterrupt / termination). A no-op outside the main
    thread (signals are only delivered there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        logger.warning("got %s: finishing this step, then saving", signal.Signals(signum).name)
        self.restore()

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def requested(self, d: Dist) -> int:
        """The signal number if any rank got one (every rank must call this each step)."""
        return max_over_ranks(self.signum, d)

    @staticmethod
    def interrupted(run_dir: Path, step: int, signum: int) -> TrainingInterrupted:
        """The exception that ends the run once the checkpoint for `signum` is written."""
        return TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved, "
            f"continue with `e2e-sae train CONFIG --resume {run_dir}`",
            signum,
        )
