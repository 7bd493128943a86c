"""Local SAE training without re-running the LM: activations cached on disk, and sweeps.

A local (MSE) SAE only needs the clean activations at the hooks it reads, so they can be computed
once and reused: `ActivationCache.build` runs the LM once over some token windows and stores the
activations at the given hooks on disk; `CachedTrainer`s then train SAEs from them, without the LM
(a sparsity sweep, a second epoch, another dictionary size). `lm_activation_batches` is the
no-disk variant: one LM pass per batch feeding several `CachedTrainer`s (all trained on the same
batches). One `CachedTrainer.step` does what `Trainer.train_step` does for a local run, on the
given activations instead of running the LM.

Layout of a cache folder (written to `<name>.tmp` and renamed when complete):
  meta.json       hooks, shapes, dtype, the LM's hook names, where the tokens came from
  tokens.npy      int32 [n_windows, n_ctx]: the token windows
  <hook>.npy      float32 or float16 [n_windows, n_ctx, d]: activations at `hook`
`.npy` files are raw little-endian arrays behind a short text header, memory-mapped on read
(`np.load(mmap_mode="r", allow_pickle=False)`): no pickle, and only the rows a batch needs are read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from e2e_sae.config import Config
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.forward import StepPlan, run_forward
from e2e_sae.losses import LossInputs, LossTerm, build_loss_terms, compute_losses
from e2e_sae.saes import SAEActs, SAEBase, build_sae
from e2e_sae.splice import SAETransformer, SpliceSite, filter_names, sae_key

META = "meta.json"
TOKENS = "tokens.npy"
FORMAT_VERSION = 1
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def _file_name(hook: str) -> str:
    return f"{hook}.npy"


class ActivationCache:
    """A cache folder opened read-only; arrays are memory-mapped, batches come as torch tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / META
        if not meta_file.is_file():
            raise UserError(f"activation cache {self.path}: no {META} (not a finished cache)")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"activation cache {self.path}: unsupported format version")
        self.hooks: list[str] = list(self.meta["hooks"])
        self.arrays = {
            h: np.load(self.path / _file_name(h), mmap_mode="r", allow_pickle=False)
            for h in self.hooks
        }
        self.token_array = np.load(self.path / TOKENS, mmap_mode="r", allow_pickle=False)

    # --- building ---------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: SAETransformer,
        batches: Iterable[Tensor],
        n_batches: int,
        path: str | Path,
        hooks: Sequence[str] | None = None,
        dtype: str = "float32",
        progress: bool = True,
        source: str = "",
    ) -> ActivationCache:
        """Run the clean LM over `n_batches` token batches [batch, n_ctx] and store the activations
        at `hooks` (default: what the model's SAEs read, and for transcoders also their targets).

        Uses the fast local path (`run_forward`): the LM stops after the last hook.
        """
        if dtype not in _NP_DTYPES:
            raise ConfigError(f"activation cache dtype: expected one of {list(_NP_DTYPES)}")
        path = Path(path)
        if path.exists():
            raise UserError(f"activation cache {path}: already exists")
        if hooks is None:
            hooks = list(dict.fromkeys(
                h for s in model.sites.values() for h in (s.input_hook, s.output_hook)
            ))  # fmt: skip
        hooks = filter_names(model.all_hook_names, list(hooks), "activation cache hooks")
        plan = StepPlan(sae_positions=[], orig_cache=list(hooks))  # clean run only, stops early
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        arrays: dict[str, np.memmap] = {}
        tokens_out: np.memmap | None = None
        row = 0
        it = iter(batches)
        device = next(model.saes.parameters()).device
        with torch.no_grad():
            for i in tqdm(range(n_batches), desc="cache", unit="batch", disable=not progress):
                tokens = next(it).to(device)
                acts = run_forward(model, tokens, plan).orig_acts
                b, n_ctx = tokens.shape
                if tokens_out is None:
                    n_rows = n_batches * b
                    tokens_out = np.lib.format.open_memmap(
                        tmp / TOKENS, mode="w+", dtype=np.int32, shape=(n_rows, n_ctx)
                    )
                    for h in hooks:
                        shape = (n_rows, *acts[h].shape[1:])
                        arrays[h] = np.lib.format.open_memmap(
                            tmp / _file_name(h), mode="w+", dtype=_NP_DTYPES[dtype], shape=shape
                        )
                if tokens.shape[0] * (i + 1) > tokens_out.shape[0]:
                    raise UserError("activation cache: batches must all have the same size")
                tokens_out[row : row + b] = tokens.cpu().numpy()
                for h in hooks:
                    arrays[h][row : row + b] = acts[h].float().cpu().numpy()
                row += b
        if tokens_out is None:
            raise UserError("activation cache: got no batches")
        for a in [tokens_out, *arrays.values()]:
            a.flush()
        meta = {
            "format_version": FORMAT_VERSION,
            "hooks": list(hooks),
            "shapes": {h: list(a.shape) for h, a in arrays.items()},
            "dtype": dtype,
            "n_windows": int(tokens_out.shape[0]),
            "n_ctx": int(tokens_out.shape[1]),
            "all_hook_names": model.all_hook_names,
            "model": _model_name(model),
            "source": source,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        del arrays, tokens_out
        os.replace(tmp, path)
        return cls(path)

    # --- reading ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.meta["n_windows"])

    def d(self, hook: str) -> int:
        return int(self.meta["shapes"][hook][-1])

    def tokens(self) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.token_array))

    def rows(self, index: Tensor | np.ndarray | slice) -> dict[str, Tensor]:
        """Activations of the given windows, {hook: fp32 tensor [rows, n_ctx, d]}."""
        idx = index.numpy() if isinstance(index, Tensor) else index
        if isinstance(idx, np.ndarray):
            # Sorted reads touch the memory map in file order; then restore the batch order.
            order = np.argsort(idx, kind="stable")
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            return {
                h: torch.from_numpy(np.asarray(a[idx[order]], dtype=np.float32)[inverse])
                for h, a in self.arrays.items()
            }
        return {
            h: torch.from_numpy(np.asarray(a[idx], dtype=np.float32))
            for h, a in self.arrays.items()
        }

    def batches(
        self, batch_size: int, seed: int | None = 0, start_batch: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        """Endless batches of windows; each epoch is a seeded permutation (`seed=None`: in order).
        Batch i of an epoch holds windows perm[i*B:(i+1)*B] (a partial last batch is dropped)."""
        n = len(self)
        per_epoch = n // batch_size
        if per_epoch == 0:
            raise UserError(f"activation cache {self.path}: {n} windows < batch_size {batch_size}")
        i = start_batch
        while True:
            epoch, j = divmod(i, per_epoch)
            if seed is None:
                perm = torch.arange(n)
            else:
                perm = torch.randperm(
                    n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
                )
            yield self.rows(perm[j * batch_size : (j + 1) * batch_size])
            i += 1


def _model_name(model: SAETransformer) -> str:
    cfg = model.tlens_model.cfg
    return str(getattr(cfg, "model_name", "") or f"{cfg.n_layers}L-{cfg.d_model}d")


def lm_activation_batches(
    model: SAETransformer, token_batches: Iterable[Tensor], hooks: Sequence[str]
) -> Iterator[dict[str, Tensor]]:
    """One clean LM pass per token batch (fast local path), yielding {hook: activation}: feed it
    to several `CachedTrainer`s to train them all on the same batches without a disk cache."""
    plan = StepPlan(sae_positions=[], orig_cache=list(hooks))
    device = next(model.saes.parameters()).device
    for tokens in token_batches:
        with torch.no_grad():  # left before the yield: grad mode is thread state, not ours
            acts = dict(run_forward(model, tokens.to(device), plan).orig_acts)
        yield acts


# --- training from activations --------------------------------------------------------------------
def resolve_sites(config: Config, all_hook_names: Sequence[str]) -> dict[str, SpliceSite]:
    """The SAE sites of `config` (as `SAETransformer` resolves them), from the LM's hook names."""
    s = config.saes
    sites: dict[str, SpliceSite] = {}
    if s.sae_positions:
        for name in filter_names(list(all_hook_names), s.sae_positions, "saes.sae_positions"):
            sites[name] = SpliceSite(name, name)
    for t in s.transcoders:
        (i,) = filter_names(list(all_hook_names), [t.input], "saes.transcoders.input")[:1]
        (o,) = filter_names(list(all_hook_names), [t.output], "saes.transcoders.output")[:1]
        sites[o] = SpliceSite(i, o)
    order = {n: k for k, n in enumerate(all_hook_names)}
    return {p: sites[p] for p in sorted(sites, key=order.__getitem__)}


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
        from e2e_sae.train import lr_lambda

        if config.loss.needs_clean_run_past_saes:
            raise ConfigError(
                "loss: logits_kl / in_to_orig need the LM past the SAEs; cached activations only "
                "serve local runs"
            )
        sites = resolve_sites(config, all_hook_names)
        s = config.saes
        kwargs: dict[str, Any] = dict(s.architecture_kwargs)
        if s.k is not None:
            kwargs["k"] = s.k
        saes = nn.ModuleDict()
        for pos, site in sites.items():
            for h in (site.input_hook, site.output_hook):
                if h not in dims:
                    raise UserError(f"saes: no cached activations at '{h}'")
            d_in = dims[site.input_hook]
            saes[sae_key(pos)] = build_sae(
                s.architecture,
                d_in,
                int(d_in * s.dict_size_to_input_ratio),
                init_decoder_orthogonal=s.init_decoder_orthogonal,
                output_size=dims[site.output_hook],
                **kwargs,
            )
        terms = build_loss_terms(config.loss)
        optimizer = torch.optim.Adam(saes.parameters(), lr=config.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_lambda(i, config))
        return cls(config, sites, saes, terms, optimizer, scheduler)

    @classmethod
    def from_model(cls, config: Config, model: SAETransformer) -> CachedTrainer:
        """Like `from_config`, starting from (a copy of) the SAE weights in `model`."""
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
        from e2e_sae.train import check_finite, check_tensors_finite

        accum = self.config.grad_accum_steps
        logged: dict[str, float] = {}
        device = next(self.saes.parameters()).device
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
        self.step_count += 1
        self.history.append(logged)
        return logged


def train_together(
    trainers: Sequence[CachedTrainer],
    act_batches: Iterator[Mapping[str, Tensor]],
    n_steps: int | None = None,
    progress: bool = True,
) -> list[list[dict[str, float]]]:
    """Train several configs' SAEs (e.g. a sparsity sweep) on the same activation batches: each
    micro-batch is read (or computed by the LM) once and used by every trainer.

    The configs must share `batch_size` and `grad_accum_steps`; `n_steps` defaults to the first
    config's number of optimizer steps. Returns each trainer's logged values per step.
    """
    if not trainers:
        return []
    accum = trainers[0].config.grad_accum_steps
    if any(t.config.grad_accum_steps != accum for t in trainers):
        raise ConfigError("effective_batch_size: every config in a sweep needs the same value")
    steps = n_steps if n_steps is not None else trainers[0].config.n_grad_steps
    for _ in tqdm(range(steps), desc="train", unit="step", disable=not progress):
        micro = [next(act_batches) for _ in range(accum)]
        for t in trainers:
            t.step(iter(micro))
    return [t.history for t in trainers]


def n_cache_batches(config: Config) -> int:
    """Micro-batches one epoch of `config`'s training needs (what a cache should hold)."""
    assert config.n_samples is not None
    return math.ceil(config.n_samples / config.batch_size)
