"""Hugging Face Hub: push a run directory or a SAELens export, and resolve `hf://user/repo[/path]`.

URIs: `hf://user/repo` (the whole repo), `hf://user/repo/sub/folder` (one folder of it) and
`hf://user/repo@revision/sub/folder` (a branch, tag or commit). Downloads go through
`huggingface_hub.snapshot_download` (its cache, `HF_HUB_OFFLINE` and token handling apply); uploads
through `HfApi.upload_folder`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_sae.errors import UserError
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.runs.checkpoint import CONFIG_FILE, list_checkpoints

logger = logging.getLogger(__name__)

_URI_RE = re.compile(
    r"^hf:/{1,2}(?P<repo>[^/@\s]+/[^/@\s]+)(?:@(?P<rev>[^/\s]+))?(?:/(?P<sub>.*))?$"
)

# Files of a run directory worth publishing (checkpoints, config, metrics, evaluation, plots).
RUN_FILE_PATTERNS = [
    "final_config.yaml",
    "samples_*.safetensors",
    "metrics.jsonl",
    "eval.json",
    "eval.*.safetensors",
    "*.png",
    "*.html",
    "README.md",
]
# A SAELens export: one folder per SAE.
SAELENS_FILE_PATTERNS = [
    "*/cfg.json",
    "*/sae_weights.safetensors",
    "*/sparsity.safetensors",
    "cfg.json",
    "sae_weights.safetensors",
    "sparsity.safetensors",
    "README.md",
]


@dataclass(frozen=True)
class HfUri:
    repo_id: str
    subfolder: str
    revision: str | None = None


CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
"""The files of a SAELens SAE folder (`e2e_sae.interop.saelens`)."""


def is_saelens_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding a SAELens `cfg.json` and `sae_weights.safetensors`."""
    p = Path(path)
    return (p / CFG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def is_hf_uri(path: str | os.PathLike[str]) -> bool:
    # `Path("hf://a/b")` collapses the double slash, so accept "hf:/" too.
    return str(path).startswith("hf:/")


def parse_hf_uri(uri: str | os.PathLike[str]) -> HfUri:
    """`hf://user/repo[@revision][/sub/folder]` -> HfUri (subfolder '' for the whole repo)."""
    m = _URI_RE.match(str(uri))
    if m is None:
        raise UserError(f"'{uri}': expected hf://user/repo[@revision][/path/in/repo]")
    sub = (m.group("sub") or "").strip("/")
    if any(part in ("", ".", "..") for part in sub.split("/")) and sub:
        raise UserError(f"'{uri}': the path inside the repo may not contain '.', '..' or '//'")
    return HfUri(m.group("repo"), sub, m.group("rev"))


def snapshot_download(**kwargs: Any) -> str:
    """`huggingface_hub.snapshot_download`, as a module attribute tests can point at a folder."""
    from huggingface_hub import snapshot_download as download

    return download(**kwargs)


def resolve_path(path: str | os.PathLike[str], cache_dir: str | Path | None = None) -> Path:
    """A local path as is; an `hf://` URI downloaded (only its subfolder) and returned as a path."""
    if not is_hf_uri(path):
        return Path(path).expanduser()
    uri = parse_hf_uri(path)
    patterns = [f"{uri.subfolder}/*"]  # fnmatch: * spans "/" if uri.subfolder else None
    try:
        root = snapshot_download(
            repo_id=uri.repo_id,
            revision=uri.revision,
            allow_patterns=patterns,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    except Exception as err:  # noqa: BLE001  (hub/network/offline errors -> one line)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: cannot download from the Hugging Face Hub ({first})") from None
    local = Path(root) / uri.subfolder if uri.subfolder else Path(root)
    if not local.exists():
        raise UserError(f"{path}: no '{uri.subfolder}' in {uri.repo_id}")
    return local


def model_card(folder: Path, repo_id: str) -> str:
    """A short README for the repo: what is in it and how to load it."""
    saes = sorted(p.name for p in folder.iterdir() if p.is_dir() and is_saelens_dir(p))
    if is_saelens_dir(folder):
        saes = [""]  # one SAE at the repo root
    if saes:
        uri = f"hf://{repo_id}" + (f"/{saes[0]}" if saes[0] else "")
        lines = [
            "---",
            "library_name: saelens",
            "tags: [e2e_sae, sparse-autoencoder]",
            "---",
            "# SAEs exported by e2e_sae",
            "",
            "SAELens format (`cfg.json` + `sae_weights.safetensors` per SAE):",
            "",
            *[f"- `{s or '(repo root)'}`" for s in saes],
            "",
            "```python",
            "from sae_lens import SAE",
            f'sae = SAE.from_pretrained("{repo_id}", "{saes[0]}")  # SAELens 6',
            "# or, spliced into a TransformerLens model with e2e_sae:",
            "from e2e_sae.interop import saelens_transformer",
            f'model = saelens_transformer(tlens_model, ["{uri}"])',
            "```",
        ]
    else:
        lines = [
            "---",
            "tags: [e2e_sae, sparse-autoencoder]",
            "---",
            "# An e2e_sae training run",
            "",
            "`final_config.yaml` is the run's config, `samples_<N>.safetensors` its checkpoints.",
            "",
            "```python",
            "from e2e_sae.interop.hub import load_from_hub",
            f'model = load_from_hub("hf://{repo_id}")',
            "```",
        ]
    return "\n".join(lines) + "\n"


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    path_in_repo: str | None = None,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    all_checkpoints: bool = False,
) -> str:
    """Upload a run directory or a SAELens export to `repo_id` (created if missing).

    From a run directory only the config, the newest checkpoint (all with `all_checkpoints`),
    metrics and evaluation files are uploaded. Adds a README model card if the folder has none.
    Returns the `hf://` URI that loads what was pushed.
    """
    from huggingface_hub import HfApi

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"push: {folder} is not a directory")
    is_run = (folder / CONFIG_FILE).is_file()
    is_export = is_saelens_dir(folder) or any(
        is_saelens_dir(p) for p in folder.iterdir() if p.is_dir()
    )
    if is_run:
        ckpts = list_checkpoints(folder)
        if not ckpts:
            raise UserError(f"push: run directory {folder} has no samples_<N>.safetensors")
        patterns = [p for p in RUN_FILE_PATTERNS if p != "samples_*.safetensors"]
        patterns += [c.name for c in (ckpts if all_checkpoints else ckpts[-1:])]
    elif is_export:
        patterns = SAELENS_FILE_PATTERNS
    else:
        raise UserError(
            f"push: {folder} is neither a run directory ({CONFIG_FILE}) nor a SAELens export "
            "(cfg.json + sae_weights.safetensors)"
        )
    api = HfApi(token=token)
    sub = (path_in_repo or "").strip("/")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            path_in_repo=sub or None,
            allow_patterns=patterns,
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} with e2e_sae",
        )
        if not (folder / "README.md").exists() and not sub:
            api.upload_file(
                path_or_fileobj=model_card(folder, repo_id).encode(),
                path_in_repo="README.md",
                repo_id=repo_id,
                revision=revision,
                commit_message="Add model card",
            )
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001  (auth/network errors -> one line)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"push to {repo_id}: {first}") from None
    rev = f"@{revision}" if revision else ""
    return f"hf://{repo_id}{rev}" + (f"/{sub}" if sub else "")


def load_from_hub(uri: str | os.PathLike[str], device: str | None = None) -> Any:
    """An `SAETransformer` from an `hf://` (or local) run directory.

    For a SAELens export use `e2e_sae.interop.saelens_transformer(tlens_model, [uri])`, which
    needs the language model the SAEs belong to.
    """

    return SAETransformer.from_local_path(resolve_path(uri), device=device)
