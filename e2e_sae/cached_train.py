"""Training local SAEs from cached activations, without the LM, and sweeps.

`CachedTrainer`s train SAEs on the activations an `e2e_sae.act_cache.ActivationCache` holds (or
`lm_activation_batches` computes), without running the LM (a sparsity sweep, a second epoch,
another dictionary size); `train_together` feeds several of them the same batches. One
`CachedTrainer.step` does what `Trainer.train_step` does for a local run, on the given activations
instead of running the LM.

From configs (what `e2e-sae train-cached` runs): `train_from_cache` trains several configs' SAEs
on the same cached batches and writes a normal run directory for each (config, metrics.jsonl,
final `samples_<N>.safetensors`, evaluation with the LM). When the cache holds a config's training
windows (built from it), the weights equal those of `e2e_sae.train.train` for that config.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from e2e_sae.act_cache import (
    ActivationCache,
    check_against_cache,
    check_cacheable,
    check_model_against_cache,
    hook_field,
    resolve_sites,
)
from e2e_sae.config import Config
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.losses import LossInputs, LossTerm, build_loss_terms, compute_losses
from e2e_sae.saes import SAEActs, SAEBase, build_sae
from e2e_sae.splice import SAETransformer, SpliceSite, dict_size, sae_key

if TYPE_CHECKING:
    from e2e_sae.evaluate import EvalResult
    from e2e_sae.resume import RunLock
    from e2e_sae.runlog import RunLogger
    from e2e_sae.train import Trainer


# --- training from activations --------------------------------------------------------------------
@dataclass
class CachedTrainer:
    """One config's local SAEs trained on given activations (no LM): `step` is
    `Trainer.train_step` for a local run (same losses, aux losses, clipping, Adam and schedule)."""

    config: Config
    sites: dict[str, SpliceSite]
    saes: nn.ModuleDict
    loss_terms: list[LossTerm]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step_count: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_config(
        cls, config: Config, all_hook_names: Sequence[str], dims: Mapping[str, int]
    ) -> CachedTrainer:
        """Fresh SAEs for `config` (a local run) with input/output sizes `dims[hook]`."""
        check_cacheable(config)
        sites = resolve_sites(config, all_hook_names)
        s = config.saes
        kwargs: dict[str, Any] = dict(s.architecture_kwargs)
        if s.k is not None:
            kwargs["k"] = s.k
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
        from e2e_sae.train import lr_lambda

        terms = build_loss_terms(config.loss)
        params = [p for p in saes.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=config.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_lambda(i, config))
        return cls(config, sites, saes, terms, optimizer, scheduler)

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
        dims = {h: int(d[-1]) for h, d in model.hook_shapes(
            [h for s in model.sites.values() for h in (s.input_hook, s.output_hook)]
        ).items()}  # fmt: skip
        t = cls.from_config(config, model.all_hook_names, dims)
        t.saes.load_state_dict(model.saes.state_dict())
        return t

    def sae(self, pos: str) -> SAEBase:
        sae = self.saes[sae_key(pos)]
        assert isinstance(sae, SAEBase)
        return sae

    def forward(self, acts: Mapping[str, Tensor]) -> LossInputs:
        sae_acts: dict[str, SAEActs] = {}
        for pos, site in self.sites.items():
            x = acts[site.input_hook]
            output, c = self.sae(pos)(x)
            sae_acts[pos] = SAEActs(x, c, output)
        targets = {p: p for p, s in self.sites.items() if s.is_transcoder}
        saes = {p: self.sae(p) for p in self.sites}
        return LossInputs(sae_acts, orig_acts=acts, transcoder_targets=targets, saes=saes)

    def step(self, micro_batches: Iterator[Mapping[str, Tensor]]) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches of activations."""
        from e2e_sae.evaluate import l0
        from e2e_sae.train import check_finite, check_tensors_finite

        accum = self.config.grad_accum_steps
        logged: dict[str, float] = {}
        device = next(self.saes.parameters()).device
        for sae in self.saes.values():  # frozen SAEs behave as at inference, as in `train`
            sae.train(any(p.requires_grad for p in sae.parameters()))
        for _ in range(accum):
            acts = {h: v.to(device) for h, v in next(micro_batches).items()}
            inputs = self.forward(acts)
            aux = {
                f"{name}/{pos}": v
                for pos, a in inputs.sae_acts.items()
                for name, v in self.sae(pos).aux_losses(a, inputs.target(pos)).items()
            }
            loss, values = compute_losses(self.loss_terms, inputs, aux)
            check_finite(loss, values, self.step_count + 1)
            (loss / accum).backward()
            for pos, a in inputs.sae_acts.items():
                self.sae(pos).update_firing_stats(a.c)
                values[f"l0/{pos}"] = l0(a.c)
            values["loss"] = loss
            for k, v in values.items():
                logged[k] = logged.get(k, 0.0) + float(v.detach()) / accum
        named = [(n, p) for n, p in self.saes.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        check_tensors_finite(((n, p.grad) for n, p in named), "gradient", self.step_count + 1)
        if self.config.max_grad_norm is not None:
            logged["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        check_tensors_finite(named, "weight", self.step_count + 1)
        self.step_count += 1
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
            raise ConfigError(f"{name}: configs trained on the same batches need the same value "
                              f"(got {', '.join(map(str, got))})")  # fmt: skip


# --- from configs: training into run directories --------------------------------------------------
@dataclass
class CachedRun:
    """One config trained from a cache: its run directory, the trainer (with its final values in
    `trainer.history[-1]`), the `train.setup` Trainer whose model holds the trained SAEs, and the
    final evaluation (None without eval_data / eval_n_samples)."""

    config: Config
    setup: Trainer
    trainer: CachedTrainer
    run_dir: Path | None = None
    log: RunLogger | None = None
    eval: EvalResult | None = None
    lock: RunLock | None = None

    @property
    def n_samples(self) -> int:
        bs = self.config.effective_batch_size or self.config.batch_size
        return self.trainer.step_count * bs

    def final_values(self) -> dict[str, float]:
        """The last step's logged values (loss terms, L0 per SAE, ...) and dead latents now."""
        from e2e_sae.train import dead_counts

        last, window = self.trainer.history[-1], self.config.act_frequency_n_tokens
        return {"loss": last["loss"], **last, **dead_counts(self.setup.model, window)}


def prepare_runs(
    configs: Sequence[Config], cache: ActivationCache, device: str | None = None
) -> list[CachedRun]:
    """Check everything and set each config up as `train` does (LM, seeded SAE init, pretrained
    SAEs, eval data); nothing is written."""
    from e2e_sae.distributed import check_device, dist_from_env
    from e2e_sae.train import setup

    if not configs:
        raise UserError("train-cached: no configs given")
    if dist_from_env().enabled:
        raise UserError("train-cached: runs in one process (no torchrun)")
    check_same_batches(configs)
    for c in configs:
        check_against_cache(c, cache)
    runs = []
    for c in configs:
        check_device(device or c.device)
        t = setup(c, device=device)
        check_model_against_cache(t.model, cache)
        t.check_eval_data()
        runs.append(CachedRun(c, t, CachedTrainer.from_model(c, t.model, share=True)))
    return runs


def _new_run_dirs(runs: Sequence[CachedRun]) -> None:
    """A fresh `<save_dir>/<run name>_<time>` per run, created exclusively (suffixed when another
    run took the name) and locked while it trains, holding final_config.yaml, and its metrics
    logger."""
    from e2e_sae.checkpoint import write_config
    from e2e_sae.runlog import RunLogger
    from e2e_sae.train import create_locked_run_dir

    for r in runs:
        r.run_dir, r.lock = create_locked_run_dir(r.config)
        write_config(r.run_dir, r.config)
        r.log = RunLogger(r.run_dir, r.config)


def _step_logger(runs: Sequence[CachedRun], n_ctx: int) -> Callable[[int], None]:
    """What `train` logs every `log_every_n_grad_steps` steps (and after step 1), per run."""
    from e2e_sae.train import dead_counts

    start = time.perf_counter()

    def on_step(step: int) -> None:
        elapsed = time.perf_counter() - start
        for r in runs:
            cfg, t = r.config, r.trainer
            if t.step_count != step or not (step % cfg.log_every_n_grad_steps == 0 or step == 1):
                continue
            rec = {"samples": r.n_samples, "step": step, "lr": t.scheduler.get_last_lr()[0],
                   **t.history[-1], "tokens_per_s": r.n_samples * n_ctx / elapsed}  # fmt: skip
            rec.update(dead_counts(r.setup.model, cfg.act_frequency_n_tokens))
            assert r.log is not None
            r.log.log(rec, step=r.n_samples)

    return on_step


def _finish(run: CachedRun) -> None:
    """Final checkpoint (the format `train` writes), then `train`'s final evaluation."""
    from e2e_sae.checkpoint import save_checkpoint
    from e2e_sae.train import TrainState, log_eval, write_curves

    assert run.run_dir is not None and run.log is not None
    steps = run.trainer.step_count
    run.log.save_file(save_checkpoint(run.run_dir, run.setup.model, run.n_samples))
    state = TrainState(steps, run.n_samples, steps * run.config.grad_accum_steps)
    log_eval(run.setup, run.log, state, lambda result: setattr(run, "eval", result))
    run.log.finish()
    write_curves(run.run_dir)


def train_from_cache(
    configs: Sequence[Config],
    cache: ActivationCache | str | Path,
    device: str | None = None,
    progress: bool = True,
) -> list[CachedRun]:
    """Train each config's SAEs from `cache`, all on the same micro-batches (the cache's windows
    in stored order, then reshuffled epochs if a run needs more), and write a run directory per
    config as `train` does: final_config.yaml, metrics.jsonl, the final samples_<N>.safetensors
    and the final evaluation with the LM. No periodic checkpoints or evaluations, no resume, one
    process. Every input is checked before anything is written."""
    cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
    runs = prepare_runs(configs, cache, device)
    try:
        _new_run_dirs(runs)
        batches = cache.batches(configs[0].batch_size, seed=configs[0].seed, in_order_epochs=1)
        on_step = _step_logger(runs, int(cache.meta["n_ctx"]))
        train_together([r.trainer for r in runs], batches, progress=progress, on_step=on_step)
        for r in runs:
            _finish(r)
    finally:
        for r in runs:
            if r.lock is not None:
                r.lock.release()
    return runs
