"""Library exceptions. A `UserError` is a mistake the user can fix; the CLI prints it on one
line and exits with status 2. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A bad config value, missing file, unknown hook, unreachable hub asset, ...

    The message is a single line that names the offending field or path and what was expected.
    """


def first_line(err: BaseException, limit: int | None = 160) -> str:
    """The first line of an exception's message, at most `limit` characters (its type name if it
    has none): what a one-line error quotes of a library's exception."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def check_output_folder(path: object, field: str) -> None:
    """`path` may be written as a folder: it does not exist yet or is a directory."""
    from pathlib import Path

    p = Path(str(path)).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{field}: {p} is a file, not a folder")
    if not p.exists() and any(q.exists() and not q.is_dir() for q in p.parents):
        raise UserError(f"{field}: {p} is inside a file, not a folder")


class ConfigError(UserError):
    """A config file or config value is invalid."""


class DamagedFileError(UserError):
    """A checkpoint file that exists but does not read back intact (truncated, emptied, corrupted).

    Loaders that have older checkpoints to fall back on catch this one; other UserErrors (a
    missing file, a file that would need a full unpickle) are not damage and are not skipped.
    """


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM stopped training after a resume checkpoint was written.

    The CLI prints the one-line message and exits 128 + the signal number (130 for SIGINT, 143 for
    SIGTERM), the shell convention for a process ended by that signal.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalInterrupt(KeyboardInterrupt):
    """SIGINT / SIGTERM ending a command at once (outside a training step, or a second signal
    during one). A KeyboardInterrupt, so that no `except Exception` on the way swallows it; the
    CLI prints the message (if any) on one line and exits 128 + the signal number."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
