"""`python -m e2e_sae` and the `e2e-sae` command (`run`)."""

import sys

from e2e_sae.interrupts import interrupt_on_signals


def run() -> int:
    """The command line, with SIGINT / SIGTERM handled before the command modules load."""
    interrupt_on_signals()
    from e2e_sae.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
