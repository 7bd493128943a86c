"""Local SAE training without re-running the LM: activations cached on disk, and sweeps.

A local (MSE) SAE only needs the clean activations at the hooks it reads, so they can be computed
once and reused: `ActivationCache.build` runs the LM once over some token windows and stores the
activations at the given hooks on disk; `CachedTrainer`s then train SAEs from them, without the LM
(a sparsity sweep, a second epoch, another dictionary size). `lm_activation_batches` is the
no-disk variant: one LM pass per batch feeding several `CachedTrainer`s (all trained on the same
batches). One `CachedTrainer.step` does what `Trainer.train_step` does for a local run, on the
given activations instead of running the LM.

From configs (what `e2e-sae cache-acts` / `train-cached` run): `build_for_config` caches the windows
a config's training reads, in its training order; `train_from_cache` trains several configs' SAEs
on the same cached batches and writes a normal run directory for each (config, metrics.jsonl,
final `samples_<N>.safetensors`, evaluation with the LM). When the cache holds a config's training
windows (built from it), the weights equal those of `e2e_sae.train.train` for that config.

Layout of a cache folder (written to `<name>.tmp` and renamed when complete):
  meta.json       hooks, shapes, dtype, the LM's hook names, where the tokens came from
  tokens.npy      int32 [n_windows, n_ctx]: the token windows
  <hook>.npy      float32 or float16 [n_windows, n_ctx, d]: activations at `hook`
`.npy` files are raw little-endian arrays behind a short text header, memory-mapped on read
(`np.load(mmap_mode="r", allow_pickle=False)`): no pickle, and only the rows a batch needs are read.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from e2e_sae.evaluate import EvalResult
    from e2e_sae.runlog import RunLogger
    from e2e_sae.train import Trainer

META = "meta.json"
TOKENS = "tokens.npy"
FORMAT_VERSION = 1
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
LOCAL_TERMS = ("sparsity", "out_to_in", "out_to_orig")
"""Loss terms that only need the clean activations at the SAE hooks (what a cache holds)."""
MODEL_KEYS = ("tlens_model_name", "tlens_model_path", "tlens_config")


def _file_name(hook: str) -> str:
    return f"{hook}.npy"


class ActivationCache:
    """A cache folder opened read-only; arrays are memory-mapped, batches come as torch tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        meta_file = self.path / META
        if not self.path.is_dir():
            raise UserError(f"activation cache {self.path}: no such folder")
        if not meta_file.is_file():
            raise UserError(f"activation cache {self.path}: no {META} (not a finished cache)")
        try:
            self.meta: dict[str, Any] = json.loads(meta_file.read_text())
            if self.meta.get("format_version") != FORMAT_VERSION:
                raise UserError(f"activation cache {self.path}: unsupported format version")
            self.hooks: list[str] = list(self.meta["hooks"])
            self.arrays = {h: _load(self.path / _file_name(h)) for h in self.hooks}
            self.token_array = _load(self.path / TOKENS)
        except (OSError, ValueError, KeyError, TypeError) as err:
            what = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"activation cache {self.path}: unreadable ({what})") from None

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
        info: Mapping[str, Any] | None = None,
    ) -> ActivationCache:
        """Run the clean LM over `n_batches` token batches [batch, n_ctx] and store the activations
        at `hooks` (default: what the model's SAEs read, and for transcoders also their targets).
        `info` is added to meta.json (e.g. which config's model and data it came from).

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
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        try:
            tokens_out, arrays = _write_arrays(
                model, batches, n_batches, tmp, hooks, dtype, progress
            )
        except BaseException:  # no half-written cache is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
            "build_seconds": time.perf_counter() - start,
            **(info or {}),
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
        return torch.from_numpy(np.array(self.token_array))  # a writable copy

    def nbytes(self) -> int:
        """Size of the cache folder's files on disk."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

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
            h: torch.from_numpy(np.array(a[idx], dtype=np.float32))  # a writable copy
            for h, a in self.arrays.items()
        }

    def batches(
        self, batch_size: int, seed: int | None = 0, start_batch: int = 0, in_order_epochs: int = 0
    ) -> Iterator[dict[str, Tensor]]:
        """Endless batches of windows; each epoch is a seeded permutation (`seed=None`: in order).
        Batch i of an epoch holds windows perm[i*B:(i+1)*B] (a partial last batch is dropped).
        The first `in_order_epochs` epochs read the windows in stored order: a cache built from a
        config's loader stores them in its training order, so epoch 0 then replays training."""
        n = len(self)
        per_epoch = n // batch_size
        if per_epoch == 0:
            raise UserError(f"activation cache {self.path}: {n} windows < batch_size {batch_size}")
        i = start_batch
        while True:
            epoch, j = divmod(i, per_epoch)
            if seed is None or epoch < in_order_epochs:
                perm = torch.arange(n)
            else:
                perm = torch.randperm(
                    n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
                )
            yield self.rows(perm[j * batch_size : (j + 1) * batch_size])
            i += 1


