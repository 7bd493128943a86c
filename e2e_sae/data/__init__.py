"""Token windows from a built-in corpus, a local path or a Hugging Face dataset.

Raw text is tokenized, documents are joined with the end-of-text token and cut into `n_ctx`
windows. Non-streaming sources are materialised once (and cached on disk) as an int tensor
[n_windows, n_ctx]; batches are drawn in a seeded permutation per epoch, so a run is deterministic
and can resume at any batch. Streaming hub datasets go through a seeded buffer shuffle.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import numbers
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from e2e_sae.config import DatasetConfig
from e2e_sae.data.corpora import BUILTIN_CORPORA, get_builtin_corpus
from e2e_sae.data.tokenizer import load_tokenizer
from e2e_sae.errors import UserError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md"}
TOKEN_COLUMNS = ("input_ids", "tokens")


def cache_dir() -> Path:
    return Path(os.environ.get("E2E_SAE_CACHE", Path.home() / ".cache" / "e2e_sae"))


@dataclass
class TokenWindows:
    """All windows of a (non-streaming) dataset split, [n_windows, n_ctx]."""

    tokens: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batches(
        self,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        shuffle: bool = True,
    ) -> Iterator[Tensor]:
        """Endless batches. Global batch i holds permuted windows [i*B, (i+1)*B) with
        B = batch_size * world_size; rank r gets its r-th slice, so N ranks with batch b see
        exactly what one process with batch N*b sees."""
        n = len(self)
        global_bs = batch_size * world_size
        if n < global_bs:
            raise UserError(
                f"dataset has {n} windows of the requested n_ctx, fewer than one batch "
                f"({global_bs}); use a smaller batch_size or n_ctx, or more data"
            )
        per_epoch = n // global_bs
        i = start_batch
        while True:
            epoch, j = divmod(i, per_epoch)
            if shuffle:
                g = torch.Generator().manual_seed(seed * 100_003 + epoch)
                perm = torch.randperm(n, generator=g)
            else:
                perm = torch.arange(n)
            lo = j * global_bs + rank * batch_size
            yield self.tokens[perm[lo : lo + batch_size]]
            i += 1


def _read_local_dataset(path: Path, cfg: DatasetConfig) -> Any:
    import datasets

    datasets.disable_progress_bars()

    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                have = ", ".join(map(str, ds.keys()))
                raise UserError(f"split: '{cfg.split}' not in saved dataset {path} (has {have})")
            ds = ds[cfg.split]
        return ds
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    texts = [p for p in files if p.suffix in TEXT_SUFFIXES]
    if texts and len(texts) == len(files):
        return {"text": [read_text_file(p, cfg.decode_errors) for p in texts]}
    builders = {kinds.get(p.suffix) for p in files} - {None}
    if len(builders) != 1:
        raise UserError(
            f"dataset_name: {path} holds no single supported file type "
            "(.txt/.md files, .jsonl, .parquet, .csv, or a dataset saved with save_to_disk)"
        )
    builder = str(next(iter(builders)))
    data_files = [str(p) for p in files if kinds.get(p.suffix) == builder]
    if all(Path(f).stat().st_size == 0 for f in data_files):
        raise UserError(f"dataset_name: {path} is empty (no rows)")
    try:
        return datasets.load_dataset(builder, data_files=data_files, split="train")
    except Exception as err:  # noqa: BLE001 - a malformed user file is a one-line error
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"dataset_name: cannot read {path} as {builder} ({first})") from None


def read_text_file(path: Path, errors: str = "strict") -> str:
    """A text file as UTF-8. `errors="strict"`: a file that is not UTF-8 or is binary (NUL
    bytes) is a one-line error; "replace": bad bytes become U+FFFD (with a warning)."""
    data = path.read_bytes()
    if errors == "replace":
        text = data.decode("utf-8", errors="replace")
        n_bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
        if n_bad:
            logger.warning("%s: %d invalid UTF-8 sequences read as U+FFFD", path, n_bad)
        return text
    hint = "(decode_errors: replace reads it anyway)"
    nul = data.find(b"\0")
    if nul >= 0:
        raise UserError(
            f"dataset_name: {path} is binary, not text (NUL byte at offset {nul}) {hint}"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"dataset_name: {path} is not UTF-8 text (byte {data[err.start]:#04x} "
            f"at offset {err.start}) {hint}"
        ) from None


def check_dataset_name(name: str) -> None:
    """A dataset name that is no built-in corpus and no existing path must be a hub name: refuse
    a missing path (it starts with '.', '/' or '~', ends in a data file suffix, or its first folder
    exists here) and a near miss of a built-in corpus (`shakespear`), which would otherwise go to
    the hub and fail there."""
    if get_builtin_corpus(name) is not None or Path(name).expanduser().exists():
        return
    first = Path(name).parts[0] if Path(name).parts else ""
    if (
        name.startswith((".", "/", "~"))
        or name.endswith((".txt", ".md", ".jsonl", ".json", ".parquet", ".arrow"))
        or ("/" in name and Path(first).is_dir())
    ):
        raise UserError(f"dataset_name: path '{name}' does not exist")
    close = difflib.get_close_matches(name.strip().lower(), list(BUILTIN_CORPORA), 1, 0.85)
    if close and "/" not in name:
        raise UserError(f"dataset_name: unknown dataset '{name}' (did you mean '{close[0]}'?)")


def _load_rows(cfg: DatasetConfig, streaming: bool) -> Any:
    """Rows of the requested split as a `datasets` object or a {column: list} dict."""

    corpus = get_builtin_corpus(cfg.dataset_name)
    if corpus is not None:
        return {"text": corpus(cfg.split)}
    path = Path(cfg.dataset_name).expanduser()
    if path.exists():
        return _read_local_dataset(path, cfg)
    check_dataset_name(cfg.dataset_name)
    import datasets

    try:
        kwargs: dict[str, Any] = {"split": cfg.split, "streaming": streaming}
        if cfg.data_files is not None:
            kwargs["data_files"] = cfg.data_files
        return datasets.load_dataset(cfg.dataset_name, **kwargs)
    except Exception as err:  # noqa: BLE001 - any hub failure is a user-facing one-liner
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(
            f"dataset_name: cannot load '{cfg.dataset_name}' (split {cfg.split}) from the "
            f"Hugging Face Hub or a local path: {first}. Offline: use 'shakespeare' or a local "
            "folder of .txt/.jsonl/.parquet files"
        ) from None


def _column(cfg: DatasetConfig, columns: list[str]) -> str:
    if cfg.column_name is not None:
        if cfg.column_name not in columns:
            raise UserError(
                f"column_name: '{cfg.column_name}' not in dataset columns ({', '.join(columns)})"
            )
        return cfg.column_name
    options = TOKEN_COLUMNS if cfg.is_tokenized else ("text",)
    for c in options:
        if c in columns:
            return c
    want = " or ".join(options)
    raise UserError(
        f"dataset {cfg.dataset_name}: no {want} column (has {', '.join(columns)}); "
        f"set column_name{'' if cfg.is_tokenized else ' or is_tokenized'}"
    )


def _columns_of(rows: Any) -> list[str]:
    if isinstance(rows, dict):
        return list(rows)
    names = getattr(rows, "column_names", None)
    return list(names) if names else []


def _token_stream(rows: list[list[int]], cfg: DatasetConfig, column: str) -> Tensor:
    """Pre-tokenized rows joined into one int64 stream (a text column or a negative id is a
    one-line error)."""
    try:
        flat = [t for r in rows for t in r]
        stream = torch.tensor(flat) if flat else torch.zeros(0, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise UserError(
            f"dataset {cfg.dataset_name}: column '{column}' does not hold lists of token ids "
            "(for text set is_tokenized: false and tokenizer_name)"
        ) from None
    if stream.is_floating_point() or stream.dtype == torch.bool or stream.is_complex():
        not_int = next(t for t in flat if not _is_token_id(t))
        raise UserError(
            f"dataset {cfg.dataset_name}: column '{column}' holds {not_int!r}; token ids are "
            "integers (a float or bool column is not tokens)"
        )
    stream = stream.to(torch.int64)
    check_token_ids(stream, cfg, column)
    return stream


def _is_token_id(t: Any) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def check_token_ids(tokens: Tensor, cfg: DatasetConfig, column: str) -> None:
    """Token ids are >= 0 (a negative one would silently index the embedding from the end)."""
    if tokens.numel() and int(tokens.min()) < 0:
        raise UserError(
            f"dataset {cfg.dataset_name}: column '{column}' holds token id {int(tokens.min())}; "
            "token ids are 0 .. d_vocab - 1"
        )


def _cut(stream: Tensor, n_ctx: int) -> Tensor:
    n = stream.numel() // n_ctx
    return stream[: n * n_ctx].reshape(n, n_ctx)


def tokenize_documents(texts: list[str], tokenizer: Any) -> Tensor:
    """Concatenate tokenized documents, each followed by the end-of-text token (int64 stream)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    if not texts:
        return torch.zeros(0, dtype=torch.int64)
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def _cache_key(cfg: DatasetConfig) -> str:
    keys = cfg.model_dump(include={"dataset_name", "split", "tokenizer_name", "column_name"})
    keys["n_documents"] = cfg.n_documents
    if cfg.decode_errors != "strict":  # (absent by default: earlier caches stay valid)
        keys["decode_errors"] = cfg.decode_errors
    path = Path(cfg.dataset_name).expanduser()
    if path.exists():
        keys["mtime"] = path.stat().st_mtime_ns
        keys["dataset_name"] = str(path.resolve())
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:20]


