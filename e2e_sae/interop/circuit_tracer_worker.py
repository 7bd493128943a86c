"""Run in circuit-tracer's own environment (it pins transformers <= 4.57.3): `e2e_sae.interop.
circuits.run_worker` calls this file with that environment's Python. It imports nothing of
e2e_sae, only circuit-tracer, TransformerLens, transformers, torch, safetensors and PyYAML; it
prints one JSON object on its last line.

  python circuit_tracer_worker.py check EXPORT ACTS [EXPORT ACTS ...]
      For each pair: load EXPORT (written by `e2e-sae export --format circuit-tracer`) with
      circuit-tracer's own loaders and compare, per layer, its features (`encode_layer`) and the
      reconstructions its attribution uses (`compute_attribution_components`) with ours, saved in
      ACTS (safetensors: `input_<l>`, `c_<l>`, `output_<l>` on clean inputs, [tokens, d]); with
      `tokens` and `logits` there too, also the clean logits of the ReplacementModel built from
      EXPORT/lm against ours.
  python circuit_tracer_worker.py graphs EXPORT PROMPTS [--save DIR] [--max-feature-nodes N]
      [--batch-size B] [--max-n-logits K] [--desired-logit-prob P]
      PROMPTS: JSON list of texts or token-id lists (the tokenizer's BOS is put first). For
      each, `circuit_tracer.attribute` on the ReplacementModel built from EXPORT/lm and EXPORT's
      transcoders, and circuit-tracer's
      replacement and completeness scores of the graph (`graph.compute_graph_scores`).
"""
# pyright: reportMissingImports=false

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

CPU = torch.device("cpu")


