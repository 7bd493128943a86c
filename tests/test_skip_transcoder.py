"""The skip transcoder: its formula, training under every loss (W_skip learns), our checkpoints,
and SAELens' `skip_transcoder` format both ways (SAELens itself when installed)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TLENS
from safetensors.torch import load_file

from e2e_sae import SAETransformer, load_config
from e2e_sae.errors import UserError
from e2e_sae.interop.saebench import to_saebench
from e2e_sae.interop.saelens import (
    encoder_linear,
    export_run_saelens,
    load_saelens_sae,
    sae_from_saelens_tensors,
    save_saelens,
)
from e2e_sae.lm.load import build_random_model
from e2e_sae.lm.tl import HookedTransformer
from e2e_sae.runs.checkpoint import save_checkpoint, write_config
from e2e_sae.saes import ARCHITECTURES, SAEActs, SkipTranscoder, build_sae, sae_key
from e2e_sae.training.engine import TrainState
from e2e_sae.training.trainer import setup

TC_IN, TC_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
SAE_POS = "blocks.1.hook_resid_pre"
LOSSES: dict[str, dict[str, Any]] = {
    "local": {"sparsity": {"coeff": 0.01}, "out_to_in": {"coeff": 1.0}},
    "e2e": {"sparsity": {"coeff": 0.01}, "logits_kl": {"coeff": 1.0}},
    "e2e_ds": {
        "sparsity": {"coeff": 0.01},
        "logits_kl": {"coeff": 0.5},
        "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_pre"], "total_coeff": 1.0},
    },
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_skip(d_in: int = 12, d_sae: int = 40, d_out: int | None = 20) -> SkipTranscoder:
    """A skip transcoder with non-trivial biases, non-unit decoder columns and a non-zero W_skip."""
    torch.manual_seed(0)
    sae = build_sae("skip_transcoder", d_in, d_sae, output_size=d_out)
    assert isinstance(sae, SkipTranscoder)
    with torch.no_grad():
        sae.decoder.weight.mul_(torch.rand(1, d_sae) * 3 + 0.2)
        encoder_linear(sae).bias.normal_(0, 0.3)
        sae.decoder.bias.normal_()
        sae.W_skip.normal_(0, 0.2)
    return sae.eval()


def direct(t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' SkipTranscoder from its tensors: relu(x W_enc + b_enc) W_dec + b_dec + x W_skip^T"""
    c = (x @ t["W_enc"] + t["b_enc"]).relu()
    return c, c @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T


def test_formula_and_zero_init() -> None:
    assert ARCHITECTURES["skip_transcoder"] is SkipTranscoder
    sae = make_skip()
    x = torch.randn(3, 5, 12)
    w_enc, b_enc = encoder_linear(sae).weight, encoder_linear(sae).bias
    w_dec, b_dec = sae.decoder.weight, sae.decoder.bias
    with torch.no_grad():
        out, c = sae(x)
        want_c = (x @ w_enc.T + b_enc).relu()
        want = want_c @ (w_dec / w_dec.norm(dim=0)).T + b_dec + x @ sae.W_skip.T
        torch.testing.assert_close(c, want_c)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(sae.decode(c), want - x @ sae.W_skip.T)  # decode: no skip
    # at init W_skip is zero: the same function as a relu SAE with the same weights
    torch.manual_seed(1)
    fresh = build_sae("skip_transcoder", 12, 40, output_size=20)
    torch.manual_seed(1)
    relu = build_sae("relu", 12, 40, output_size=20)
    assert torch.equal(fresh.W_skip, torch.zeros(20, 12))  # type: ignore[arg-type]
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], relu(x)[0])


@pytest.mark.parametrize("site", ["transcoder", "single_hook"])
@pytest.mark.parametrize("kind", list(LOSSES))
def test_trains_under_each_loss_and_w_skip_learns(
    kind: str, site: str, config_dict, tmp_path: Path
) -> None:
    saes: dict[str, Any] = {"dict_size_to_input_ratio": 2.0, "architecture": "skip_transcoder"}
    if site == "transcoder":
        saes.update(sae_positions=[], transcoders=[{"input": TC_IN, "output": TC_OUT}])
        pos = TC_OUT
    else:
        saes.update(sae_positions=[SAE_POS])
        pos = SAE_POS
    cfg = load_config(config_dict(loss=LOSSES[kind], saes=saes, lr=3e-3))
    t = setup(cfg, device="cpu")
    sae = t.model.sae(pos)
    assert isinstance(sae, SkipTranscoder)
    assert torch.equal(sae.W_skip, torch.zeros_like(sae.W_skip))
    batch = next(t.batches(cfg.train_data, cfg.seed))
    same = itertools.repeat(batch)  # one batch over and over: the loss must go down
    state = TrainState()
    t.model.train()
    losses = []
    for step in range(6):
        if step == 1:  # the first step's gradient reached W_skip (which Adam then moved)
            assert float(sae.W_skip.detach().abs().max()) > 0
        losses.append(t.train_step(same, state)["loss"])
    assert losses[-1] < 0.9 * losses[0], losses
    w_skip = sae.W_skip.detach().clone()
    assert float(w_skip.abs().min()) > 0  # every entry moved off zero

    # our checkpoint round trip (from_local_path) keeps W_skip and the outputs
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(run_dir, cfg)
    save_checkpoint(run_dir, t.model, state.n_samples)
    loaded = SAETransformer.from_local_path(run_dir, device="cpu")
    back = loaded.sae(pos)
    assert isinstance(back, SkipTranscoder) and torch.equal(back.W_skip, w_skip)
    t.model.eval()
    loaded.eval()
    with torch.no_grad():
        logits_a, acts_a = t.model.forward(batch)
        logits_b, acts_b = loaded.forward(batch)
    assert logits_a is not None and logits_b is not None and torch.equal(logits_a, logits_b)
    a, b = acts_a[pos], acts_b[pos]
    assert isinstance(a, SAEActs) and isinstance(b, SAEActs) and torch.equal(a.output, b.output)
    # `e2e-sae export` of the run directory, read back: the same SAE
    (folder,) = export_run_saelens(run_dir, tmp_path / "export")
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "skip_transcoder"
    imported, info = load_saelens_sae(folder)
    assert info.position == pos and info.hook_name == (TC_IN if site == "transcoder" else pos)
    with torch.no_grad():
        torch.testing.assert_close(imported(a.input)[0], a.output)


