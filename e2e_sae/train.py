"""The training loop: batch -> forward -> losses -> backward -> step; log / eval / save triggers."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.checkpoint import build_model, load_pretrained_saes, save_checkpoint, write_config
from e2e_sae.config import Config, DatasetConfig
from e2e_sae.data import create_data_loader
from e2e_sae.errors import UserError
from e2e_sae.evaluate import EvalResult, evaluate
from e2e_sae.forward import StepPlan, make_plan, run_forward
from e2e_sae.losses import LossTerm, build_loss_terms, compute_losses
from e2e_sae.runlog import RunLogger
from e2e_sae.splice import SAETransformer

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(step: int, config: Config) -> float:
    """Linear warmup over `warmup_samples`, then linear/cosine decay to `min_lr_factor`."""
    bs = config.effective_batch_size or config.batch_size
    warmup = config.warmup_samples // bs
    total = config.n_grad_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    lo = config.min_lr_factor
    if config.lr_schedule == "linear":
        return 1 - (1 - lo) * progress
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))


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


@dataclass
class TrainState:
    """Counters that define where a run is (also what a resume restores)."""

    step: int = 0  # optimizer steps taken
    n_samples: int = 0  # training samples consumed
    batches: int = 0  # micro-batches drawn from the loader


def make_run_dir(config: Config, run_dir: Path | None) -> Path:
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        assert config.save_dir is not None
        run_dir = Path(config.save_dir) / f"{get_run_name(config)}_{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


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

    def batches(self, data: DatasetConfig, seed: int, start: int = 0) -> Iterator[Tensor]:
        return create_data_loader(data, self.config.batch_size, seed, start_batch=start)

    def train_step(self, batches: Iterator[Tensor], state: TrainState) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns logged values."""
        accum = self.config.grad_accum_steps
        logged: dict[str, float] = {}
        for _ in range(accum):
            tokens = next(batches).to(self.device)
            state.batches += 1
            inputs = run_forward(self.model, tokens, self.plan, reference=self.reference)
            aux = {
                f"{name}/{pos}": v
                for pos, acts in inputs.sae_acts.items()
                if pos in self.trainable
                for name, v in self.model.sae(pos).aux_losses(acts, inputs.target(pos)).items()
            }
            loss, values = compute_losses(self.loss_terms, inputs, aux)
            check_finite(loss, values, state.step)
            (loss / accum).backward()
            for pos, acts in inputs.sae_acts.items():
                self.model.sae(pos).update_firing_stats(acts.c)
            values["loss"] = loss
            for k, v in values.items():
                logged[k] = logged.get(k, 0.0) + float(v.detach()) / accum
        params = [p for p in self.model.saes.parameters() if p.requires_grad]
        if self.config.max_grad_norm is not None:
            gn = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            logged["grad_norm"] = float(gn)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        state.step += 1
        state.n_samples += self.config.effective_batch_size or self.config.batch_size
        return logged

    def run_eval(self, progress: bool = False) -> EvalResult | None:
        cfg = self.config
        if cfg.eval_data is None or not cfg.eval_n_samples:
            return None
        n_batches = max(1, cfg.eval_n_samples // cfg.batch_size)
        seed = cfg.seed + 42  # a different order from training, as in the original
        batches = self.batches(cfg.eval_data, seed)
        self.model.eval()
        return evaluate(self.model, batches, n_batches, self.eval_plan, self.loss_terms, progress)


def check_finite(loss: Tensor, values: dict[str, Tensor], step: int) -> None:
    if torch.isfinite(loss):
        return
    bad = next((k for k, v in values.items() if not torch.isfinite(v)), "loss")
    raise NumericalError(
        f"non-finite loss at step {step}: term '{bad}' is {float(values.get(bad, loss))}"
    )


class NumericalError(UserError):
    """NaN / inf in a loss, gradient or weight."""


def setup(config: Config, device: str | None = None, reference: bool = False) -> Trainer:
    """Load the LM, build the SAEs, and prepare optimizer and schedule (no files written)."""
    set_seed(config.seed)
    model = build_model(config, device=device)
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
    plan = make_plan(model, config.loss)
    loss_terms = build_loss_terms(config.loss, plan.new_cache)
    params = [p for p in model.saes.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, config))
    dev = next(model.saes.parameters()).device
    return Trainer(config, model, plan, make_plan(model, config.loss, force_full_pass=True),
                   loss_terms, trainable, optimizer, scheduler, dev, reference)  # fmt: skip


