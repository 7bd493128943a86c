"""SAE checkpoints as safetensors (never pickle), atomic writes, and reading them back.

Layout of a run directory:
  final_config.yaml          the resolved config
  samples_<N>.safetensors    SAE weights after N training samples (keys `<sae_key>.<param>`)
  metrics.jsonl              one JSON object per log / eval step

Loading also reads run directories of the original e2e_sae 2.1.1 (`samples_<N>.pt`, its
`final_config.yaml`), through `e2e_sae.runs.original`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from e2e_sae.config import Config, config_to_yaml_dict
from e2e_sae.errors import DamagedFileError, UserError
from e2e_sae.runs.original import read_pt_state_dict
from e2e_sae.saes import SAEDict, sae_key


class SAETransformer(Protocol):
    """The part of `lm.splice.SAETransformer` whose SAEs a checkpoint holds."""

    saes: SAEDict
    sae_positions: list[str]
    architecture: str


logger = logging.getLogger(__name__)

CONFIG_FILE = "final_config.yaml"
_CKPT_RE = re.compile(r"^samples_(\d+)\.safetensors$")
_ANY_CKPT_RE = re.compile(r"^samples_(\d+)\.(safetensors|pt)$")
# Buffers that count what happened in training; a checkpoint without them (the original's) starts
# them at zero. Other missing buffers (e.g. batchtopk's threshold) keep their initial value.
TRAINING_STAT_BUFFERS = ("tokens_since_fired",)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TMP_RE = re.compile(r"^\..+\.tmp\d+$")
"""Temp files of the atomic writes below: `.<name>.tmp<pid>`."""


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """The temp file to write `path`'s new contents to, renamed over `path` when the block ends
    (then the folder is fsynced). On any failure (a full disk, a signal, ...) no temp file is left
    behind, and an OSError without a file name names the temp file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # (write / fsync: say which file)
            raise OSError(err.errno, err.strerror, str(tmp)) from None
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file, flush + fsync, then rename over `path`."""
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def clean_stale_temp_files(run_dir: Path) -> None:
    """Temp files of writes that a kill interrupted (never renamed, so never read)."""
    for p in run_dir.iterdir():
        if _TMP_RE.match(p.name):
            p.unlink(missing_ok=True)


DIGEST_KEY = "e2e_sae.sha256"
OUR_METADATA = frozenset({"architecture", "sae_positions", "init_kwargs"})
"""Metadata keys of the SAE checkpoints we write (with the checksum, always): a file that has them
but no checksum is not trusted. Other safetensors files (no such keys) are read unchecked."""
_FULL_DIGEST = "v2:"  # this prefix: the digest covers the metadata too (older files: tensors only)


def tensor_digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `tensors` and, when given, the
    metadata strings (detects corrupted or edited files)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    if metadata is None:
        return h.hexdigest()
    h.update(json.dumps(sorted(metadata.items())).encode())
    return _FULL_DIGEST + h.hexdigest()


def atomic_save_tensors(
    tensors: Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Temp file + fsync + rename; the metadata gets a checksum over tensors and metadata that
    `read_tensors` verifies. Equal contents give byte-identical files."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: v for k, v in (metadata or {}).items() if k != DIGEST_KEY}
    with _replacing(path) as tmp:
        _save_file(cpu, tmp, {**meta, DIGEST_KEY: tensor_digest(cpu, meta)})
        _sort_header_metadata(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def _save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' `save_file`, whose I/O errors (a full disk, a file size limit) are raised as
    the `OSError` they are, not as a `SafetensorError`."""
    try:
        save_file(tensors, str(path), metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _sort_header_metadata(path: Path) -> None:
    """safetensors writes the metadata in hash-map order, different in every process: rewrite the
    header with sorted metadata keys (the data offsets do not change), so that `sha256sum` can
    compare the files of two runs."""
    with open(path, "rb+") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # (escapes differ from the writer's): keep the file as written
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))  # trailing spaces are valid header padding


def write_config(run_dir: Path, config: Config) -> None:
    text = yaml.safe_dump(config_to_yaml_dict(config), sort_keys=False)
    atomic_write_bytes(run_dir / CONFIG_FILE, text.encode())


@contextmanager
def new_run_dir(out: Path) -> Iterator[Path]:
    """A run directory written in a temporary sibling of `out` and renamed to `out` when the
    block ends: `out` appears complete or not at all."""
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_relu_run(
    run_dir: Path,
    tensors: Mapping[str, Tensor],
    positions: list[str],
    n_samples: int,
    config: Config,
    converted_from: str,
) -> None:
    """The original's (ReLU) SAEs at `positions` as a run of ours: `samples_<n_samples>` with
    their weights and `final_config.yaml` (`convert`, the paper's SAEs)."""
    meta = {
        "architecture": "relu",
        "sae_positions": json.dumps(positions),
        "init_kwargs": json.dumps({p: {} for p in positions}),
        "converted_from": converted_from,
    }
    atomic_save_tensors(tensors, run_dir / f"samples_{n_samples}.safetensors", meta)
    write_config(run_dir, config)


def sae_state(model: SAETransformer) -> dict[str, Tensor]:
    return dict(model.saes.state_dict())