@pytest.mark.parametrize("d_out,hook_out", [(20, TC_OUT), (12, None)], ids=["tc", "single"])
def test_saelens_export_import(d_out: int, hook_out: str | None, tmp_path: Path) -> None:
    sae = make_skip(d_out=d_out)
    folder = save_saelens(sae, tmp_path / "sk", TC_IN, hook_name_out=hook_out, model_name="tiny")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "skip_transcoder"
    assert (cfg["d_in"], cfg["d_sae"], cfg["d_out"]) == (12, 40, d_out)
    assert cfg["metadata"]["hook_name_out"] == (hook_out or TC_IN)
    assert cfg["apply_b_dec_to_input"] is False
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert sorted(tensors) == ["W_dec", "W_enc", "W_skip", "b_dec", "b_enc"]
    assert torch.equal(tensors["W_skip"], sae.W_skip.detach())
    x = torch.randn(4, 6, 12)
    with torch.no_grad():
        out, c = sae(x)
        c_file, out_file = direct(tensors, x)
        torch.testing.assert_close(c_file, c)
        torch.testing.assert_close(out_file, out)
        back, info = load_saelens_sae(folder)
        assert isinstance(back, SkipTranscoder) and info.architecture == "skip_transcoder"
        assert info.position == (hook_out or TC_IN)
        torch.testing.assert_close(back.W_skip, sae.W_skip)
        torch.testing.assert_close(back(x)[0], out)
        torch.testing.assert_close(back(x)[1], c)
    # a file without W_skip, or with the wrong shape, is refused in one line
    bad = {k: v for k, v in tensors.items() if k != "W_skip"}
    flat = {**cfg, **cfg["metadata"]}
    with pytest.raises(UserError, match="without 'W_skip'"):
        sae_from_saelens_tensors(flat, bad)
    with pytest.raises(UserError, match="W_skip has shape"):
        sae_from_saelens_tensors(flat, {**bad, "W_skip": torch.zeros(3, 3)})


def tiny_lm() -> HookedTransformer:
    return build_random_model(TINY_TLENS, device="cpu").train()


def test_saebench_adapter_refuses_the_skip_term() -> None:
    model = SAETransformer(tiny_lm(), [SAE_POS], 2.0, architecture="skip_transcoder")
    with pytest.raises(UserError, match="skip_transcoder"):
        to_saebench(model, SAE_POS, model_name="tiny")


# --- SAELens itself (the `saelens` extra) --------------------------------------------------------
def test_saelens_loads_our_skip_transcoder_and_we_load_theirs(tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_skip()
    folder = save_saelens(sae, tmp_path / "ours", TC_IN, hook_name_out=TC_OUT)
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    assert type(theirs).__name__ == "SkipTranscoder"
    x = torch.randn(5, 12)
    with torch.no_grad():
        out, c = sae(x)
        torch.testing.assert_close(theirs.encode(x), c)
        torch.testing.assert_close(theirs(x), out)
    # the reverse: a SkipTranscoder saved by SAELens (decoder rows far from unit norm)
    from sae_lens.saes.sae import SAEMetadata

    cfg = sae_lens.SkipTranscoderConfig(
        d_in=12,
        d_sae=32,
        d_out=20,
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=TC_IN, hook_name_out=TC_OUT, model_name="tiny"),
    )
    torch.manual_seed(3)
    s = sae_lens.SkipTranscoder(cfg)
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    s.save_model(tmp_path / "theirs")
    ours, info = load_saelens_sae(tmp_path / "theirs")
    assert isinstance(ours, SkipTranscoder) and info.position == TC_OUT
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], s(x))
        assert torch.equal((ours(x)[1] > 0), (s.encode(x) > 0))


def test_spliced_skip_transcoder_writes_its_output_hook() -> None:
    tl = tiny_lm()
    model = SAETransformer(
        tl, [], 2.0, architecture="skip_transcoder", transcoders=[(TC_IN, TC_OUT)]
    )
    sae = model.sae(TC_OUT)
    assert isinstance(sae, SkipTranscoder)
    with torch.no_grad():
        sae.W_skip.normal_()
    tokens = torch.randint(0, TINY_TLENS["d_vocab"], (2, 8))
    with torch.no_grad():
        _, cache = tl.run_with_cache(tokens)
        _, acts = model.forward(tokens)
    a = acts[TC_OUT]
    assert isinstance(a, SAEActs)
    torch.testing.assert_close(a.input, cache[TC_IN])
    x = cache[TC_IN]
    want = F.linear(sae.encode(x), sae.dict_elements, sae.decoder.bias) + x @ sae.W_skip.T
    torch.testing.assert_close(a.output, want)
    assert sae_key(TC_OUT) in model.saes
