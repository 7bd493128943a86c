"""The numbers of a step, kept where they were computed until someone reads them.

A GPU runs ahead of Python only as long as the step never asks for a value back; reading one
(`.item()`, `float()`, `bool()`, a boolean mask) makes the host wait for every kernel queued
before it. So an engine step returns its logged values as `StepValues` (device tensors), and its
`Guard` only keeps, per step, what the checks need: the loss and its terms, each gradient's and
each weight's norm (one `_foreach_norm` call each: NaN or inf exactly when an entry is). Nothing
is read until the loop reads: on logged steps, before a checkpoint or an evaluation, on the last
step and on a signal (`loop.step_run`). Then `Guard.check` reads every kept step at once (one
host read) and replays the checks in step order, on the host: the first step whose loss is
non-finite (naming the term), whose gradients or weights are (naming the parameter), or whose
loss is over `divergence_factor` times the median of the last DIVERGENCE_WINDOW steps (naming
the term that grew most) raises the `NumericalError` that the step would have raised, with the
same message and the same step, so the checkpoint holding the weights that caused it is set
aside as before; the steps taken since (on weights that may already be NaN) are discarded with
it. (Recording the first problem on the device instead cost ~90 small kernels a step: ~4% of a
small model's step on a CPU.)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from e2e_sae.errors import UserError
from e2e_sae.training.distributed import SINGLE, Dist, max_over_ranks

DIVERGENCE_WINDOW = 100  # steps whose median loss the divergence guard compares against

LOSS, GRADIENT, WEIGHT, DIVERGED = 1, 2, 3, 4
_COMPACT = 1024  # kept tensors joined into one (on the device) at this many
_LATE = 1 << 62  # (ranks agree on the earliest step of a problem: max of _LATE - step)


class NumericalError(UserError):
    """NaN / inf in a loss, gradient or weight, or a diverging loss. `weights_step`: the step
    after which the weights that caused it were in place (their checkpoint is not to be kept)."""

    def __init__(self, message: str, weights_step: int | None = None) -> None:
        super().__init__(message)
        self.weights_step = weights_step


class Guard:
    """One run's watch over its numbers (see the module docstring).

    `divergence_factor`: None turns the divergence check off (the window is kept either way: it
    is part of a resume point, `TrainState.recent_losses`)."""

    def __init__(self, divergence_factor: float | None = None) -> None:
        self.factor = divergence_factor
        self._kept: list[Tensor] = []  # float64 vectors on the device, not read yet
        self._chunks: list[Tensor] = []  # earlier kept vectors, joined
        self._what: list[tuple[int, int, int, Sequence[str]]] = []  # (kind, step, numel, names)
        self._window: dict[str, deque[float]] = {}  # host: the last steps' loss and terms
        self._at: tuple[int, int] | None = None  # (id of the TrainState, its step) last seen

    # --- per step: keep, no host read -----------------------------------------------------------
    def begin(self, state: Any) -> None:
        """Before a step of `state`: a state the guard did not leave (a fresh one, one restored
        from a resume point) resets it, with the divergence window `state.recent_losses`."""
        if self._at != (id(state), state.step):
            self._kept, self._chunks, self._what = [], [], []
            self._window = {
                k: deque(v, maxlen=DIVERGENCE_WINDOW) for k, v in state.recent_losses.items()
            }

    def end(self, state: Any) -> None:
        """After the step (`state.step` counted)."""
        self._at = (id(state), state.step)

    def _keep(self, kind: int, step: int, vector: Tensor, names: Sequence[str]) -> None:
        self._kept.append(vector.detach().reshape(-1).double())
        self._what.append((kind, step, vector.numel(), names))
        if len(self._kept) == _COMPACT:  # (a long stretch without reads: fewer tensors)
            self._chunks.append(torch.cat(self._kept))
            self._kept = []

    def check_loss(self, values: Tensor, names: Sequence[str], step: int) -> None:
        """`values` [terms..., loss] of one step (a tensor of its own): a non-finite loss,
        naming its first non-finite term (else "loss")."""
        self._keep(LOSS, step, values, names)

    def check_tensors(
        self, named: Sequence[tuple[str, Tensor | None]], kind: int, step: int
    ) -> None:
        """Gradients (`kind` GRADIENT) or weights (WEIGHT): a non-finite entry, naming the first
        parameter that holds one."""
        pairs = [(n, t) for n, t in named if t is not None]
        if not pairs:
            return
        with torch.no_grad():  # (squares of float32 / bf16 entries cannot overflow float64)
            norms = torch._foreach_norm([t for _, t in pairs], 2, dtype=torch.float64)
            self._keep(kind, step, torch.stack(norms), [n for n, _ in pairs])

    def check_divergence(self, loss_and_terms: Tensor, columns: Sequence[str], step: int) -> None:
        """`loss_and_terms` [loss, terms...] of this step (a tensor of its own) against the
        median of the window; then the step joins the window."""
        self._keep(DIVERGED, step, loss_and_terms, columns)

    # --- reading (host) -------------------------------------------------------------------------
    def check(self, state: Any, d: Dist = SINGLE) -> None:
        """Read the guard (one host read; every rank must call this at the same step): raise
        the first problem of the steps kept, as the step it happened in would have; else write
        the divergence window into `state.recent_losses` (what a resume point saves)."""
        kept = self._chunks + self._kept
        flat = torch.cat(kept).tolist() if kept else []
        what, self._kept, self._chunks, self._what = self._what, [], [], []
        problem: NumericalError | None = None
        step, at = 0, 0
        for kind, step, n, names in what:
            problem = self._replay(kind, step, flat[at : at + n], names)
            at += n
            if problem is not None:
                break
        first = max_over_ranks(_LATE - step if problem else 0, d)  # the earliest over ranks
        if first:
            if problem is None or _LATE - first != step:
                step = _LATE - first
                raise NumericalError(f"non-finite loss at step {step} on another rank", step - 1)
            raise problem
        state.recent_losses = {k: list(v) for k, v in self._window.items()}

    def _replay(
        self, kind: int, step: int, values: list[float], names: Sequence[str]
    ) -> NumericalError | None:
        """One kept check, on the host: its error, or None (a divergence row joins the
        window)."""
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if kind == LOSS:
            if math.isfinite(values[-1]):
                return None
            term = bad[0]  # (the loss itself, last, when no term is)
            return NumericalError(
                f"non-finite loss at step {step}: term '{names[term]}' is {values[term]}", step - 1
            )
        if kind in (GRADIENT, WEIGHT):
            if not bad:
                return None
            what = "gradient" if kind == GRADIENT else "weight"
            # a gradient comes from the weights before this step; a weight is this step's result
            return NumericalError(
                f"non-finite {what} at step {step}: saes.{names[bad[0]]}",
                step - 1 if kind == GRADIENT else step,
            )
        row = dict(zip(names, values, strict=True))
        hist = self._window
        if self.factor is not None and hist.get("loss"):
            median = statistics.median(hist["loss"])
            if median > 0 and row["loss"] > self.factor * median:

                def growth(k: str) -> float:
                    m = statistics.median(hist[k]) if hist.get(k) else 0.0
                    return row[k] / m if m > 0 else (math.inf if row[k] > 0 else 0.0)

                term = max(names[1:], key=growth, default="loss")
                return NumericalError(
                    f"loss diverged at step {step}: {row['loss']:.4g} is over {self.factor:g}x "
                    f"the median {median:.4g} of the last {len(hist['loss'])} steps; term "
                    f"'{term}' is {row[term]:.4g} (divergence_factor tunes this, null disables)",
                    step - 1,
                )
        for k, v in row.items():
            hist.setdefault(k, deque(maxlen=DIVERGENCE_WINDOW)).append(v)
        return None


class StepValues(Mapping[str, float]):
    """An optimizer step's logged values: a float64 vector on the device (already averaged over
    micro-batches and ranks) under `keys`, plus values the host computed (`host`). Reading them
    (`read()`, or any item) is a host sync and first asks the guard (`Guard.check`): a problem
    recorded up to this step raises its `NumericalError` instead."""

    def __init__(
        self,
        vector: Tensor,
        keys: Sequence[str],
        host: Mapping[str, float],
        guard: Guard,
        state: Any,
        dist: Dist = SINGLE,
    ) -> None:
        assert vector.numel() == len(keys)
        self.vector, self.keys_ = vector, list(keys)
        self.host = dict(host)
        self._guard, self._state, self._dist = guard, state, dist
        self._values: dict[str, float] | None = None

    def read(self) -> dict[str, float]:
        if self._values is None:
            self._guard.check(self._state, self._dist)
            values = dict(zip(self.keys_, self.vector.tolist(), strict=True))
            values.update(self.host)
            self._values = values
        return self._values

    def __getitem__(self, key: str) -> float:
        return self.read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self.keys_, *(k for k in self.host if k not in self.keys_)])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __repr__(self) -> str:
        return f"StepValues({self.read() if self._values is not None else self.keys_})"
