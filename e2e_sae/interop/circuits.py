"""circuit-tracer's on-disk formats (Ameisen et al. 2025; `circuit-tracer` 0.5): a run's transcoder
set or cross-layer transcoder, written so that circuit-tracer's own loaders read it, and the LM
beside it so that its `ReplacementModel` can be built without the Hub.

Transcoder set (`model_kind: transcoder_set`): `layer_<l>.safetensors` per layer with `W_enc`
[d_sae, d_in], `b_enc`, `W_dec` [d_sae, d_out], `b_dec` (+ `W_skip` [d_out, d_in],
`activation_function.threshold` [d_sae]); `config.yaml` lists them (`transcoders`, absolute paths,
which `circuit_tracer.utils.hf_utils.load_transcoders` reads as local files) with
`feature_input_hook` / `feature_output_hook` (block-relative TransformerLens names) and `scan`.
Cross-layer transcoder (`model_kind: cross_layer_transcoder`): `W_enc_<l>.safetensors`
(`W_enc_<l>`, `b_enc_<l>`, `b_dec_<l>`, `threshold_<l>`) and `W_dec_<l>.safetensors` (`W_dec_<l>`
[d_sae, n_layers - l, d_out]) per layer, read by circuit-tracer's
`transcoder.cross_layer_transcoder.load_clt`.

Folding. circuit-tracer computes act(x W_enc^T + b_enc) W_dec + b_dec (+ x W_skip^T; a CLT's
reconstruction at layer t sums W_dec_s[:, t - s] over the layers s <= t): we write our encoder as
it is, and as W_dec the dictionary elements as ours decode with them (the raw decoder columns
normalised, `SAEBase` / `CrossLayerTranscoder.decoder_weights`; a CLT's per target layer). Our
dictionaries read the hook as it is (no input normalisation or b_dec subtraction to fold). Our
relu is circuit-tracer's relu, our jumprelu (z * 1[z > theta]) its JumpReLU with theta, and a
BatchTopK dictionary at inference (z * 1[z > theta] with one learned theta) its JumpReLU with
theta for every latent. TopK (a per-token selection), gated and Matryoshka dictionaries have no
circuit-tracer equivalent, nor have SAEs at single hooks or transcoders that do not cover every
layer with the same hooks: their export is refused, naming the run.

`lm/` (unless `with_lm=False`): the LM as we run it (`model.safetensors`: its parameters under
TransformerLens names; `hooked_transformer_config.json`; `tokenizer/`), because circuit-tracer's
`from_pretrained` loads a hub model without TransformerLens' weight processing, which moves the
MLP outputs our dictionaries were trained on. `circuit_tracer_worker.py` (run in circuit-tracer's
own environment) builds the `ReplacementModel` from it and attribution graphs.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from e2e_sae.config import Config
from e2e_sae.data import eval_batches
from e2e_sae.errors import UserError, check_output_folder
from e2e_sae.eval.evaluate import check_finite_weights, eval_dataset
from e2e_sae.lm.sites import SpliceSite
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.runs.checkpoint import atomic_save_tensors, atomic_write_bytes
from e2e_sae.saes import BatchTopKSAE, CrossLayerTranscoder, JumpReLUSAE, SAEBase

logger = logging.getLogger(__name__)

CONFIG_YAML = "config.yaml"
LM_DIR = "lm"
LM_WEIGHTS = "model.safetensors"
LM_CONFIG = "hooked_transformer_config.json"
TOKENIZER_DIR = "tokenizer"
WORKER = Path(__file__).with_name("circuit_tracer_worker.py")
"""The script run in circuit-tracer's environment (it imports nothing of ours)."""
_EXPORTABLE = ("relu", "jumprelu", "batchtopk", "skip_transcoder", "clt")


@dataclass(frozen=True)
class Layout:
    """What circuit-tracer sees of a run: the layers (0..n_layers-1), the block-relative input and
    output hooks, and whether it is one cross-layer transcoder."""

    positions: list[str]
    input_hook: str
    output_hook: str
    cross_layer: bool


