"""Shared fixtures: a tiny random-weight HookedTransformer and a small local token dataset.

Everything is CPU-only and offline; caches go to a per-session temp folder.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from e2e_sae.config import Config, load_config
from e2e_sae.lm.tl import HAS_HOOKED, TL_VERSION

# The tests use tiny tensors: one thread avoids thread-pool overhead (~4x faster on 2 cores).
torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

needs_hooked = pytest.mark.skipif(
    not HAS_HOOKED, reason=f"needs HookedTransformer (TransformerLens 3.x); {TL_VERSION} installed"
)
"""For tests of what only TransformerLens 3.x has: HookedTransformer itself, the lean runner."""

TINY_TLENS: dict[str, Any] = {
    "d_model": 32,
    "n_layers": 3,
    "n_ctx": 16,
    "d_head": 8,
    "n_heads": 4,
    "d_mlp": 64,
    "d_vocab": 97,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "seed": 0,
}


def hooked_state(fields: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A random HookedTransformer's state dict for HookedTransformerConfig fields (on
    TransformerLens 4.x the same draws, by `e2e_sae.lm.native`; tests/test_tl_versions.py checks
    that the models agree)."""
    if HAS_HOOKED:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        return HookedTransformer(HookedTransformerConfig(**fields)).state_dict()
    from e2e_sae.lm import native

    return native.hooked_init(native.resolved_fields(fields))


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "values"
) -> None:
    """`actual` equals `expected` up to float rounding, on any CPU.

    Kernels (AVX2, AVX-512, AMX, oneDNN, MKL, thread counts) sum in different orders, so the
    rounding error of an entry scales with the magnitude of the whole computation, not with the
    entry itself: an entry near zero may differ by rtol x the tensor's scale. So the error is
    measured against the largest |expected| entry, never against an absolute 1e-7.
    """
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    assert err <= rtol * scale, (
        f"{what}: max |diff| {err:.3g} > {rtol:g} x max |expected| {scale:.3g}"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["E2E_SAE_CACHE"] = str(tmp_path_factory.mktemp("e2e_sae_cache"))


def write_token_jsonl(
    path: Path, n_rows: int = 64, n_ctx: int = 16, vocab: int = 97, seed: int = 0
):
    """Pre-tokenized rows with some structure (repeated bigrams), so an LM has something to fit."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n_rows):
            row = [rng.randrange(vocab)]
            while len(row) < n_ctx:
                row.append(
                    (row[-1] * 7 + 3) % vocab if rng.random() < 0.7 else rng.randrange(vocab)
                )
            f.write(json.dumps({"input_ids": row}) + "\n")
    return path


@pytest.fixture(scope="session")
def token_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_jsonl(tmp_path_factory.mktemp("data") / "tokens.jsonl")


def make_config_dict(data_path: Path, save_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A complete config for the tiny model; `loss`/`saes` etc. can be overridden."""
    cfg: dict[str, Any] = {
        "tlens_config": dict(TINY_TLENS),
        "n_samples": 32,
        "batch_size": 4,
        "lr": 1e-3,
        "save_dir": str(save_dir),
        "eval_n_samples": 8,
        "log_every_n_grad_steps": 1,
        "loss": {"sparsity": {"coeff": 0.1}, "out_to_in": {"coeff": 1.0}},
        "train_data": {"dataset_name": str(data_path), "n_ctx": 16, "streaming": False},
        "eval_data": {"dataset_name": str(data_path), "n_ctx": 16, "streaming": False},
        "saes": {"sae_positions": ["blocks.1.hook_resid_pre"], "dict_size_to_input_ratio": 2.0},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
def config_dict(token_data: Path, tmp_path: Path):
    def make(**overrides: Any) -> dict[str, Any]:
        return make_config_dict(token_data, tmp_path / "runs", **overrides)

    return make


def train_on_same_batches(
    trainers: list[Any], batches: Any, n_steps: int | None = None
) -> list[list[dict[str, float]]]:
    """Engine steps of several cache-fed trainers (`setup(c).fed_from_cache()`) on the same
    micro-batches, each for `n_steps` (default: its config's steps), as `train-cached`'s loop
    takes them; returns each trainer's logged values per step."""
    from e2e_sae.training.engine import TrainState

    todo = [n_steps or t.config.n_grad_steps for t in trainers]
    states = [TrainState() for _ in trainers]
    logs: list[list[dict[str, float]]] = [[] for _ in trainers]
    accum = trainers[0].config.grad_accum_steps
    for i in range(max(todo)):
        micro = [next(batches) for _ in range(accum)]
        for t, n, state, log in zip(trainers, todo, states, logs, strict=True):
            if i < n:
                log.append(t.train_step(iter(micro), state, stats=True))
    return logs


def parse_config(cfg: dict[str, Any]) -> Config:
    """A config dict validated as a run config (what `train` gets)."""
    config = load_config(cfg)
    assert isinstance(config, Config)
    return config


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def only_run(save_dir: Path) -> Path:
    """The one run directory in `save_dir`."""
    (run,) = [p for p in save_dir.iterdir() if p.is_dir()]
    return run
