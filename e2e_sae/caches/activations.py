"""Activation caches: the clean LM's activations at some hooks, computed once and stored on disk.

A local (MSE) SAE only needs the clean activations at the hooks it reads, so they can be computed
once and reused: `ActivationCache.build` runs the LM once over some token windows and stores the
activations at the given hooks on disk, and `e2e_sae.training.cached` trains SAEs from them without
the LM. `lm_activation_batches` is the no-disk variant: one LM pass per batch, yielding the same
{hook: activation} batches.

From configs (what `e2e-sae cache-acts` runs): `build_for_config` caches the windows a config's
training reads, in its training order; `check_against_cache` / `check_model_against_cache` check a
config / its loaded LM against a cache before anything is trained.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.config import Config
from e2e_sae.data import create_data_loader, data_errors
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.load import resolve_backend
from e2e_sae.lm.runner import check_vocab
from e2e_sae.lm.sites import SpliceSite, config_sites, filter_names
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.objective.forward import StepPlan, run_forward, with_runner
from e2e_sae.resources import check_device, check_disk, reserve

META = "meta.json"
TOKENS = "tokens.npy"
FORMAT_VERSION = 1
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
LOCAL_TERMS = ("sparsity", "out_to_in", "out_to_orig")
"""Loss terms that only need the clean activations at the SAE hooks (what a cache holds)."""
MODEL_KEYS = ("tlens_model_name", "tlens_model_path", "tlens_config", "hf_model_name", "backend")
"""What `model_source` records (`backend` only when it resolves to bridge, so caches of
HookedTransformer runs read as before)."""


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
            hooks = list(dict.fromkeys(h for s in model.sites.values() for h in s.hooks))
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
        except BaseException as err:  # no half-written cache is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError):  # (a full disk, a file size limit, ...)
                raise UserError(
                    f"activation cache {path}: cannot write {Path(str(err.filename or tmp)).name} "
                    f"({err.strerror}); the partial cache was removed"
                ) from None
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
    plan = with_runner(model, StepPlan(sae_positions=[], orig_cache=list(hooks)))  # clean only
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
                shapes = {h: (n_rows, *acts[h].shape[1:]) for h in hooks}
                item = np.dtype(_NP_DTYPES[dtype]).itemsize
                need = n_rows * n_ctx * 4 + sum(math.prod(sh) * item for sh in shapes.values())
                check_disk(
                    need,
                    folder.parent,
                    "activation cache",
                    f"{n_rows} windows x {n_ctx} tokens at {len(hooks)} hook(s)",
                    " (cache fewer windows with --n-samples, or use --dtype float16)",
                )
                tokens_out = _open_array(folder / TOKENS, np.dtype(np.int32), (n_rows, n_ctx))
                for h in hooks:
                    arrays[h] = _open_array(
                        folder / _file_name(h), np.dtype(_NP_DTYPES[dtype]), shapes[h]
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


def _open_array(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file memory-mapped for writing, its blocks allocated now: a full disk is an
    OSError here, not a SIGBUS when the map is written later."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with open(path, "r+b") as f:
        try:
            reserve(f.fileno(), os.fstat(f.fileno()).st_size)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(path)) from None
    return array


def _load(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _model_name(model: SAETransformer) -> str:
    cfg = model.tlens_model.cfg
    return str(getattr(cfg, "model_name", "") or f"{cfg.n_layers}L-{cfg.d_model}d")


def lm_activation_batches(
    model: SAETransformer, token_batches: Iterable[Tensor], hooks: Sequence[str]
) -> Iterator[dict[str, Tensor]]:
    """One clean LM pass per token batch (fast local path), yielding {hook: activation}: feed it
    to several cache-fed trainers (`Trainer.fed_from_cache`) to train them all on the same batches
    without a disk cache."""
    plan = with_runner(model, StepPlan(sae_positions=[], orig_cache=list(hooks)))
    device = next(model.saes.parameters()).device
    for tokens in token_batches:
        with torch.no_grad():  # left before the yield: grad mode is thread state, not ours
            acts = dict(run_forward(model, tokens.to(device), plan).orig_acts)
        yield acts


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
    if config.precision == "bf16":
        raise ConfigError("precision: training from cached activations runs in fp32; set fp32")


def hook_field(config: Config, site: SpliceSite, hook: str) -> str:
    """The config field that made `hook` necessary (for error messages)."""
    if not site.is_transcoder:
        return "saes.sae_positions"
    entry = "transcoders"
    t = config.saes.transcoder_set
    if t is not None and site.output_hook.endswith("." + t.output):
        entry = "transcoder_set"
    return f"saes.{entry}.input" if hook == site.input_hook else f"saes.{entry}.output"


def model_source(config: Config) -> dict[str, Any]:
    """What identifies `config`'s LM; a cache records it and every config trained from it must
    give the same (paths compared resolved). A bridge's activations are the stock HF model's,
    which a HookedTransformer's weight processing may shift, so the backend counts too."""

    out: dict[str, Any] = {}
    for key in MODEL_KEYS:
        value = getattr(config, key) if key != "backend" else None
        if key == "backend" and resolve_backend(config) == "bridge":
            value = "bridge"
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
        raise ConfigError(
            f"train_data.n_ctx: {config.train_data.n_ctx}, but the activation "
            f"cache {cache.path} holds windows of {n_ctx} tokens"
        )
    if len(cache) < config.batch_size:
        raise ConfigError(
            f"batch_size: {config.batch_size} is more than the {len(cache)} windows "
            f"of the activation cache {cache.path}"
        )
    recorded = cache.meta.get("model_source")
    mine = model_source(config)
    if recorded is not None and recorded != mine:
        key = next(k for k in MODEL_KEYS if recorded.get(k) != mine.get(k))
        built = ", ".join(f"{k}={_short(v)}" for k, v in recorded.items())
        raise ConfigError(
            f"{key}: the activation cache {cache.path} was built from another model ({built})"
        )
    for site in config_sites(config, cache.meta["all_hook_names"]).values():
        for h in site.hooks:
            if h not in cache.hooks:
                raise ConfigError(
                    f"{hook_field(config, site, h)}: '{h}' is not in the activation cache "
                    f"{cache.path} (it holds {', '.join(cache.hooks)})"
                )