def circuit_tracer_layout(model: SAETransformer, where: object = "export") -> Layout:
    """The run as circuit-tracer represents it, or a one-line UserError naming `where` and what
    it cannot represent."""
    sites = [model.sites[p] for p in model.sae_positions]
    singles = [s.output_hook for s in sites if not s.is_transcoder]
    if singles:
        raise UserError(
            f"{where}: circuit-tracer replaces MLP outputs by transcoders, but the run has SAEs "
            f"at single hooks ({singles[0]}; saes.sae_positions)"
        )
    arch = model.architecture
    if arch not in _EXPORTABLE:
        why = {
            "topk": "a per-token top-k has no circuit-tracer activation (relu, jumprelu)",
            "matryoshka": "its nested prefixes have no circuit-tracer equivalent",
            "gated": "a gated encoder has no circuit-tracer equivalent",
        }.get(arch, "circuit-tracer knows relu and jumprelu transcoders")
        raise UserError(
            f"{where}: architecture {arch} cannot be exported to circuit-tracer ({why})"
        )
    n = model.n_layers
    suffixes = [_block_relative(s, model) for s in sites]
    layers = [lay for lay, _, _ in suffixes]
    if layers != list(range(n)):
        raise UserError(
            f"{where}: circuit-tracer needs a transcoder for every layer 0..{n - 1} of the model "
            f"(saes.transcoder_set.layers: all); the run has layers {layers}"
        )
    if len({(i, o) for _, i, o in suffixes}) != 1:
        raise UserError(
            f"{where}: circuit-tracer reads one hook and writes one hook in every block; the run's "
            f"transcoders use several ({sorted({(i, o) for _, i, o in suffixes})})"
        )
    for p in model.sae_positions:
        sae = model.sae(p)
        if isinstance(sae, CrossLayerTranscoder) and sae.activation == "topk":
            raise UserError(
                f"{where}: a topk cross-layer transcoder cannot be exported to circuit-tracer "
                "(its CLT loader knows relu and jumprelu)"
            )
        if isinstance(sae, BatchTopKSAE) and bool(torch.isnan(sae.threshold)):
            raise UserError(
                f"{where}: the batchtopk transcoder at {p} has no learned threshold yet (it never "
                "trained), so it is a per-token top-k, which circuit-tracer cannot represent"
            )
    _, inp, out = suffixes[0]
    return Layout(list(model.sae_positions), inp, out, model.sae(sites[0].output_hook).cross_layer)


def _block_relative(site: SpliceSite, model: SAETransformer) -> tuple[int, str, str]:
    """(block, input hook, output hook) with the hooks relative to the block; a hook outside a
    block is a UserError."""
    parts = []
    for hook in (site.input_hook, site.output_hook):
        head, _, rest = hook.partition(".")
        layer, _, name = rest.partition(".")
        if head != "blocks" or not layer.isdigit() or not name:
            raise UserError(
                f"export: circuit-tracer's transcoders read and write hooks inside a block; "
                f"'{hook}' is not one"
            )
        parts.append((int(layer), name))
    (li, i), (lo, o) = parts
    if li != lo:
        raise UserError(
            f"export: circuit-tracer's transcoders read and write in one block; "
            f"{site.input_hook} -> {site.output_hook} spans two"
        )
    return li, i, o


def _threshold(sae: SAEBase) -> Tensor | None:
    """The jumprelu threshold circuit-tracer applies ([d_sae]), None for relu."""
    if isinstance(sae, CrossLayerTranscoder):
        return sae.threshold.detach() if sae.activation == "jumprelu" else None
    if isinstance(sae, JumpReLUSAE):
        return sae.threshold.detach()
    if isinstance(sae, BatchTopKSAE):
        return sae.threshold.detach().expand(sae.n_dict_components).clone()
    return None


def _encoder(sae: SAEBase) -> nn.Linear:
    enc = sae.encoder[0]
    assert isinstance(enc, nn.Linear)
    return enc


def transcoder_tensors(sae: SAEBase) -> dict[str, Tensor]:
    """One transcoder of a set in circuit-tracer's layout (`SingleLayerTranscoder`)."""
    enc = _encoder(sae)
    out = {
        "W_enc": enc.weight.detach(),
        "b_enc": enc.bias.detach(),
        "W_dec": sae.dict_elements.detach().T,
        "b_dec": sae.decoder.bias.detach(),
    }
    if sae.W_skip is not None:
        out["W_skip"] = sae.W_skip.detach()
    threshold = _threshold(sae)
    if threshold is not None:
        out["activation_function.threshold"] = threshold
    return {k: v.float().contiguous().cpu() for k, v in out.items()}