def save_checkpoint(run_dir: Path, model: SAETransformer, n_samples: int) -> Path:
    path = run_dir / f"samples_{n_samples}.safetensors"
    meta = {"architecture": model.architecture, "sae_positions": json.dumps(model.sae_positions)}
    # constructor options per SAE (k, thresholds' bandwidth, ...), for readers without the config
    meta["init_kwargs"] = json.dumps(
        {p: model.saes.at(p).build_kwargs() for p in model.sae_positions}
    )
    atomic_save_tensors(sae_state(model), path, meta)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """SAE checkpoints of a run, oldest first."""
    found = [
        (int(m.group(1)), p)
        for p in run_dir.glob("samples_*.safetensors")
        if (m := _CKPT_RE.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def list_sae_checkpoints(run_dir: Path) -> list[Path]:
    """SAE checkpoints of a run, ours and the original's (`samples_<N>.pt`), oldest first; at equal
    N the safetensors file counts as the newer."""
    found = [
        (int(m.group(1)), m.group(2) == "safetensors", p)
        for p in run_dir.glob("samples_*")
        if (m := _ANY_CKPT_RE.match(p.name))
    ]
    return [p for *_, p in sorted(found)]


def read_tensors(path: Path, what: str = "checkpoint") -> dict[str, Tensor]:
    """Tensors of a safetensors file (checksum verified when it has one) or of the original's `.pt`
    state dict (`weights_only=True`). A file that exists but is damaged raises DamagedFileError."""
    path = Path(path)
    if path.suffix == ".pt":
        return read_pt_state_dict(path, what)
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    try:
        tensors = load_file(str(path))
        meta = tensor_metadata(path)
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DamagedFileError(
            f"{what}: {path} is not a readable safetensors file ({first})"
        ) from None
    digest = meta.pop(DIGEST_KEY, None)
    if digest is None and any(k in OUR_METADATA or k.startswith("e2e_sae") for k in meta):
        raise DamagedFileError(
            f"{what}: {path} has no checksum ('{DIGEST_KEY}' is missing from a file e2e_sae "
            "wrote, which always has one): it is damaged or was modified"
        )
    full = digest is not None and digest.startswith(_FULL_DIGEST)
    if digest is not None and digest != tensor_digest(tensors, meta if full else None):
        raise DamagedFileError(f"{what}: {path} is corrupted or was modified (checksum mismatch)")
    return tensors


def newest_intact(ckpts: list[Path], what: str) -> tuple[Path, dict[str, Tensor]]:
    """(path, tensors) of the newest checkpoint in `ckpts` (oldest first) that reads back intact.
    Damaged newer ones are skipped with one warning naming them; none intact is a UserError."""
    assert ckpts, what
    damaged: list[DamagedFileError] = []
    for path in reversed(ckpts):
        try:
            state = read_tensors(path, what)
        except DamagedFileError as err:
            damaged.append(err)
            continue
        if damaged:
            logger.warning("%s; loaded %s instead", "; ".join(map(str, damaged)), path.name)
        return path, state
    older = f" (and the {len(damaged) - 1} older ones are damaged too)" if len(damaged) > 1 else ""
    raise UserError(f"{damaged[0]}{older}")


def load_sae_weights(
    model: SAETransformer,
    path: Path,
    positions: list[str] | None = None,
    strict: bool = True,
    state: Mapping[str, Tensor] | None = None,
) -> list[str]:
    """Load SAE weights into `model` (only `positions` if given; `state`: the tensors of `path`,
    already read). Every parameter must be there; missing buffers are allowed (see
    TRAINING_STAT_BUFFERS). Returns the positions loaded."""
    state = read_tensors(path) if state is None else state
    check_architecture(model, path)
    loaded: list[str] = []

    wanted = positions if positions is not None else model.sae_positions
    for pos in wanted:
        key = sae_key(pos)
        sub = {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(key + ".")}
        if not sub:
            if strict:
                raise UserError(f"checkpoint {path}: no weights for SAE at '{pos}'")
            continue
        target = model.saes.at(pos)
        own = target.state_dict()
        for k, v in sub.items():
            if k in own and own[k].shape != v.shape:
                raise UserError(
                    f"checkpoint {path}: '{key}.{k}' has shape {tuple(v.shape)} but the config "
                    f"builds {tuple(own[k].shape)}"
                )
        params = {n for n, _ in target.named_parameters()}
        missing = sorted((set(own) - set(sub)) & params)
        if missing and strict:
            raise UserError(f"checkpoint {path}: SAE '{pos}' lacks {key}.{missing[0]}")
        extra = sorted(set(sub) - set(own))
        if extra:  # weights of another architecture (e.g. a gated SAE's in a relu config)
            raise UserError(
                f"checkpoint {path}: '{key}.{extra[0]}' is not a weight of the config's "
                f"{model.architecture} SAE (the file holds another kind of SAE)"
            )
        stats = {
            b: torch.zeros_like(own[b]) for b in TRAINING_STAT_BUFFERS if b in own and b not in sub
        }
        target.load_state_dict({**own, **stats, **sub}, strict=False)
        loaded.append(pos)
    return loaded


def check_architecture(model: SAETransformer, path: Path) -> None:
    """The SAEs a checkpoint of ours holds are of the architecture the config builds (a topk file
    in a relu run would load its encoder and decoder and silently act as a relu SAE)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return
    try:
        held = tensor_metadata(path).get("architecture")
    except Exception:  # noqa: BLE001 - unreadable files are reported by read_tensors
        return
    if held is not None and held != model.architecture:
        raise UserError(
            f"checkpoint {path}: holds {held} SAEs, but the config builds {model.architecture} "
            "SAEs (saes.architecture)"
        )


def tensor_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


__all__ = [
    "CONFIG_FILE",
    "atomic_save_tensors",
    "atomic_write_bytes",
    "list_checkpoints",
    "list_sae_checkpoints",
    "load_sae_weights",
    "newest_intact",
    "read_tensors",
    "save_checkpoint",
    "torch",
    "write_config",
]
