"""Faults of the filesystem under a running training: a full disk, a file size limit, a run
directory made read-only or deleted. Each ends the run with one line saying what happened and how
to continue; nothing is lost, because every file is written atomically (the last complete
checkpoint stays as it was, and `--resume` continues from it exactly)."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from e2e_sae.errors import UserError
from e2e_sae.runs.checkpoint import CONFIG_FILE
from e2e_sae.training.resume import resume_points

WRITE_FAULTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file reached the file size limit (ulimit -f)",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
"""errno -> what happened, for the write errors a run can survive by being resumed later."""


class RunDirectoryGone(UserError):
    """The run directory was deleted while its run was writing to it."""


def fault_message(err: OSError, run_dir: Path, resume_command: str) -> str:
    """One line: which file could not be written and why, the checkpoint that is intact, and
    the command that continues from it."""
    what = WRITE_FAULTS.get(err.errno or 0, err.strerror or str(err))
    target = Path(str(err.filename or run_dir))
    if (temp := re.match(r"^\.(.+)\.tmp\d+$", target.name)) is not None:
        target = target.with_name(temp.group(1))  # the file an atomic write was replacing
    points = resume_points(run_dir)
    kept = (
        f"the last complete checkpoint, {points[-1].samples_path.name}, is intact"
        if points
        else "no checkpoint was complete yet"
    )
    then = (
        f"continue with `{resume_command} {run_dir}`"
        if (run_dir / CONFIG_FILE).is_file()
        else "start it again"  # (its config was not written: there is nothing to resume)
    )
    return (
        f"cannot write {target}: {what} ({err.strerror}); training stopped and {kept}; "
        f"make room or fix the permissions, then {then}"
    )


@contextmanager
def write_faults(run_dirs: Sequence[Path], resume_command: str) -> Iterator[None]:
    """Turn the filesystem faults of a running training into one-line UserErrors: `WRITE_FAULTS`
    (naming the file, the intact checkpoint and `resume_command RUN_DIR`), and any write into a
    run directory that no longer exists (`RunDirectoryGone`; it is not recreated)."""
    try:
        yield
    except OSError as err:
        run_dir = _owner(err, run_dirs)
        if run_dir is None:
            raise
        if not run_dir.is_dir():
            raise RunDirectoryGone(
                f"run directory {run_dir} was deleted while the run was writing to it; "
                "training stopped (the directory is not recreated; nothing is left to resume)"
            ) from None
        if err.errno not in WRITE_FAULTS:
            raise
        raise UserError(fault_message(err, run_dir, resume_command)) from None


def _owner(err: OSError, run_dirs: Sequence[Path]) -> Path | None:
    """The run directory `err` happened in (by its file name; the only one if there is one)."""
    if err.filename is not None:
        path = Path(str(err.filename)).absolute()
        for d in run_dirs:
            if path == d.absolute() or d.absolute() in path.parents:
                return d
        return None
    return run_dirs[0] if len(run_dirs) == 1 else None
