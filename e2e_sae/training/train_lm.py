"""Train a HookedTransformer language model from scratch (`e2e-sae train-lm CONFIG.yaml`).

On TransformerLens 4.x the same model (same init for a seed) is a TransformerBridge over TL's
native model (`e2e_sae.lm.native`), trained with the same optimizer groups and saved in the same
HookedTransformer format, so either version loads what either wrote.

AdamW, linear warmup then cosine (or linear / constant) decay, gradient accumulation and clipping.
After every epoch the mean next-token CE on the eval split is measured (and logged next to a
unigram baseline fitted on the training tokens). The result is written with `save_tlens_model`
(model.safetensors + tlens_config.json incl. `tokenizer_name`), so `tlens_model_path` loads it.

Output folder `save_dir/name/`:
  model.safetensors, tlens_config.json   the final model
  epoch_<k>/                             the model after epoch k (`save_every_n_epochs`)
  train_lm_config.yaml                   the resolved config
  metrics.jsonl                          training loss / lr every few steps, eval CE per epoch
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from pydantic import (
    NonNegativeFloat,
    PositiveFloat,
    model_validator,
)
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.config import (
    Count,
    DatasetConfig,
    OptimizerConfig,
    PathComponent,
    Seed,
    _Frozen,
    config_to_yaml_dict,
    load_config,
)
from e2e_sae.data import TokenWindows, create_data_loader, load_windows
from e2e_sae.data.corpora import get_builtin_corpus
from e2e_sae.data.tokenizer import load_tokenizer
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.load import build_random_model, default_device, save_tlens_model
from e2e_sae.lm.tl import HookedTransformer
from e2e_sae.training.engine import lr_schedule
from e2e_sae.training.runlog import RunLogger, init_wandb

logger = logging.getLogger(__name__)

CONFIG_FILE = "train_lm_config.yaml"


class LMTrainSettings(OptimizerConfig):
    """Optimisation settings (the `train:` block): the optimizer settings every trainer here has
    (`OptimizerConfig`; AdamW here, clipping at 1.0 by default), plus epochs, weight decay,
    betas, saving and logging."""

    n_epochs: Count
    weight_decay: NonNegativeFloat = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: PositiveFloat | None = 1.0
    save_every_n_epochs: Count | None = None
    samples_per_epoch: Count | None = None
    """Windows per epoch (default: all windows of train_data; required for streaming hub data)."""
    eval_n_samples: Count | None = None
    """Eval windows per epoch (default: all windows of eval_data; required for streaming data)."""
    log_every_n_grad_steps: Count = 20


class TrainLMConfig(_Frozen):
    """A language model trained from scratch; the original library's `tiny_gpt2_lm.yaml` schema
    plus `train_data` / `eval_data` / `save_dir` / `device`."""

    seed: Seed = 0
    name: PathComponent
    """The model's folder under save_dir: one folder name."""
    tlens_config: dict[str, Any]
    """HookedTransformerConfig fields + `tokenizer_name`; `d_vocab` defaults to the tokenizer's."""
    train: LMTrainSettings
    train_data: DatasetConfig
    eval_data: DatasetConfig | None = None
    save_dir: Path = Path("models")
    wandb_project: str | None = None
    device: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainLMConfig:
        if "n_ctx" not in self.tlens_config:
            raise ValueError("tlens_config.n_ctx is required")
        for key, data in (("train_data", self.train_data), ("eval_data", self.eval_data)):
            if data is not None and data.n_ctx > int(self.tlens_config["n_ctx"]):
                raise ValueError(
                    f"{key}.n_ctx ({data.n_ctx}) exceeds tlens_config.n_ctx "
                    f"({self.tlens_config['n_ctx']})"
                )
        model_tok = self.tlens_config.get("tokenizer_name")
        data_tok = self.train_data.tokenizer_name
        if model_tok and data_tok and model_tok != data_tok:
            raise ValueError(
                f"tlens_config.tokenizer_name ({model_tok}) differs from "
                f"train_data.tokenizer_name ({data_tok})"
            )
        return self

    @property
    def tokenizer_name(self) -> str | None:
        return self.tlens_config.get("tokenizer_name") or self.train_data.tokenizer_name

    @property
    def out_dir(self) -> Path:
        return Path(self.save_dir) / self.name


