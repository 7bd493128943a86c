"""The numerical guard against a direct computation: steps kept on the device, checked in step
order when read (`e2e_sae.training.guard`)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import pytest
import torch

from e2e_sae.training.guard import (
    DIVERGENCE_WINDOW,
    GRADIENT,
    WEIGHT,
    Guard,
    NumericalError,
)


@dataclass
class State:
    step: int = 0
    recent_losses: dict[str, list[float]] = field(default_factory=dict)


def _step(
    guard: Guard,
    state: State,
    sparsity: float,
    mse: float,
    grad: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> None:
    """One step as the engine reports it: loss terms, gradients, weights, divergence row."""
    guard.begin(state)
    step = state.step + 1
    loss = sparsity + mse
    values = torch.tensor([sparsity, mse, loss], dtype=torch.float64)
    guard.check_loss(values.clone(), ["sparsity", "mse", "loss"], step)
    ok = torch.ones(3, 2)
    grads = [("enc.W", ok), ("dec.W", grad if grad is not None else ok)]
    guard.check_tensors(grads, GRADIENT, step)
    guard.check_tensors([("enc.W", weight if weight is not None else ok)], WEIGHT, step)
    guard.check_divergence(values[[2, 0, 1]].clone(), ["loss", "sparsity", "mse"], step)
    state.step += 1
    guard.end(state)


def test_no_problem_keeps_the_last_window_of_losses() -> None:
    guard, state = Guard(divergence_factor=1000.0), State()
    losses = [(1.0 + 0.01 * i, 2.0 - 0.001 * i) for i in range(DIVERGENCE_WINDOW + 37)]
    for i, (s, m) in enumerate(losses):
        _step(guard, state, s, m)
        if i in (10, 90):  # read now and then, as the loop does on logged steps
            guard.check(state)
    guard.check(state)
    last = losses[-DIVERGENCE_WINDOW:]
    assert state.recent_losses["sparsity"] == [s for s, _ in last]
    assert state.recent_losses["mse"] == [m for _, m in last]
    assert state.recent_losses["loss"] == [s + m for s, m in last]


def test_divergence_names_the_median_and_the_term_that_grew_most() -> None:
    guard, state = Guard(divergence_factor=10.0), State()
    history = [(1.0 + 0.1 * (i % 3), 0.5 + 0.05 * i) for i in range(7)]
    for s, m in history:
        _step(guard, state, s, m)
    _step(guard, state, 40.0, 0.6)  # sparsity grew 40x its median, mse barely
    with pytest.raises(NumericalError) as err:
        guard.check(state)
    median = statistics.median(s + m for s, m in history)
    assert str(err.value) == (
        f"loss diverged at step 8: {40.6:.4g} is over 10x the median {median:.4g} of the last "
        f"7 steps; term 'sparsity' is {40.0:.4g} (divergence_factor tunes this, null disables)"
    )
    assert err.value.weights_step == 7


def test_the_first_problem_wins_in_step_order_across_kinds() -> None:
    guard, state = Guard(divergence_factor=None), State()
    nan = torch.ones(3, 2)
    nan[1, 1] = math.nan
    inf = torch.ones(3, 2)
    inf[0, 0] = -math.inf
    for _ in range(4):
        _step(guard, state, 1.0, 1.0)
    _step(guard, state, 1.0, 1.0, grad=nan)  # step 5: gradient of dec.W
    _step(guard, state, math.nan, 1.0)  # step 6: a loss term
    with pytest.raises(NumericalError) as err:
        guard.check(state)
    assert str(err.value) == "non-finite gradient at step 5: saes.dec.W"
    assert err.value.weights_step == 4

    guard, state = Guard(), State()
    _step(guard, state, 1.0, 1.0)
    _step(guard, state, 1.0, math.inf)
    with pytest.raises(NumericalError, match=r"^non-finite loss at step 2: term 'mse' is inf$"):
        guard.check(state)

    guard, state = Guard(), State()
    _step(guard, state, 1.0, 1.0, weight=inf)
    with pytest.raises(NumericalError) as err:
        guard.check(state)
    assert str(err.value) == "non-finite weight at step 1: saes.enc.W"
    assert err.value.weights_step == 1  # (a weight is the step's own result)


def test_a_resumed_state_brings_its_window_and_long_stretches_stay_exact() -> None:
    state = State(recent_losses={"loss": [2.0] * 5, "sparsity": [1.0] * 5, "mse": [1.0] * 5})
    guard = Guard(divergence_factor=3.0)
    for _ in range(400):  # > the guard's compaction threshold in kept tensors, never read
        _step(guard, state, 1.0, 1.0)
    _step(guard, state, 1.0, 6.0)
    with pytest.raises(NumericalError, match=r"^loss diverged at step 401: 7 is over 3x the "):
        guard.check(state)

    fresh = State(step=3, recent_losses={"loss": [1.0], "sparsity": [0.5], "mse": [0.5]})
    guard.begin(fresh)  # another state: the guard starts over from its window
    guard.check(fresh)
    assert fresh.recent_losses == {"loss": [1.0], "sparsity": [0.5], "mse": [0.5]}


def test_steps_read_no_value_from_the_device() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    reads: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(str(func))
            return func(*args, **(kwargs or {}))

    guard, state = Guard(divergence_factor=2.0), State()
    with Watch():
        for _ in range(20):
            _step(guard, state, 1.0, 1.0)
    assert reads == []
    guard.check(state)
    assert len(state.recent_losses["loss"]) == 20
