"""Resampling dead ReLU latents: the re-initialisation against a direct computation, the training
trigger, exact resume across a resample, and the config check."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from test_reliability import (
    _assert_bit_exact,
    _config,
    _interrupt_after,
    _newest_weights,
    _only_run,
    _write,
)
from torch import nn

from e2e_sae import load_config
from e2e_sae.cli import main
from e2e_sae.errors import ConfigError
from e2e_sae.saes import SAE, sae_key
from e2e_sae.saes.resample import ENCODER_SCALE, resample_dead_latents
from e2e_sae.training.runlog import read_metrics
from e2e_sae.training.trainer import train

POS = "blocks.1.hook_resid_pre"


def _adam_with_state(sae: SAE) -> torch.optim.Adam:
    """An Adam whose moments are non-zero everywhere (one step on a random loss)."""
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    out, c = sae(torch.randn(5, sae.input_size))
    (out.pow(2).sum() + c.sum()).backward()
    opt.step()
    return opt


def test_resample_matches_a_direct_computation() -> None:
    torch.manual_seed(0)
    sae = SAE(input_size=6, n_dict_components=10)
    opt = _adam_with_state(sae)
    enc = cast(nn.Linear, sae.encoder[0])
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in sae.parameters()}

    x = torch.randn(2, 4, 6)
    target = x.clone()
    output = x.clone()
    output[1, 2] += torch.tensor([3.0, 0, 0, 0, 0, 1.0])  # the only token with an error
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[2, 7]] = True
    sae.tokens_since_fired.fill_(50)
    gen = torch.Generator().manual_seed(0)

    assert resample_dead_latents(sae, x, target, output, dead, opt, gen) == 2

    alive = ~dead
    scale = ENCODER_SCALE * before["encoder.0.weight"][alive].norm(dim=-1).mean()
    miss = F.normalize(target[1, 2] - output[1, 2], dim=0)  # the residual error's direction
    for i in (2, 7):
        torch.testing.assert_close(enc.weight[i], miss * scale)
        assert float(enc.bias[i].detach()) == 0.0
        torch.testing.assert_close(sae.decoder.weight[:, i], miss)
        for p in (enc.weight, enc.bias):
            for v in (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]):
                assert torch.all(v[i] == 0)
        for v in (
            opt.state[sae.decoder.weight]["exp_avg"],
            opt.state[sae.decoder.weight]["exp_avg_sq"],
        ):
            assert torch.all(v[:, i] == 0)
    # live latents, the decoder bias and their optimizer state are untouched
    assert torch.equal(enc.weight[alive], before["encoder.0.weight"][alive])
    assert torch.equal(enc.bias[alive], before["encoder.0.bias"][alive])
    assert torch.equal(sae.decoder.weight[:, alive], before["decoder.weight"][:, alive])
    assert torch.equal(sae.decoder.bias, before["decoder.bias"])
    w = enc.weight
    assert torch.equal(opt.state[w]["exp_avg"][alive], moments[id(w)]["exp_avg"][alive])
    assert sae.tokens_since_fired.tolist() == [0 if d else 50 for d in dead.tolist()]


def test_resample_draws_tokens_by_squared_error() -> None:
    """Tokens are drawn with probability proportional to ||output - target||^2."""
    torch.manual_seed(0)
    sae = SAE(input_size=2, n_dict_components=4000)
    opt = torch.optim.Adam(sae.parameters())
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    output = x + torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # squared errors 1, 4, 0
    dead = torch.ones(4000, dtype=torch.bool)
    resample_dead_latents(sae, x, x, output, dead, opt, torch.Generator().manual_seed(1))
    cols = sae.decoder.weight.detach().T  # each dead latent's column: its token's -error
    from_first, from_second = (cols[:, 0] < -0.99), (cols[:, 1] < -0.99)
    assert bool((from_first | from_second).all())  # the zero-error token is never drawn
    assert abs(float(from_second.float().mean()) - 0.8) < 0.03  # 4 / (1 + 4); binomial sd ~0.006


def test_resample_transcoder_encoder_reads_the_input() -> None:
    torch.manual_seed(0)
    sae = SAE(input_size=3, n_dict_components=4, output_size=5)
    x, target = torch.randn(6, 3), torch.randn(6, 5)
    output = target.clone()
    output[4] += 1.0
    dead = torch.tensor([True, False, False, False])
    opt = torch.optim.Adam(sae.parameters())
    norm = float(cast(nn.Linear, sae.encoder[0]).weight[1:].detach().norm(dim=-1).mean())
    resample_dead_latents(sae, x, target, output, dead, opt, torch.Generator(), transcoder=True)
    enc = cast(nn.Linear, sae.encoder[0])
    torch.testing.assert_close(enc.weight[0], F.normalize(x[4], dim=0) * ENCODER_SCALE * norm)
    torch.testing.assert_close(sae.decoder.weight[:, 0], -torch.ones(5) / 5**0.5)


def test_resample_nothing_when_no_latent_is_dead() -> None:
    sae = SAE(input_size=3, n_dict_components=5)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    x = torch.randn(4, 3)
    n = resample_dead_latents(
        sae,
        x,
        x,
        x + 1,
        torch.zeros(5, dtype=torch.bool),
        torch.optim.Adam(sae.parameters()),
        torch.Generator(),
    )
    assert n == 0
    assert all(torch.equal(v, before[k]) for k, v in sae.state_dict().items())


RESAMPLE = {
    "loss": {"sparsity": {"coeff": 3.0}, "out_to_in": {"coeff": 1.0}},  # kills latents quickly
    "act_frequency_n_tokens": 32,  # dead after two micro-batches without firing
    "lr": 0.02,
}


def _resampled(run: Path) -> float:
    return sum(r.get(f"resampled/{POS}", 0.0) for r in read_metrics(run))


def test_training_resamples_dead_latents(config_dict, tmp_path: Path) -> None:
    cfg = config_dict(n_samples=64, **RESAMPLE)
    base = train(_config(cfg), run_dir=tmp_path / "off", progress=False)
    saes = {**cfg["saes"], "resample_every_n_samples": 16}
    run = train(_config({**cfg, "saes": saes}), run_dir=tmp_path / "on", progress=False)
    assert _resampled(base) == 0
    assert _resampled(run) > 0
    logged = [r for r in read_metrics(run) if f"resampled/{POS}" in r]
    assert [r["samples"] for r in logged] == [16, 32]  # the first half of the run only
    key = f"{sae_key(POS)}.decoder.weight"
    assert not torch.equal(_newest_weights(base)[key], _newest_weights(run)[key])


def test_resume_across_a_resample_is_bit_exact(config_dict, tmp_path: Path, monkeypatch) -> None:
    cfg = config_dict(n_samples=64, save_every_n_samples=8, eval_n_samples=None, **RESAMPLE)
    cfg["saes"] = {**cfg["saes"], "resample_every_n_samples": 16}
    ref = train(_config(cfg), run_dir=tmp_path / "ref", progress=False)
    assert _resampled(ref) > 0
    path = _write(tmp_path / "cfg.yaml", cfg)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3, signal.SIGINT)  # between resamples at steps 4 and 8 (16, 32 samples)
        assert main(["train", str(path)]) == 128 + signal.SIGINT
    run = _only_run(Path(cfg["save_dir"]))
    assert main(["train", str(path), "--resume", str(run)]) == 0
    _assert_bit_exact(_newest_weights(ref), _newest_weights(run))


def test_resample_is_for_relu_only(config_dict) -> None:
    cfg = config_dict()
    cfg["saes"] = {**cfg["saes"], "architecture": "topk", "k": 2, "resample_every_n_samples": 8}
    with pytest.raises(ConfigError, match="saes: resample_every_n_samples: only for architecture"):
        load_config(cfg)
