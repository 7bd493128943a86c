"""`e2e-sae` command line: parse, call the library, print a table. User errors exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from e2e_sae.errors import TrainingInterrupted, UserError

Command = Callable[[argparse.Namespace], int | None]


def cmd_train(args: argparse.Namespace) -> int:
    from e2e_sae.config import Config, config_to_yaml_dict, load_config

    if args.config is None and args.resume not in (None, "latest"):
        args.config = Path(args.resume) / "final_config.yaml"  # resume a run with its own config
        if not args.config.is_file():
            raise UserError(
                f"--resume: {args.resume} is not a run directory (no {args.config.name})"
            )
    if args.config is None:
        from e2e_sae.cli_demo import cmd_demo

        return cmd_demo(args)
    config = load_config(args.config)
    assert isinstance(config, Config)
    if args.dry_run:
        from e2e_sae.dry_run import check_hooks

        hooks = check_hooks(config)  # a hook matching nothing fails here, as in the real run
        print(yaml.safe_dump(config_to_yaml_dict(config), sort_keys=False), end="")
        print(f"# {hooks}", file=sys.stderr)
        return 0
    from e2e_sae.report import eval_table
    from e2e_sae.train import train

    results = []
    run_dir = train(config, device=args.device, reference=args.reference,
                    on_eval=results.append, resume=args.resume)  # fmt: skip
    if results:
        print(eval_table(results[-1]))
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        from e2e_sae.analysis.curves import CURVES_FILE

        print(f"\nrun directory: {run_dir}")
        if (run_dir / CURVES_FILE).is_file():
            print(f"training curves: {run_dir / CURVES_FILE}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from e2e_sae.cli_eval import run_eval_command

    return run_eval_command(args)


def _version() -> str:
    from e2e_sae import __version__

    return __version__


class _Parser(argparse.ArgumentParser):
    """Usage mistakes become one-line UserErrors (exit 2) instead of a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="e2e-sae", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train SAEs from a YAML config (no config: the demo)")
    t.add_argument("config", nargs="?", type=Path, help="YAML config")
    t.add_argument("--dry-run", action="store_true", help="validate and print the resolved config")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    t.add_argument(
        "--reference",
        action="store_true",
        help="use the straightforward two-pass e2e step (as the original library)",
    )
    t.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR (alone: the newest run of CONFIG under save_dir) from "
                   "its last checkpoint; the result equals an uninterrupted run")  # fmt: skip
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained run on held-out data")
    e.add_argument("run_dir", type=Path)
    e.add_argument(
        "--data", default=None, help="dataset name or path (default: the run's eval_data)"
    )
    e.add_argument("--split", default=None, help="dataset split (default: the run's)")
    e.add_argument("--n-tokens", type=int, default=None, help="evaluate on about this many tokens")
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument(
        "--out", type=Path, default=None, help="write JSON here (default RUN_DIR/eval.json)"
    )
    e.add_argument("--device", default=None)
    e.set_defaults(func=cmd_eval)
    for register in EXTRA_COMMANDS:
        register(sub)
    return p


# Other modules add subcommands here (train-lm, sweep, export, demo, ...).
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


# Modules that define `register(subparsers)` to add their subcommands.
COMMAND_MODULES = [
    "e2e_sae.cli_demo",
    "e2e_sae.cli_more",
    "e2e_sae.cli_analysis",
    "e2e_sae.cli_interop",
    "e2e_sae.cli_cache",
    "e2e_sae.cli_compat",
]


def _register_extras() -> None:
    import importlib
    import importlib.util

    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        reg = getattr(importlib.import_module(name), "register", None)
        if reg is not None and reg not in EXTRA_COMMANDS:
            EXTRA_COMMANDS.append(reg)


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
    _register_extras()
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