def load_windows(cfg: DatasetConfig) -> TokenWindows:
    """All `n_ctx` windows of a non-streaming split (the tokenized stream is cached on disk)."""
    cache_file = cache_dir() / "tokens" / f"{_cache_key(cfg)}.safetensors"
    if not cfg.is_tokenized and cache_file.exists():
        return TokenWindows(_windows_checked(load_file(cache_file)["tokens"], cfg))
    rows = _load_rows(cfg, streaming=False)
    col = _column(cfg, _columns_of(rows))
    data = rows[col]
    if cfg.n_documents is not None:
        data = data[: cfg.n_documents]
    if cfg.is_tokenized:
        return TokenWindows(_windows_checked(_token_stream(list(data), cfg, col), cfg))

    assert cfg.tokenizer_name is not None
    texts = [t for t in data if isinstance(t, str) and t]
    stream = tokenize_documents(texts, load_tokenizer(cfg.tokenizer_name))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    save_file({"tokens": stream.to(torch.int32)}, str(tmp))
    os.replace(tmp, cache_file)
    return TokenWindows(_windows_checked(stream, cfg))


def _windows_checked(stream: Tensor, cfg: DatasetConfig) -> Tensor:
    stream = stream.to(torch.int64)
    if stream.dim() == 2:
        stream = stream.reshape(-1)
    windows = _cut(stream, cfg.n_ctx)
    if windows.shape[0] == 0:
        raise UserError(
            f"dataset {cfg.dataset_name} (split {cfg.split}): {stream.numel()} tokens, fewer "
            f"than one window of n_ctx={cfg.n_ctx}"
        )
    return TokenWindows(windows).tokens


