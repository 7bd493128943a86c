"""One optimizer step over the SAEs, whatever feeds them, and the lr schedule of every trainer here
(`lr_schedule`: SAE runs, `train-lm`, the MLP's SAEs).

`Engine.train_step` accumulates `grad_accum_steps` micro-batches (forward through the engine's
`feed`, loss terms plus the architectures' aux losses, finite checks, backward, firing
statistics), then averages gradients over ranks, clips, steps Adam and the schedule, checks the
weights and resamples dead latents when due. A feed turns one micro-batch into `LossInputs`: token
windows through the LM (`feeds.LMFeed`) or stored activations (`feeds.CacheFeed`); nothing else
differs between an LM-fed and a cache-fed run.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from e2e_sae.config import Config, OptimizerConfig
from e2e_sae.errors import UserError
from e2e_sae.eval.evaluate import l0
from e2e_sae.objective.forward import autocast
from e2e_sae.objective.losses import LossInputs, LossTerm, compute_losses
from e2e_sae.saes import SAEDict, sae_key
from e2e_sae.saes.resample import resample_dead_latents
from e2e_sae.training.distributed import (
    SINGLE,
    Dist,
    average_gradients,
    broadcast_state,
    max_over_ranks,
    reduce_mean,
    sync_firing_stats,
)

Feed = Callable[[Any], LossInputs]
"""One micro-batch (token windows, or {hook: activations}) -> what the loss terms read."""

DIVERGENCE_WINDOW = 100  # steps whose median loss the divergence guard compares against


@dataclass
class TrainState:
    """Counters that define where a run is (also what a resume restores)."""

    step: int = 0  # optimizer steps taken
    n_samples: int = 0  # training samples consumed
    batches: int = 0  # micro-batches drawn from the loader
    recent_losses: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """The last DIVERGENCE_WINDOW steps' loss and loss terms (for the divergence guard)."""


def n_grad_steps(config: Config, world_size: int = 1) -> int:
    """Optimizer steps of the run: `n_samples` counts samples over all ranks."""
    return max(1, config.n_grad_steps // world_size)


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, schedule: str, min_factor: float
) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1 - (1 - min_factor) * progress
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(
    optimizer: torch.optim.Optimizer, optim: OptimizerConfig, total_steps: int, world_size: int = 1
) -> LambdaLR:
    """`optim`'s schedule over `total_steps` optimizer steps (`world_size` processes, each
    stepping `samples_per_step` samples)."""
    warmup = optim.warmup_samples // (optim.samples_per_step * world_size)
    kind, lo = optim.lr_schedule, optim.min_lr_factor
    return LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps, kind, lo))


