"""`e2e-sae graph RUN_OR_EXPORT PROMPT...`: circuit-tracer's attribution graphs of prompts on a
run's transcoder set or cross-layer transcoder, and their replacement / completeness scores (run in
circuit-tracer's own environment, `.venv-ct`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_graph(args: argparse.Namespace) -> int:
    from e2e_sae.errors import UserError
    from e2e_sae.eval.report import table
    from e2e_sae.interop.circuits import CONFIG_YAML, default_ct_python, graph_scores, run_worker

    prompts: list[str | list[int]] = list(args.prompts)
    if args.prompts_file is not None:
        try:
            loaded = json.loads(Path(args.prompts_file).read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--prompts-file: cannot read {args.prompts_file} ({err})") from None
        if not isinstance(loaded, list):
            raise UserError("--prompts-file: a JSON list of texts or token-id lists")
        prompts += loaded
    if not prompts:
        raise UserError("graph: give at least one prompt (or --prompts-file)")
    python = args.ct_python if args.ct_python is not None else default_ct_python()
    src = Path(args.source).expanduser()
    if (src / CONFIG_YAML).is_file():  # an export: straight to circuit-tracer
        if not (src / "lm").is_dir():
            raise UserError(f"graph: {src} has no lm/ (exported with --no-lm); export it again")
        import tempfile

        with tempfile.TemporaryDirectory(prefix="e2e_sae_graph_") as tmp:
            pf = Path(tmp) / "prompts.json"
            pf.write_text(json.dumps(prompts))
            cmd = ["graphs", str(src), str(pf)]
            if args.save is not None:
                cmd += ["--save", str(Path(args.save).expanduser().resolve())]
            if args.max_feature_nodes is not None:
                cmd += ["--max-feature-nodes", str(args.max_feature_nodes)]
            graphs = run_worker(python, cmd)["graphs"]
    else:
        from e2e_sae.lm.splice import SAETransformer

        model = SAETransformer.from_local_path(src, checkpoint=args.checkpoint, device="cpu")
        graphs = graph_scores(
            model,
            prompts,
            ct_python=python,
            save=args.save,
            max_feature_nodes=args.max_feature_nodes,
        )["per_prompt"]
    rows = [
        [
            i,
            g["n_tokens"],
            g["n_active_features"],
            g["n_nodes"],
            f"{g['replacement_score']:.4f}",
            f"{g['completeness_score']:.4f}",
        ]
        for i, g in enumerate(graphs)
    ]
    n = len(graphs)
    rows.append(
        [
            "mean",
            "",
            "",
            "",
            f"{sum(g['replacement_score'] for g in graphs) / n:.4f}",
            f"{sum(g['completeness_score'] for g in graphs) / n:.4f}",
        ]
    )
    heads = ["prompt", "tokens", "active features", "nodes", "replacement", "completeness"]
    print(table(heads, rows))
    if args.save is not None:
        print(f"\ngraphs (circuit-tracer's .pt) in {args.save}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "graph", help="circuit-tracer attribution graphs of prompts on a transcoder set / CLT"
    )
    p.add_argument("source", help="run directory, or a folder from export --format circuit-tracer")
    p.add_argument("prompts", nargs="*", help="prompt texts")
    p.add_argument("--prompts-file", default=None, help="JSON list of texts or token-id lists")
    p.add_argument("--checkpoint", default=None, help="samples_<N>.safetensors (default: newest)")
    p.add_argument("--ct-python", type=Path, default=None, help="default: .venv-ct/bin/python")
    p.add_argument("--save", default=None, help="also write the graphs (circuit-tracer's .pt)")
    p.add_argument("--max-feature-nodes", type=int, default=None, help="prune to this many")
    p.set_defaults(func=cmd_graph)
