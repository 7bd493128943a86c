"""`train`: set up a config's LM and SAEs (`setup`: the LM, the SAEs' init options and pretrained
weights, the step plan, loss terms and optimizer), check its inputs, open (or resume) its run
directory, and hand the run to the loop (`e2e_sae.training`)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.caches.teacher import open_teacher_cache
from e2e_sae.config import Config, DatasetConfig
from e2e_sae.data import create_data_loader, data_errors
from e2e_sae.errors import UserError
from e2e_sae.eval.evaluate import EvalResult, eval_settings, eval_window_batches, evaluate
from e2e_sae.interop.pretrained import load_pretrained_saes
from e2e_sae.lm.runner import LeanRunner, check_vocab
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.objective.forward import StepPlan, make_plan
from e2e_sae.objective.losses import build_loss_terms
from e2e_sae.resources import bf16_is_fast, check_memory
from e2e_sae.runs.checkpoint import CONFIG_FILE, write_config
from e2e_sae.runs.rundir import RunLock, create_locked_run_dir
from e2e_sae.saes import TopKSAE, idle_aux_warnings
from e2e_sae.saes.init import Center, init_saes_
from e2e_sae.training.distributed import (
    SINGLE,
    Dist,
    broadcast_state,
    broadcast_str,
    init_distributed,
    on_main,
    shutdown,
)
from e2e_sae.training.engine import Engine, Resampling, TrainState, make_optimizer, n_grad_steps
from e2e_sae.training.faults import write_faults
from e2e_sae.training.feeds import CacheFeed, LMFeed
from e2e_sae.training.find_run import Resume, find_resume, recorded_precision
from e2e_sae.training.loop import Run, run_loop
from e2e_sae.training.resume import restore_point
from e2e_sae.training.runlog import RunLogger

logger = logging.getLogger(__name__)


def set_seed(seed: int | None) -> None:
    """Seed Python's, NumPy's and torch's generators (nothing when `seed` is None)."""
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


RESUME_COMMAND = "e2e-sae train CONFIG --resume"
"""How a stopped `train` run continues (+ its run directory), in the messages that stop it."""


@dataclass(kw_only=True)
class Trainer(Engine[Config]):
    """An engine over the SAEs of an `SAETransformer`, whose LM evaluates them and, with the
    default `LMFeed`, computes their training activations (`fed_from_cache`: stored ones)."""

    model: SAETransformer
    plan: StepPlan
    eval_plan: StepPlan
    reference: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.feed is None:
            self.feed = LMFeed(self)

    def batches(
        self, data: DatasetConfig, seed: int, start: int = 0, shard: bool = False
    ) -> Iterator[Tensor]:
        """Endless batches from global batch `start` on (`shard`: this rank's slice of each)."""
        rank, world = (self.dist.rank, self.dist.world_size) if shard else (0, 1)
        return create_data_loader(data, self.config.batch_size, seed, rank, world, start)

    def fed_from_cache(self) -> Trainer:
        """Train on stored clean activations {hook: tensor} instead of running the LM (local
        losses only; `e2e_sae.caches.activations`)."""
        self.feed = CacheFeed(self.model.sites, self.saes, self.device)
        return self

    def run_eval(self, progress: bool = False, desc: str = "eval") -> EvalResult | None:
        cfg = self.config
        if cfg.eval_data is None or not cfg.eval_n_samples:
            return None
        batches, n_batches, n = self.eval_batches()
        self.model.eval()
        with tqdm(
            total=n_batches, desc=desc, unit="batch", leave=False, disable=not progress
        ) as bar:
            result = evaluate(
                self.model, _counted(batches, bar), n_batches, self.eval_plan, self.loss_terms
            )
        result.settings = eval_settings(cfg.eval_data, n, cfg.batch_size, cfg.seed, None)
        return result

    def eval_batches(self) -> tuple[Iterator[Tensor], int, int]:
        """The evaluation's batches, their number and the windows they hold: `eval_n_samples`
        windows of the eval set, each once (a set too small for them is a UserError), the
        windows and order `e2e-sae eval` takes by default."""
        cfg = self.config
        assert cfg.eval_data is not None and cfg.eval_n_samples
        asked = f"eval_n_samples: {cfg.eval_n_samples} windows"
        n = cfg.eval_n_samples
        return eval_window_batches(cfg.eval_data, cfg.batch_size, n, cfg.seed, asked)

    def check_data(self, first_train_batch: Tensor | None = None) -> None:
        """Check the first training batch (if given) against the model's vocabulary, and load and
        check the first eval batch now: bad data fails before anything is written."""
        cfg = self.config
        if first_train_batch is not None:
            check_vocab(self.model.lm, first_train_batch, "train_data")
        if cfg.eval_data is not None and cfg.eval_n_samples:
            with data_errors("eval_data"):
                first = next(self.eval_batches()[0])
            check_vocab(self.model.lm, first, "eval_data")