def _write_arrays(
    model: SAETransformer,
    batches: Iterable[Tensor],
    n_batches: int,
    folder: Path,
    hooks: Sequence[str],
    dtype: str,
    progress: bool,
) -> tuple[np.memmap, dict[str, np.memmap]]:
    """The clean LM's activations at `hooks` (and the tokens) into .npy files in `folder`."""
    plan = StepPlan(sae_positions=[], orig_cache=list(hooks))  # clean run only, stops early
    arrays: dict[str, np.memmap] = {}
    tokens_out: np.memmap | None = None
    row = 0
    it = iter(batches)
    device = next(model.saes.parameters()).device
    with torch.no_grad():
        for i in tqdm(range(n_batches), desc="cache", unit="batch", disable=not progress):
            tokens = next(it, None)
            if tokens is None:
                raise UserError(
                    f"activation cache: the data ran out after {i} of {n_batches} batches"
                )
            tokens = tokens.to(device)
            acts = run_forward(model, tokens, plan).orig_acts
            b, n_ctx = tokens.shape
            if tokens_out is None:
                n_rows = n_batches * b
                tokens_out = np.lib.format.open_memmap(
                    folder / TOKENS, mode="w+", dtype=np.int32, shape=(n_rows, n_ctx)
                )
                for h in hooks:
                    shape = (n_rows, *acts[h].shape[1:])
                    arrays[h] = np.lib.format.open_memmap(
                        folder / _file_name(h), mode="w+", dtype=_NP_DTYPES[dtype], shape=shape
                    )
            if tokens.shape[0] * (i + 1) > tokens_out.shape[0]:
                raise UserError("activation cache: batches must all have the same size")
            tokens_out[row : row + b] = tokens.cpu().numpy()
            for h in hooks:
                arrays[h][row : row + b] = acts[h].float().cpu().numpy()
            row += b
    if tokens_out is None:
        raise UserError("activation cache: got no batches")
    return tokens_out, arrays