def stream_batches(
    cfg: DatasetConfig,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    buffer_size: int = 1000,
) -> Iterator[Tensor]:
    """Batches from a streaming hub dataset (seeded buffer shuffle; rank r takes every r-th row)."""

    ds = _load_rows(cfg, streaming=True).shuffle(seed=seed, buffer_size=buffer_size)
    tokenizer = None if cfg.is_tokenized else load_tokenizer(cfg.tokenizer_name or "")
    col: str | None = None
    buf: list[int] = []
    batch: list[Tensor] = []
    idx = 0
    skip = start_batch * batch_size * world_size
    for row in ds:
        if col is None:
            col = _column(cfg, list(row))
        if tokenizer is not None:
            buf.extend(tokenize_documents([row[col]], tokenizer).tolist())
        else:
            ids = list(row[col])
            bad = next((t for t in ids if not _is_token_id(t)), None)
            if bad is not None:
                raise UserError(
                    f"dataset {cfg.dataset_name}: column '{col}' holds {bad!r}; token ids are "
                    "integers (a float or bool column is not tokens)"
                )
            if ids and min(ids) < 0:
                check_token_ids(torch.tensor(ids, dtype=torch.int64), cfg, col)
            buf.extend(ids)
        while len(buf) >= cfg.n_ctx:
            window, buf = buf[: cfg.n_ctx], buf[cfg.n_ctx :]
            mine = idx % world_size == rank
            idx += 1
            if idx <= skip or not mine:
                continue
            batch.append(torch.tensor(window, dtype=torch.int64))
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []


def create_data_loader(
    dataset_config: DatasetConfig,
    batch_size: int,
    global_seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
) -> Iterator[Tensor]:
    """Endless (non-streaming) or single-pass (streaming) iterator of [batch, n_ctx] token batches.

    The seed is the dataset's own `seed` if set, else `global_seed`.
    """
    seed = dataset_config.seed if dataset_config.seed is not None else global_seed
    local = Path(dataset_config.dataset_name).expanduser().exists()

    if (
        dataset_config.streaming
        and not local
        and get_builtin_corpus(dataset_config.dataset_name) is None
    ):
        return stream_batches(dataset_config, batch_size, seed, rank, world_size, start_batch)
    windows = load_windows(dataset_config)
    return windows.batches(batch_size, seed, rank, world_size, start_batch)


def eval_batches(
    cfg: DatasetConfig, batch_size: int, seed: int, n_batches: int, request: str | None
) -> tuple[Iterator[Tensor], int]:
    """(batches, how many to take) for an evaluation of `n_batches` batches of distinct windows.

    A non-streaming eval set holding fewer whole batches would repeat windows (and count each
    latent's firing twice): `request` (what was asked, e.g. "--n-tokens: 8192 tokens") then is
    a one-line UserError saying how much the set holds; `request` None (a default size) takes
    the whole set instead. A streaming set ends when it ends (a single pass)."""
    if cfg.streaming and not Path(cfg.dataset_name).expanduser().exists():
        if get_builtin_corpus(cfg.dataset_name) is None:
            return create_data_loader(cfg, batch_size, seed), n_batches
    windows = load_windows(cfg)
    whole = len(windows) // batch_size
    if 0 < whole < n_batches:
        if request is not None:
            raise UserError(
                f"{request} in batches of {batch_size}, but the eval set {cfg.dataset_name} "
                f"(split {cfg.split}) holds {len(windows)} windows of {cfg.n_ctx} tokens: at most "
                f"{whole * batch_size} windows ({whole * batch_size * cfg.n_ctx} tokens) without "
                "repeating one"
            )
        logger.info("eval: the eval set holds %d batches; evaluating on all of them", whole)
        n_batches = whole
    seed = cfg.seed if cfg.seed is not None else seed
    return windows.batches(batch_size, seed), n_batches


@contextmanager
def data_errors(field: str) -> Iterator[None]:
    """Prefix data loading errors with the config section (train_data / eval_data) they are in."""
    try:
        yield
    except UserError as err:
        if str(err).startswith(field):
            raise
        raise type(err)(f"{field}: {err}") from None