def setup(
    config: Config, device: str | None = None, reference: bool = False, dist: Dist = SINGLE
) -> Trainer:
    """Load the LM, build the SAEs, and prepare optimizer and schedule (no files written).
    `precision: auto` becomes the precision the SAEs' device runs fast (`concrete_precision`);
    the trainer's `config` holds it, so the run directory records it."""
    set_seed(config.seed)
    model = SAETransformer.from_config(config, device=device)
    config = concrete_precision(config, next(model.saes.parameters()).device)
    if config.n_samples is not None and config.n_samples < (
        global_batch := (config.effective_batch_size or config.batch_size) * dist.world_size
    ):
        raise UserError(
            f"n_samples: {config.n_samples} is less than one optimizer step over "
            f"{dist.world_size} processes ({global_batch} samples)"
        )
    s = config.saes
    if s.tied_init or s.init_b_dec != "zeros":  # before pretrained weights, which then win
        sample = None
        if s.init_b_dec != "zeros":  # a small data sample: the first training batch
            sample = next(create_data_loader(config.train_data, config.batch_size, config.seed))
            check_vocab(model.lm, sample, "train_data")
        initialize_saes(model, sample, tied=s.tied_init, b_dec=s.init_b_dec)
    frozen: set[str] = set()
    if config.saes.pretrained_sae_paths:
        frozen = load_pretrained_saes(
            model, config.saes.pretrained_sae_paths, config.saes.retrain_saes
        )
    for pos in frozen:
        model.sae(pos).requires_grad_(False)
    trainable = [p for p in model.sae_positions if p not in frozen]
    for line in idle_aux_warnings(config, {p: model.sae(p) for p in trainable}):
        logger.warning(line)
    if not trainable:
        raise UserError("saes.retrain_saes: every SAE is frozen, so nothing would train")
    params = [p for q in trainable for p in model.sae(q).parameters()]
    n_bytes = sum(p.numel() * p.element_size() for p in params)
    check_memory(  # (allocated at the first step; the weights themselves are checked at build)
        3 * n_bytes,
        next(model.saes.parameters()).device,
        "saes.dict_size_to_input_ratio",
        "the trained SAEs' gradients and Adam moments",
    )
    broadcast_state(model.saes, dist)  # every rank starts from rank 0's SAEs, as DDP does
    plan = make_plan(model, config.loss, precision=config.precision)
    eval_plan = make_plan(model, config.loss, force_full_pass=True)
    if config.teacher_cache is not None:
        plan = dataclasses.replace(plan, teacher=open_teacher_cache(config))
    if config.compile:
        compile_step(model, plan, trainable)
    loss_terms = build_loss_terms(config.loss, plan.new_cache, config.kl_chunk_tokens)
    steps = n_grad_steps(config, dist.world_size)
    optimizer, scheduler = make_optimizer(config, model.saes, steps, dist.world_size)
    dev = next(model.saes.parameters()).device
    every = config.saes.resample_every_n_samples
    resampling = None
    if every is not None:
        resampling = Resampling(
            every, config.n_samples or 0, config.act_frequency_n_tokens, config.seed
        )
    return Trainer(
        config,
        model.saes,
        trainable,
        loss_terms,
        optimizer,
        scheduler,
        dev,
        dist=dist,
        precision=config.precision,
        resampling=resampling,
        divergence_factor=config.divergence_factor,
        model=model,
        plan=plan,
        eval_plan=eval_plan,
        reference=reference,
    )


def compile_step(model: SAETransformer, plan: StepPlan, trainable: list[str]) -> None:
    """`compile: true`: the trained SAEs' forward and the plan's hook-free LM blocks (where the
    plan runs on the lean forward) go through `torch.compile`. A TopK SAE on its sparse path is
    left as it is: one GEMM and sparse products that dynamo does not trace."""
    for pos in trainable:
        sae = model.sae(pos)
        if not (isinstance(sae, TopKSAE) and sae.uses_sparse_path()):
            sae.compile(dynamic=False)
    if isinstance(plan.runner, LeanRunner):
        plan.runner.lean(plan.precision).compile()  # type: ignore[union-attr]
    else:
        logger.info("compile: this LM runs without the lean forward; only the SAEs are compiled")


def concrete_precision(config: Config, device: torch.device | str) -> Config:
    """`config` with `precision: auto` replaced by bf16 where `device` multiplies bf16 fast
    (`resources.bf16_is_fast`), else fp32; any other precision as it is."""
    if config.precision != "auto":
        return config
    precision = "bf16" if bf16_is_fast(device) else "fp32"
    logger.info("precision: auto -> %s on %s", precision, device)
    return config.model_copy(update={"precision": precision})


