"""SAE checkpoints as safetensors (never pickle), atomic writes, and rebuilding a run directory.

Layout of a run directory:
  final_config.yaml          the resolved config
  samples_<N>.safetensors    SAE weights after N training samples (keys `<sae_key>.<param>`)
  metrics.jsonl              one JSON object per log / eval step

Loading also reads run directories of the original e2e_sae 2.1.1 (`samples_<N>.pt`, its
`final_config.yaml`), through `e2e_sae.compat.original`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from e2e_sae.config import Config, config_to_yaml_dict
from e2e_sae.errors import DamagedFileError, UserError
from e2e_sae.splice import SAETransformer

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file, flush + fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


DIGEST_KEY = "e2e_sae.sha256"
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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: v for k, v in (metadata or {}).items() if k != DIGEST_KEY}
    save_file(cpu, str(tmp), {**meta, DIGEST_KEY: tensor_digest(cpu, meta)})
    _sort_header_metadata(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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


def sae_state(model: SAETransformer) -> dict[str, Tensor]:
    return dict(model.saes.state_dict())


def save_checkpoint(run_dir: Path, model: SAETransformer, n_samples: int) -> Path:
    path = run_dir / f"samples_{n_samples}.safetensors"
    meta = {"architecture": model.architecture, "sae_positions": json.dumps(model.sae_positions)}
    # constructor options per SAE (k, thresholds' bandwidth, ...), for readers without the config
    meta["init_kwargs"] = json.dumps({p: model.sae(p).init_kwargs() for p in model.sae_positions})
    atomic_save_tensors(sae_state(model), path, meta)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """SAE checkpoints of a run, oldest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("samples_*.safetensors")
             if (m := _CKPT_RE.match(p.name))]  # fmt: skip
    return [p for _, p in sorted(found)]


def list_sae_checkpoints(run_dir: Path) -> list[Path]:
    """SAE checkpoints of a run, ours and the original's (`samples_<N>.pt`), oldest first; at equal
    N the safetensors file counts as the newer."""
    found = [(int(m.group(1)), m.group(2) == "safetensors", p) for p in run_dir.glob("samples_*")
             if (m := _ANY_CKPT_RE.match(p.name))]  # fmt: skip
    return [p for *_, p in sorted(found)]


def read_tensors(path: Path, what: str = "checkpoint") -> dict[str, Tensor]:
    """Tensors of a safetensors file (checksum verified when it has one) or of the original's `.pt`
    state dict (`weights_only=True`). A file that exists but is damaged raises DamagedFileError."""
    path = Path(path)
    if path.suffix == ".pt":
        from e2e_sae.compat.original import read_pt_state_dict

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
    loaded: list[str] = []
    from e2e_sae.splice import sae_key

    wanted = positions if positions is not None else model.sae_positions
    for pos in wanted:
        key = sae_key(pos)
        sub = {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(key + ".")}
        if not sub:
            if strict:
                raise UserError(f"checkpoint {path}: no weights for SAE at '{pos}'")
            continue
        target = model.sae(pos)
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
        stats = {b: torch.zeros_like(own[b]) for b in TRAINING_STAT_BUFFERS
                 if b in own and b not in sub}  # fmt: skip
        target.load_state_dict({**own, **stats, **sub}, strict=False)
        loaded.append(pos)
    return loaded


def build_model(config: Config, device: str | None = None) -> SAETransformer:
    from e2e_sae.models import default_device, load_lm

    device = device or config.device or default_device()
    tlens = load_lm(config, device=device)
    # HookedTransformer re-seeds torch with its cfg.seed; without this every run's SAE init
    # would be the same whatever `seed` the run config sets.
    torch.manual_seed(config.seed)
    s = config.saes
    kwargs: dict[str, Any] = dict(s.architecture_kwargs)
    if s.k is not None:
        kwargs["k"] = s.k
    model = SAETransformer(
        tlens,
        s.sae_positions,
        s.dict_size_to_input_ratio,
        s.init_decoder_orthogonal,
        architecture=s.architecture,
        architecture_kwargs=kwargs,
        transcoders=[(t.input, t.output) for t in s.transcoders],
    )
    # With a device_map the LM is where from_pretrained put it; the SAEs join its embedding.
    return model.to(model.lm.device if config.device_map is not None else device)


