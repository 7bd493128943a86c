"""`train`: set up a config's LM and SAEs (`setup`), check its inputs, open (or resume) its run
directory, and hand the run to the loop (`e2e_sae.training`)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.caches.teacher import TeacherCache, check_teacher_config
from e2e_sae.config import Config, DatasetConfig
from e2e_sae.data import create_data_loader, data_errors
from e2e_sae.errors import UserError
from e2e_sae.eval.evaluate import EvalResult, eval_batches, eval_settings, evaluate
from e2e_sae.interop.pretrained import load_pretrained_saes
from e2e_sae.lm.names import check_after_first_sae
from e2e_sae.lm.splice import SAETransformer, build_model, check_vocab, filter_names
from e2e_sae.objective.forward import StepPlan, make_plan
from e2e_sae.objective.losses import build_loss_terms
from e2e_sae.saes import idle_aux_warnings
from e2e_sae.training.distributed import SINGLE, Dist, broadcast_state, init_distributed, shutdown
from e2e_sae.training.engine import Engine, TrainState, make_optimizer
from e2e_sae.training.feeds import CacheFeed, LMFeed
from e2e_sae.training.init import initialize_saes
from e2e_sae.training.loop import Run, run_loop
from e2e_sae.training.resume import (
    Resume,
    RunLock,
    find_resume,
    on_main,
    prepare_run_dir,
    restore_point,
)
from e2e_sae.training.runlog import RunLogger

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_run_name(config: Config) -> str:
    """Name from the key settings, as the original library does."""
    if config.run_name or config.wandb_run_name:
        return str(config.run_name or config.wandb_run_name)
    positions = "-".join(config.saes.sae_positions + [t.output for t in config.saes.transcoders])
    parts = [f"{positions}", f"ratio-{config.saes.dict_size_to_input_ratio}", f"lr-{config.lr}"]
    if config.saes.architecture != "relu":
        parts.insert(0, config.saes.architecture + (f"{config.saes.k}" if config.saes.k else ""))
    short = {
        "sparsity": "lpcoeff",
        "out_to_in": "in-to-out",
        "out_to_orig": "out-to-orig",
        "logits_kl": "logits-kl",
        "in_to_orig": "in-to-orig",
    }
    for name, term in config.loss.enabled.items():
        parts.append(f"{short[name]}-{getattr(term, 'coeff', 0):g}")
    return config.wandb_run_name_prefix + "_".join(parts)


def _stamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def make_run_dir(config: Config, run_dir: Path | None = None) -> Path:
    """A new run directory: `run_dir`, or `<save_dir>/<run name>_<time>`, created exclusively
    (`-2`, `-3`, ... appended when another run took the name, e.g. started in the same second)."""
    try:
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            return run_dir
        assert config.save_dir is not None
        base = Path(config.save_dir).expanduser() / f"{get_run_name(config)}_{_stamp()}"
        base.parent.mkdir(parents=True, exist_ok=True)
        for k in itertools.count(1):
            run_dir = base if k == 1 else base.with_name(f"{base.name}-{k}")
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                continue
    except OSError as err:
        where = run_dir or config.save_dir
        raise UserError(f"save_dir: cannot create {where} ({err.strerror})") from None
    raise AssertionError("unreachable")


def create_locked_run_dir(config: Config, run_dir: Path | None = None) -> tuple[Path, RunLock]:
    """`make_run_dir`, then its lock (a given `run_dir` that a live run holds is refused)."""
    run_dir = make_run_dir(config, run_dir)
    return run_dir, RunLock(run_dir).acquire("save_dir")


@dataclass(kw_only=True)
class Trainer(Engine):
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
        # the windows `e2e-sae eval` scans by default: eval_n_samples of them, in its order
        n = cfg.eval_n_samples
        batches, n_batches = eval_batches(cfg.eval_data, cfg.batch_size, n, cfg.seed)
        self.model.eval()
        with tqdm(
            total=n_batches, desc=desc, unit="batch", leave=False, disable=not progress
        ) as bar:
            result = evaluate(
                self.model, _counted(batches, bar), n_batches, self.eval_plan, self.loss_terms
            )
        result.settings = eval_settings(cfg.eval_data, n, cfg.batch_size, cfg.seed, None)
        return result

    def check_eval_data(self) -> None:
        """Load the first eval batch now, so a bad eval dataset fails before anything is written."""
        cfg = self.config
        if cfg.eval_data is not None and cfg.eval_n_samples:
            with data_errors("eval_data"):
                first = next(eval_batches(cfg.eval_data, cfg.batch_size, 1, cfg.seed)[0])
            check_vocab(self.model, first, "eval_data")


def open_teacher_cache(config: Config) -> Any:

    check_teacher_config(config)
    return TeacherCache(config.teacher_cache or "")


def setup(
    config: Config, device: str | None = None, reference: bool = False, dist: Dist = SINGLE
) -> Trainer:
    """Load the LM, build the SAEs, and prepare optimizer and schedule (no files written)."""
    set_seed(config.seed)
    model = build_model(config, device=device)
    check_in_to_orig(model, config)
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
            check_vocab(model, sample, "train_data")
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
    broadcast_state(model.saes, dist)  # every rank starts from rank 0's SAEs, as DDP does
    plan = make_plan(model, config.loss, precision=config.precision)
    if config.teacher_cache is not None:
        plan = dataclasses.replace(plan, teacher=open_teacher_cache(config))
    loss_terms = build_loss_terms(config.loss, plan.new_cache, config.kl_chunk_tokens)
    optimizer, scheduler = make_optimizer(config, model.saes, dist.world_size)
    dev = next(model.saes.parameters()).device
    eval_plan = make_plan(model, config.loss, force_full_pass=True)
    return Trainer(
        config,
        model.saes,
        trainable,
        loss_terms,
        optimizer,
        scheduler,
        dev,
        dist=dist,
        model=model,
        plan=plan,
        eval_plan=eval_plan,
        reference=reference,
    )


def check_in_to_orig(model: SAETransformer, config: Config) -> None:
    """`in_to_orig` hooks must run after the first SAE's output: before it (or at it) the spliced
    run equals the clean one, and the term would be 0 at every step."""
    term = config.loss.in_to_orig
    if term is None:
        return

    field = "loss.in_to_orig.hook_positions"
    hooks = filter_names(model.all_hook_names, term.hook_positions, field)
    outputs = [model.sites[p].output_hook for p in model.sae_positions]
    order = list(model.hook_shapes([*outputs, *hooks]))  # in the order the forward pass runs
    check_after_first_sae(order, outputs, hooks, field)


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
    t = setup(config, device=device, reference=reference, dist=d)
    locks: list[RunLock] = []
    try:
        state, found = restore_run(t, resume, locks)
        with data_errors("train_data"):
            batches = t.batches(config.train_data, config.seed, start=state.batches, shard=True)
            first = next(batches)
        check_vocab(t.model, first, "train_data")
        t.check_eval_data()
        run = open_run(t, state, found, run_dir, locks, on_eval)
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
    if found is not None:
        run_dir = found.run_dir
    else:
        made = on_main(lambda: create_locked_run_dir(t.config, run_dir), d)
        if made is not None:
            run_dir = made[0]
            locks.append(made[1])
    run_dir = prepare_run_dir(t.config, run_dir, found, d)
    return Run(t, state, run_dir, RunLogger(run_dir, t.config, enabled=d.is_main), on_eval)


def _counted(batches: Iterator[Tensor], bar: Any) -> Iterator[Tensor]:
    for b in batches:
        yield b
        bar.update(1)