def _load(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


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
                    raise UserError(f"{_field(site, h)}: no cached activations at '{h}'")
            d_in = dims[site.input_hook]
            saes[sae_key(pos)] = build_sae(
                s.architecture,
                d_in,
                int(d_in * s.dict_size_to_input_ratio),
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


def n_cache_batches(config: Config, n_windows: int | None = None) -> int:
    """Micro-batches one epoch of `config`'s training needs (what a cache should hold), or the
    batches that hold `n_windows` windows."""
    assert config.n_samples is not None
    return math.ceil((n_windows or config.n_samples) / config.batch_size)


# --- from configs: checks -------------------------------------------------------------------------
def check_cacheable(config: Config) -> None:
    """Cached activations serve local runs only: a one-line ConfigError naming the field if not."""
    for name in config.loss.enabled:
        if name not in LOCAL_TERMS:
            raise ConfigError(
                f"loss.{name}: needs the LM past the SAEs; training from cached activations "
                f"supports only {', '.join(LOCAL_TERMS)}"
            )
    if config.precision != "fp32":
        raise ConfigError("precision: training from cached activations runs in fp32; set fp32")
    if config.saes.resample_every_n_samples is not None:
        raise ConfigError("saes.resample_every_n_samples: not supported with cached activations")


def check_same_batches(configs: Sequence[Config]) -> None:
    """Configs trained on the same micro-batches need the same batch layout."""
    for name in ("batch_size", "effective_batch_size"):
        got = sorted({getattr(c, name) or c.batch_size for c in configs})
        if len(got) > 1:
            raise ConfigError(f"{name}: configs trained on the same batches need the same value "
                              f"(got {', '.join(map(str, got))})")  # fmt: skip


def _field(site: SpliceSite, hook: str) -> str:
    """The config field that made `hook` necessary (for error messages)."""
    if not site.is_transcoder:
        return "saes.sae_positions"
    return "saes.transcoders.input" if hook == site.input_hook else "saes.transcoders.output"


def model_source(config: Config) -> dict[str, Any]:
    """What identifies `config`'s LM; a cache records it and every config trained from it must
    give the same (paths compared resolved)."""
    out: dict[str, Any] = {}
    for key in MODEL_KEYS:
        value = getattr(config, key)
        if isinstance(value, Path):
            value = str(value.expanduser().resolve())
        if value is not None:
            out[key] = value
    return json.loads(json.dumps(out))  # as it reads back from meta.json


def check_against_cache(config: Config, cache: ActivationCache) -> None:
    """Before anything is loaded or written: local losses, window length, the same LM (as the
    cache recorded it) and every hook the config's SAEs read or replace in the cache."""
    check_cacheable(config)
    n_ctx = int(cache.meta["n_ctx"])
    if config.train_data.n_ctx != n_ctx:
        raise ConfigError(f"train_data.n_ctx: {config.train_data.n_ctx}, but the activation "
                          f"cache {cache.path} holds windows of {n_ctx} tokens")  # fmt: skip
    if len(cache) < config.batch_size:
        raise ConfigError(f"batch_size: {config.batch_size} is more than the {len(cache)} windows "
                          f"of the activation cache {cache.path}")  # fmt: skip
    recorded = cache.meta.get("model_source")
    mine = model_source(config)
    if recorded is not None and recorded != mine:
        key = next(k for k in MODEL_KEYS if recorded.get(k) != mine.get(k))
        built = ", ".join(f"{k}={_short(v)}" for k, v in recorded.items())
        raise ConfigError(f"{key}: the activation cache {cache.path} was built from another "
                          f"model ({built})")  # fmt: skip
    for site in resolve_sites(config, cache.meta["all_hook_names"]).values():
        for h in (site.input_hook, site.output_hook):
            if h not in cache.hooks:
                raise ConfigError(f"{_field(site, h)}: '{h}' is not in the activation cache "
                                  f"{cache.path} (it holds {', '.join(cache.hooks)})")  # fmt: skip


def _short(value: Any, n: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def check_model_against_cache(model: SAETransformer, cache: ActivationCache) -> None:
    """The loaded LM is the one the cache was built with: name, hook names, activation sizes."""
    name, recorded = _model_name(model), cache.meta.get("model")
    if recorded is not None and name != recorded:
        raise ConfigError(f"model: '{name}', but the activation cache {cache.path} was built "
                          f"with '{recorded}'")  # fmt: skip
    if model.all_hook_names != cache.meta["all_hook_names"]:
        raise ConfigError(f"model: its hook names differ from those of the model the activation "
                          f"cache {cache.path} was built with")  # fmt: skip
    hooks = list(dict.fromkeys(h for s in model.sites.values()
                               for h in (s.input_hook, s.output_hook)))  # fmt: skip
    for h, shape in model.hook_shapes(hooks).items():
        if shape[-1] != cache.d(h):
            raise ConfigError(f"model: activations at '{h}' have size {shape[-1]}, the "
                              f"activation cache's {cache.d(h)} (another model)")  # fmt: skip


# --- from configs: building a cache ---------------------------------------------------------------
def build_for_config(
    config: Config,
    path: str | Path,
    n_windows: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> ActivationCache:
    """Cache the activations `config`'s SAEs read, over the windows its training reads, in its
    training order: one epoch of the run (`n_cache_batches`), or `n_windows` windows rounded up to
    whole batches. meta.json records the config's model and data. Nothing is written until the
    model and the first batch have loaded."""
    from e2e_sae.checkpoint import build_model
    from e2e_sae.data import create_data_loader
    from e2e_sae.distributed import check_device
    from e2e_sae.train import check_vocab, data_errors

    check_cacheable(config)
    if dtype not in _NP_DTYPES:
        raise ConfigError(f"activation cache dtype: expected one of {list(_NP_DTYPES)}")
    path = Path(path).expanduser()
    if path.exists():
        raise UserError(f"activation cache {path}: already exists")
    check_device(device or config.device)
    model = build_model(config, device=device)
    with data_errors("train_data"):
        loader = create_data_loader(config.train_data, config.batch_size, config.seed)
        first = next(loader, None)
    if first is None:
        raise UserError("train_data: the dataset yields no windows")
    check_vocab(model, first, "train_data")
    info = {"model_source": model_source(config), "seed": config.seed,
            "batch_size": config.batch_size,
            "train_data": config.train_data.model_dump(mode="json")}  # fmt: skip
    n_batches = n_cache_batches(config, n_windows)
    batches = itertools.chain([first], loader)
    return ActivationCache.build(model, batches, n_batches, path, dtype=dtype, progress=progress,
                                 source=config.train_data.dataset_name, info=info)  # fmt: skip


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

    @property
    def n_samples(self) -> int:
        bs = self.config.effective_batch_size or self.config.batch_size
        return self.trainer.step_count * bs

    def final_values(self) -> dict[str, float]:
        """The last step's logged values (loss terms, L0 per SAE, ...) and dead latents now."""
        from e2e_sae.train import _dead_counts

        last, window = self.trainer.history[-1], self.config.act_frequency_n_tokens
        return {"loss": last["loss"], **last, **_dead_counts(self.setup.model, window)}


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
    """A fresh `<save_dir>/<run name>_<time>` per run (suffixed when two would collide), holding
    final_config.yaml, and its metrics logger."""
    from e2e_sae.checkpoint import write_config
    from e2e_sae.runlog import RunLogger
    from e2e_sae.train import get_run_name, make_run_dir

    stamp = time.strftime("%Y%m%d-%H%M%S")
    taken: set[Path] = set()
    for r in runs:
        base = Path(r.config.save_dir or ".").expanduser() / f"{get_run_name(r.config)}_{stamp}"
        run_dir = base
        for k in itertools.count(2):
            if run_dir not in taken and not run_dir.exists():
                break
            run_dir = base.with_name(f"{base.name}-{k}")
        taken.add(run_dir)
        r.run_dir = make_run_dir(r.config, run_dir)
        write_config(r.run_dir, r.config)
        r.log = RunLogger(r.run_dir, r.config)


def _step_logger(runs: Sequence[CachedRun], n_ctx: int) -> Callable[[int], None]:
    """What `train` logs every `log_every_n_grad_steps` steps (and after step 1), per run."""
    from e2e_sae.train import _dead_counts

    start = time.perf_counter()

    def on_step(step: int) -> None:
        elapsed = time.perf_counter() - start
        for r in runs:
            cfg, t = r.config, r.trainer
            if t.step_count != step or not (step % cfg.log_every_n_grad_steps == 0 or step == 1):
                continue
            rec = {"samples": r.n_samples, "step": step, "lr": t.scheduler.get_last_lr()[0],
                   **t.history[-1], "tokens_per_s": r.n_samples * n_ctx / elapsed}  # fmt: skip
            rec.update(_dead_counts(r.setup.model, cfg.act_frequency_n_tokens))
            assert r.log is not None
            r.log.log(rec, step=r.n_samples)

    return on_step


def _finish(run: CachedRun) -> None:
    """Final checkpoint (the format `train` writes), then `train`'s final evaluation."""
    from e2e_sae.checkpoint import save_checkpoint
    from e2e_sae.train import TrainState, _log_eval

    assert run.run_dir is not None and run.log is not None
    steps = run.trainer.step_count
    run.log.save_file(save_checkpoint(run.run_dir, run.setup.model, run.n_samples))
    state = TrainState(steps, run.n_samples, steps * run.config.grad_accum_steps)
    _log_eval(run.setup, run.log, state, lambda result: setattr(run, "eval", result))
    run.log.finish()


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
    _new_run_dirs(runs)
    batches = cache.batches(configs[0].batch_size, seed=configs[0].seed, in_order_epochs=1)
    on_step = _step_logger(runs, int(cache.meta["n_ctx"]))
    train_together([r.trainer for r in runs], batches, progress=progress, on_step=on_step)
    for r in runs:
        _finish(r)
    return runs