def clt_tensors(sae: CrossLayerTranscoder, layer: int) -> tuple[dict[str, Tensor], Tensor]:
    """Layer `layer` of a CLT in circuit-tracer's layout: the encoder file's tensors and W_dec
    [d_sae, n_targets, d_out]."""
    enc = _encoder(sae)
    out = {
        f"W_enc_{layer}": enc.weight.detach(),
        f"b_enc_{layer}": enc.bias.detach(),
        f"b_dec_{layer}": sae.decoder.bias.detach(),
    }
    threshold = _threshold(sae)
    if threshold is not None:
        out[f"threshold_{layer}"] = threshold
    w_dec = sae.target_decoders().detach().permute(2, 0, 1)  # [d_sae, n_targets, d_out]
    enc_file = {k: v.float().contiguous().cpu() for k, v in out.items()}
    return enc_file, w_dec.float().contiguous().cpu()


def export_circuit_tracer(
    model: SAETransformer,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    with_lm: bool = True,
    scan: str | None = None,
    where: object = "export",
) -> Path:
    """Write `model`'s transcoder set or CLT in circuit-tracer's format into `out_dir` (module
    doc). Everything is checked before anything is written; a non-empty `out_dir` needs
    `overwrite` (its circuit-tracer files are then replaced)."""
    layout = circuit_tracer_layout(model, where)
    check_finite_weights(model.saes, where)
    out = Path(out_dir).expanduser()
    check_output_folder(out, "export: out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"export: out {out} is not empty (an earlier export?); pass --overwrite to replace it"
        )
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    for old in [*out.glob("*.safetensors"), out / CONFIG_YAML]:
        old.unlink(missing_ok=True)  # (only with overwrite: otherwise `out` is empty)
    cfg: dict[str, Any] = {
        "model_kind": "cross_layer_transcoder" if layout.cross_layer else "transcoder_set",
        "feature_input_hook": layout.input_hook,
        "feature_output_hook": layout.output_hook,
        "scan": scan or f"e2e_sae/{model.run_dir.name if model.run_dir else 'model'}",
    }
    if layout.cross_layer:
        for layer, pos in enumerate(layout.positions):
            sae = model.sae(pos)
            assert isinstance(sae, CrossLayerTranscoder)
            enc_file, w_dec = clt_tensors(sae, layer)
            atomic_save_tensors(enc_file, out / f"W_enc_{layer}.safetensors")
            atomic_save_tensors({f"W_dec_{layer}": w_dec}, out / f"W_dec_{layer}.safetensors")
    else:
        paths = []
        for layer, pos in enumerate(layout.positions):
            path = out / f"layer_{layer}.safetensors"
            atomic_save_tensors(transcoder_tensors(model.sae(pos)), path)
            paths.append(str(path))
        cfg["transcoders"] = paths
    config = model.run_config
    cfg["e2e_sae"] = {  # ours (circuit-tracer reads only the keys above)
        "run_dir": str(model.run_dir) if model.run_dir else None,
        "checkpoint": model.checkpoint_path.name if model.checkpoint_path else None,
        "architecture": model.architecture,
        "model": (config.tlens_model_name or config.hf_model_name) if config else None,
        "lm": LM_DIR if with_lm else None,
    }
    text = yaml.safe_dump(cfg, sort_keys=False)
    atomic_write_bytes(out / CONFIG_YAML, text.encode())
    if with_lm:
        write_lm(model, out / LM_DIR)
    return out


def write_lm(model: SAETransformer, out: Path) -> Path:
    """The LM as we run it, for circuit-tracer's `ReplacementModel.from_config`: its parameters
    (TransformerLens names), its HookedTransformerConfig (JSON-able fields) and its tokenizer."""
    if model.backend != "hooked":
        raise UserError(
            "export: circuit-tracer's replacement model is a HookedTransformer; this run's LM "
            f"runs on backend {model.backend} (export it with --no-lm and load the model there)"
        )
    out.mkdir(parents=True, exist_ok=True)
    tl = model.tlens_model
    params = {n: p.detach().float().contiguous().cpu() for n, p in tl.named_parameters()}
    atomic_save_tensors(params, out / LM_WEIGHTS)
    fields: dict[str, Any] = {}
    for k, v in tl.cfg.to_dict().items():
        if k in ("device", "dtype", "tokenizer_name", "n_devices"):
            continue
        if v is None or isinstance(v, (bool, int, float, str)):
            if isinstance(v, float) and not math.isfinite(v):
                continue
            fields[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str)) for x in v):
            fields[k] = list(v)
    atomic_write_bytes(out / LM_CONFIG, (json.dumps(fields, indent=2) + "\n").encode())
    tok_dir = out / TOKENIZER_DIR
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tok = model.lm.tokenizer
    if tok is None:  # (a random-weight model): circuit-tracer's attribution will need one
        logger.warning("export: the LM has no tokenizer; none is written to %s", tok_dir)
    else:
        tok.save_pretrained(str(tok_dir))
        _older_tokenizer_class(tok_dir / "tokenizer_config.json")
    return out


