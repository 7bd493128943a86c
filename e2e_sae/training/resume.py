"""Exact resume and clean stops: what a checkpoint holds beyond the SAE weights, and how a run
continues from it.

A resume point N is two files in the run directory, written in this order (each atomically):
  resume_<N>.safetensors   Adam moments (tensors) + JSON metadata: optimizer param groups, scheduler
                           state, python / numpy / torch RNG states, the step / sample / batch
                           counters (the batch counter is the data position) and the batch layout
  samples_<N>.safetensors  SAE weights and buffers (what `load_run` and evaluation read)
A point counts only when both files exist, so a run killed at any moment (SIGKILL) resumes from its
last complete point. Each file's checksum covers its tensors and its metadata, and the resume file
holds the checksum of the SAE weights, so a damaged or mismatched file is found before anything is
loaded; `--resume` then falls back to the newest intact point (one warning line per damaged file,
which is renamed `*.damaged` once the run goes on). Only safetensors and JSON are read back: no
pickle.

A run holds an exclusive lock (`RunLock`, an flock on RUN_DIR/.lock) for its lifetime: a second
process cannot `--resume` (or otherwise train into) a directory a live run writes. The OS drops the
lock when its process ends in any way, SIGKILL included.

SIGINT / SIGTERM do not kill a training run: the current step finishes, a resume point is written,
and `TrainingInterrupted` ends the run (the CLI exits 128 + signal number: 130 / 143).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from e2e_sae.config import Config, config_to_yaml_dict, load_config
from e2e_sae.errors import ConfigError, SignalInterrupt, TrainingInterrupted, UserError
from e2e_sae.interrupts import deliver_later, in_import
from e2e_sae.lm.checkpoint import (
    CONFIG_FILE,
    atomic_save_tensors,
    atomic_write_bytes,
    load_sae_weights,
    read_tensors,
    sae_state,
    save_checkpoint,
    tensor_digest,
    write_config,
)
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.training.distributed import SINGLE, Dist, broadcast_str, max_over_ranks

try:
    import fcntl
except ImportError:  # (Windows: no advisory locks; runs are then not protected from each other)
    fcntl = None  # type: ignore[assignment]


class Checkpointed(Protocol):
    """What a resume point saves and restores (`training.trainer.Trainer` is one)."""

    config: Config
    model: SAETransformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


logger = logging.getLogger(__name__)

FORMAT = "e2e_sae.training.resume/1"
META_KEY = "e2e_sae.training.resume"
LATEST = "latest"
_SAMPLES_RE = re.compile(r"^samples_(\d+)\.safetensors$")
_RESUME_RE = re.compile(r"^resume_(\d+)\.safetensors$")
_TMP_RE = re.compile(r"^\..+\.tmp\d+$")
LOCK_FILE = ".lock"
DAMAGED_SUFFIX = ".damaged"

# Config keys that may change between the interrupted run and its continuation: they steer logging,
# saving, evaluation, length, or where / how memory-frugally the same step runs. (`batch_size` /
# `effective_batch_size` may change with the number of ranks as long as the global batch stays the
# same; checked separately.) Changing n_samples, device, compile or kl_chunk_tokens gives a valid
# continuation that is no longer bit-identical to an uninterrupted run.
RESUMABLE_CHANGES = frozenset(
    {
        "n_samples",
        "save_every_n_samples",
        "keep_last_n_checkpoints",
        "eval_every_n_samples",
        "eval_n_samples",
        "eval_data",
        "log_every_n_grad_steps",
        "act_frequency_n_tokens",
        "collect_act_frequency_every_n_samples",
        "wandb_project",
        "wandb_run_name",
        "wandb_run_name_prefix",
        "run_name",
        "save_dir",
        "device",
        "compile",
        "kl_chunk_tokens",
        "batch_size",
        "effective_batch_size",
        "divergence_factor",
    }
)


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


# --- one process per run directory ---------------------------------------------------------------
class RunLock:
    """An exclusive flock on RUN_DIR/.lock, held from creation (or `--resume`) to the end of the
    run. The file holds the holder's pid, for the message a second process gets."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._fd: int | None = None

    def acquire(self, field: str) -> RunLock:
        """Take the lock or raise a one-line UserError (`field`: what the user gave)."""
        try:
            fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"{field}: cannot write in {self.run_dir} ({err.strerror})") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(
                    f"{field}: {self.run_dir} is in use by a running training (pid {holder}); "
                    "let it finish or stop it first"
                ) from None
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as err:  # (a full disk)
            os.close(fd)
            raise UserError(f"{field}: cannot write in {self.run_dir} ({err.strerror})") from None
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def on_main(fn: Callable[[], Any], d: Dist) -> Any:
    """`fn()` on rank 0 only (None elsewhere). A UserError there is raised on every rank, so the
    other ranks do not wait forever at the next collective."""
    if not d.enabled:
        return fn()
    result, message = None, None
    if d.is_main:
        try:
            result = fn()
        except UserError as err:
            message = str(err)
    message = broadcast_str(message, d)
    if message is not None:
        raise UserError(message)
    return result


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


