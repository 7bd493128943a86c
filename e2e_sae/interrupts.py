"""SIGINT / SIGTERM for the command line: one line and exit 128 + signal number, wherever they land.

`interrupt_on_signals` (installed before the command's modules are imported) makes the first
signal raise `SignalInterrupt` and ignores the ones after it, so the unwinding it starts is not cut
short. A signal that lands inside an import is held back until the import is over: an exception
raised in the middle of a module's import leaves it half-initialised (numpy then recurses forever,
transformers reports a missing module), so it would end in someone else's traceback. A training
run replaces these handlers while it trains (`training.loop.StopOnSignal`: finish the step,
save, then stop).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from e2e_sae.errors import SignalInterrupt

SIGNALS = (signal.SIGINT, signal.SIGTERM)
RETRY_S = 0.05
"""How long a signal that landed inside an import waits before it is delivered again."""


def in_import(frame: FrameType | None) -> bool:
    """Whether `frame` (where a signal landed) is inside the import machinery."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def deliver_later(signum: int) -> None:
    """Send `signum` to this process again in RETRY_S seconds (its handler then runs again)."""
    timer = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def ignore_signals() -> None:
    """From now on SIGINT and SIGTERM do nothing (the command is ending already)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if in_import(frame):
        deliver_later(signum)
        return
    ignore_signals()
    raise SignalInterrupt(signum)


def interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise `SignalInterrupt` (once; see the module docstring). Main thread
    only (where Python runs signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _interrupt)
