"""Pretrained SAEs: those named in a config (`saes.pretrained_sae_paths`: our checkpoints and run
directories, the original's `.pt` files, SAELens folders, local or `hf://`), and the paper's own
GPT-2 small SAEs by name (`PAPER_SAES`, `load_paper_sae`, `write_paper_run`)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from e2e_sae.config import Config
from e2e_sae.errors import UserError
from e2e_sae.interop.hub import is_saelens_dir, resolve_path
from e2e_sae.interop.saelens import copy_saelens_folder_into, saelens_transformer
from e2e_sae.lm.load import load_pretrained
from e2e_sae.lm.sites import filter_names
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.runs.checkpoint import (
    list_sae_checkpoints,
    load_sae_weights,
    new_run_dir,
    newest_intact,
    read_tensors,
    save_relu_run,
)
from e2e_sae.runs.original import load_run_config, read_pt_state_dict
from e2e_sae.saes import sae_key


def load_pretrained_saes(
    model: SAETransformer, paths: list[Path], retrain: bool | list[str]
) -> set[str]:
    """Load SAEs from checkpoints (files or run dirs, local or hf://, or SAELens folders); returns
    the positions that stay frozen."""
    loaded: list[str] = []
    for p in paths:
        p = newest_match(p)  # (a glob: its newest match)
        p = resolve_path(p)  # local path, or hf://user/repo[/path] downloaded
        if is_saelens_dir(p):  # a SAELens SAE folder (cfg.json + sae_weights.safetensors)
            loaded += copy_saelens_folder_into(model, p)
            continue
        if p.is_dir():
            ckpts = list_sae_checkpoints(p)
            if not ckpts:
                raise UserError(f"saes.pretrained_sae_paths: {p} holds no checkpoint")
            p, have = newest_intact(ckpts, "saes.pretrained_sae_paths")
        else:
            have = read_tensors(p, "saes.pretrained_sae_paths")
        positions = [
            pos
            for pos in model.sae_positions
            if any(k.startswith(sae_key(pos) + ".") for k in have)
        ]
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
    have = model.sae_positions
    for pat in patterns:
        if not any(pat == p or pat in p for p in have):
            raise UserError(f"saes.retrain_saes: '{pat}' names no SAE (SAEs at {', '.join(have)})")
    return filter_names(have, patterns, "saes.retrain_saes")


# --- the paper's SAEs by name ---------------------------------------------------------------------
# Braun et al. 2024 published their GPT-2 small SAEs (layers 2, 6, 10, `hook_resid_pre`) in two
# places: the Hugging Face repo below, one `<name>.pt` + `<name>.yaml` pair per SAE (the `.pt` a
# torch.save of {encoder.weight [d_sae, d_in], encoder.bias, decoder.weight [d_in, d_sae] (the
# unit-norm dictionary), decoder.bias}, the `.yaml` the run's final_config.yaml of the original
# library); and SAELens' registry, releases `gpt2-small-res_<code>-ajt` in the repos
# `neuronpedia/gpt2-small__res_<code>-ajt`, one SAELens folder `<layer>-res_<code>-ajt` per layer.
# <code>: s = similar, then c(E) / l(0), then l(ocal) / e(2e) / efr (e2e + "future
# reconstruction", the original's early name for the downstream loss).
PAPER_HF_REPO = "apollo-research/e2e-saes-gpt2"
PAPER_LAYERS = (2, 6, 10)
_HF_KINDS = {"local": "local", "e2e": "e2e", "downstream": "e2e+ds"}
_SAELENS_KIND = {"local": "l", "e2e": "e", "e2e+ds": "efr"}
_PARAMS = {  # the .pt's keys -> ours (our SAE keeps the original's parameter names)
    "encoder.weight": "encoder.0.weight",
    "encoder.bias": "encoder.0.bias",
    "decoder.weight": "decoder.weight",
    "decoder.bias": "decoder.bias",
}


@dataclass(frozen=True)
class PaperSAE:
    """One of the paper's GPT-2 small SAEs."""

    name: str
    """The Hugging Face file stem, e.g. `e2e_similar_ce_layer_6`."""
    sae_type: str
    """local, e2e or e2e+ds."""
    matched: str
    """`CE` (Table 2: runs at similar CE-loss increase) or `L0` (Table 3: similar L0)."""
    layer: int

    @property
    def position(self) -> str:
        return f"blocks.{self.layer}.hook_resid_pre"

    @property
    def hf_files(self) -> tuple[str, str]:
        return f"{self.name}.pt", f"{self.name}.yaml"

    @property
    def saelens_code(self) -> str:
        return f"s{'c' if self.matched == 'CE' else 'l'}{_SAELENS_KIND[self.sae_type]}"

    @property
    def saelens_release(self) -> str:
        return f"gpt2-small-res_{self.saelens_code}-ajt"

    @property
    def saelens_uri(self) -> str:
        """The SAELens folder as an `hf://` URI (`interop.hub`)."""
        code = self.saelens_code
        return f"hf://neuronpedia/gpt2-small__res_{code}-ajt/{self.layer}-res_{code}-ajt"


PAPER_SAES: dict[str, PaperSAE] = {
    f"{kind}_similar_{m.lower()}_layer_{layer}": PaperSAE(
        f"{kind}_similar_{m.lower()}_layer_{layer}", ours, m, layer
    )
    for m in ("CE", "L0")
    for kind, ours in _HF_KINDS.items()
    for layer in PAPER_LAYERS
}


def paper_sae(name: str) -> PaperSAE:
    """A paper SAE by its Hugging Face name (`e2e_similar_ce_layer_6`) or its SAELens release and
    id (`gpt2-small-res_sce-ajt/blocks.6.hook_resid_pre`); "did you mean" for a near miss."""
    if name in PAPER_SAES:
        return PAPER_SAES[name]
    for s in PAPER_SAES.values():
        if name in (f"{s.saelens_release}/{s.position}", f"{s.saelens_release}:{s.position}"):
            return s
    import difflib

    close = difflib.get_close_matches(name, list(PAPER_SAES), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else " (`e2e-sae pretrained` lists them)"
    raise UserError(f"pretrained: unknown SAE '{name}'{hint}")


def hf_hub_download(**kwargs: Any) -> str:
    """`huggingface_hub.hf_hub_download`, as a module attribute tests can point at a folder."""
    from huggingface_hub import hf_hub_download as download

    return download(**kwargs)


def download_paper_sae(
    name: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """(weights `.pt`, config `.yaml`) of a paper SAE from `PAPER_HF_REPO`, through the Hugging
    Face cache (`HF_HUB_OFFLINE` and tokens apply). Network errors are one-line UserErrors."""
    sae = paper_sae(name)
    paths = []
    for filename in sae.hf_files:
        try:
            got = hf_hub_download(
                repo_id=PAPER_HF_REPO,
                filename=filename,
                revision=revision,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
            )
        except Exception as err:  # noqa: BLE001  (hub/network/offline errors -> one line)
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(
                f"pretrained: cannot download {filename} from {PAPER_HF_REPO} ({first})"
            ) from None
        paths.append(Path(got))
    return paths[0], paths[1]


def paper_sae_state(pt: Path, position: str) -> dict[str, Tensor]:
    """The `.pt` of a paper SAE as our checkpoint tensors for the SAE at `position` (read with
    weights_only=True; keys renamed, firing statistics zero)."""
    raw = read_pt_state_dict(pt, "pretrained")
    if set(raw) != set(_PARAMS):
        raise UserError(
            f"pretrained: {pt} holds {sorted(raw)}, expected {sorted(_PARAMS)} (the paper's layout)"
        )
    d_sae, d_in = raw["encoder.weight"].shape
    if tuple(raw["decoder.weight"].shape) != (d_in, d_sae):
        raise UserError(f"pretrained: {pt}: decoder.weight is {tuple(raw['decoder.weight'].shape)}")
    key = sae_key(position)
    state = {f"{key}.{ours}": raw[theirs].detach().float() for theirs, ours in _PARAMS.items()}
    state[f"{key}.tokens_since_fired"] = torch.zeros(d_sae, dtype=torch.long)
    return state


def _paper_config(name: str, yaml_path: Path, state: dict[str, Tensor]) -> Config:
    sae = paper_sae(name)
    config = load_run_config(yaml_path)
    positions = config.saes.sae_positions
    if not any(p == sae.position or p in sae.position for p in positions):
        raise UserError(f"pretrained: {yaml_path} trains SAEs at {positions}, not {sae.position}")
    d_sae, d_in = state[f"{sae_key(sae.position)}.encoder.0.weight"].shape
    if int(d_in * config.saes.dict_size_to_input_ratio) != d_sae:
        raise UserError(
            f"pretrained: {name}: {d_sae} latents for d_in {d_in}, but its config says "
            f"dict_size_to_input_ratio {config.saes.dict_size_to_input_ratio}"
        )
    return config.model_copy(
        update={"saes": config.saes.model_copy(update={"sae_positions": [sae.position]})}
    )


def write_paper_run(
    name: str,
    out: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Download a paper SAE from the Hugging Face repo and write it as a run directory of ours
    (`final_config.yaml` + `samples_<N>.safetensors`), which `eval`, `plot`, `paper-figures`,
    `browse` and `SAETransformer.from_local_path` read. `out` appears complete or not at all."""
    sae = paper_sae(name)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"pretrained: output {out} already exists and is not empty")
    pt, yaml_path = download_paper_sae(sae.name, revision, cache_dir)
    state = paper_sae_state(pt, sae.position)
    config = _paper_config(sae.name, yaml_path, state)
    with new_run_dir(out) as tmp:
        source = f"hf://{PAPER_HF_REPO}/{pt.name}"
        save_relu_run(tmp, state, [sae.position], config.n_samples or 0, config, source)
    return out


def load_paper_sae(
    name: str,
    *,
    source: str = "hf",
    device: str | None = None,
    revision: str | None = None,
) -> SAETransformer:
    """A paper SAE spliced into GPT-2 small, by name (see `paper_sae`): an `SAETransformer`
    in eval mode, as `SAETransformer.from_local_path` returns for a run.

    `source="hf"`: the `.pt` + `.yaml` pair from `PAPER_HF_REPO` (the model gets the run's
    config, so evaluation uses its data); `source="saelens"`: the same SAE's SAELens folder from
    its registry release (no run config). Both need the network (or the Hugging Face cache) for
    the SAE and for GPT-2."""
    sae = paper_sae(name)
    if source == "saelens":
        lm = load_pretrained("gpt2", device=device)
        model = saelens_transformer(lm, [sae.saelens_uri], device=device)
        return model.eval()
    if source != "hf":
        raise UserError(f"pretrained: source '{source}' is not one of hf, saelens")
    pt, yaml_path = download_paper_sae(sae.name, revision)
    state = paper_sae_state(pt, sae.position)
    config = _paper_config(sae.name, yaml_path, state)
    model = SAETransformer.from_config(config, device=device)
    load_sae_weights(model, pt, state=state)
    model.run_config = config
    model.checkpoint_path = pt
    return model.eval()
