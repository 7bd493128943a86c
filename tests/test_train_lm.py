"""`e2e-sae train-lm` and the shipped `shakespeare-lm`: losses checked by direct computation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import write_token_jsonl

from e2e_sae.cli import main
from e2e_sae.errors import ConfigError
from e2e_sae.lm.load import builtin_model_dir, load_tlens_model
from e2e_sae.training.engine import lr_factor
from e2e_sae.training.train_lm import (
    TrainLMConfig,
    load_train_lm_config,
    train_lm,
    unigram_ce,
    unigram_log_probs,
)

VOCAB = 97
N_CTX = 16


def direct_ce(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean CE of tokens[:, 1:] given logits[:, :-1], via F.cross_entropy."""
    return float(
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    )


def read_rows(path: Path) -> torch.Tensor:
    rows = [json.loads(line)["input_ids"] for line in path.read_text().splitlines()]
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("lm_data")
    train = write_token_jsonl(d / "train.jsonl", n_rows=96, n_ctx=N_CTX, vocab=VOCAB, seed=1)
    val = write_token_jsonl(d / "val.jsonl", n_rows=16, n_ctx=N_CTX, vocab=VOCAB, seed=2)
    return train, val


def lm_config(train: Path, val: Path, save_dir: Path, **train_overrides: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "name": "tiny-lm",
        "tlens_config": {
            "d_model": 32,
            "n_layers": 1,
            "n_ctx": N_CTX,
            "d_head": 8,
            "n_heads": 4,
            "d_mlp": 64,
            "d_vocab": VOCAB,
            "act_fn": "gelu",
            "normalization_type": "LN",
            "dtype": "float32",
        },
        "train": {
            "n_epochs": 2,
            "batch_size": 8,
            "effective_batch_size": 16,
            "lr": 1e-2,
            "warmup_samples": 16,
            **train_overrides,
        },
        "train_data": {"dataset_name": str(train), "n_ctx": N_CTX, "streaming": False},
        "eval_data": {"dataset_name": str(val), "n_ctx": N_CTX, "streaming": False},
        "save_dir": str(save_dir),
    }


def test_train_lm_lowers_val_loss_and_round_trips(lm_data: tuple[Path, Path], tmp_path: Path):
    train, val = lm_data
    config = load_train_lm_config(_write(tmp_path / "lm.yaml", lm_config(train, val, tmp_path)))
    assert isinstance(config, TrainLMConfig) and config.out_dir == tmp_path / "tiny-lm"
    val_tokens = read_rows(val)

    # The untrained model: same seed, same init as train_lm builds.
    torch.manual_seed(0)
    from e2e_sae.lm.load import build_random_model
    from e2e_sae.training.train_lm import _model_fields

    init = build_random_model(_model_fields(config)).eval()
    with torch.no_grad():
        ce_before = direct_ce(init(val_tokens), val_tokens)

    result = train_lm(config, device="cpu", progress=False)
    assert result.model is not None
    # 96 windows / 16 per step = 6 steps per epoch, 2 epochs.
    assert result.n_train_tokens == 2 * 6 * 16 * N_CTX
    with torch.no_grad():
        logits = result.model(val_tokens)
    ce_after = direct_ce(logits, val_tokens)
    assert len(result.eval_ce) == 2
    assert result.eval_ce[-1] == pytest.approx(ce_after, abs=1e-5)
    assert ce_after < ce_before - 0.3, (ce_before, ce_after)

    # The unigram baseline: add-one smoothed training counts, scored on the same positions.
    counts = torch.bincount(read_rows(train).reshape(-1), minlength=VOCAB).double() + 1
    p = counts / counts.sum()
    assert result.unigram_ce == pytest.approx(float(-p[val_tokens[:, 1:]].log().mean()), rel=1e-9)

    # Saved as safetensors + config; tlens_model_path gives back identical logits.
    out = tmp_path / "tiny-lm"
    assert (out / "model.safetensors").is_file() and (out / "tlens_config.json").is_file()
    reloaded = load_tlens_model(tlens_model_path=out, device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(val_tokens), logits)
    evals = [
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "eval/ce_loss" in r
    ]
    assert [r["epoch"] for r in evals] == [1, 2]