@dataclass
class TrainLMResult:
    """Where the model went and how it did (CE in nats per predicted token)."""

    model_dir: Path
    eval_ce: list[float] = field(default_factory=list)
    """Mean eval CE after each epoch (empty without eval_data)."""
    unigram_ce: float | None = None
    """CE of the add-one unigram model of the training tokens on the same eval positions."""
    n_params: int = 0
    n_train_tokens: int = 0
    model: HookedTransformer | None = None
    """The trained model (in memory, eval mode)."""


# ----------------------------------------------------------------------------- metrics


def next_token_ce(logits: Tensor, tokens: Tensor, reduction: str = "mean") -> Tensor:
    """CE (nats) of predicting tokens[:, 1:] from logits[:, :-1]; `sum` or `mean` over positions."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return nll.sum() if reduction == "sum" else nll.mean()


@torch.no_grad()
def eval_ce(model: HookedTransformer, windows: Tensor, batch_size: int) -> float:
    """Mean next-token CE over all windows [n, n_ctx] (each predicted position weighs the same)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for lo in range(0, windows.shape[0], batch_size):
        tokens = windows[lo : lo + batch_size].to(device)
        total += float(next_token_ce(model(tokens), tokens, reduction="sum"))
        count += tokens[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def unigram_log_probs(train_tokens: Tensor, d_vocab: int) -> Tensor:
    """log p(token) from training counts with add-one smoothing, [d_vocab]."""
    counts = torch.bincount(train_tokens.reshape(-1), minlength=d_vocab)[:d_vocab].double() + 1
    return (counts / counts.sum()).log()


def unigram_ce(log_probs: Tensor, windows: Tensor) -> float:
    """CE of a unigram model on the positions next_token_ce scores (tokens[:, 1:])."""
    return float(-log_probs[windows[:, 1:].reshape(-1)].mean())


# ----------------------------------------------------------------------------- setup


def _is_streamed(data: DatasetConfig) -> bool:
    """A streaming hub dataset (read once, in order) rather than materialised windows."""

    local = Path(data.dataset_name).expanduser().exists()
    return data.streaming and not local and get_builtin_corpus(data.dataset_name) is None


def _model_fields(config: TrainLMConfig) -> dict[str, Any]:
    fields = dict(config.tlens_config)
    fields.setdefault("seed", config.seed)
    if config.tokenizer_name:
        fields["tokenizer_name"] = config.tokenizer_name
    if isinstance(fields.get("dtype"), str):  # YAML can only say "float32"
        dtype = getattr(torch, fields["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"tlens_config.dtype: unknown torch dtype '{fields['dtype']}'")
        fields["dtype"] = dtype
    if "d_vocab" not in fields:
        if not config.tokenizer_name:
            raise ConfigError("tlens_config.d_vocab: required when no tokenizer_name is given")

        fields["d_vocab"] = len(load_tokenizer(config.tokenizer_name))
    return fields


def _check_vocab(tokens: Tensor, d_vocab: int, key: str) -> None:
    top = int(tokens.max())
    if top >= d_vocab:
        raise UserError(
            f"{key}: token id {top} >= tlens_config.d_vocab {d_vocab} "
            "(the tokenizer does not match the model)"
        )


def _eval_windows(config: TrainLMConfig, d_vocab: int) -> Tensor | None:
    data, n = config.eval_data, config.train.eval_n_samples
    if data is None:
        return None
    if _is_streamed(data):
        if n is None:
            raise ConfigError(
                "train.eval_n_samples: required when eval_data is a streaming dataset"
            )
        loader = create_data_loader(data, config.train.batch_size, config.seed + 1)
        rows: list[Tensor] = []
        for batch in loader:
            rows.append(batch)
            if sum(r.shape[0] for r in rows) >= n:
                break
        windows = torch.cat(rows)[:n]
    else:
        windows = load_windows(data).tokens
        windows = windows[:n] if n is not None else windows
    _check_vocab(windows, d_vocab, "eval_data")
    return windows


# ----------------------------------------------------------------------------- training


def train_lm(
    config: TrainLMConfig, device: str | None = None, progress: bool = True
) -> TrainLMResult:
    """Train the model of `config` and save it under `save_dir/name`; returns the result."""
    torch.manual_seed(config.seed)
    s = config.train
    device = device or config.device or default_device()
    fields = _model_fields(config)
    model = build_random_model(fields, device=device)
    d_vocab = model.cfg.d_vocab

    # Read (and check) all data before anything is written, so a bad config leaves no folder.
    train_windows: TokenWindows | None = None
    if _is_streamed(config.train_data):
        if s.samples_per_epoch is None:
            raise ConfigError(
                "train.samples_per_epoch: required when train_data is a streaming dataset"
            )
        samples_per_epoch = s.samples_per_epoch
    else:
        train_windows = load_windows(config.train_data)
        _check_vocab(train_windows.tokens, d_vocab, "train_data")
        samples_per_epoch = min(s.samples_per_epoch or len(train_windows), len(train_windows))
    eval_windows = _eval_windows(config, d_vocab)
    steps_per_epoch = samples_per_epoch // s.samples_per_step
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.effective_batch_size: one step needs {s.samples_per_step} windows but an epoch "
            f"has {samples_per_epoch}"
        )
    total_steps = steps_per_epoch * s.n_epochs
    uni_ce = None
    if eval_windows is not None and train_windows is not None:
        uni_ce = unigram_ce(unigram_log_probs(train_windows.tokens, d_vocab), eval_windows)

    decay = [p for n, p in model.named_parameters() if _decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not _decays(n, p)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": s.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=s.lr,
        betas=s.adam_betas,
    )
    scheduler = lr_schedule(optimizer, s, total_steps)

    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(config_to_yaml_dict(config), sort_keys=False))
    log = RunLogger(out, None)
    if config.wandb_project:
        log.wandb_run = init_wandb(config, out)

    batches: Iterator[Tensor]
    if train_windows is not None:
        batches = train_windows.batches(s.batch_size, config.seed)
    else:
        batches = create_data_loader(config.train_data, s.batch_size, config.seed)
    result = TrainLMResult(
        out, unigram_ce=uni_ce, n_params=sum(p.numel() for p in model.parameters())
    )
    bar = tqdm(total=total_steps, desc=f"train-lm {config.name}", unit="step", disable=not progress)
    step = 0
    try:
        for epoch in range(1, s.n_epochs + 1):
            model.train()
            for _ in range(steps_per_epoch):
                loss = _train_step(model, batches, s.grad_accum_steps, device)
                if s.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                result.n_train_tokens += s.samples_per_step * config.train_data.n_ctx
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch)
                if step % s.log_every_n_grad_steps == 0 or step == 1:
                    lr = scheduler.get_last_lr()[0]
                    log.log({"step": step, "epoch": epoch, "loss": loss, "lr": lr}, step=step)
            rec: dict[str, Any] = {"step": step, "epoch": epoch}
            if eval_windows is not None:
                ce = eval_ce(model, eval_windows, s.batch_size)
                result.eval_ce.append(ce)
                rec["eval/ce_loss"] = ce
                if uni_ce is not None:
                    rec["eval/unigram_ce_loss"] = uni_ce
                bar.set_postfix(loss=f"{loss:.3f}", val_ce=f"{ce:.3f}", epoch=epoch)
            log.log(rec, step=step)
            if s.save_every_n_epochs and epoch % s.save_every_n_epochs == 0 and epoch < s.n_epochs:
                save_tlens_model(model, out / f"epoch_{epoch}")
    finally:
        bar.close()
        log.finish()
    save_tlens_model(model, out)
    result.model = model.eval()
    return result


