"""Training local SAEs from activations instead of the LM: a disk cache or a one-pass sweep.

Both take their steps through the one engine (`e2e_sae.training.engine.Engine.train_step`) with a
`CacheFeed`; only where the activations come from differs from `train`.

- `CachedTrainer` + `train_together`: several configs' SAEs in memory on the same activation
  batches, from an `e2e_sae.caches.activations.ActivationCache` or computed by the LM once per batch
  (`lm_activation_batches`: the sweep in one pass).
- `train_from_cache` (what `e2e-sae train-cached` runs): each config set up as `train` does, fed
  from the cache, in the same loop as `train` (`e2e_sae.training.loop`): a run directory each with
  checkpoints, resume, evaluations, resampling and the divergence guard. When the cache holds a
  config's training windows (built from it), the weights equal those of `train` for that config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from e2e_sae.caches.activations import (
    ActivationCache,
    check_against_cache,
    check_cacheable,
    check_model_against_cache,
    hook_field,
    resolve_sites,
)
from e2e_sae.config import Config
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.load import check_device
from e2e_sae.lm.splice import SAETransformer, SpliceSite, dict_size, sae_key
from e2e_sae.objective.losses import build_loss_terms
from e2e_sae.saes import build_sae, sae_kwargs
from e2e_sae.training.distributed import dist_from_env
from e2e_sae.training.engine import Engine, TrainState, make_optimizer, n_grad_steps
from e2e_sae.training.feeds import CacheFeed
from e2e_sae.training.loop import Run, run_loop
from e2e_sae.training.resume import RunLock
from e2e_sae.training.trainer import Trainer, open_run, restore_run, setup


# --- training from activations --------------------------------------------------------------------
@dataclass(kw_only=True)
class CachedTrainer(Engine):
    """One config's local SAEs trained on given activations {hook: [batch, pos, d]} (no LM):
    the engine's step with a `CacheFeed`; `step` keeps its own counters and logged values."""

    sites: dict[str, SpliceSite]
    state: TrainState = field(default_factory=TrainState)
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_config(
        cls, config: Config, all_hook_names: Sequence[str], dims: Mapping[str, int]
    ) -> CachedTrainer:
        """Fresh SAEs for `config` (a local run) with input/output sizes `dims[hook]`."""
        check_cacheable(config)
        sites = resolve_sites(config, all_hook_names)
        s = config.saes
        kwargs = sae_kwargs(s.architecture, s.architecture_kwargs, s.k, config.train_tokens)
        saes = nn.ModuleDict()
        for pos, site in sites.items():
            for h in (site.input_hook, site.output_hook):
                if h not in dims:
                    raise UserError(f"{hook_field(site, h)}: no cached activations at '{h}'")
            d_in = dims[site.input_hook]
            saes[sae_key(pos)] = build_sae(
                s.architecture,
                d_in,
                dict_size(d_in, s.dict_size_to_input_ratio, pos),
                init_decoder_orthogonal=s.init_decoder_orthogonal,
                output_size=dims[site.output_hook],
                **kwargs,
            )
        return cls._assemble(config, sites, saes)

    @classmethod
    def _assemble(
        cls, config: Config, sites: dict[str, SpliceSite], saes: nn.ModuleDict
    ) -> CachedTrainer:
        """Loss terms, Adam over the trainable parameters and the schedule, as `train.setup`."""
        optimizer, scheduler = make_optimizer(config, saes)
        trainable = [
            p for p in sites if any(q.requires_grad for q in saes[sae_key(p)].parameters())
        ]
        device = next(saes.parameters()).device
        return cls(
            config,
            saes,
            trainable,
            build_loss_terms(config.loss),
            optimizer,
            scheduler,
            device,
            CacheFeed(sites, saes, device),
            sites=sites,
        )

    @classmethod
    def from_model(
        cls, config: Config, model: SAETransformer, share: bool = False
    ) -> CachedTrainer:
        """Like `from_config`, starting from (a copy of) the SAE weights in `model`. `share`:
        train `model`'s own SAE modules instead (frozen ones stay frozen), so that `model` then
        holds the trained SAEs for saving and evaluation."""
        if share:
            check_cacheable(config)
            return cls._assemble(config, dict(model.sites), model.saes)
        dims = {
            h: int(d[-1])
            for h, d in model.hook_shapes(
                [h for s in model.sites.values() for h in (s.input_hook, s.output_hook)]
            ).items()
        }
        t = cls.from_config(config, model.all_hook_names, dims)
        t.saes.load_state_dict(model.saes.state_dict())
        return t

    @property
    def step_count(self) -> int:
        return self.state.step

    def step(self, micro_batches: Iterator[Mapping[str, Tensor]]) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches of activations."""
        logged = self.train_step(micro_batches, self.state, stats=True)
        self.history.append(logged)
        return logged


def train_together(
    trainers: Sequence[CachedTrainer],
    act_batches: Iterator[Mapping[str, Tensor]],
    n_steps: int | None = None,
    progress: bool = True,
    on_step: Callable[[int], Any] | None = None,
) -> list[list[dict[str, float]]]:
    """Train several configs' SAEs (e.g. a sparsity sweep) on the same activation batches: each
    micro-batch is read (or computed by the LM) once and used by every trainer.

    The configs must share `batch_size` and `effective_batch_size`. `n_steps` optimizer steps for
    every trainer (default: each config's own number of steps; one that is done sits out the
    rest). `on_step(i)` runs after the i-th (1-based) round. Returns each trainer's logged values
    per step.
    """
    if not trainers:
        return []
    check_same_batches([t.config for t in trainers])
    accum = trainers[0].config.grad_accum_steps
    todo = [n_steps if n_steps is not None else t.config.n_grad_steps for t in trainers]
    for i in tqdm(range(max(todo)), desc="train", unit="step", disable=not progress):
        micro = [next(act_batches) for _ in range(accum)]
        for t, n in zip(trainers, todo, strict=True):
            if i < n:
                t.step(iter(micro))
        if on_step is not None:
            on_step(i + 1)
    return [t.history for t in trainers]


def check_same_batches(configs: Sequence[Config]) -> None:
    """Configs trained on the same micro-batches need the same batch layout."""
    for name in ("batch_size", "effective_batch_size"):
        got = sorted({getattr(c, name) or c.batch_size for c in configs})
        if len(got) > 1:
            raise ConfigError(
                f"{name}: configs trained on the same batches need the same value "
                f"(got {', '.join(map(str, got))})"
            )


# --- from configs: training into run directories --------------------------------------------------
def prepare_runs(
    configs: Sequence[Config], cache: ActivationCache, device: str | None = None
) -> list[Trainer]:
    """Check everything and set each config up as `train` does (LM, seeded SAE init, pretrained
    SAEs, eval data), fed from the cache; nothing is written."""
    if not configs:
        raise UserError("train-cached: no configs given")
    if dist_from_env().enabled:
        raise UserError("train-cached: runs in one process (no torchrun)")
    check_same_batches(configs)
    for c in configs:
        check_against_cache(c, cache)
        check_cacheable(c)
    trainers = []
    for c in configs:
        check_device(device or c.device)
        t = setup(c, device=device)
        check_model_against_cache(t.model, cache)
        t.check_eval_data()
        trainers.append(t.fed_from_cache())
    return trainers


def train_from_cache(
    configs: Sequence[Config],
    cache: ActivationCache | str | Path,
    device: str | None = None,
    progress: bool = True,
    resume: Sequence[str | Path] | str | Path | None = None,
) -> list[Run]:
    """Train each config's SAEs from `cache`, all on the same micro-batches (the cache's windows
    in stored order, then reshuffled epochs if a run needs more), in a run directory per config
    as `train` writes it: final_config.yaml, metrics.jsonl, periodic and final checkpoints with
    their resume files, periodic and final evaluations with the LM, resampling and the
    divergence guard. `resume`: "latest" (each config's newest run) or one run directory per
    config, continued exactly; the unfinished runs must be at the same step. One process. Every
    input is checked before anything is written."""
    cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
    trainers = prepare_runs(configs, cache, device)
    if resume is None or isinstance(resume, str | Path):
        resumes: list[str | Path | None] = [resume] * len(trainers)
    else:
        resumes = list(resume)
        if len(resumes) != len(trainers):
            raise UserError(
                f"--resume: {len(resumes)} run directories for {len(trainers)} configs "
                "(one per config, in order; none: each one's latest)"
            )
    locks: list[RunLock] = []
    try:
        restored = [restore_run(t, r, locks) for t, r in zip(trainers, resumes, strict=True)]
        start = _common_start(trainers, [s for s, _ in restored])
        runs = [
            open_run(t, s, found, None, locks)
            for t, (s, found) in zip(trainers, restored, strict=True)
        ]
        batches = cache.batches(
            configs[0].batch_size, seed=configs[0].seed, start_batch=start, in_order_epochs=1
        )
        command = "e2e-sae train-cached CONFIG... --cache DIR --resume"
        run_loop(runs, batches, int(cache.meta["n_ctx"]), progress, command)
    finally:
        for lock in locks:
            lock.release()
    return runs


def _common_start(trainers: Sequence[Trainer], states: Sequence[TrainState]) -> int:
    """The shared stream's first micro-batch: where every unfinished run stands."""
    at = {
        s.batches for t, s in zip(trainers, states, strict=True) if s.step < n_grad_steps(t.config)
    }
    if len(at) > 1:
        raise UserError(
            f"--resume: the unfinished runs stand at different batches "
            f"({', '.join(map(str, sorted(at)))}); resume them separately"
        )
    return at.pop() if at else 0
