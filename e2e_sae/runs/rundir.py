"""A run's directory: named from its config (`get_run_name`), made without ever reusing one
(`make_run_dir`), and held by one process for the run's lifetime (`RunLock`,
`create_locked_run_dir`).

The lock is an exclusive flock on RUN_DIR/.lock: a second process cannot `--resume` (or otherwise
train into) a directory a live run writes. The OS drops the lock when its process ends in any way,
SIGKILL included.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

from e2e_sae.config import MAX_NAME_BYTES, Config
from e2e_sae.errors import UserError

try:
    import fcntl
except ImportError:  # (Windows: no advisory locks; runs are then not protected from each other)
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


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


def get_run_name(config: Config) -> str:
    """Name from the key settings, as the original library does."""
    if config.run_name or config.wandb_run_name:
        return str(config.run_name or config.wandb_run_name)
    positions = "-".join(config.saes.sae_positions + [t.output for t in config.saes.transcoders])
    parts = [f"{positions}", f"ratio-{config.saes.dict_size_to_input_ratio}", f"lr-{config.lr}"]
    if config.saes.architecture != "relu":
        parts.insert(0, config.saes.architecture + (f"{config.saes.k}" if config.saes.k else ""))
    short = {
        "sparsity": "lpcoeff",
        "out_to_in": "in-to-out",
        "out_to_orig": "out-to-orig",
        "logits_kl": "logits-kl",
        "in_to_orig": "in-to-orig",
    }
    for name, term in config.loss.enabled.items():
        parts.append(f"{short[name]}-{getattr(term, 'coeff', 0):g}")
    return folder_name(config.wandb_run_name_prefix + "_".join(parts))


def folder_name(name: str) -> str:
    """A name made of config values as one folder name: separators and control characters become
    '_', cut to MAX_NAME_BYTES bytes (a name the user gave is checked by the config instead)."""
    name = re.sub(r"[/\\\x00-\x1f\x7f]", "_", name).lstrip(".") or "run"
    return name.encode()[:MAX_NAME_BYTES].decode(errors="ignore")


def _stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def make_run_dir(config: Config, run_dir: Path | None = None) -> Path:
    """A new run directory: `run_dir`, or `<save_dir>/<run name>_<time>`, created exclusively
    (`-2`, `-3`, ... appended when another run took the name, e.g. started in the same second)."""
    try:
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            return run_dir
        assert config.save_dir is not None
        base = Path(config.save_dir).expanduser() / f"{get_run_name(config)}_{_stamp()}"
        base.parent.mkdir(parents=True, exist_ok=True)
        for k in itertools.count(1):
            run_dir = base if k == 1 else base.with_name(f"{base.name}-{k}")
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                continue
    except OSError as err:
        where = run_dir or config.save_dir
        raise UserError(f"save_dir: cannot create {where} ({err.strerror})") from None
    raise AssertionError("unreachable")


def create_locked_run_dir(config: Config, run_dir: Path | None = None) -> tuple[Path, RunLock]:
    """`make_run_dir`, then its lock (a given `run_dir` that a live run holds is refused)."""
    new = run_dir is None or not run_dir.exists()
    run_dir = make_run_dir(config, run_dir)
    try:
        return run_dir, RunLock(run_dir).acquire("save_dir")
    except UserError:
        if new:  # (e.g. a full disk): no directory holding only a `.lock` is left
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
