"""One process per run directory: an exclusive flock on RUN_DIR/.lock.

A run holds the lock for its lifetime: a second process cannot `--resume` (or otherwise train
into) a directory a live run writes. The OS drops the lock when its process ends in any way,
SIGKILL included.
"""

from __future__ import annotations

import os
from pathlib import Path

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