@dataclass
class Resume:
    """What `--resume` continues: the run directory (locked by rank 0), the point to restore
    (None: start over at step 0, e.g. a run killed before its first checkpoint) and the damaged
    files of newer points that were skipped."""

    run_dir: Path
    point: ResumePoint | None
    damaged: list[Path] = field(default_factory=list)
    lock: RunLock | None = None


def find_resume(resume: str | Path, config: Config, d: Dist = SINGLE) -> Resume:
    """Find the run directory, lock it (rank 0) and pick its newest intact point. Writes nothing
    but the lock file; the caller releases `lock`."""
    run_dir = find_run_dir(resume, config)
    lock = on_main(lambda: RunLock(run_dir).acquire("--resume"), d)
    try:
        choice = on_main(lambda: newest_intact_point(run_dir), d)
        n = broadcast_str(None if choice is None or choice[0] is None else str(choice[0]), d)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    point = ResumePoint(run_dir, int(n)) if n is not None else None
    return Resume(run_dir, point, choice[1] if choice is not None else [], lock)


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


def prepare_run_dir(config: Config, run_dir: Path | None, resume: Resume | None, d: Dist) -> Path:
    """Rank 0 writes the config (and, when resuming, drops metric records past the checkpoint,
    stale temp files, and renames the damaged files it skipped); every rank learns the
    directory's path."""
    if d.is_main:
        assert run_dir is not None
        write_config(run_dir, config)
        if resume is not None:
            clean_stale_temp_files(run_dir)
            for path in resume.damaged:
                if path.exists():
                    os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
            point = resume.point
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


def _param_names(t: Checkpointed) -> list[str]:
    """Names of the optimizer's parameters in its own order (checked again on load)."""
    names = {id(p): n for n, p in t.model.saes.named_parameters()}
    return [names.get(id(p), "?") for g in t.optimizer.param_groups for p in g["params"]]


def save_point(
    run_dir: Path, t: Checkpointed, state: Any, d: Dist, final: bool = False
) -> Path | None:
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
        "samples_sha256": tensor_digest(sae_state(t.model)),  # ties the two files together
    }
    atomic_save_tensors(tensors, run_dir / f"resume_{n}.safetensors", {META_KEY: json.dumps(meta)})
    path = save_checkpoint(run_dir, t.model, n)
    keep = t.config.keep_last_n_checkpoints
    if keep is not None:
        prune_points(run_dir, keep + (1 if final else 0), upto=n)
    return path


def _layout(t: Checkpointed, d: Dist) -> dict[str, int]:
    cfg = t.config
    return {
        "world_size": d.world_size,
        "global_batch": cfg.batch_size * d.world_size,
        "global_effective_batch": (cfg.effective_batch_size or cfg.batch_size) * d.world_size,
    }


def prune_points(run_dir: Path, keep: int, upto: int | None = None) -> None:
    """Delete all but the newest `keep` checkpoints up to `upto` samples (samples first: a samples
    file always has its resume file). Later files are left from before a resume (the run will
    write them again): they must not count as newest."""
    found = sorted(_indices(run_dir, _SAMPLES_RE) | _indices(run_dir, _RESUME_RE))
    found = [n for n in found if upto is None or n <= upto]
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
        _set_rng(meta["rng"], tensors)
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

    @contextmanager
    def at_once(self, message: Callable[[int], str]) -> Iterator[None]:
        """Within: SIGINT / SIGTERM (or one that came since `install`) end the run now, with a
        `SignalInterrupt` carrying `message(signum)`: for work after the final checkpoint (the
        final evaluation), which a stop would otherwise have to wait for."""
        if self.signum:
            raise SignalInterrupt(self.signum, message(self.signum))
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, frame: FrameType | None) -> None:
            if in_import(frame):  # (raised there, it would break the module being imported)
                deliver_later(signum)
                return
            self.signum = signum
            self.restore()  # (the handlers from before `install`: a further signal ends it all)
            raise SignalInterrupt(signum, message(signum))

        before = {s: signal.signal(s, handle) for s in self.SIGNALS}
        try:
            yield
        finally:
            if not self.signum:
                for s, old in before.items():
                    signal.signal(s, old)

    def requested(self, d: Dist) -> int:
        """The signal number if any rank got one (every rank must call this each step)."""
        return max_over_ranks(self.signum, d)

    @staticmethod
    def interrupted(
        run_dir: Path, step: int, signum: int, command: str = "e2e-sae train CONFIG --resume"
    ) -> TrainingInterrupted:
        """The exception that ends the run once the checkpoint for `signum` is written."""
        return TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved, "
            f"continue with `{command} {run_dir}`",
            signum,
        )
