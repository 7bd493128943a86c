"""One optimizer step over the SAEs, whatever feeds them, and the lr schedule of every trainer here
(`lr_schedule`: SAE runs, `train-lm`, the MLP's SAEs).

`Engine.train_step` accumulates `grad_accum_steps` micro-batches (forward through the engine's
`feed`, loss terms plus the architectures' aux losses, backward, firing statistics), then averages
gradients over ranks, clips, steps Adam and the schedule and resamples dead latents when due. It
reads no tensor value (a GPU runs ahead of it): the logged values stay on the device
(`guard.StepValues`) and the checks for non-finite losses, gradients and weights and for a
diverging loss are recorded there (`guard.Guard`), read when the loop reads the values. A feed
turns one micro-batch into `LossInputs`: token windows through the LM (`feeds.LMFeed`) or stored
activations (`feeds.CacheFeed`); nothing else differs between an LM-fed and a cache-fed run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from e2e_sae.config import Config, OptimizerConfig
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
    mean_over_ranks_,
    reduce_mean,
    sync_firing_stats,
)
from e2e_sae.training.guard import GRADIENT, WEIGHT, Guard, StepValues

Feed = Callable[[Any], LossInputs]
"""One micro-batch (token windows, or {hook: activations}) -> what the loss terms read."""


@dataclass
class TrainState:
    """Counters that define where a run is (also what a resume restores)."""

    step: int = 0  # optimizer steps taken
    n_samples: int = 0  # training samples consumed
    batches: int = 0  # micro-batches drawn from the loader
    recent_losses: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """The last `guard.DIVERGENCE_WINDOW` steps' loss and loss terms (for the divergence guard; the
    guard keeps them on the device and writes them here when the loop reads it)."""


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
    divergence_factor: float | None = None
    """`Config.divergence_factor` (None: no divergence check, e.g. the MLP's SAEs)."""

    def __post_init__(self) -> None:
        self._trainable_keys = {sae_key(p) for p in self.trainable}
        self.guard = Guard(self.divergence_factor)

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
    ) -> StepValues:
        """One optimizer step over `grad_accum_steps` micro-batches; returns the logged values
        (averaged over micro-batches and ranks) where they were computed: the step reads no
        tensor value, and a numerical problem is raised when they are read (`guard`).
        `stats`: also log each SAE's L0 (the loop asks on logged steps only: the count costs a
        few % of a small model's step)."""
        self.set_modes()
        self.guard.begin(state)
        accum, step = self.config.grad_accum_steps, state.step + 1
        total: Tensor | None = None  # float64: the terms, the aux losses, L0s, then the loss
        keys: list[str] = []
        n_terms = 0
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
            n_terms = len(values)  # the loss terms and the aux losses (what the loss is made of)
            (loss / accum).backward()
            n_tokens = 0
            for pos, acts in inputs.sae_acts.items():
                self.saes.at(pos).update_firing_stats(acts.c)
                n_tokens = acts.c.numel() // acts.c.shape[-1]
                if stats:
                    values[f"l0/{pos}"] = l0(acts.c)
            sync_firing_stats(self.saes, self.dist, n_tokens)
            values["loss"] = loss
            keys = list(values)
            part = torch.stack([v.detach().double() for v in values.values()]) / accum
            total = part if total is None else total + part
        assert total is not None
        self.guard.check_loss(
            torch.cat([total[:n_terms], total[-1:]]), [*keys[:n_terms], "loss"], step
        )
        named = [(n, p) for n, p in self.saes.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        average_gradients(params, self.dist)
        self.guard.check_tensors([(n, p.grad) for n, p in named], GRADIENT, step)
        if self.config.max_grad_norm is not None:
            gn = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            keys.append("grad_norm")
            total = torch.cat([total, gn.detach().double().reshape(1)])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.guard.check_tensors(named, WEIGHT, step)
        host = self.maybe_resample(inputs, state.n_samples + self.global_batch, state.step)
        broadcast_state(self.saes, self.dist, buffers_only=True)
        mean_over_ranks_(total, self.dist)
        loss_at = keys.index("loss")
        self.guard.check_divergence(
            torch.cat([total[loss_at : loss_at + 1], total[:n_terms]]),
            ["loss", *keys[:n_terms]],
            step,
        )
        state.step += 1
        state.n_samples += self.global_batch
        self.guard.end(state)
        return StepValues(total, keys, reduce_mean(host, self.dist), self.guard, state, self.dist)

    def check(self, state: TrainState) -> None:
        """Read the guard now (a host sync): raise the first numerical problem of the steps so
        far; else the divergence window goes into `state` (for a resume point)."""
        self.guard.check(state, self.dist)

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