def test_train_lm_cli(lm_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture):
    train, val = lm_data
    cfg = lm_config(train, val, tmp_path / "models", n_epochs=1, save_every_n_epochs=1)
    cfg["tlens_config"]["tokenizer_name"] = "gpt2"  # recorded, not loaded (d_vocab is given)
    assert main(["train-lm", str(_write(tmp_path / "lm.yaml", cfg)), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "eval CE epoch 1" in out and "unigram" in out
    saved = json.loads((tmp_path / "models" / "tiny-lm" / "tlens_config.json").read_text())
    assert saved["tokenizer_name"] == "gpt2" and saved["d_vocab"] == VOCAB


def test_train_lm_user_errors(lm_data: tuple[Path, Path], tmp_path: Path, capsys):
    train, val = lm_data
    bad = lm_config(train, val, tmp_path / "models")
    bad["eval_data"]["dataset_name"] = str(tmp_path / "missing.jsonl")
    assert main(["train-lm", str(_write(tmp_path / "bad.yaml", bad))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.jsonl" in err and "\n" not in err
    assert not (tmp_path / "models").exists()  # nothing half-written

    with pytest.raises(ConfigError, match=r"train: effective_batch_size \(12\) must be a multiple"):
        load_train_lm_config(
            _write(tmp_path / "b2.yaml", lm_config(train, val, tmp_path, effective_batch_size=12))
        )
    wide = lm_config(train, val, tmp_path)
    wide["train_data"]["n_ctx"] = 2 * N_CTX
    with pytest.raises(ConfigError, match="train_data.n_ctx"):
        load_train_lm_config(_write(tmp_path / "b3.yaml", wide))


def test_lr_factor_warmup_then_cosine():
    assert lr_factor(0, 4, 20, "cosine", 0.1) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, "cosine", 0.1) == pytest.approx(1.0)
    half = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_factor(12, 4, 20, "cosine", 0.1) == pytest.approx(half)
    assert lr_factor(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(12, 4, 20, "linear", 0.1) == pytest.approx(1 - 0.9 * 0.5)


def test_unigram_against_hand_computation():
    train = torch.tensor([[0, 1, 1, 2]])
    logp = unigram_log_probs(train, d_vocab=4)
    # counts + 1 = [2, 3, 2, 1] over 8
    assert torch.allclose(logp.exp(), torch.tensor([2, 3, 2, 1], dtype=torch.float64) / 8)
    windows = torch.tensor([[3, 1, 3]])  # scored positions: tokens 1 and 3
    assert unigram_ce(logp, windows) == pytest.approx(-(math.log(3 / 8) + math.log(1 / 8)) / 2)


def test_shipped_shakespeare_lm_beats_unigram():
    from e2e_sae.data.corpora import shakespeare_documents
    from e2e_sae.data.tokenizer import load_tokenizer

    folder = builtin_model_dir("shakespeare-lm")
    assert folder is not None
    assert (folder / "model.safetensors").stat().st_size < 20 * 2**20
    model = load_tlens_model(tlens_model_name="shakespeare-lm", device="cpu")
    assert model.cfg.tokenizer_name == "shakespeare-bpe"
    tok = load_tokenizer("shakespeare-bpe")
    assert model.cfg.d_vocab == len(tok)

    def stream(docs: list[str]) -> torch.Tensor:
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        return torch.tensor([t for d in ids for t in [*d, tok.eos_token_id]])

    n_ctx = model.cfg.n_ctx
    val = stream(shakespeare_documents("validation")[:1])[: 8 * n_ctx].reshape(8, n_ctx)
    with torch.no_grad():
        model_ce = direct_ce(model(val), val)
    # Unigram fitted on four training works (add-one smoothing), scored on the same positions.
    counts = torch.bincount(stream(shakespeare_documents("train")[:4]), minlength=len(tok)) + 1
    p = counts.double() / counts.sum()
    uni_ce = float(-p[val[:, 1:]].log().mean())
    assert uni_ce > 5.5
    assert model_ce < uni_ce - 1.2, (model_ce, uni_ce)


def _write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
