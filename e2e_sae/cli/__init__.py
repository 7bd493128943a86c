"""`e2e-sae` command line: parse, call the library, print a table. User errors exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from e2e_sae.cli import (
    activations,
    autointerp,
    browse,
    cache_acts,
    cache_teacher,
    convert,
    demo,
    export,
    geometry,
    graph,
    paper_figures,
    plot,
    pretrained,
    push,
    sweep,
    train,
    train_cached,
    train_lm,
    train_mlp,
)
from e2e_sae.cli import eval as eval_cmd
from e2e_sae.errors import SignalInterrupt, TrainingInterrupted, UserError
from e2e_sae.interrupts import ignore_signals, interrupt_on_signals
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


# The command table: one module per command, named for it; each module's `register(subparsers)`
# adds its subcommand (in this order in --help). The modules import the library inside their
# commands, so `--help` stays fast.
COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    train.register,
    eval_cmd.register,
    demo.register,
    train_lm.register,
    sweep.register,
    plot.register,
    paper_figures.register,
    geometry.register,
    activations.register,
    pretrained.register,
    browse.register,
    autointerp.register,
    export.register,
    graph.register,
    push.register,
    train_mlp.register,
    cache_acts.register,
    cache_teacher.register,
    train_cached.register,
    convert.register,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; `argv` None: this process's own command line. Then SIGINT and SIGTERM
    end the command with one line and exit 130 / 143 wherever they arrive (a training saves
    first, see `training.loop.StopOnSignal`), and signals after the first, or after the
    command ended (e.g. a second Ctrl-C during shutdown), are ignored (`e2e_sae.interrupts`)."""
    if argv is None:
        interrupt_on_signals()
    _reported.clear()
    try:
        return _main(argv)
    except KeyboardInterrupt as err:  # a second signal while the first one was being handled
        if argv is None:
            ignore_signals()
        return _interrupted(err)
    finally:
        if argv is None:
            ignore_signals()


_reported: list[int] = []  # the exit status of the interruption already reported, if any


def _interrupted(err: KeyboardInterrupt) -> int:
    """One line for a signal that ended the command (once: a signal that lands while the first
    one is reported adds nothing); its exit status, 128 + the signal number."""
    if not _reported:
        message = str(err) if isinstance(err, SignalInterrupt) else ""
        print(f"interrupted: {message}" if message else "interrupted", file=sys.stderr)
        _reported.append(err.exit_code if isinstance(err, SignalInterrupt) else 130)
    return _reported[0]


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
    except KeyboardInterrupt as err:
        return _interrupted(err)


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


if __name__ == "__main__":
    sys.exit(main())