def load_export(folder: str) -> Any:
    """The export's transcoders, through circuit-tracer's loaders."""
    with open(os.path.join(folder, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    if cfg["model_kind"] == "cross_layer_transcoder":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        return load_clt(
            folder,
            feature_input_hook=cfg["feature_input_hook"],
            feature_output_hook=cfg["feature_output_hook"],
            scan=cfg["scan"],
            device=CPU,
            dtype=torch.float32,
            lazy_decoder=False,
            lazy_encoder=False,
        )
    from circuit_tracer.utils.hf_utils import load_transcoders

    loaded = load_transcoders(cfg, device=CPU, dtype=torch.float32, lazy_decoder=False)
    return loaded[0] if isinstance(loaded, tuple) else loaded


def replacement_model(folder: str, transcoders: Any) -> Any:
    """circuit-tracer's ReplacementModel from EXPORT/lm (config, weights, tokenizer)."""
    from circuit_tracer import ReplacementModel
    from transformer_lens import HookedTransformerConfig
    from transformers import AutoTokenizer

    lm = os.path.join(folder, "lm")
    with open(os.path.join(lm, "hooked_transformer_config.json")) as f:
        fields = json.load(f)
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    fields = {k: v for k, v in fields.items() if k in known}
    fields.pop("tokenizer_name", None)
    cfg = HookedTransformerConfig(**{**fields, "device": "cpu", "dtype": torch.float32})
    # TransformerLens reloads the tokenizer by name: a folder it can load from disk
    tok_dir = os.path.join(lm, "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir) if os.path.isdir(tok_dir) else None
    model = ReplacementModel.from_config(cfg, transcoders, tokenizer=tok)
    weights = load_file(os.path.join(lm, "model.safetensors"))
    own = model.state_dict()
    # the replacement model wraps each MLP and the unembedding: blocks.l.mlp.W_in lives at
    # blocks.l.mlp.old_mlp.W_in, unembed.W_U at unembed.old_unembed.W_U
    state = {}
    for k, v in weights.items():
        parts = k.split(".")
        if len(parts) > 3 and parts[0] == "blocks" and parts[2] == "mlp":
            k = ".".join([*parts[:3], "old_mlp", *parts[3:]])
        elif parts[0] == "unembed":
            k = "unembed.old_unembed." + ".".join(parts[1:])
        if k not in own:
            raise SystemExit(f"the LM's parameter {k} has no place in the replacement model")
        state[k] = v
    model.load_state_dict(state, strict=False)
    return model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |b|)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max()), float(b.abs().max())


def cmd_check(args: argparse.Namespace) -> dict[str, Any]:
    pairs = args.pairs
    if len(pairs) % 2:
        raise SystemExit("check: give EXPORT ACTS pairs")
    return {"checks": [check_one(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]}


def check_one(export: str, acts_file: str) -> dict[str, Any]:
    transcoders = load_export(export)
    acts = load_file(acts_file)
    n_layers = sum(1 for k in acts if k.startswith("input_"))
    inputs = torch.stack([acts[f"input_{layer}"] for layer in range(n_layers)])
    comps = transcoders.compute_attribution_components(inputs, zero_positions=slice(0, 0))
    recon = comps["reconstruction"]
    layers = []
    for layer in range(n_layers):
        c = transcoders.encode_layer(inputs[layer], layer)
        f_err, f_scale = _rel_err(c, acts[f"c_{layer}"])
        sparse = comps["activation_matrix"].to_dense()[layer]
        s_err, _ = _rel_err(sparse, acts[f"c_{layer}"])
        r_err, r_scale = _rel_err(recon[layer], acts[f"output_{layer}"])
        layers.append(
            {
                "features_err": f_err,
                "features_scale": f_scale,
                "attribution_features_err": s_err,
                "reconstruction_err": r_err,
                "reconstruction_scale": r_scale,
                "n_active": int((c != 0).sum()),
            }
        )
    out: dict[str, Any] = {"kind": type(transcoders).__name__, "layers": layers}
    if "tokens" in acts and os.path.isdir(os.path.join(export, "lm")):
        model = replacement_model(export, transcoders)
        with torch.no_grad():
            logits = model(acts["tokens"].long())
        err, scale = _rel_err(logits, acts["logits"])
        out["logits_err"], out["logits_scale"] = err, scale
    return out


def prompt_ids(prompt: str | list[int], tok: Any) -> list[int]:
    """Token ids with the tokenizer's BOS (else EOS / PAD) first. circuit-tracer puts one there
    itself, but skips a special token whose id is 0 (`filter(None, ...)`), which is ours."""
    if isinstance(prompt, str):
        if tok is None:
            raise SystemExit("a text prompt needs the export's tokenizer (lm/tokenizer)")
        prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = [int(i) for i in prompt]
    if tok is None:
        return ids
    first = next(
        (i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None), None
    )
    if first is not None and (not ids or ids[0] not in tok.all_special_ids):
        ids = [first, *ids]
    return ids


def cmd_graphs(args: argparse.Namespace) -> dict[str, Any]:
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores

    transcoders = load_export(args.export)
    model = replacement_model(args.export, transcoders)
    with open(args.prompts) as f:
        prompts = [prompt_ids(p, model.tokenizer) for p in json.load(f)]
    results = []
    for i, ids in enumerate(prompts):
        start = time.perf_counter()
        graph = attribute(
            torch.tensor(ids, dtype=torch.long),
            model,
            max_n_logits=args.max_n_logits,
            desired_logit_prob=args.desired_logit_prob,
            batch_size=args.batch_size,
            max_feature_nodes=args.max_feature_nodes,
        )
        replacement, completeness = compute_graph_scores(graph)
        results.append(
            {
                "n_tokens": len(ids),
                "n_active_features": int(graph.active_features.shape[0]),
                "n_selected_features": int(len(graph.selected_features)),
                "n_nodes": int(graph.adjacency_matrix.shape[0]),
                "n_logits": int(len(graph.logit_targets)),
                "replacement_score": replacement,
                "completeness_score": completeness,
                "seconds": time.perf_counter() - start,
            }
        )
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            graph.to_pt(os.path.join(args.save, f"graph_{i}.pt"))
        print(f"prompt {i + 1}/{len(prompts)}: {results[-1]}", file=sys.stderr, flush=True)
    return {"graphs": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="circuit-tracer checks and graphs of an export")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("pairs", nargs="+", metavar="EXPORT ACTS")
    g = sub.add_parser("graphs")
    g.add_argument("export")
    g.add_argument("prompts")
    g.add_argument("--save", default=None)
    g.add_argument("--max-feature-nodes", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--max-n-logits", type=int, default=10)
    g.add_argument("--desired-logit-prob", type=float, default=0.95)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result = cmd_check(args) if args.cmd == "check" else cmd_graphs(args)
    print(json.dumps(result), flush=True)
    sys.stdout.flush()
    # the replacement model's __del__ prints an ignored TypeError at interpreter exit: skip it
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
