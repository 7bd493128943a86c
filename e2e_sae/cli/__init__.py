"""`e2e-sae` command line: parse, call the library, print a table. User errors exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from e2e_sae.cli import analysis, cache, compat, demo, interop, paper, train
from e2e_sae.cli import eval as eval_cmd
from e2e_sae.errors import TrainingInterrupted, UserError
from e2e_sae.version import __version__


class _Parser(argparse.ArgumentParser):
    """Usage mistakes become one-line UserErrors (exit 2) instead of a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="e2e-sae", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    for register in COMMANDS:
        register(sub)
    return p


# The command table: each module's `register(subparsers)` adds its subcommands (in this order in
# --help). The modules import the library inside their commands, so `--help` stays fast.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    train.register,
    eval_cmd.register,
    demo.register,
    analysis.register,
    paper.register,
    interop.register,
    cache.register,
    compat.register,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; `argv` None: this process's own command line (then signals that arrive
    after the command ended, e.g. a second Ctrl-C during shutdown, are ignored)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was being handled
        if argv is None:
            _ignore_signals()
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is None:
            _ignore_signals()


def _ignore_signals() -> None:
    """The command is over: a late SIGINT / SIGTERM would otherwise raise inside an interpreter
    exit handler (an 'Exception ignored in atexit callback' traceback) or kill the process
    with another exit status than the one reported."""
    import signal

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit as done:  # --help, --version
        return int(done.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:  # a checkpoint was written: exit 128 + signal number
        print(f"interrupted: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


if __name__ == "__main__":
    sys.exit(main())
