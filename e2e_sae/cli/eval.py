"""`e2e-sae eval RUN_DIR`: load a run, splice all its SAEs in, measure on held-out data.

Writes RUN_DIR/eval.json (or --out) and, next to it, the per-latent firing frequencies
(`eval.feature_frequency.safetensors`) that `e2e-sae plot` draws density histograms from. The file
records its settings (dataset, split, tokens, checkpoint, ...); one of other settings is replaced
only with --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run_eval_command"]


def run_eval_command(args: argparse.Namespace) -> int:
    from e2e_sae.errors import UserError, check_output_folder
    from e2e_sae.eval.evaluate import EVAL_JSON, evaluate_run, write_eval
    from e2e_sae.eval.report import downstream_table, eval_table

    out = args.out or Path(args.run_dir) / EVAL_JSON
    if args.out is not None:  # before the evaluation, not after it
        if out.is_dir():
            raise UserError(f"--out: {out} is a folder; give a file name (e.g. {out / EVAL_JSON})")
        check_output_folder(out.parent, "--out")
    from e2e_sae.eval.evaluate import check_count
    from e2e_sae.lm.splice import SAETransformer

    check_count(args.graph_prompts, "--graph-prompts")
    model = SAETransformer.from_local_path(args.run_dir, device=args.device)
    if args.graph_prompts:  # refuse a run circuit-tracer cannot represent before evaluating
        from e2e_sae.interop.circuits import circuit_tracer_layout

        circuit_tracer_layout(model, args.run_dir)
    result = evaluate_run(
        model,
        data=args.data,
        split=args.split,
        n_tokens=args.n_tokens,
        batch_size=args.batch_size,
        device=args.device,
        progress=True,
    )
    if args.graph_prompts:
        from e2e_sae.interop.circuits import graph_scores, prompt_windows

        assert model.run_config is not None
        prompts = prompt_windows(
            model.run_config, args.graph_prompts, args.graph_prompt_tokens, args.data, args.split
        )
        print(f"attribution graphs of {len(prompts)} prompts (circuit-tracer) ...")
        scores = graph_scores(model.to("cpu"), prompts, ct_python=args.ct_python)
        result.metrics["graph_replacement_score"] = scores["replacement_score"]
        result.metrics["graph_completeness_score"] = scores["completeness_score"]
        result.graphs = scores["per_prompt"]
    out = write_eval(result, out, overwrite=args.overwrite)
    print(eval_table(result))
    if result.downstream:
        print("\ndownstream reconstruction (SAE-spliced vs clean run)")
        print(downstream_table(result))
    print(f"\nwrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate a trained run on held-out data")
    e.add_argument("run_dir", type=Path)
    e.add_argument(
        "--data", default=None, help="dataset name or path (default: the run's eval_data)"
    )
    e.add_argument("--split", default=None, help="dataset split (default: the run's)")
    e.add_argument("--n-tokens", type=int, default=None, help="evaluate on about this many tokens")
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument(
        "--out", type=Path, default=None, help="write JSON here (default RUN_DIR/eval.json)"
    )
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing eval file that records other settings (split, tokens, "
        "checkpoint, ...); without it that is an error",
    )
    e.add_argument("--device", default=None)
    e.add_argument(
        "--graph-prompts",
        type=int,
        default=None,
        help="transcoder set / CLT: circuit-tracer's graph scores on this many fixed eval prompts "
        "(needs .venv-ct, `make install-ct`)",
    )
    e.add_argument("--graph-prompt-tokens", type=int, default=16, help="tokens per graph prompt")
    e.add_argument("--ct-python", type=Path, default=None, help="default: .venv-ct/bin/python")
    e.set_defaults(func=run_eval_command)