@torch.no_grad()
def initialize_saes(
    model: SAETransformer, tokens: Tensor | None, *, tied: bool, b_dec: Center
) -> None:
    """Apply the init options to every SAE of `model` (`e2e_sae.saes.init.init_saes_`); `tokens`
    [batch, pos] is the data sample (needed unless b_dec is "zeros"), run through the clean LM."""
    samples = None
    if b_dec != "zeros":
        if tokens is None:
            raise ValueError("initialize_saes: init_b_dec needs a data sample")
        hooks = sorted({h for s in model.sites.values() for h in s.hooks})
        device = next(model.saes.parameters()).device
        _, acts = model.forward_raw(
            tokens.to(device), run_entire_model=False, cache_positions=hooks
        )
        samples = {
            pos: (acts[site.output_hook], acts[site.input_hook] if site.is_transcoder else None)
            for pos, site in model.sites.items()
        }
    saes = {pos: model.sae(pos) for pos in model.sae_positions}
    init_saes_(saes, samples, tied=tied, b_dec=b_dec)


def train(
    config: Config,
    run_dir: Path | None = None,
    device: str | None = None,
    progress: bool = True,
    reference: bool = False,
    on_eval: Callable[[EvalResult], Any] | None = None,
    resume: str | Path | None = None,
) -> Path:
    """Train the SAEs of `config`; returns the run directory. `resume`: a run directory (or
    "latest": the newest run of this config) to continue exactly from its last intact
    checkpoint. Under torchrun every rank calls this; see `e2e_sae.training.distributed`. Nothing is
    written before the inputs are checked. The run directory is locked while the run lasts."""
    d, device = init_distributed(device or config.device)
    if resume is not None and config.precision == "auto":  # a run goes on as it was trained
        config = config.model_copy(update={"precision": recorded_precision(resume, config)})
    t = setup(config, device=device, reference=reference, dist=d)
    locks: list[RunLock] = []
    try:
        state, found = restore_run(t, resume, locks)
        with data_errors("train_data"):
            batches = t.batches(config.train_data, config.seed, start=state.batches, shard=True)
            first = next(batches)
        t.check_data(first)
        dirs = [found.run_dir] if found is not None else [run_dir] if run_dir is not None else []
        with write_faults(dirs, RESUME_COMMAND):
            run = open_run(t, state, found, run_dir, locks, on_eval)
            dirs.append(run.run_dir)
            run_loop([run], itertools.chain([first], batches), first.shape[1], progress)
        shutdown(d)
        return run.run_dir
    finally:
        for lock in locks:
            lock.release()


def restore_run(
    t: Trainer, resume: str | Path | None, locks: list[RunLock]
) -> tuple[TrainState, Resume | None]:
    """The counters to start from: zero, or (`resume`) those of the run's newest intact point,
    whose weights, optimizer, schedule and RNG states are loaded into `t`. The run directory's
    lock joins `locks`."""
    state = TrainState()
    if resume is None:
        return state, None
    found = find_resume(resume, t.config, t.dist)
    if found.lock is not None:
        locks.append(found.lock)
    if found.point is not None:
        restore_point(t, found.point, state, t.dist)
    return state, found


def open_run(
    t: Trainer,
    state: TrainState,
    found: Resume | None,
    run_dir: Path | None,
    locks: list[RunLock],
    on_eval: Callable[[EvalResult], Any] | None = None,
) -> Run:
    """The run's directory (a new locked one, or the resumed one) with its config written, and
    its metrics logger: the first writes, once every input has been checked."""
    d = t.dist
    new = found is None and (run_dir is None or not run_dir.exists())
    if found is not None:
        run_dir = found.run_dir
    else:
        made = on_main(lambda: create_locked_run_dir(t.config, run_dir), d)
        if made is not None:
            run_dir = made[0]
            locks.append(made[1])
    try:
        if d.is_main:
            assert run_dir is not None
            write_config(run_dir, t.config)
            if found is not None:
                found.tidy()
    except OSError as err:
        if not new or run_dir is None:
            raise  # (a resumed run or a given folder: `write_faults` says what happened)
        shutil.rmtree(run_dir, ignore_errors=True)  # made just now, empty but for its lock
        raise UserError(
            f"save_dir: cannot write the run's {CONFIG_FILE} into {run_dir.parent} "
            f"({err.strerror}); no run directory was left"
        ) from None
    path = broadcast_str(str(run_dir) if run_dir is not None else None, d)  # for every rank
    assert path is not None
    run_dir = Path(path)
    return Run(t, state, run_dir, RunLogger(run_dir, t.config, enabled=d.is_main), on_eval)


def _counted(batches: Iterator[Tensor], bar: Any) -> Iterator[Tensor]:
    for b in batches:
        yield b
        bar.update(1)