def make_optimizer(
    optim: OptimizerConfig, saes: nn.Module, total_steps: int, world_size: int = 1
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam over the trainable SAE parameters and `optim`'s schedule over `total_steps`."""
    params = [p for p in saes.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=optim.lr)
    return optimizer, lr_schedule(optimizer, optim, total_steps, world_size)


@dataclass(frozen=True)
class Resampling:
    """When the engine resamples dead latents (`saes.resample_every_n_samples`): every `every`
    samples during the first half of a run of `total` samples, the latents that have not fired for
    `dead_after` tokens, drawn with a generator seeded from `seed` and the step."""

    every: int
    total: int
    dead_after: int
    seed: int


def crossed(n_samples: int, bs: int, every: int) -> bool:
    """True when the last step (of `bs` samples) crossed a multiple of `every` samples."""
    return (n_samples // every) > ((n_samples - bs) // every)


def loss_term_keys(values: Iterable[str], term_names: Iterable[str]) -> list[str]:
    """The logged keys that make up the loss: the loss terms and the aux losses (`name/pos`),
    not the per-step statistics (`l0/`, `resampled/`, `grad_norm`)."""
    keys = list(term_names)
    stats = ("l0/", "resampled/")
    return keys + [k for k in values if "/" in k and not k.startswith(stats)]


C = TypeVar("C", bound=OptimizerConfig)


@dataclass
class Engine(Generic[C]):
    """SAEs, their loss terms, optimizer and schedule, and the feed that turns a micro-batch into
    loss inputs. `config`: the batch layout and clipping (a run's `Config`, or any
    `OptimizerConfig`); `saes` holds every SAE; `trainable`: the positions whose SAEs train (the
    others are frozen and run as at inference)."""

    config: C
    saes: SAEDict
    trainable: list[str]
    loss_terms: list[LossTerm]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    feed: Feed | None = None
    """None: set by a subclass (`Trainer`: the LM)."""
    dist: Dist = SINGLE
    precision: str = "fp32"
    """"bf16": the forward under bf16 autocast (`Config.precision`)."""
    resampling: Resampling | None = None

    def __post_init__(self) -> None:
        self._trainable_keys = {sae_key(p) for p in self.trainable}

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks."""
        return self.config.samples_per_step * self.dist.world_size

    def set_modes(self) -> None:
        """Trainable SAEs in training mode; frozen ones as at inference (BatchTopK threshold)."""
        for key, sae in self.saes.items():
            sae.train(key in self._trainable_keys)

    def train_step(
        self, micro_batches: Iterator[Any], state: TrainState, stats: bool = False
    ) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns the logged values
        (averaged over micro-batches and ranks). `stats`: also log each SAE's L0 (the loop asks on
        logged steps only: the count costs a few % of a small model's step)."""
        self.set_modes()
        accum = self.config.grad_accum_steps
        logged: dict[str, float] = {}
        for _ in range(accum):
            batch = next(micro_batches)
            state.batches += 1
            assert self.feed is not None
            with autocast(self.precision, self.device):
                inputs = self.feed(batch)
            aux = {
                f"{name}/{pos}": v
                for pos, acts in inputs.sae_acts.items()
                if pos in self.trainable
                for name, v in self.saes.at(pos).aux_losses(acts, inputs.target(pos)).items()
            }
            loss, values = compute_losses(self.loss_terms, inputs, aux)
            check_finite(loss, values, state.step + 1, self.dist)
            (loss / accum).backward()
            n_tokens = 0
            for pos, acts in inputs.sae_acts.items():
                self.saes.at(pos).update_firing_stats(acts.c)
                n_tokens = acts.c.numel() // acts.c.shape[-1]
                if stats:
                    values[f"l0/{pos}"] = l0(acts.c)
            sync_firing_stats(self.saes, self.dist, n_tokens)
            values["loss"] = loss
            for k, v in values.items():
                logged[k] = logged.get(k, 0.0) + float(v.detach()) / accum
        named = [(n, p) for n, p in self.saes.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        average_gradients(params, self.dist)
        check_tensors_finite(((n, p.grad) for n, p in named), "gradient", state.step + 1)
        if self.config.max_grad_norm is not None:
            gn = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            logged["grad_norm"] = float(gn)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        check_tensors_finite(named, "weight", state.step + 1)
        logged.update(self.maybe_resample(inputs, state.n_samples + self.global_batch, state.step))
        broadcast_state(self.saes, self.dist, buffers_only=True)
        state.step += 1
        state.n_samples += self.global_batch
        return reduce_mean(logged, self.dist)

    def maybe_resample(self, inputs: LossInputs, n_samples: int, step: int) -> dict[str, float]:
        """Re-initialise dead latents when this step crossed a multiple of `resampling.every`."""
        r = self.resampling
        if (
            r is None
            or not crossed(n_samples, self.global_batch, r.every)
            or 2 * n_samples > r.total
        ):
            return {}  # (only in the first half: the second lets resampled latents settle)
        window = r.dead_after
        gen = torch.Generator().manual_seed(r.seed * 1_000_003 + step)
        counts = {}
        for pos in self.trainable:
            sae, acts = self.saes.at(pos), inputs.sae_acts[pos]
            dead, tc = sae.tokens_since_fired >= window, inputs.site(pos).is_transcoder
            n = resample_dead_latents(
                sae, acts.input, inputs.target(pos), acts.output, dead, self.optimizer, gen, tc
            )
            counts[f"resampled/{pos}"] = float(n)
        broadcast_state(self.saes, self.dist)  # rank 0's choice on every rank
        return counts


class NumericalError(UserError):
    """NaN / inf in a loss, gradient or weight, or a diverging loss. `weights_step`: the step
    after which the weights that caused it were in place (their checkpoint is not to be kept)."""

    def __init__(self, message: str, weights_step: int | None = None) -> None:
        super().__init__(message)
        self.weights_step = weights_step


def check_finite(loss: Tensor, values: dict[str, Tensor], step: int, d: Dist = SINGLE) -> None:
    """Stop (on every rank alike) when the loss is NaN / inf, naming the term that is."""
    here = not bool(torch.isfinite(loss))
    if not max_over_ranks(int(here), d):
        return
    if not here:
        raise NumericalError(f"non-finite loss at step {step} on another rank", step - 1)
    bad = next((k for k, v in values.items() if not torch.isfinite(v)), "loss")
    value = float(values.get(bad, loss).detach())
    raise NumericalError(f"non-finite loss at step {step}: term '{bad}' is {value}", step - 1)


def check_tensors_finite(named: Iterable[tuple[str, Tensor | None]], what: str, step: int) -> None:
    """Stop when a gradient / weight holds NaN / inf, naming the parameter (one sync per call)."""
    pairs = [(n, t) for n, t in named if t is not None]
    if not pairs or bool(torch.stack([t.isfinite().all() for _, t in pairs]).all()):
        return
    name = next(n for n, t in pairs if not bool(t.isfinite().all()))
    # a gradient comes from the weights before this step; a weight is this step's result
    weights_step = step - 1 if what == "gradient" else step
    raise NumericalError(f"non-finite {what} at step {step}: saes.{name}", weights_step)


def check_divergence(
    values: dict[str, float], state: TrainState, factor: float | None, terms: list[str]
) -> None:
    """Stop when this step's loss is over `factor` times the median of the last
    DIVERGENCE_WINDOW steps' losses (`divergence_factor`; None: off), naming the term that grew
    most; else add the step to the window. `state.step` is this step (already counted)."""
    hist = state.recent_losses
    if factor is not None and hist.get("loss"):
        median = statistics.median(hist["loss"])
        if median > 0 and values["loss"] > factor * median:

            def growth(k: str) -> float:
                m = statistics.median(hist[k]) if hist.get(k) else 0.0
                return values[k] / m if m > 0 else (math.inf if values[k] > 0 else 0.0)

            term = max((k for k in terms if k in values), key=growth, default="loss")
            raise NumericalError(
                f"loss diverged at step {state.step}: {values['loss']:.4g} is over {factor:g}x "
                f"the median {median:.4g} of the last {len(hist['loss'])} steps; term "
                f"'{term}' is {values[term]:.4g} (divergence_factor tunes this, null disables)",
                state.step - 1,
            )
    for k in ["loss", *terms]:
        if k in values:
            window = hist.setdefault(k, [])
            window.append(float(values[k]))
            del window[:-DIVERGENCE_WINDOW]