def check_vocab(model: SAETransformer, tokens: Tensor, field: str) -> None:
    top = int(tokens.max())
    if top >= model.tlens_model.cfg.d_vocab:
        raise UserError(
            f"{field}: token id {top} >= the model's d_vocab {model.tlens_model.cfg.d_vocab} "
            "(tokenizer_name does not match the model)"
        )


def train(
    config: Config,
    run_dir: Path | None = None,
    device: str | None = None,
    progress: bool = True,
    reference: bool = False,
    on_eval: Callable[[EvalResult], Any] | None = None,
) -> Path:
    """Train the SAEs of `config`; returns the run directory."""
    t = setup(config, device=device, reference=reference)
    state = TrainState()
    batches = t.batches(config.train_data, config.seed)
    first = next(batches)
    check_vocab(t.model, first, "train_data")
    batches = _prepend(first, batches)
    n_ctx = first.shape[1]
    run_dir = make_run_dir(config, run_dir)
    write_config(run_dir, config)
    log = RunLogger(run_dir, config)
    bs = config.effective_batch_size or config.batch_size
    save_every, eval_every = config.save_every_n_samples, config.eval_every_n_samples
    bar = tqdm(total=config.n_grad_steps, desc="train", unit="step", disable=not progress)
    t0 = time.perf_counter()
    try:
        while state.step < config.n_grad_steps:
            t.model.train()
            for pos in set(t.model.sae_positions) - set(t.trainable):
                t.model.sae(pos).eval()  # frozen SAEs behave as at inference (BatchTopK threshold)
            values = t.train_step(batches, state)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4g}")
            if state.step % config.log_every_n_grad_steps == 0 or state.step == 1:
                rec = {"samples": state.n_samples, "step": state.step,
                       "lr": t.scheduler.get_last_lr()[0], **values,
                       "tokens_per_s": state.n_samples * n_ctx / (time.perf_counter() - t0),
                       }  # fmt: skip
                rec.update(_dead_counts(t.model, config.act_frequency_n_tokens))
                log.log(rec, step=state.n_samples)
            if eval_every and _crossed(state.n_samples, bs, eval_every):
                _log_eval(t, log, state, on_eval)
            if save_every and _crossed(state.n_samples, bs, save_every):
                save_checkpoint(run_dir, t.model, state.n_samples)
    finally:
        bar.close()
    save_checkpoint(run_dir, t.model, state.n_samples)
    if not (eval_every and state.n_samples % eval_every == 0):
        _log_eval(t, log, state, on_eval)
    log.finish()
    return run_dir


def _prepend(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest


def _crossed(n_samples: int, bs: int, every: int) -> bool:
    """True when the last step crossed a multiple of `every` samples."""
    return (n_samples // every) > ((n_samples - bs) // every)


def _dead_counts(model: SAETransformer, window: int) -> dict[str, float]:
    return {f"dead_dict_elements/{p}": model.sae(p).n_dead(window) for p in model.sae_positions}


def _log_eval(
    t: Trainer, log: RunLogger, state: TrainState, on_eval: Callable[[EvalResult], Any] | None
) -> None:
    result = t.run_eval()
    if result is None:
        return
    log.log({"samples": state.n_samples, "step": state.step, **result.flat()}, step=state.n_samples)
    if on_eval is not None:
        on_eval(result)