def _short(value: Any, n: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def check_model_against_cache(model: SAETransformer, cache: ActivationCache) -> None:
    """The loaded LM is the one the cache was built with: name, hook names, activation sizes."""
    name, recorded = _model_name(model), cache.meta.get("model")
    if recorded is not None and name != recorded:
        raise ConfigError(
            f"model: '{name}', but the activation cache {cache.path} was built with '{recorded}'"
        )
    if model.all_hook_names != cache.meta["all_hook_names"]:
        raise ConfigError(
            f"model: its hook names differ from those of the model the activation "
            f"cache {cache.path} was built with"
        )
    hooks = list(dict.fromkeys(h for s in model.sites.values() for h in s.hooks))
    for h, shape in model.hook_shapes(hooks).items():
        if shape[-1] != cache.d(h):
            raise ConfigError(
                f"model: activations at '{h}' have size {shape[-1]}, the "
                f"activation cache's {cache.d(h)} (another model)"
            )


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

    check_cacheable(config)
    if dtype not in _NP_DTYPES:
        raise ConfigError(f"activation cache dtype: expected one of {list(_NP_DTYPES)}")
    path = Path(path).expanduser()
    if path.exists():
        raise UserError(f"activation cache {path}: already exists")
    check_device(device or config.device)
    model = SAETransformer.from_config(config, device=device)
    batches = training_batches(config, model)
    info = {
        "model_source": model_source(config),
        "seed": config.seed,
        "batch_size": config.batch_size,
        "train_data": config.train_data.model_dump(mode="json"),
    }
    n_batches = n_cache_batches(config, n_windows)
    return ActivationCache.build(
        model,
        batches,
        n_batches,
        path,
        dtype=dtype,
        progress=progress,
        source=config.train_data.dataset_name,
        info=info,
    )


def training_batches(config: Config, model: SAETransformer) -> Iterator[Tensor]:
    """The token batches `config`'s training reads, in its order (the first one loaded and
    checked against the model now, so a bad dataset fails before anything is written)."""

    with data_errors("train_data"):
        loader = create_data_loader(config.train_data, config.batch_size, config.seed)
        first = next(loader, None)
    if first is None:
        raise UserError("train_data: the dataset yields no windows")
    check_vocab(model.lm, first, "train_data")
    return itertools.chain([first], loader)
