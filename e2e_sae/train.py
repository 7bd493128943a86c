"""The training loop: batch -> forward -> losses -> backward -> step; log / eval / save triggers."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.checkpoint import build_model, load_pretrained_saes
from e2e_sae.config import Config, DatasetConfig
from e2e_sae.data import create_data_loader
from e2e_sae.distributed import (
    SINGLE,
    Dist,
    average_gradients,
    broadcast_state,
    init_distributed,
    max_over_ranks,
    reduce_mean,
    shutdown,
    sync_firing_stats,
)
from e2e_sae.errors import UserError
from e2e_sae.evaluate import EvalResult, evaluate
from e2e_sae.forward import StepPlan, autocast, make_plan, run_forward
from e2e_sae.losses import LossInputs, LossTerm, build_loss_terms, compute_losses
from e2e_sae.resample import resample_dead_latents
from e2e_sae.resume import (
    Resume,
    RunLock,
    StopOnSignal,
    find_resume,
    on_main,
    prepare_run_dir,
    restore_point,
    resume_points,
    save_point,
)
from e2e_sae.runlog import RunLogger
from e2e_sae.saes.init import initialize_saes
from e2e_sae.splice import SAETransformer

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(step: int, config: Config, world_size: int = 1) -> float:
    """Linear warmup over `warmup_samples`, then linear/cosine decay to `min_lr_factor`."""
    bs = (config.effective_batch_size or config.batch_size) * world_size
    warmup = config.warmup_samples // bs
    total = n_grad_steps(config, world_size)
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    lo = config.min_lr_factor
    if config.lr_schedule == "linear":
        return 1 - (1 - lo) * progress
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))


def n_grad_steps(config: Config, world_size: int = 1) -> int:
    """Optimizer steps of the run: `n_samples` counts samples over all ranks."""
    return max(1, config.n_grad_steps // world_size)


def get_run_name(config: Config) -> str:
    """Name from the key settings, as the original library does."""
    if config.run_name or config.wandb_run_name:
        return str(config.run_name or config.wandb_run_name)
    positions = "-".join(config.saes.sae_positions + [t.output for t in config.saes.transcoders])
    parts = [f"{positions}", f"ratio-{config.saes.dict_size_to_input_ratio}", f"lr-{config.lr}"]
    if config.saes.architecture != "relu":
        parts.insert(0, config.saes.architecture + (f"{config.saes.k}" if config.saes.k else ""))
    short = {"sparsity": "lpcoeff", "out_to_in": "in-to-out", "out_to_orig": "out-to-orig",
             "logits_kl": "logits-kl", "in_to_orig": "in-to-orig"}  # fmt: skip
    for name, term in config.loss.enabled.items():
        parts.append(f"{short[name]}-{getattr(term, 'coeff', 0):g}")
    return config.wandb_run_name_prefix + "_".join(parts)


DIVERGENCE_WINDOW = 100  # steps whose median loss the divergence guard compares against


@dataclass
class TrainState:
    """Counters that define where a run is (also what a resume restores)."""

    step: int = 0  # optimizer steps taken
    n_samples: int = 0  # training samples consumed
    batches: int = 0  # micro-batches drawn from the loader
    recent_losses: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """The last DIVERGENCE_WINDOW steps' loss and loss terms (for the divergence guard)."""


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


