"""`e2e-sae eval RUN_DIR`: load a run, splice all its SAEs in, measure on held-out data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from e2e_sae.checkpoint import load_run
from e2e_sae.config import Config, DatasetConfig
from e2e_sae.errors import UserError


def eval_dataset(config: Config, data: str | None, split: str | None) -> DatasetConfig:
    base = config.eval_data or config.train_data
    updates: dict[str, object] = {}
    if data is not None:
        updates["dataset_name"] = data
        if not Path(data).expanduser().exists():
            updates["streaming"] = base.streaming
    if split is not None:
        updates["split"] = split
    if config.eval_data is None and split is None and data is None:
        raise UserError("eval: the run has no eval_data; pass --data and/or --split")
    return DatasetConfig.model_validate({**base.model_dump(), **updates})


def run_eval_command(args: argparse.Namespace) -> int:
    from e2e_sae.data import create_data_loader
    from e2e_sae.evaluate import evaluate
    from e2e_sae.forward import make_plan
    from e2e_sae.losses import build_loss_terms
    from e2e_sae.report import eval_table

    model = load_run(args.run_dir, device=args.device)
    config: Config = model.run_config  # type: ignore[attr-defined]
    data = eval_dataset(config, args.data, args.split)
    bs = args.batch_size or config.batch_size
    n_tokens = args.n_tokens or (config.eval_n_samples or 50) * data.n_ctx
    n_batches = max(1, n_tokens // (bs * data.n_ctx))
    plan = make_plan(model, config.loss, force_full_pass=True)
    terms = build_loss_terms(config.loss, plan.new_cache)
    batches = create_data_loader(data, bs, config.seed + 42)
    result = evaluate(model, batches, n_batches, plan, terms, progress=True)
    out = args.out or Path(args.run_dir) / "eval.json"
    out.write_text(json.dumps({**result.metrics, "per_sae": result.per_sae}, indent=2))
    print(eval_table(result))
    print(f"\nwrote {out}")
    return 0