_BRIDGE_QKV_BIAS = re.compile(r"\.attn\.[qkv]\.bias$")


def _decays(name: str, p: Tensor) -> bool:
    """Weight decay for the matrices, as on HookedTransformer: every parameter of 2 or more dims
    but the position embedding (W_pos). A HookedTransformer's per-head query / key / value biases
    are 2-D ([n_heads, d_head]), so they decay too; in a TransformerBridge they are 1-D."""
    name = name.replace("._original_component", "")
    if _BRIDGE_QKV_BIAS.search(name):
        return True
    return p.dim() >= 2 and "W_pos" not in name and not name.startswith("pos.")


def _train_step(model: HookedTransformer, batches: Iterator[Tensor], accum: int, device: str):
    """Forward/backward over `accum` micro-batches; returns the mean loss (no optimizer step)."""
    total = 0.0
    for _ in range(accum):
        try:
            tokens = next(batches).to(device)
        except StopIteration:
            raise UserError("train_data: the stream ended before the configured epochs") from None
        loss = next_token_ce(model(tokens), tokens)
        if not torch.isfinite(loss):
            raise UserError(f"train-lm: non-finite loss ({float(loss)}); lower train.lr")
        (loss / accum).backward()
        total += float(loss.detach()) / accum
    return total


def load_train_lm_config(path: str | Path) -> TrainLMConfig:
    config = load_config(path, TrainLMConfig)
    assert isinstance(config, TrainLMConfig)
    return config