def _older_tokenizer_class(path: Path) -> None:
    """transformers 5 names a plain fast tokenizer `TokenizersBackend`, a class circuit-tracer's
    transformers (<= 4.57) lacks; both read the same files as `PreTrainedTokenizerFast`."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        atomic_write_bytes(path, (json.dumps(cfg, indent=2) + "\n").encode())


def export_run_circuit_tracer(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    overwrite: bool = False,
    with_lm: bool = True,
) -> Path:
    """`e2e-sae export RUN --format circuit-tracer OUT`: load the run (its LM too: the hooks and
    the LM files need it) and write it (`export_circuit_tracer`)."""
    run = Path(run_dir).expanduser()
    model = SAETransformer.from_local_path(run, checkpoint=checkpoint, device="cpu")
    return export_circuit_tracer(model, out_dir, overwrite=overwrite, with_lm=with_lm, where=run)


def check_acts(
    model: SAETransformer, tokens: Tensor, with_logits: bool = True
) -> dict[str, Tensor]:
    """What `circuit_tracer_worker.py check` compares an export of `model` with: per layer l of
    its transcoders, on the clean activations of `tokens`, what it reads (`input_<l>`), its code
    (`c_<l>`) and its reconstruction (`output_<l>`, a CLT's summed over the earlier layers),
    flattened over tokens; with `with_logits` the tokens and the clean logits too (the
    replacement model's clean pass must give them)."""
    from e2e_sae.lm.sites import run_sites

    sites = {p: model.sites[p] for p in model.sae_positions}
    with torch.no_grad():
        logits, clean = model.forward_raw(
            tokens, cache_positions=[s.input_hook for s in sites.values()]
        )
        acts = run_sites(sites, {p: model.sae(p) for p in sites}, clean)
    out: dict[str, Tensor] = {}
    for layer, pos in enumerate(model.sae_positions):
        a = acts[pos]
        for key, v in (("input", a.input), ("c", a.c), ("output", a.output)):
            out[f"{key}_{layer}"] = v.reshape(-1, v.shape[-1]).float().contiguous().cpu()
    if with_logits:
        assert logits is not None
        out["tokens"] = tokens.long().contiguous().cpu()
        out["logits"] = logits.float().contiguous().cpu()
    return out


def check_exports(
    items: Sequence[tuple[Path, dict[str, Tensor]]],
    ct_python: str | Path | None = None,
    timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Load each export with circuit-tracer's own loaders (in its environment, one process) and
    compare with `check_acts`' tensors: per layer the max |difference| of features and
    reconstructions and the scale of ours (`circuit_tracer_worker.py check`)."""
    python = Path(ct_python) if ct_python is not None else default_ct_python()
    with tempfile.TemporaryDirectory(prefix="e2e_sae_ct_check_") as tmp:
        args = ["check"]
        for i, (export, acts) in enumerate(items):
            path = Path(tmp) / f"acts_{i}.safetensors"
            atomic_save_tensors(acts, path)
            args += [str(export), str(path)]
        return run_worker(python, args, timeout=timeout)["checks"]


# --- circuit-tracer's own environment -------------------------------------------------------------
def run_worker(python: str | Path, args: Sequence[str], timeout: float | None = None) -> Any:
    """Run `circuit_tracer_worker.py` with circuit-tracer's Python (its own virtualenv: it pins
    transformers <= 4.57.3) and return the JSON it prints last. A missing interpreter, a failure
    or an unreadable answer is a one-line UserError."""
    exe = Path(python).expanduser()
    if not exe.exists():
        raise UserError(
            f"circuit-tracer's Python {exe} does not exist (`make install-ct` builds .venv-ct; "
            "or pass --ct-python)"
        )
    try:
        proc = subprocess.run(
            [str(exe), "-P", str(WORKER), *args],  # -P: not this folder first on sys.path
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_worker_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UserError(f"circuit-tracer worker: no answer within {timeout:g} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"circuit-tracer worker failed (exit {proc.returncode}): {tail}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise UserError("circuit-tracer worker: no JSON answer")
    return json.loads(lines[-1])


def _worker_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.pop("PYTHONPATH", None)  # nothing of ours (or of our environment) in its imports
    return env


def default_ct_python() -> Path:
    """Where `make install-ct` puts circuit-tracer's environment: `.venv-ct` in the current
    folder, else beside this package's checkout, else beside the running interpreter's venv."""
    here = Path.cwd() / ".venv-ct" / "bin" / "python"
    if here.exists():
        return here
    repo = Path(__file__).resolve().parents[2] / ".venv-ct" / "bin" / "python"
    if repo.exists():
        return repo
    return Path(sys.prefix).parent / ".venv-ct" / "bin" / "python"


# --- attribution graphs and their scores ----------------------------------------------------------
GRAPH_PROMPTS = 20
GRAPH_PROMPT_TOKENS = 16


def prompt_windows(
    config: Config,
    n_prompts: int = GRAPH_PROMPTS,
    n_tokens: int = GRAPH_PROMPT_TOKENS,
    data: str | None = None,
    split: str | None = None,
) -> list[list[int]]:
    """A fixed prompt set: the first `n_tokens` tokens of the first `n_prompts` windows of the
    run's eval data, in the order its evaluation reads them (seed + 42)."""
    if n_prompts < 1 or n_tokens < 2:
        raise UserError(
            f"--graph-prompts / --graph-prompt-tokens: need at least 1 prompt of 2 tokens, got "
            f"{n_prompts} of {n_tokens}"
        )
    ds = eval_dataset(config, data, split)
    if n_tokens > ds.n_ctx:
        raise UserError(f"--graph-prompt-tokens: {n_tokens} is over the windows' {ds.n_ctx}")
    batch = min(n_prompts, config.batch_size)
    n_batches = -(-n_prompts // batch)
    batches, n_batches = eval_batches(ds, batch, config.seed + 42, n_batches, None)
    out: list[list[int]] = []
    for _, tokens in zip(range(n_batches), batches, strict=False):
        out += [row[:n_tokens].tolist() for row in tokens]
    if len(out) < n_prompts:
        raise UserError(f"--graph-prompts: the eval set holds only {len(out)} windows")
    return out[:n_prompts]


def graph_scores(
    model: SAETransformer,
    prompts: Sequence[Sequence[int] | str],
    *,
    ct_python: str | Path | None = None,
    save: str | Path | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int = 256,
    timeout: float | None = None,
) -> dict[str, Any]:
    """circuit-tracer's attribution graph of each prompt (token ids or text; the tokenizer's BOS
    is put first, circuit-tracer leaves position 0 out) on `model`'s transcoders, built in
    circuit-tracer's environment from an export of `model`, and the graphs' replacement and
    completeness scores (`circuit_tracer.graph.compute_graph_scores`): their means and each
    graph's. `save`: also write the graphs there (`graph_<i>.pt`, circuit-tracer's format)."""
    python = Path(ct_python) if ct_python is not None else default_ct_python()
    with tempfile.TemporaryDirectory(prefix="e2e_sae_ct_") as tmp:
        export = export_circuit_tracer(model, Path(tmp) / "export", where="graph scores")
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps([p if isinstance(p, str) else list(p) for p in prompts]))
        args = ["graphs", str(export), str(prompts_file), "--batch-size", str(batch_size)]
        if save is not None:
            args += ["--save", str(Path(save).expanduser().resolve())]
        if max_feature_nodes is not None:
            args += ["--max-feature-nodes", str(max_feature_nodes)]
        answer = run_worker(python, args, timeout=timeout)
    graphs = answer["graphs"]
    return {
        "n_prompts": len(graphs),
        "replacement_score": sum(g["replacement_score"] for g in graphs) / len(graphs),
        "completeness_score": sum(g["completeness_score"] for g in graphs) / len(graphs),
        "per_prompt": graphs,
    }