@dataclass
class Trainer:
    """Everything set up before the loop runs (nothing is written to disk until `train`)."""

    config: Config
    model: SAETransformer
    plan: StepPlan
    eval_plan: StepPlan
    loss_terms: list[LossTerm]
    trainable: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    reference: bool = False
    dist: Dist = SINGLE

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks."""
        return (self.config.effective_batch_size or self.config.batch_size) * self.dist.world_size

    def batches(
        self, data: DatasetConfig, seed: int, start: int = 0, shard: bool = False
    ) -> Iterator[Tensor]:
        """Endless batches from global batch `start` on (`shard`: this rank's slice of each)."""
        rank, world = (self.dist.rank, self.dist.world_size) if shard else (0, 1)
        return create_data_loader(data, self.config.batch_size, seed, rank, world, start)

    def train_step(self, batches: Iterator[Tensor], state: TrainState) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns logged values."""
        accum = self.config.grad_accum_steps
        logged: dict[str, float] = {}
        for _ in range(accum):
            tokens = next(batches).to(self.device)
            state.batches += 1
            with autocast(self.plan.precision, self.device):
                inputs = run_forward(self.model, tokens, self.plan, reference=self.reference)
            aux = {
                f"{name}/{pos}": v
                for pos, acts in inputs.sae_acts.items()
                if pos in self.trainable
                for name, v in self.model.sae(pos).aux_losses(acts, inputs.target(pos)).items()
            }
            loss, values = compute_losses(self.loss_terms, inputs, aux)
            check_finite(loss, values, state.step + 1, self.dist)
            (loss / accum).backward()
            for pos, acts in inputs.sae_acts.items():
                self.model.sae(pos).update_firing_stats(acts.c)
            sync_firing_stats(self.model.saes, self.dist, tokens.numel())
            values["loss"] = loss
            for k, v in values.items():
                logged[k] = logged.get(k, 0.0) + float(v.detach()) / accum
        named = [(n, p) for n, p in self.model.saes.named_parameters() if p.requires_grad]
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
        broadcast_state(self.model.saes, self.dist, buffers_only=True)
        state.step += 1
        state.n_samples += self.global_batch
        return reduce_mean(logged, self.dist)

    def maybe_resample(self, inputs: LossInputs, n_samples: int, step: int) -> dict[str, float]:
        """Re-initialise dead latents when this step crossed `resample_every_n_samples`."""
        every, total = self.config.saes.resample_every_n_samples, self.config.n_samples or 0
        if not every or not _crossed(n_samples, self.global_batch, every) or 2 * n_samples > total:
            return {}  # (only in the first half: the second lets resampled latents settle)
        window = self.config.act_frequency_n_tokens
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        counts = {}
        for pos in self.trainable:
            sae, acts = self.model.sae(pos), inputs.sae_acts[pos]
            dead, tc = sae.tokens_since_fired >= window, pos in inputs.transcoder_targets
            n = resample_dead_latents(sae, acts.input, inputs.target(pos), acts.output, dead,
                                      self.optimizer, gen, tc)  # fmt: skip
            counts[f"resampled/{pos}"] = float(n)
        broadcast_state(self.model.saes, self.dist)  # rank 0's choice on every rank
        return counts

    def run_eval(self, progress: bool = False, desc: str = "eval") -> EvalResult | None:
        cfg = self.config
        if cfg.eval_data is None or not cfg.eval_n_samples:
            return None
        n_batches = max(1, cfg.eval_n_samples // cfg.batch_size)
        seed = cfg.seed + 42  # a different order from training, as in the original
        batches = self.batches(cfg.eval_data, seed)
        self.model.eval()
        with tqdm(total=n_batches, desc=desc, unit="batch", leave=False,
                  disable=not progress) as bar:  # fmt: skip
            return evaluate(self.model, _counted(batches, bar), n_batches, self.eval_plan,
                            self.loss_terms)  # fmt: skip

    def check_eval_data(self) -> None:
        """Load the first eval batch now, so a bad eval dataset fails before anything is written."""
        cfg = self.config
        if cfg.eval_data is not None and cfg.eval_n_samples:
            with data_errors("eval_data"):
                first = next(self.batches(cfg.eval_data, cfg.seed + 42))
            check_vocab(self.model, first, "eval_data")


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


class NumericalError(UserError):
    """NaN / inf in a loss, gradient or weight, or a diverging loss. `weights_step`: the step
    after which the weights that caused it were in place (their checkpoint is not to be kept)."""

    def __init__(self, message: str, weights_step: int | None = None) -> None:
        super().__init__(message)
        self.weights_step = weights_step


def check_divergence(values: dict[str, float], state: TrainState, factor: float | None,
                     terms: list[str]) -> None:  # fmt: skip
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


def open_teacher_cache(config: Config) -> Any:
    from e2e_sae.teacher_cache import TeacherCache, check_teacher_config

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
        raise UserError(f"n_samples: {config.n_samples} is less than one optimizer step over "
                        f"{dist.world_size} processes ({global_batch} samples)")  # fmt: skip
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
    if not trainable:
        raise UserError("saes.retrain_saes: every SAE is frozen, so nothing would train")
    broadcast_state(model.saes, dist)  # every rank starts from rank 0's SAEs, as DDP does
    plan = make_plan(model, config.loss, precision=config.precision)
    if config.teacher_cache is not None:
        plan = dataclasses.replace(plan, teacher=open_teacher_cache(config))
    loss_terms = build_loss_terms(config.loss, plan.new_cache, config.kl_chunk_tokens)
    params = [p for p in model.saes.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    world = dist.world_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, config, world))
    dev = next(model.saes.parameters()).device
    return Trainer(config, model, plan, make_plan(model, config.loss, force_full_pass=True),
                   loss_terms, trainable, optimizer, scheduler, dev, reference, dist)  # fmt: skip


def check_in_to_orig(model: SAETransformer, config: Config) -> None:
    """`in_to_orig` hooks must run after the first SAE's output: before it (or at it) the spliced
    run equals the clean one, and the term would be 0 at every step."""
    term = config.loss.in_to_orig
    if term is None:
        return
    from e2e_sae.splice import filter_names

    field = "loss.in_to_orig.hook_positions"
    hooks = filter_names(model.all_hook_names, term.hook_positions, field)
    outputs = [model.sites[p].output_hook for p in model.sae_positions]
    order = list(model.hook_shapes([*outputs, *hooks]))  # in the order the forward pass runs
    first = min(outputs, key=order.index)
    early = [h for h in hooks if order.index(h) <= order.index(first)]
    if early:
        raise UserError(f"{field}: '{early[0]}' is not after the first SAE ('{first}'), where the "
                        "spliced run equals the clean run (the term would be 0)")  # fmt: skip


@contextmanager
def data_errors(field: str) -> Iterator[None]:
    """Prefix data loading errors with the config section (train_data / eval_data) they are in."""
    try:
        yield
    except UserError as err:
        if str(err).startswith(field):
            raise
        raise type(err)(f"{field}: {err}") from None


def check_vocab(model: SAETransformer, tokens: Tensor, field: str) -> None:
    """Token ids and window length must fit the model (a wrong tokenizer or n_ctx otherwise
    fails deep inside the forward pass)."""
    if tokens.shape[-1] > model.lm.n_ctx:
        raise UserError(f"{field}.n_ctx: {tokens.shape[-1]} is longer than the model's context "
                        f"n_ctx={model.lm.n_ctx}")  # fmt: skip
    low, top = int(tokens.min()), int(tokens.max())
    if low < 0:
        raise UserError(f"{field}: token id {low} is negative (token ids are 0 .. d_vocab - 1)")
    if top >= model.lm.d_vocab:
        raise UserError(
            f"{field}: token id {top} >= the model's d_vocab {model.lm.d_vocab} "
            "(tokenizer_name does not match the model)"
        )


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
    checkpoint. Under torchrun every rank calls this; see `e2e_sae.distributed`. Nothing is
    written before the inputs are checked. The run directory is locked while the run lasts."""
    d, device = init_distributed(device or config.device)
    t = setup(config, device=device, reference=reference, dist=d)
    locks: list[RunLock] = []
    try:
        return _train(t, d, run_dir, resume, progress, on_eval, locks)
    finally:
        for lock in locks:
            lock.release()


def _train(
    t: Trainer,
    d: Dist,
    run_dir: Path | None,
    resume: str | Path | None,
    progress: bool,
    on_eval: Callable[[EvalResult], Any] | None,
    locks: list[RunLock],
) -> Path:
    config = t.config
    state = TrainState()
    found: Resume | None = None
    if resume is not None:
        found = find_resume(resume, config, d)
        run_dir = found.run_dir
        if found.lock is not None:
            locks.append(found.lock)
        if found.point is not None:
            restore_point(t, found.point, state, d)
    with data_errors("train_data"):
        batches = t.batches(config.train_data, config.seed, start=state.batches, shard=True)
        first = next(batches)
    check_vocab(t.model, first, "train_data")
    t.check_eval_data()
    batches = _prepend(first, batches)
    n_ctx = first.shape[1]
    if found is None:
        made = on_main(lambda: create_locked_run_dir(config, run_dir), d)
        if made is not None:
            run_dir = made[0]
            locks.append(made[1])
    run_dir = prepare_run_dir(config, run_dir, found, d)
    log = RunLogger(run_dir, config, enabled=d.is_main)
    bs, n_steps = t.global_batch, n_grad_steps(config, d.world_size)
    save_every, eval_every = config.save_every_n_samples, config.eval_every_n_samples
    bar = tqdm(total=n_steps, initial=state.step, desc="train", unit="step",
               disable=not progress or not d.is_main)  # fmt: skip
    t0, n0 = time.perf_counter(), state.n_samples
    rate = TokenRate(now=t0)
    stop = StopOnSignal().install()
    try:
        while state.step < n_steps:
            t.model.train()
            for pos in set(t.model.sae_positions) - set(t.trainable):
                t.model.sae(pos).eval()  # frozen SAEs behave as at inference (BatchTopK threshold)
            try:
                values = t.train_step(batches, state)
                terms = [term.name for term in t.loss_terms]  # + the architectures' aux losses:
                terms += [k for k in values if "/" in k and not k.startswith("resampled/")]
                check_divergence(values, state, config.divergence_factor, terms)
            except NumericalError as err:
                raise set_aside_bad_point(err, run_dir, bs, d) from None
            speed = format_rate(rate.update(bs * n_ctx))
            bar.set_postfix_str(f"loss={values['loss']:.4g}, {speed}", refresh=False)
            bar.update(1)
            if state.step % config.log_every_n_grad_steps == 0 or state.step == 1:
                rec = {"samples": state.n_samples, "step": state.step,
                       "lr": t.scheduler.get_last_lr()[0], **values,
                       "tokens_per_s": (state.n_samples - n0) * n_ctx / (time.perf_counter() - t0),
                       }  # fmt: skip
                rec.update(dead_counts(t.model, config.act_frequency_n_tokens))
                log.log(rec, step=state.n_samples)
            if eval_every and _crossed(state.n_samples, bs, eval_every):
                log_eval(t, log, state, on_eval, progress=progress)
            signum = stop.requested(d)  # SIGINT / SIGTERM: save, then stop
            due = save_every and _crossed(state.n_samples, bs, save_every) and state.step < n_steps
            if due or signum:  # (the last step is saved below, as the final checkpoint)
                log.save_file(save_point(run_dir, t, state, d))
            if signum:
                raise stop.interrupted(run_dir, state.step, signum)
    finally:
        bar.close()
        stop.restore()
    log.save_file(save_point(run_dir, t, state, d, final=True))
    if not (eval_every and state.n_samples % eval_every == 0):
        log_eval(t, log, state, on_eval, progress=progress, desc="final eval")
    log.finish()
    if d.is_main:
        write_curves(run_dir)
    shutdown(d)
    return run_dir


def set_aside_bad_point(err: NumericalError, run_dir: Path, bs: int, d: Dist) -> NumericalError:
    """Rename the checkpoint holding the weights that caused `err` to `*.diverged` (so that
    evaluation, export and `--resume` use the one before) and say which one is kept."""
    if not d.is_main or err.weights_step is None:
        return err
    points = resume_points(run_dir)
    bad = [p for p in points if p.n_samples >= err.weights_step * bs and p.n_samples > 0]
    if not bad:
        return err
    for p in bad:
        for path in (p.samples_path, p.resume_path):
            path.replace(path.with_name(path.name + ".diverged"))
    kept = [p for p in points if p not in bad]
    names = ", ".join(p.samples_path.name for p in bad)
    last = kept[-1].samples_path.name if kept else "none"
    return NumericalError(f"{err}; last checkpoint before it: {last} ({names} renamed "
                          "*.diverged)", err.weights_step)  # fmt: skip


class TokenRate:
    """Tokens per second over the last `window_s` seconds (the progress bar's current speed; the
    cumulative rate would hide a slowdown and include start-up)."""

    def __init__(self, window_s: float = 20.0, now: float | None = None) -> None:
        self.window_s = window_s
        self.marks: deque[tuple[float, int]] = deque(
            [(time.perf_counter() if now is None else now, 0)]
        )

    def update(self, n_tokens: int, now: float | None = None) -> float:
        """Add `n_tokens` just processed; returns the current rate (tokens/s)."""
        now = time.perf_counter() if now is None else now
        self.marks.append((now, self.marks[-1][1] + n_tokens))
        while len(self.marks) > 2 and now - self.marks[1][0] >= self.window_s:
            self.marks.popleft()  # keep one mark at or before the window's start
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def format_rate(tokens_per_s: float) -> str:
    """'12.3k tok/s' style."""
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if tokens_per_s >= div:
            return f"{tokens_per_s / div:.3g}{unit} tok/s"
    return f"{tokens_per_s:.3g} tok/s"


def write_curves(run_dir: Path) -> Path | None:
    """training_curves.png of a finished run (a plotting failure never fails the run)."""
    from e2e_sae.analysis.curves import plot_training_curves

    try:
        return plot_training_curves(run_dir)
    except Exception as err:  # noqa: BLE001
        logger.warning("could not write the training curves of %s: %s", run_dir, err)
        return None


def _counted(batches: Iterator[Tensor], bar: Any) -> Iterator[Tensor]:
    for b in batches:
        yield b
        bar.update(1)


def _prepend(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest


def _crossed(n_samples: int, bs: int, every: int) -> bool:
    """True when the last step crossed a multiple of `every` samples."""
    return (n_samples // every) > ((n_samples - bs) // every)


def dead_counts(model: SAETransformer, window: int) -> dict[str, float]:
    """Training's dead latents: those that fired on none of the last `window` training tokens
    (`act_frequency_n_tokens`); the window is logged with them as `dead_window_tokens`."""
    counts = {f"dead_dict_elements/{p}": model.sae(p).n_dead(window) for p in model.sae_positions}
    return {**counts, "dead_window_tokens": window}


def log_eval(
    t: Trainer,
    log: RunLogger,
    state: TrainState,
    on_eval: Callable[[EvalResult], Any] | None,
    progress: bool = False,
    desc: str = "eval",
) -> None:
    if not t.dist.is_main:  # evaluation runs on rank 0 only; the others wait at the next step
        return
    result = t.run_eval(progress=progress, desc=desc)
    if result is None:
        return
    log.log({"samples": state.n_samples, "step": state.step, **result.flat()}, step=state.n_samples)
    freqs = {p: result.feature_frequency(p) for p in result.feature_counts}
    log.log_feature_frequencies(freqs, step=state.n_samples)
    if on_eval is not None:
        on_eval(result)
