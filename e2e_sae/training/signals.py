"""Clean stops: SIGINT / SIGTERM do not kill a training run. The current step finishes, a resume
point is written, and `TrainingInterrupted` ends the run (the CLI exits 128 + signal number:
130 / 143)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from e2e_sae.errors import TrainingInterrupted
from e2e_sae.training.distributed import Dist, max_over_ranks

logger = logging.getLogger(__name__)


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
