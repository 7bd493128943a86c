"""Exact resume: what a checkpoint holds beyond the SAE weights (a resume point), written and read
back.

A resume point N is two files in the run directory, written in this order (each atomically):
  resume_<N>.safetensors   Adam moments (tensors) + JSON metadata: optimizer param groups, scheduler
                           state, python / numpy / torch RNG states, the step / sample / batch
                           counters (the batch counter is the data position) and the batch layout
  samples_<N>.safetensors  SAE weights and buffers (what `from_local_path` and evaluation read)
A point counts only when both files exist, so a run killed at any moment (SIGKILL) resumes from its
last complete point. Each file's checksum covers its tensors and its metadata, and the resume file
holds the checksum of the SAE weights, so a damaged or mismatched file is found before anything is
loaded; `--resume` then falls back to the newest intact point (one warning line per damaged file,
which is renamed `*.damaged` once the run goes on). Only safetensors and JSON are read back: no
pickle.

Which run `--resume` continues, and tidying its directory before it goes on, is `find_run`'s job;
old points beyond `keep_last_n_checkpoints` go as each new one is written (`prune_points`).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from e2e_sae.config import Config
from e2e_sae.errors import UserError
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.runs.checkpoint import (
    atomic_save_tensors,
    load_sae_weights,
    read_tensors,
    sae_state,
    save_checkpoint,
    tensor_digest,
)
from e2e_sae.training.distributed import Dist


class Checkpointed(Protocol):
    """What a resume point saves and restores (`training.trainer.Trainer` is one)."""

    config: Config
    model: SAETransformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


logger = logging.getLogger(__name__)

FORMAT = "e2e_sae.training.resume/1"
META_KEY = "e2e_sae.training.resume"
_SAMPLES_RE = re.compile(r"^samples_(\d+)\.safetensors$")
_RESUME_RE = re.compile(r"^resume_(\d+)\.safetensors$")
DAMAGED_SUFFIX = ".damaged"


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


def damaged_file(point: ResumePoint) -> tuple[Path, str] | None:
    """(file, one-line reason) when a file of `point` is unreadable, fails its checksum, or the
    weights are not the ones its resume file was written with; None when the point is intact."""
    try:
        samples = read_tensors(point.samples_path, "checkpoint")
    except UserError as err:
        return point.samples_path, str(err)
    try:
        meta = _read_meta(point.resume_path)
        read_tensors(point.resume_path, "resume file")
    except UserError as err:
        return point.resume_path, str(err)
    want = meta.get("samples_sha256")
    if want is not None and want != tensor_digest(samples):
        return point.samples_path, (
            f"checkpoint: {point.samples_path} does not hold the weights "
            f"{point.resume_path.name} was saved with (checksum mismatch)"
        )
    return None


def newest_intact_point(run_dir: Path) -> tuple[int | None, list[Path]]:
    """(n_samples of the newest intact point or None if the run has no point yet, the damaged
    files of newer points). One warning line per damaged file; a UserError when points exist
    but none is intact."""
    damaged: list[tuple[Path, str]] = []
    points = resume_points(run_dir)
    for point in reversed(points):
        bad = damaged_file(point)
        if bad is None:
            for _, reason in damaged:
                logger.warning("--resume: %s; resuming from %s", reason, point.samples_path.name)
            return point.n_samples, [p for p, _ in damaged]
        damaged.append(bad)
    if damaged:
        raise UserError(f"{damaged[0][1]}; no older intact checkpoint to resume from")
    return None, []


def point_step(point: ResumePoint) -> int:
    return int(_read_meta(point.resume_path)["state"]["step"])


# --- writing -------------------------------------------------------------------------------------
def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The Python, NumPy, torch (and CUDA) generators' states as tensors and JSON metadata."""
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


def _restore_rng(meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Set every generator to the state `rng_state` returned."""
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _param_names(t: Checkpointed) -> list[str]:
    """Names of the optimizer's parameters in its own order (checked again on load)."""
    names = {id(p): n for n, p in t.model.saes.named_parameters()}
    return [names.get(id(p), "?") for g in t.optimizer.param_groups for p in g["params"]]


def save_point(
    run_dir: Path, t: Checkpointed, state: Any, d: Dist, keep: int | None = None
) -> Path | None:
    """Write resume_<N> then samples_<N> (rank 0 only) and keep the newest `keep` points (None:
    all); returns samples_<N>."""
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
        "samples_sha256": tensor_digest(sae_state(t.model)),  # ties the two files together
    }
    atomic_save_tensors(tensors, run_dir / f"resume_{n}.safetensors", {META_KEY: json.dumps(meta)})
    path = save_checkpoint(run_dir, t.model, n)
    if keep is not None:
        prune_points(run_dir, keep, upto=n)
    return path


def prune_points(run_dir: Path, keep: int, upto: int | None = None) -> None:
    """Delete all but the newest `keep` checkpoints up to `upto` samples (samples first: a samples
    file always has its resume file). Later files are left from before a resume (the run will
    write them again): they must not count as newest."""
    found = sorted(_indices(run_dir, _SAMPLES_RE) | _indices(run_dir, _RESUME_RE))
    found = [n for n in found if upto is None or n <= upto]
    for n in found[: max(0, len(found) - keep)]:
        (run_dir / f"samples_{n}.safetensors").unlink(missing_ok=True)
        (run_dir / f"resume_{n}.safetensors").unlink(missing_ok=True)


def _layout(t: Checkpointed, d: Dist) -> dict[str, int]:
    cfg = t.config
    return {
        "world_size": d.world_size,
        "global_batch": cfg.batch_size * d.world_size,
        "global_effective_batch": (cfg.effective_batch_size or cfg.batch_size) * d.world_size,
    }


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


def restore_point(t: Checkpointed, point: ResumePoint, state: Any, d: Dist) -> None:
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
        _restore_rng(meta["rng"], tensors)
        for f in fields(state):  # a counter added after the file was written keeps its default
            value = getattr(state, f.name)
            setattr(state, f.name, type(value)(meta["state"].get(f.name, value)))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise UserError(
            f"resume file {path}: inconsistent contents ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def _check_layout(old: dict[str, int], new: dict[str, int], path: Path) -> None:
    for key in ("global_batch", "global_effective_batch"):
        if old[key] != new[key]:
            raise UserError(
                f"resume file {path}: the run used a {key.replace('_', ' ')} of {old[key]} "
                f"(world_size {old['world_size']}), now {new[key]}; keep world_size x batch_size"
            )


def _load_optimizer(t: Checkpointed, meta: dict[str, Any], tensors: dict[str, Tensor], path: Path):
    names = _param_names(t)
    if meta["param_names"] != names:
        raise UserError(
            f"resume file {path}: optimizer parameters {meta['param_names'][:3]}... "
            f"do not match this config's {names[:3]}..."
        )
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
