"""SAELens' on-disk format (SAELens >= 6: `cfg.json` + `sae_weights.safetensors`), both directions.

Export. Our SAEs compute `act(x @ W_enc + b_enc) @ W_dec + b_dec` where the rows of W_dec are our
unit-norm dictionary elements and b_dec is never subtracted from the input, so we write those four
tensors (+ `threshold` for JumpReLU, `k` in cfg.json for TopK) with `apply_b_dec_to_input: false`
and `normalize_activations: none`. SAELens' `SAE.load_from_disk(folder)` then encodes and decodes
the same numbers.

Import. SAELens decoders need not have unit-norm rows, while ours are renormalised every forward.
For latent i with decoder norm n_i we scale its encoder row and bias by n_i and divide its decoder
row by n_i. ReLU and JumpReLU (threshold scaled by n_i too) are positively homogeneous, so the
reconstruction is unchanged and the codes are n_i times SAELens'. TopK selects on raw
pre-activations, so scaling them changes which latents win unless the SAE was trained with
`rescale_acts_by_decoder_norm` (then SAELens selects on n_i-scaled values itself) or the norms
are already 1; otherwise import refuses unless `allow_inexact=True`. `apply_b_dec_to_input`
is folded into b_enc (b_enc - b_dec @ W_enc). Folding is done in float64.

Gated SAEs compute the same function in both libraries (gate W_enc, b_gate; magnitude
W_enc * exp(r_mag), b_mag; c = 1[gate > 0] * relu(magnitude)); SAELens stores the gate bias as
`b_gate` instead of `b_enc`. Scaling latent i's W_enc column, b_gate and b_mag by n_i (r_mag
unchanged) scales its code by n_i; b_mag absorbs `apply_b_dec_to_input` as
b_mag - (b_dec @ W_enc) * exp(r_mag).

Skip transcoders are SAELens' `skip_transcoder` (ReLU transcoder + `W_skip` [d_out, d_in] applied
to the raw input), written with `d_out` and `metadata.hook_name_out` also when the SAE sits at a
single hook (then hook_name_out = hook_name). W_skip is copied as is both ways.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from e2e_sae.config import Config, config_to_yaml_dict, load_config
from e2e_sae.errors import UserError, check_output_folder
from e2e_sae.eval.evaluate import check_finite_weights, read_eval, read_feature_frequency
from e2e_sae.interop.hub import CFG_FILE, WEIGHTS_FILE, resolve_path
from e2e_sae.lm.load import resolve_backend
from e2e_sae.lm.sites import hook_layer
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.runs.checkpoint import (
    CONFIG_FILE,
    atomic_save_tensors,
    atomic_write_bytes,
    list_checkpoints,
    newest_intact,
    read_tensors,
    tensor_metadata,
)
from e2e_sae.saes import SAEBase, build_sae, sae_key
from e2e_sae.version import __version__

if TYPE_CHECKING:
    from e2e_sae.lm.runner import LM
    from e2e_sae.lm.splice import SAETransformer

logger = logging.getLogger(__name__)

SPARSITY_FILE = "sparsity.safetensors"
SPARSITY_EPS = 1e-10  # SAELens' eps in log10(feature density + eps)
# The cfg.json layout we write is SAELens 6's (fields at the top, model/hook info in `metadata`).
# SAELens reads `metadata.sae_lens_version` to decide between that and its pre-6 flat layout.
FORMAT_VERSION = "6.0.0"
# Normalisations that are the identity at inference in SAELens' own `load_from_disk`.
_IDENTITY_NORMS = {None, "none", False, "expected_average_only_in"}
# Decoder norms within this of 1 count as unit norm (float32 rounding of a normalised row).
UNIT_NORM_ATOL = 1e-4


# --- helpers -------------------------------------------------------------------------------------
def saelens_version() -> str:
    """`metadata.sae_lens_version` of an export: the installed SAELens' version, the one the export
    was written for and is tested with; without SAELens installed, FORMAT_VERSION (6.0.0, the
    first release whose layout we write)."""
    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return FORMAT_VERSION


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: Any, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"{where}: dtype '{name}' is not a torch dtype (e.g. float32)")
    return dtype


def encoder_linear(sae: SAEBase) -> nn.Linear:
    """The encoder's Linear ([d_sae, d_in] weight), under the original library's name."""
    enc = sae.encoder[0]
    assert isinstance(enc, nn.Linear)
    return enc


def _k_of(sae: SAEBase) -> int:
    k = getattr(sae, "k", None)
    if not isinstance(k, int):
        raise UserError(f"{type(sae).__name__}: no integer `k` to export")
    return k


# --- architectures --------------------------------------------------------------------------------
# SAELens' transcoder flavour of each SAE architecture that has one.
_TRANSCODER_NAMES = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}
_Export = Callable[[SAEBase], tuple[str, dict[str, Tensor], dict[str, Any]]]


def _relu_export(sae: SAEBase) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    return "standard", {}, {}


def _topk_export(sae: SAEBase) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    return "topk", {}, {"k": _k_of(sae), "rescale_acts_by_decoder_norm": False}


def _jumprelu_export(sae: SAEBase) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    # ours: z * 1[z > theta] with theta = exp(log_threshold) > 0; SAELens: relu(z) * 1[z > theta],
    # the same function for theta >= 0.
    threshold = getattr(sae, "threshold", None)
    assert isinstance(threshold, Tensor)
    return "jumprelu", {"threshold": threshold.detach()}, {}


def _batchtopk_export(sae: SAEBase) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    # At inference BatchTopK is a JumpReLU with one global threshold (> 0: it is the running
    # mean of kept, positive values), as SAELens also stores it. Untrained (NaN): per-token TopK.
    threshold = getattr(sae, "threshold", None)
    assert isinstance(threshold, Tensor)
    if torch.isnan(threshold).any():
        return _topk_export(sae)
    return "jumprelu", {"threshold": threshold.detach().expand(sae.n_dict_components)}, {}


def _matryoshka_export(sae: SAEBase) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    # As SAELens saves its MatryoshkaBatchTopK SAEs: the inference JumpReLU of batchtopk, with the
    # training architecture and the prefix widths kept in `metadata`.
    name, tensors, cfg = _batchtopk_export(sae)
    meta = {
        "training_architecture": "matryoshka_batchtopk",
        "matryoshka_widths": list(getattr(sae, "widths", [])),
    }
    return name, tensors, {**cfg, "metadata": meta}


def _gated_export(sae: SAEBase) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    r_mag, b_mag = getattr(sae, "r_mag", None), getattr(sae, "b_mag", None)
    assert isinstance(r_mag, Tensor) and isinstance(b_mag, Tensor)
    return "gated", {"r_mag": r_mag.detach(), "b_mag": b_mag.detach()}, {}


def _skip_transcoder_export(sae: SAEBase) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    w_skip = getattr(sae, "W_skip", None)
    assert isinstance(w_skip, Tensor)
    return "skip_transcoder", {"W_skip": w_skip.detach()}, {}


_EXPORTS: dict[str, _Export] = {
    "relu": _relu_export,
    "topk": _topk_export,
    "jumprelu": _jumprelu_export,
    "batchtopk": _batchtopk_export,
    "matryoshka": _matryoshka_export,
    "gated": _gated_export,
    "skip_transcoder": _skip_transcoder_export,
}
# SAELens architectures that are transcoders (d_out, hook_name_out) even at a single hook.
_ALWAYS_TRANSCODER = {"skip_transcoder"}
# SAELens' name for our encoder bias, where it is not `b_enc` (gated: the gate path's bias).
_ENCODER_BIAS = {"gated": "b_gate"}


@dataclass(frozen=True)
class _Import:
    """How a SAELens architecture becomes one of ours."""

    ours: str
    kwargs: Callable[[dict[str, Any]], dict[str, Any]] = lambda cfg: {}
    exact: Callable[[dict[str, Any], Tensor], bool] = lambda cfg, norms: True
    """(cfg, decoder norms) -> does folding the norms into the encoder keep outputs identical?"""
    extras: Callable[[SAEBase, dict[str, Tensor], Tensor], None] = lambda sae, t, norms: None
    """(our new SAE, SAELens tensors, decoder norms) -> set architecture-specific state."""
    prepare: Callable[[dict[str, Any], dict[str, Tensor]], dict[str, Tensor]] = lambda cfg, t: t
    """(cfg, SAELens tensors in float64) -> the tensors with architecture-specific folds done,
    before the shared ones (decoder norms, `apply_b_dec_to_input` into the encoder bias)."""


def _topk_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    k = cfg.get("k")
    if not isinstance(k, int) or k <= 0:
        raise UserError(f"SAELens cfg.json: topk SAE needs a positive integer 'k' (got {k!r})")
    return {"k": k}


def _topk_exact(cfg: dict[str, Any], norms: Tensor) -> bool:
    unit = bool(((norms - 1).abs() <= UNIT_NORM_ATOL).all())
    return bool(cfg.get("rescale_acts_by_decoder_norm")) or unit


def _jumprelu_extras(sae: SAEBase, tensors: dict[str, Tensor], norms: Tensor) -> None:
    if "threshold" in tensors:
        threshold = tensors["threshold"].double()
    elif "log_threshold" in tensors:
        threshold = tensors["log_threshold"].double().exp()
    else:
        raise UserError("SAELens weights: jumprelu SAE without 'threshold'")
    log_t = getattr(sae, "log_threshold", None)
    assert isinstance(log_t, Tensor)
    # Ours needs theta > 0. SAELens computes relu(z) * 1[z > theta], which for theta <= 0 is
    # relu(z): the same as a tiny positive theta except for z in (0, 1e-30].
    log_t.data.copy_((threshold * norms).clamp_min(1e-30).log().to(log_t.dtype))


def _jumprelu_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    # Only matters when fine-tuning here: the straight-through bandwidth SAELens trained with.
    bw = cfg.get("jumprelu_bandwidth")
    return {"bandwidth": float(bw)} if isinstance(bw, (int, float)) and bw > 0 else {}


def _gated_prepare(cfg: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    W_enc, b_dec = tensors["W_enc"], tensors["b_dec"]
    for key in ("r_mag", "b_mag"):
        if key not in tensors:
            raise UserError(f"SAELens weights: gated SAE without '{key}'")
        if tensors[key].shape != W_enc.shape[1:]:
            raise UserError(
                f"SAELens weights: gated '{key}' has shape {tuple(tensors[key].shape)}, "
                f"expected ({W_enc.shape[-1]},)"
            )
    b_mag = tensors["b_mag"]
    if cfg.get("apply_b_dec_to_input") and b_dec.shape[0] == W_enc.shape[0]:
        b_mag = b_mag - (b_dec @ W_enc) * tensors["r_mag"].exp()
    return {**tensors, "b_mag": b_mag}


def _gated_extras(sae: SAEBase, tensors: dict[str, Tensor], norms: Tensor) -> None:
    r_mag, b_mag = getattr(sae, "r_mag", None), getattr(sae, "b_mag", None)
    assert isinstance(r_mag, Tensor) and isinstance(b_mag, Tensor)
    r_mag.data.copy_(tensors["r_mag"].to(r_mag.dtype))
    b_mag.data.copy_((tensors["b_mag"] * norms).to(b_mag.dtype))


def _skip_transcoder_extras(sae: SAEBase, tensors: dict[str, Tensor], norms: Tensor) -> None:
    w_skip = getattr(sae, "W_skip", None)
    assert isinstance(w_skip, Tensor)
    if "W_skip" not in tensors:
        raise UserError("SAELens weights: skip_transcoder without 'W_skip'")
    if tensors["W_skip"].shape != w_skip.shape:
        raise UserError(
            f"SAELens weights: W_skip has shape {tuple(tensors['W_skip'].shape)}, expected "
            f"(d_out, d_in) = {tuple(w_skip.shape)}"
        )
    # the skip path reads the raw input in SAELens too, so no decoder-norm or b_dec fold applies
    w_skip.data.copy_(tensors["W_skip"].to(w_skip.dtype))


_IMPORTS: dict[str, _Import] = {
    "standard": _Import("relu"),
    "transcoder": _Import("relu"),
    "topk": _Import("topk", _topk_kwargs, _topk_exact),
    "jumprelu": _Import("jumprelu", _jumprelu_kwargs, extras=_jumprelu_extras),
    "jumprelu_transcoder": _Import("jumprelu", _jumprelu_kwargs, extras=_jumprelu_extras),
    "gated": _Import("gated", extras=_gated_extras, prepare=_gated_prepare),
    "skip_transcoder": _Import("skip_transcoder", extras=_skip_transcoder_extras),
}


# --- export ---------------------------------------------------------------------------------------
def saelens_state(sae: SAEBase) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
    """(SAELens architecture, tensors, architecture cfg fields; a "metadata" entry goes into
    cfg.json's `metadata`) of one of our SAEs.

    W_enc [d_in, d_sae], b_enc [d_sae] (gated: b_gate), W_dec [d_sae, d_out] (unit-norm rows),
    b_dec [d_out] (+ threshold, r_mag / b_mag, W_skip [d_out, d_in] per architecture).
    """
    export = _EXPORTS.get(sae.architecture)
    if export is None:
        known = ", ".join(_EXPORTS)
        raise UserError(
            f"SAELens export: architecture '{sae.architecture}' has no SAELens equivalent ({known})"
        )
    name, extra_tensors, extra_cfg = export(sae)
    tensors = {
        "W_enc": encoder_linear(sae).weight.detach().T,
        _ENCODER_BIAS.get(name, "b_enc"): encoder_linear(sae).bias.detach(),
        "W_dec": sae.dict_elements.detach().T,
        "b_dec": sae.decoder.bias.detach(),
        **extra_tensors,
    }
    return name, {k: v.contiguous().cpu() for k, v in tensors.items()}, extra_cfg


def save_saelens(
    sae: SAEBase,
    out_dir: str | Path,
    hook_name: str,
    *,
    hook_name_out: str | None = None,
    model_name: str | None = None,
    metadata: dict[str, Any] | None = None,
    feature_frequency: Tensor | None = None,
) -> Path:
    """Write `sae` as a SAELens folder (`cfg.json`, `sae_weights.safetensors`, and
    `sparsity.safetensors` = log10 firing frequency when `feature_frequency` [d_sae] is given).

    `hook_name` is the hook the SAE reads; `hook_name_out` the one a transcoder writes.
    """

    name, tensors, extra_cfg = saelens_state(sae)
    extra_cfg = dict(extra_cfg)
    arch_meta: dict[str, Any] = extra_cfg.pop("metadata", {})
    transcoder = sae.output_size != sae.input_size or (
        hook_name_out is not None and hook_name_out != hook_name
    )
    if name in _ALWAYS_TRANSCODER:
        transcoder = True
    elif transcoder:
        if name not in _TRANSCODER_NAMES:
            raise UserError(
                f"SAELens export: SAELens has no '{name}' transcoder (only standard, jumprelu)"
            )
        name = _TRANSCODER_NAMES[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Without the model its n_layers is unknown: hooks after the blocks get -1 ("not in a block").
    layer = hook_layer(hook_name, 10**6)
    meta: dict[str, Any] = {
        "sae_lens_version": saelens_version(),
        "sae_lens_training_version": f"e2e_sae-{__version__}",
        "model_name": model_name,
        "model_class_name": "HookedTransformer",
        "hook_name": hook_name,
        "hook_head_index": None,
        **({"hook_name_out": hook_name_out or hook_name} if transcoder else {}),
        **arch_meta,
        **(metadata or {}),
    }
    cfg: dict[str, Any] = {
        "architecture": name,
        "d_in": sae.input_size,
        "d_sae": sae.n_dict_components,
        **({"d_out": sae.output_size} if transcoder else {}),
        "dtype": _dtype_name(tensors["W_enc"].dtype),
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **extra_cfg,
        "metadata": meta,
        # Flat copies for readers of the pre-6 layout (SAEBench configs, Neuronpedia, older tools).
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": layer if layer < 10**6 else -1,
    }
    atomic_save_tensors(tensors, out / WEIGHTS_FILE)
    atomic_write_bytes(out / CFG_FILE, (json.dumps(cfg, indent=2, default=str) + "\n").encode())
    if feature_frequency is not None:
        if feature_frequency.shape != (sae.n_dict_components,):
            raise UserError(
                f"SAELens export: feature_frequency has shape {tuple(feature_frequency.shape)}, "
                f"expected ({sae.n_dict_components},)"
            )
        atomic_save_tensors(
            {"sparsity": log_feature_density(feature_frequency)}, out / SPARSITY_FILE
        )
    return out


def log_feature_density(frequency: Tensor) -> Tensor:
    """SAELens' `sparsity` tensor: log10(firing frequency + 1e-10), float32 (a latent that never
    fired gets -10, as SAELens' trainer writes it)."""
    return torch.log10(frequency.double() + SPARSITY_EPS).float()


def _saes_of_run(
    run_dir: Path, checkpoint: str | Path | None
) -> tuple[Any, list[tuple[str, str, SAEBase]]] | None:
    """(config, [(position, input hook, SAE)]) rebuilt from a checkpoint and its metadata alone,
    without loading the language model (which may need the network). None for transcoder runs,
    whose input hooks may be patterns only the model can resolve."""

    if run_dir.is_file():
        run_dir, checkpoint = run_dir.parent, run_dir
    if not (run_dir / CONFIG_FILE).is_file():
        raise UserError(f"export: {run_dir} has no {CONFIG_FILE} (is it a training run?)")
    config = load_config(run_dir / CONFIG_FILE)
    assert isinstance(config, Config)
    if config.saes.transcoders:
        return None
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        ckpt = ckpt if ckpt.is_absolute() or ckpt.exists() else run_dir / ckpt
        state = read_tensors(ckpt)
    else:
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise UserError(f"export: {run_dir} has no samples_<N>.safetensors checkpoint")
        ckpt, state = newest_intact(ckpts, "export")  # (a damaged newest one: as eval does)
    meta = tensor_metadata(ckpt)
    if "sae_positions" not in meta or "init_kwargs" not in meta:
        return None  # an older checkpoint: rebuild through the model instead
    arch = meta.get("architecture", config.saes.architecture)
    if arch != config.saes.architecture:
        raise UserError(
            f"export: {ckpt} holds {arch} SAEs, but {run_dir / CONFIG_FILE} says "
            f"{config.saes.architecture} (saes.architecture)"
        )
    init_kwargs = json.loads(meta["init_kwargs"])
    out = []
    for pos in json.loads(meta["sae_positions"]):
        key = sae_key(pos) + "."
        sub = {k[len(key) :]: v for k, v in state.items() if k.startswith(key)}
        d_sae, d_in = sub["encoder.0.weight"].shape
        sae = build_sae(
            arch, d_in, d_sae, False, sub["decoder.weight"].shape[0], **init_kwargs.get(pos, {})
        )
        sae.load_state_dict(sub)
        out.append((pos, pos, sae.eval()))
    return config, out


def export_run_saelens(
    run: str | Path | SAETransformer,
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write every SAE of a run (directory, or an `SAETransformer`) as a SAELens folder named
    after the hook it replaces, under `out_dir`. Returns the folders. An `out_dir` that is not
    empty (an earlier export?) is refused unless `overwrite`, which replaces the SAE folders.

    A run directory is read without loading its language model when possible."""

    out = Path(out_dir).expanduser()
    check_output_folder(out, "export: out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"export: out {out} is not empty (an earlier export?); pass --overwrite "
            "to replace its SAE folders"
        )

    run_dir: Path | None = None
    config: Any = None
    saes: list[tuple[str, str, SAEBase]] | None = None
    if isinstance(run, (str, Path)):
        run_dir = Path(run).expanduser()
        if run_dir.is_file():
            run_dir, checkpoint = run_dir.parent, run_dir
        found = _saes_of_run(run_dir, checkpoint)
        if found is not None:
            config, saes = found
        else:
            run = SAETransformer.from_local_path(run_dir, checkpoint=checkpoint, device="cpu")
    if saes is None:
        assert not isinstance(run, (str, Path))
        config = run.run_config
        saes = [(p, run.sites[p].input_hook, run.sae(p)) for p in run.sae_positions]
        if run_dir is None:  # a model from `from_local_path` knows its run directory and checkpoint
            run_dir, checkpoint = run.run_dir, run.checkpoint_path
    meta: dict[str, Any] = {}
    if config is not None:
        model_name = (
            model_name
            or config.tlens_model_name
            or config.hf_model_name
            or (str(config.tlens_model_path) if config.tlens_model_path else None)
        )
        meta = {
            # The activations are the stock HF model's (no weight folding or centring).
            **(
                {"model_class_name": "TransformerBridge"}
                if resolve_backend(config) == "bridge"
                else {}
            ),
            "context_size": config.train_data.n_ctx,
            "dataset_path": config.train_data.dataset_name,
            "e2e_sae_config": config_to_yaml_dict(config),
        }
    for _, _, sae in saes:  # before anything is written
        check_finite_weights(sae, checkpoint or run_dir or "export")
    freqs = _eval_feature_frequency(run_dir, checkpoint)
    for pos, _, _ in saes:
        old = out / pos
        if old.is_dir():
            shutil.rmtree(old)  # (only with overwrite: otherwise `out` is empty)
        elif old.exists():
            old.unlink()
    return [
        save_saelens(
            sae,
            out / pos,
            input_hook,
            hook_name_out=pos if input_hook != pos else None,
            model_name=model_name,
            metadata=meta,
            feature_frequency=freqs.get(pos),
        )
        for pos, input_hook, sae in saes
    ]


def _eval_feature_frequency(
    run_dir: Path | None, checkpoint: str | Path | None
) -> dict[str, Tensor]:
    """The firing frequencies of the run's `eval.json`, {} without one or when it measured another
    checkpoint than the exported one (the file records which; one without that record measured
    the newest checkpoint)."""

    if run_dir is None:
        return {}
    freqs = read_feature_frequency(run_dir)
    if not freqs:
        return {}
    ckpts = list_checkpoints(run_dir)
    evaluated = (read_eval(run_dir) or {}).get("settings", {}).get("checkpoint")
    if evaluated is None and ckpts:
        evaluated = ckpts[-1].name
    exported = (
        Path(checkpoint).name if checkpoint is not None else ckpts[-1].name if ckpts else None
    )
    if exported != evaluated:
        logger.info("export: eval.json measured %s, not %s: no sparsity", evaluated, exported)
        return {}
    return freqs


# --- import ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SAELensInfo:
    """Where a SAELens SAE came from and where it belongs."""

    path: Path
    architecture: str
    """SAELens' name (standard, topk, jumprelu, gated, transcoder, jumprelu_transcoder,
    skip_transcoder)."""
    hook_name: str | None
    """The hook the SAE reads."""
    hook_name_out: str | None
    """For transcoders: the hook whose activation it replaces."""
    model_name: str | None
    cfg: dict[str, Any]
    """cfg.json with `metadata` merged in and pre-6 key names updated."""

    @property
    def position(self) -> str | None:
        """The hook whose activation the SAE replaces when spliced in."""
        return self.hook_name_out or self.hook_name


def read_saelens_cfg(folder: Path) -> dict[str, Any]:
    """cfg.json as one flat dict, accepting the SAELens 6 layout and the older flat one."""
    path = folder / CFG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: no {CFG_FILE} (not a SAELens SAE folder)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON (line {err.lineno})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    meta = raw.get("metadata") or {}
    cfg = {**raw, **{k: v for k, v in meta.items() if v is not None or k not in raw}}
    cfg.pop("metadata", None)
    for old, new in (
        ("hook_point", "hook_name"),
        ("hook_point_out", "hook_name_out"),
        ("hook_point_head_index", "hook_head_index"),
        ("activation_fn_str", "activation_fn"),
    ):
        if old in cfg and cfg.get(new) is None:
            cfg[new] = cfg.pop(old)
    if "architecture" not in cfg:  # pre-6 configs: ReLU unless the activation says TopK
        cfg["architecture"] = "standard"
        if cfg.get("activation_fn") == "topk":
            cfg["architecture"] = "topk"
            cfg["k"] = (cfg.get("activation_fn_kwargs") or {}).get("k")
    return cfg


def _check_supported(cfg: dict[str, Any], where: str) -> None:
    act = cfg.get("activation_fn")
    if cfg["architecture"] == "standard" and act not in (None, "relu"):
        raise UserError(f"{where}: activation_fn '{act}' is not supported (relu only)")
    norm = cfg.get("normalize_activations")
    if norm not in _IDENTITY_NORMS:
        raise UserError(
            f"{where}: normalize_activations '{norm}' is not supported (none or "
            "expected_average_only_in with the factor folded in)"
        )
    per_head = cfg.get("reshape_activations") not in (None, "none")
    if per_head or cfg.get("hook_head_index") is not None:
        raise UserError(f"{where}: per-head (hook_z / hook_head_index) SAEs are not supported")


def sae_from_saelens_tensors(
    cfg: dict[str, Any],
    tensors: dict[str, Tensor],
    *,
    allow_inexact: bool = False,
    where: str = "SAELens SAE",
) -> SAEBase:
    """Build our SAE from SAELens tensors and a flat cfg (see `read_saelens_cfg`), folding the
    decoder norms into the encoder so the reconstruction is unchanged (see the module docstring)."""
    _check_supported(cfg, where)
    arch = _IMPORTS.get(str(cfg["architecture"]))
    if arch is None:
        known = ", ".join(_IMPORTS)
        raise UserError(
            f"{where}: SAELens architecture '{cfg['architecture']}' is not supported ({known})"
        )
    bias = _ENCODER_BIAS.get(str(cfg["architecture"]), "b_enc")
    for key in ("W_enc", bias, "W_dec", "b_dec"):
        if key not in tensors:
            raise UserError(f"{where}: weights lack '{key}'")
    tensors = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = arch.prepare(cfg, tensors)
    W_enc, b_enc = tensors["W_enc"], tensors[bias]
    W_dec, b_dec = tensors["W_dec"], tensors["b_dec"]
    d_in, d_sae = W_enc.shape
    d_out = W_dec.shape[1]
    if W_dec.shape[0] != d_sae or b_enc.shape != (d_sae,) or b_dec.shape != (d_out,):
        raise UserError(
            f"{where}: inconsistent shapes W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
            f"W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)}"
        )
    for field, size in (("d_in", d_in), ("d_sae", d_sae)):
        if cfg.get(field) is not None and int(cfg[field]) != size:
            raise UserError(f"{where}: cfg {field}={cfg[field]} but the weights have {size}")
    if cfg.get("apply_b_dec_to_input"):
        if d_out != d_in:
            raise UserError(f"{where}: apply_b_dec_to_input needs d_out == d_in")
        b_enc = b_enc - b_dec @ W_enc
    scale = tensors.get("finetuning_scaling_factor", tensors.get("scaling_factor"))
    if scale is not None:
        W_dec = W_dec * scale.double()[:, None]  # SAELens scales the codes before decoding
    norms = W_dec.norm(dim=1)
    if not arch.exact(cfg, norms):
        if not allow_inexact:
            raise UserError(
                f"{where}: {cfg['architecture']} SAE with decoder norms in "
                f"[{float(norms.min()):.3g}, {float(norms.max()):.3g}] and no "
                "rescale_acts_by_decoder_norm cannot be loaded exactly with unit-norm decoder "
                "columns (pass allow_inexact=True to select top-k on norm-scaled activations)"
            )
        logger.warning("%s: top-k now selects on norm-scaled pre-activations", where)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    sae = build_sae(
        arch.ours,
        d_in,
        d_sae,
        init_decoder_orthogonal=False,
        output_size=d_out,
        **arch.kwargs(cfg),
    )
    dtype = _parse_dtype(cfg.get("dtype", "float32"), where)
    with torch.no_grad():
        encoder_linear(sae).weight.copy_((W_enc * norms).T)
        encoder_linear(sae).bias.copy_(b_enc * norms)
        sae.decoder.weight.copy_((W_dec / safe[:, None]).T)
        sae.decoder.bias.copy_(b_dec)
        arch.extras(sae, tensors, norms)
    return sae.to(dtype)


def load_saelens_sae(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_inexact: bool = False,
) -> tuple[SAEBase, SAELensInfo]:
    """Load a SAELens SAE folder (local or `hf://user/repo/folder`) as one of our SAEs."""
    return read_saelens_folder(
        resolve_path(path), str(path), device=device, dtype=dtype, allow_inexact=allow_inexact
    )


def read_saelens_folder(
    folder: Path,
    path: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_inexact: bool = False,
) -> tuple[SAEBase, SAELensInfo]:
    """`load_saelens_sae` of a local folder (`path`: how the user named it, for messages)."""
    if not folder.is_dir():
        raise UserError(f"{path}: not a folder (expected {CFG_FILE} + {WEIGHTS_FILE})")
    cfg = read_saelens_cfg(folder)
    tensors = read_tensors(folder / WEIGHTS_FILE, "SAELens weights")
    sae = sae_from_saelens_tensors(cfg, tensors, allow_inexact=allow_inexact, where=str(folder))
    if dtype is not None:
        sae = sae.to(_parse_dtype(dtype, str(path)) if isinstance(dtype, str) else dtype)
    if device is not None:
        sae = sae.to(device)
    info = SAELensInfo(
        path=folder,
        architecture=str(cfg["architecture"]),
        hook_name=cfg.get("hook_name"),
        hook_name_out=cfg.get("hook_name_out"),
        model_name=cfg.get("model_name"),
        cfg=cfg,
    )
    return sae, info


def saelens_transformer(
    tlens_model: LM,
    paths: Sequence[str | os.PathLike[str]],
    *,
    device: str | torch.device | None = None,
    allow_inexact: bool = False,
) -> SAETransformer:
    """An `SAETransformer` (in eval mode) with SAELens SAEs (folders or `hf://` URIs) spliced in
    at the hooks their cfg.json names (transcoders read `hook_name` and replace `hook_name_out`).
    Exported as `e2e_sae.interop.saelens_transformer`."""

    if not paths:
        raise UserError("saelens_transformer: give at least one SAELens folder")
    loaded = [load_saelens_sae(p, allow_inexact=allow_inexact) for p in paths]
    plain: list[str] = []
    transcoders: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _, info in loaded:
        if info.hook_name is None or info.position is None:
            raise UserError(f"{info.path}/{CFG_FILE}: no hook_name, so it cannot be spliced in")
        if info.position in seen:
            raise UserError(f"saelens_transformer: two SAEs replace '{info.position}'")
        seen.add(info.position)
        if info.hook_name_out and info.hook_name_out != info.hook_name:
            transcoders.append((info.hook_name, info.hook_name_out))
        else:
            plain.append(info.hook_name)
    for name in [*plain, *[h for t in transcoders for h in t]]:
        if name not in tlens_model.hook_dict:
            raise UserError(f"saelens_transformer: the model has no hook '{name}'")
    # Build with placeholder SAEs (cheap), then swap in the loaded ones after checking sizes.
    model = SAETransformer(tlens_model, plain, 1.0, False, transcoders=transcoders)
    archs = {sae.architecture for sae, _ in loaded}
    model.architecture = archs.pop() if len(archs) == 1 else "mixed"
    for sae, info in loaded:
        pos = info.position
        assert pos is not None
        placeholder = model.sae(pos)
        if (placeholder.input_size, placeholder.output_size) != (sae.input_size, sae.output_size):
            raise UserError(
                f"{info.path}: SAE maps {sae.input_size} -> {sae.output_size} but the model's "
                f"hooks give {placeholder.input_size} -> {placeholder.output_size}"
            )
        model.saes[sae_key(pos)] = sae
    target = device or tlens_model.cfg.device
    return (model.to(target) if target is not None else model).eval()


def load_saelens_into(model: SAETransformer, path: str | os.PathLike[str]) -> list[str]:
    """Copy a SAELens SAE (local folder or `hf://` URI) into the matching SAE of `model`.

    Returns the position loaded. The config must build the same architecture and sizes.
    """
    return copy_saelens_folder_into(model, resolve_path(path))


def copy_saelens_folder_into(model: SAETransformer, path: Path) -> list[str]:
    """`load_saelens_into` for a local folder (`saes.pretrained_sae_paths`, resolved already)."""
    sae, info = read_saelens_folder(path, str(path))
    field = "saes.pretrained_sae_paths"
    pos = info.position
    if pos not in model.sae_positions:
        raise UserError(f"{field}: {path} is an SAE for '{pos}', not one of {model.sae_positions}")
    target = model.sae(pos)
    if target.architecture != sae.architecture:
        raise UserError(
            f"{field}: {path} is a '{sae.architecture}' SAE but saes.architecture is "
            f"'{target.architecture}'"
        )
    if (target.input_size, target.n_dict_components, target.output_size) != (
        sae.input_size,
        sae.n_dict_components,
        sae.output_size,
    ):
        ratio = sae.n_dict_components / sae.input_size
        raise UserError(
            f"{field}: {path} has d_sae={sae.n_dict_components} (dict_size_to_input_ratio "
            f"{ratio:g}) but the config builds {target.n_dict_components}"
        )
    k_ours, k_theirs = getattr(target, "k", None), getattr(sae, "k", None)
    if k_ours != k_theirs:
        raise UserError(f"saes.k: {path} was trained with k={k_theirs}, the config has {k_ours}")
    own = target.state_dict()
    new = {k: v for k, v in sae.state_dict().items() if k in own and k != "tokens_since_fired"}
    target.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in new.items()}})
    return [pos]