def load_run(
    path: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    *,
    config_file: str | Path | None = None,
) -> SAETransformer:
    """Rebuild an `SAETransformer` (in eval mode) from a run directory or one of its checkpoint
    files, ours or the original e2e_sae's.

    `checkpoint`: a file (relative to the run directory, else as given); default: the newest
    intact one, skipping damaged newer files with a warning. `config_file`: instead of the run
    directory's `final_config.yaml`. A relative `tlens_model_path` is looked up in the config's
    folder first."""
    from e2e_sae.compat.original import load_run_config, samples_of

    ckpt: Path | None = None
    if path is None:
        if checkpoint is None and config_file is None:
            raise UserError("load: give a run directory, a checkpoint file or a config file")
        run_dir = Path(checkpoint or config_file or "").expanduser().parent
    else:
        run_dir = Path(path).expanduser()
        if run_dir.is_file():
            if checkpoint is not None:
                raise UserError(f"load: {run_dir} is a checkpoint file; do not also give one")
            run_dir, ckpt = run_dir.parent, run_dir
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        ckpt = run_dir / ckpt if not ckpt.is_absolute() and (run_dir / ckpt).exists() else ckpt
    cfg_path = Path(config_file).expanduser() if config_file is not None else run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        if config_file is not None:
            raise UserError(f"config_file: file not found: {cfg_path}")
        if not run_dir.is_dir():
            raise UserError(f"run directory {run_dir}: not found")
        raise UserError(f"run directory {run_dir}: no {CONFIG_FILE} (is it a training run?)")
    ckpts = [ckpt] if ckpt is not None else list_sae_checkpoints(run_dir)
    if not ckpts:
        raise UserError(
            f"run directory {run_dir}: no samples_<N>.safetensors (or original samples_<N>.pt) "
            "checkpoint"
        )
    config = _local_model_path(load_run_config(cfg_path, samples_of(ckpts[-1])), cfg_path.parent)
    if ckpt is not None:
        state = read_tensors(ckpt)
    else:
        ckpt, state = newest_intact(ckpts, f"run directory {run_dir}")
    model = build_model(config, device=device)
    load_sae_weights(model, ckpt, state=state)
    model.run_config = config
    model.run_dir = run_dir  # e.g. for its eval's feature frequencies
    model.checkpoint_path = ckpt
    # eval mode: e.g. a BatchTopK SAE applies its learned threshold only outside training mode
    return model.eval()


def _local_model_path(config: Config, folder: Path) -> Config:
    """A relative `tlens_model_path` that exists under the config's folder (as `e2e-sae convert`
    writes it) is taken from there; otherwise it stays relative to the working directory."""
    p = config.tlens_model_path
    if p is None or p.is_absolute() or not (folder / p).exists():
        return config
    return config.model_copy(update={"tlens_model_path": folder / p})


def load_pretrained_saes(
    model: SAETransformer, paths: list[Path], retrain: bool | list[str]
) -> set[str]:
    """Load SAEs from checkpoints (files or run dirs, local or hf://, or SAELens folders); returns
    the positions that stay frozen."""
    loaded: list[str] = []
    for p in paths:
        from e2e_sae.interop import is_saelens_dir, load_saelens_into, resolve_path

        p = resolve_path(newest_match(p))  # local path, or hf://user/repo[/path] downloaded
        if is_saelens_dir(p):  # a SAELens SAE folder (cfg.json + sae_weights.safetensors)
            loaded += load_saelens_into(model, p)
            continue
        if p.is_dir():
            ckpts = list_sae_checkpoints(p)
            if not ckpts:
                raise UserError(f"saes.pretrained_sae_paths: {p} holds no checkpoint")
            p, have = newest_intact(ckpts, "saes.pretrained_sae_paths")
        else:
            have = read_tensors(p, "saes.pretrained_sae_paths")
        from e2e_sae.splice import sae_key

        positions = [pos for pos in model.sae_positions
                     if any(k.startswith(sae_key(pos) + ".") for k in have)]  # fmt: skip
        if not positions:
            raise UserError(f"saes.pretrained_sae_paths: {p} has no SAE at {model.sae_positions}")
        try:
            loaded += load_sae_weights(model, p, positions, state=have)
        except UserError as err:  # (a shape that does not fit the config, ...)
            raise UserError(f"saes.pretrained_sae_paths: {err}") from None
    if retrain is True:
        return set()
    if retrain is False:
        return set(loaded)
    trainable = set(filter_names_safe(model, retrain))
    return {p for p in loaded if p not in trainable}


def newest_match(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """A local path with glob characters (`runs/local_*`) -> its newest match by modification time,
    so a fine-tuning config can name an earlier run whose timestamp it does not know."""
    text = os.path.expanduser(str(path))
    if not any(ch in text for ch in "*?[") or os.path.exists(text):
        return path
    matches = glob.glob(text)
    if not matches:
        raise UserError(f"saes.pretrained_sae_paths: nothing matches {path}")
    return Path(max(matches, key=os.path.getmtime))


def filter_names_safe(model: SAETransformer, patterns: list[str]) -> list[str]:
    from e2e_sae.splice import filter_names

    have = model.sae_positions
    for pat in patterns:
        if not any(pat == p or pat in p for p in have):
            raise UserError(f"saes.retrain_saes: '{pat}' names no SAE (SAEs at {', '.join(have)})")
    return filter_names(have, patterns, "saes.retrain_saes")


def tensor_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


__all__ = [
    "CONFIG_FILE",
    "atomic_save_tensors",
    "atomic_write_bytes",
    "build_model",
    "list_checkpoints",
    "list_sae_checkpoints",
    "load_pretrained_saes",
    "load_run",
    "load_sae_weights",
    "newest_intact",
    "read_tensors",
    "save_checkpoint",
    "torch",
    "write_config",
]
