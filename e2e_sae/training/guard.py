"""The numbers of a step, kept where they were computed until someone reads them.

A GPU runs ahead of Python only as long as the step never asks for a value back; reading one
(`.item()`, `float()`, `bool()`, a boolean mask) makes the host wait for every kernel queued
before it. So an engine step returns its logged values as `StepValues` (device tensors) and its
`Guard` watches for trouble on the device: the first step whose loss is non-finite (naming the
term), whose gradients or weights are (naming the parameter), or whose loss is over
`divergence_factor` times the median of the last DIVERGENCE_WINDOW steps (naming the term that
grew most) is recorded there. Nothing is read until the loop reads: on logged steps, before a
checkpoint or an evaluation, on the last step and on a signal (`loop.step_run`). Then
`Guard.check` raises the `NumericalError` that the step would have raised, with the same message
and the same step, so the checkpoint holding the weights that caused it is set aside as before;
the steps taken since (on weights that may already be NaN) are discarded with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from e2e_sae.errors import UserError
from e2e_sae.training.distributed import SINGLE, Dist, max_over_ranks

DIVERGENCE_WINDOW = 100  # steps whose median loss the divergence guard compares against

LOSS, GRADIENT, WEIGHT, DIVERGED = 1, 2, 3, 4
_RECORD = 7  # kind, step, index, value, loss, median, window length
_LATE = 1 << 62  # (ranks agree on the earliest step of a problem: max of _LATE - step)


class NumericalError(UserError):
    """NaN / inf in a loss, gradient or weight, or a diverging loss. `weights_step`: the step
    after which the weights that caused it were in place (their checkpoint is not to be kept)."""

    def __init__(self, message: str, weights_step: int | None = None) -> None:
        super().__init__(message)
        self.weights_step = weights_step


class Guard:
    """One run's watch over its numbers, on the device (see the module docstring).

    `divergence_factor`: None turns the divergence check off (the window is kept either way: it
    is part of a resume point, `TrainState.recent_losses`)."""

    def __init__(self, divergence_factor: float | None = None) -> None:
        self.factor = divergence_factor
        self._found: Tensor | None = None  # bool: a problem was recorded
        self._record: Tensor | None = None  # float64 [_RECORD]: the first one
        self._names: dict[int, list[str]] = {}
        self._window: Tensor | None = None  # float64 [DIVERGENCE_WINDOW, 1 + terms]
        self._columns: list[str] = []  # the window's columns: "loss", then the terms
        self._len = 0  # rows filled
        self._next = 0  # the row the next step writes
        self._loaded: dict[str, list[float]] = {}
        self._at: tuple[int, int] | None = None  # (id of the TrainState, its step) last seen

    # --- per step, on the device ----------------------------------------------------------------
    def begin(self, state: Any) -> None:
        """Before a step of `state`: a state the guard did not leave (a fresh one, one restored
        from a resume point) resets it, with the divergence window `state.recent_losses`."""
        if self._at != (id(state), state.step):
            self._found = self._record = self._window = None
            self._names.clear()
            self._len = self._next = 0
            self._loaded = {k: list(v) for k, v in state.recent_losses.items()}

    def end(self, state: Any) -> None:
        """After the step (`state.step` counted)."""
        self._at = (id(state), state.step)

    def note(
        self,
        bad: Tensor,
        kind: int,
        step: int,
        index: Tensor,
        value: Tensor | None,
        names: Sequence[str],
        extra: Tensor | None = None,
    ) -> None:
        """Record (kind, step, names[index], value, extra) if `bad` and nothing was recorded
        before; no host read."""
        self._names[kind] = list(names)
        # (fill_ takes a Python number as a kernel argument: no copy from the host)
        rec = torch.zeros(_RECORD, dtype=torch.float64, device=bad.device)
        rec[0:1].fill_(kind)
        rec[1:2].fill_(step)
        rec[2:3].copy_(index.reshape(1))
        if value is not None:
            rec[3:4].copy_(value.reshape(1))
        if extra is not None:
            rec[4 : 4 + extra.numel()].copy_(extra.reshape(-1))
        if self._found is None or self._record is None:
            self._found, self._record = bad.clone(), torch.where(bad, rec, torch.zeros_like(rec))
            return
        self._record = torch.where(bad & ~self._found, rec, self._record)
        self._found = self._found | bad

    def check_loss(self, values: Tensor, names: Sequence[str], step: int) -> None:
        """`values` [terms..., loss] of one step: a non-finite loss, naming its first
        non-finite term (else "loss")."""
        finite = torch.isfinite(values)
        first = (~finite).to(torch.int8).argmax()
        self.note(~finite[-1], LOSS, step, first, _at(values, first), names)

    def check_tensors(
        self, named: Sequence[tuple[str, Tensor | None]], kind: int, step: int
    ) -> None:
        """Gradients (`kind` GRADIENT) or weights (WEIGHT): a non-finite entry, naming the first
        parameter that holds one."""
        pairs = [(n, t) for n, t in named if t is not None]
        if not pairs:
            return
        ok = torch.stack([t.isfinite().all() for _, t in pairs])
        first = (~ok).to(torch.int8).argmax()
        self.note(~ok.all(), kind, step, first, None, [n for n, _ in pairs])

    def check_divergence(self, loss_and_terms: Tensor, columns: Sequence[str], step: int) -> None:
        """`loss_and_terms` [loss, terms...] (float64) of this step against the median of the
        window; then the step joins the window."""
        if self._window is None or list(columns) != self._columns:
            self._start_window(list(columns), loss_and_terms.device)
        assert self._window is not None
        n = self._len
        if self.factor is not None and n > 0:
            s = self._window[:n].sort(dim=0).values
            median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
            loss, m = loss_and_terms[0], median[0]
            bad = (m > 0) & (loss > self.factor * m)
            if len(columns) > 1:  # the term that grew most (growth: value / its median)
                v, mt = loss_and_terms[1:], median[1:]
                inf = torch.full_like(v, float("inf"))
                growth = torch.where(mt > 0, v / mt, torch.where(v > 0, inf, torch.zeros_like(v)))
                term = growth.argmax() + 1
            else:
                term = torch.zeros((), dtype=torch.int64, device=loss.device)
            extra = torch.stack([loss, m, torch.full_like(m, n)])
            self.note(bad, DIVERGED, step, term, _at(loss_and_terms, term), columns, extra)
        self._window[self._next] = loss_and_terms
        self._next = (self._next + 1) % DIVERGENCE_WINDOW
        self._len = min(self._len + 1, DIVERGENCE_WINDOW)

    def _start_window(self, columns: list[str], device: torch.device) -> None:
        """An empty window with these columns, filled with the loaded one where it has them."""
        self._columns = columns
        self._window = torch.zeros(
            DIVERGENCE_WINDOW, len(columns), dtype=torch.float64, device=device
        )
        self._len = self._next = 0
        loaded = [self._loaded.get(k) for k in columns]
        cols = [col for col in loaded if col is not None]
        n = min(len(col) for col in cols) if cols and len(cols) == len(columns) else 0
        if n:  # (once per run: a resume point's window back on the device)
            rows = [[col[len(col) - n + i] for col in cols] for i in range(n)]
            self._window[:n] = torch.tensor(rows, dtype=torch.float64).to(device)
        self._len, self._next = n, n % DIVERGENCE_WINDOW
        self._loaded = {}

    # --- reading (host) -------------------------------------------------------------------------
    def check(self, state: Any, d: Dist = SINGLE) -> None:
        """Read the guard (one host read; every rank must call this at the same step): raise
        the first problem recorded, as the step it happened in would have; else write the
        divergence window into `state.recent_losses` (what a resume point saves)."""
        found = self._found is not None and bool(self._found)
        rec = self._record.tolist() if found and self._record is not None else []
        step = int(rec[1]) if rec else 0
        first = max_over_ranks(_LATE - step if found else 0, d)  # the earliest over ranks
        if first:
            raise self._error(rec, _LATE - first)
        if self._window is not None:
            order = [(self._next - self._len + i) % DIVERGENCE_WINDOW for i in range(self._len)]
            rows = self._window[order].tolist() if order else []
            state.recent_losses = {k: [row[j] for row in rows] for j, k in enumerate(self._columns)}

    def _error(self, rec: list[float], step: int) -> NumericalError:
        if not rec or int(rec[1]) != step:
            return NumericalError(f"non-finite loss at step {step} on another rank", step - 1)
        kind, index, value = int(rec[0]), int(rec[2]), rec[3]
        name = self._names.get(kind, [])[index] if index < len(self._names.get(kind, [])) else "?"
        if kind == LOSS:
            return NumericalError(
                f"non-finite loss at step {step}: term '{name}' is {value}", step - 1
            )
        if kind in (GRADIENT, WEIGHT):
            what = "gradient" if kind == GRADIENT else "weight"
            # a gradient comes from the weights before this step; a weight is this step's result
            return NumericalError(
                f"non-finite {what} at step {step}: saes.{name}",
                step - 1 if kind == GRADIENT else step,
            )
        loss, median, n = rec[4], rec[5], int(rec[6])
        return NumericalError(
            f"loss diverged at step {step}: {loss:.4g} is over {self.factor:g}x the median "
            f"{median:.4g} of the last {n} steps; term '{name}' is {value:.4g} "
            "(divergence_factor tunes this, null disables)",
            step - 1,
        )


def _at(values: Tensor, index: Tensor) -> Tensor:
    """values[index] for a 0-d index tensor, without reading the index (indexing with a tensor
    would turn it into a Python int)."""
    return values.index_select(0, index.reshape(1)).squeeze(0)


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
