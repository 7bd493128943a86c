"""Training local SAEs from stored activations instead of the LM (what `e2e-sae train-cached`
runs): each config set up as `train` does, fed from an activation cache
(`e2e_sae.caches.activations`) through `Trainer.fed_from_cache`, in the same loop as `train`
(`e2e_sae.training.loop`), all on the same micro-batches: a run directory each with checkpoints,
resume, evaluations, resampling and the divergence guard. Every step is the one engine's
(`e2e_sae.training.engine.Engine.train_step`). When the cache holds a config's training windows
(built from it), the weights equal those of `train` for that config.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from e2e_sae.caches.activations import (
    ActivationCache,
    check_against_cache,
    check_cacheable,
    check_model_against_cache,
)
from e2e_sae.config import Config
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.resources import check_device
from e2e_sae.runs.rundir import RunLock
from e2e_sae.training.distributed import dist_from_env
from e2e_sae.training.engine import TrainState, n_grad_steps
from e2e_sae.training.faults import write_faults
from e2e_sae.training.loop import Run, run_loop
from e2e_sae.training.trainer import Trainer, open_run, restore_run, setup


def check_same_batches(configs: Sequence[Config]) -> None:
    """Configs trained on the same micro-batches need the same batch layout."""
    for name in ("batch_size", "effective_batch_size"):
        got = sorted({getattr(c, name) or c.batch_size for c in configs})
        if len(got) > 1:
            raise ConfigError(
                f"{name}: configs trained on the same batches need the same value "
                f"(got {', '.join(map(str, got))})"
            )


def prepare_runs(
    configs: Sequence[Config], cache: ActivationCache, device: str | None = None
) -> list[Trainer]:
    """Check everything and set each config up as `train` does (LM, seeded SAE init, pretrained
    SAEs, eval data), fed from the cache; nothing is written."""
    if not configs:
        raise UserError("train-cached: no configs given")
    if dist_from_env().enabled:
        raise UserError("train-cached: runs in one process (no torchrun)")
    check_same_batches(configs)
    for c in configs:
        check_against_cache(c, cache)
        check_cacheable(c)
    trainers = []
    for c in configs:
        check_device(device or c.device)
        c = c.model_copy(update={"precision": "fp32"})  # (`auto` too: cached training is fp32)
        t = setup(c, device=device)
        check_model_against_cache(t.model, cache)
        t.check_data()
        trainers.append(t.fed_from_cache())
    return trainers


def train_from_cache(
    configs: Sequence[Config],
    cache: ActivationCache | str | Path,
    device: str | None = None,
    progress: bool = True,
    resume: Sequence[str | Path] | str | Path | None = None,
) -> list[Run]:
    """Train each config's SAEs from `cache`, all on the same micro-batches (the cache's windows
    in stored order, then reshuffled epochs if a run needs more), in a run directory per config
    as `train` writes it: final_config.yaml, metrics.jsonl, periodic and final checkpoints with
    their resume files, periodic and final evaluations with the LM, resampling and the
    divergence guard. `resume`: "latest" (each config's newest run) or one run directory per
    config, continued exactly; the unfinished runs must be at the same step. One process. Every
    input is checked before anything is written."""
    cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
    trainers = prepare_runs(configs, cache, device)
    if resume is None or isinstance(resume, str | Path):
        resumes: list[str | Path | None] = [resume] * len(trainers)
    else:
        resumes = list(resume)
        if len(resumes) != len(trainers):
            raise UserError(
                f"--resume: {len(resumes)} run directories for {len(trainers)} configs "
                "(one per config, in order; none: each one's latest)"
            )
    locks: list[RunLock] = []
    try:
        restored = [restore_run(t, r, locks) for t, r in zip(trainers, resumes, strict=True)]
        start = _common_start(trainers, [s for s, _ in restored])
        command = "e2e-sae train-cached CONFIG... --cache DIR --resume"
        dirs = [found.run_dir for _, found in restored if found is not None]
        runs: list[Run] = []
        with write_faults(dirs, command):
            try:
                for t, (s, found) in zip(trainers, restored, strict=True):
                    runs.append(open_run(t, s, found, None, locks))
                    dirs.append(runs[-1].run_dir)
            except BaseException:  # the directories just made for the configs before go too
                for run, (_, found) in zip(runs, restored, strict=False):
                    if found is None:
                        shutil.rmtree(run.run_dir, ignore_errors=True)
                raise
            batches = cache.batches(
                configs[0].batch_size, seed=configs[0].seed, start_batch=start, in_order_epochs=1
            )
            run_loop(runs, batches, int(cache.meta["n_ctx"]), progress, command)
    finally:
        for lock in locks:
            lock.release()
    return runs


def _common_start(trainers: Sequence[Trainer], states: Sequence[TrainState]) -> int:
    """The shared stream's first micro-batch: where every unfinished run stands."""
    at = {
        s.batches for t, s in zip(trainers, states, strict=True) if s.step < n_grad_steps(t.config)
    }
    if len(at) > 1:
        raise UserError(
            f"--resume: the unfinished runs stand at different batches "
            f"({', '.join(map(str, sorted(at)))}); resume them separately"
        )
    return at.pop() if at else 0
