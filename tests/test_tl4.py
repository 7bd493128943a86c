"""What differs on TransformerLens 4.x: our models as TransformerBridges, written back in
HookedTransformer's format, `smollm2-135m` as its HF model, and the one-line refusals of what needs
HookedTransformer. (tests/test_tl_versions.py: the same numbers as on 3.x.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_TLENS, assert_close_scaled, make_config_dict

from e2e_sae import load_config
from e2e_sae.cli import main
from e2e_sae.errors import UserError
from e2e_sae.lm import native
from e2e_sae.lm.load import (
    build_random_model,
    load_lm,
    load_tlens_model_from_path,
    save_tlens_model,
)
from e2e_sae.lm.tl import HAS_HOOKED, TL_VERSION, require_hooked

only_tl4 = pytest.mark.skipif(HAS_HOOKED, reason=f"TransformerLens 4.x only ({TL_VERSION} here)")
ROTARY_GQA: dict[str, Any] = {
    **TINY_TLENS,
    "normalization_type": "RMS",
    "positional_embedding_type": "rotary",
    "rotary_dim": 4,  # a partial rotary: the last channels of each head stay as they are
    "gated_mlp": True,
    "act_fn": "silu",
    "n_key_value_heads": 2,
    "seed": 11,
}


@pytest.mark.parametrize("fields", [TINY_TLENS, ROTARY_GQA], ids=["ln_gelu", "rotary_gqa"])
def test_saved_model_loads_back_with_the_same_function(fields: dict[str, Any], tmp_path: Path):
    """save_tlens_model writes HookedTransformer's state dict on either version (on 4.x converted
    back from the bridge's layout); loading it gives the same logits."""
    model = build_random_model(fields, device="cpu").eval()
    save_tlens_model(model, tmp_path / "lm")
    again = load_tlens_model_from_path(tmp_path / "lm", device="cpu")
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_scaled(again(tokens), model(tokens), rtol=1e-6, what="logits after reload")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "lm" / "model.safetensors"))
    assert state["blocks.0.attn.W_Q"].shape == (4, 32, 8)  # HookedTransformer's layout
    if fields is ROTARY_GQA:
        assert state["blocks.0.attn._W_K"].shape == (2, 32, 8)


def test_damaged_or_mismatched_saved_model_is_one_line(tmp_path: Path) -> None:
    """On either version: a truncated model.safetensors, or weights that do not fit the folder's
    tlens_config.json, is a one-line UserError naming tlens_model_path, never a traceback."""
    import json

    save_tlens_model(build_random_model(TINY_TLENS, device="cpu"), tmp_path / "lm")
    weights = tmp_path / "lm" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError) as err:
        load_tlens_model_from_path(tmp_path / "lm", device="cpu")
    msg = str(err.value)
    assert msg.startswith("tlens_model_path: ") and "not a readable safetensors" in msg, msg
    assert len(msg.splitlines()) == 1
    weights.write_bytes(good)
    cfg_file = tmp_path / "lm" / "tlens_config.json"
    fields = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**fields, "d_mlp": fields["d_mlp"] * 2}))
    with pytest.raises(UserError, match=r"^tlens_model_path: .*do not fit the config \(.*'"):
        load_tlens_model_from_path(tmp_path / "lm", device="cpu")


@only_tl4
def test_layout_conversion_round_trips() -> None:
    """to_native then from_native gives the HookedTransformer state dict back exactly (rotary
    channel permutation, grouped K/V, gated MLP)."""
    fields = native.resolved_fields(ROTARY_GQA)
    state = native.hooked_init(fields)
    bridge = native.build_bridge(fields, state, "cpu")
    back = native.from_native(bridge, fields)
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k


@only_tl4
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("parallel_attn_mlp", True),
        ("positional_embedding_type", "alibi"),
        ("output_logits_soft_cap", 30.0),
        ("act_fn", "gelu_fast"),
        ("use_local_attn", True),
    ],
)
def test_what_needs_hooked_transformer_is_one_line_naming_the_version(
    field: str, value: Any, token_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UserError) as err:
        build_random_model({**TINY_TLENS, field: value}, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and f"tlens_config.{field}" in msg and TL_VERSION in msg
    assert "transformer-lens>=3.9,<4" in msg
    # through the CLI: exit 2, the one line, no run directory
    cfg = make_config_dict(token_data, tmp_path / "runs", run_name="refused")
    cfg["tlens_config"] = {**cfg["tlens_config"], field: value}
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    err_text = capsys.readouterr().err.strip()
    assert TL_VERSION in err_text and "Traceback" not in err_text
    assert not (tmp_path / "runs" / "refused").exists()


@only_tl4
def test_require_hooked_names_the_version() -> None:
    with pytest.raises(UserError, match=rf"TransformerLens {TL_VERSION} no longer has") as err:
        require_hooked("smollm2_from_hf")
    assert "\n" not in str(err.value)


@only_tl4
def test_smollm2_is_its_hf_model_under_the_bridge(
    config_dict: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tlens_model_name: smollm2-135m` (backend auto) on 4.x: the bridge over the HF model
    built from the GGUF (a tiny stand-in here), with the GGUF tokenizer; the residual at a hook
    is the HF model's hidden state (RMSNorm: no processing changes it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from e2e_sae.lm import bridge as bridge_module

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    ).eval()
    monkeypatch.setattr(bridge_module, "load_smollm2_hf", lambda **kw: hf)
    cfg = config_dict(tlens_model_name="smollm2-135m")
    cfg.pop("tlens_config")
    lm: Any = load_lm(load_config(cfg), device="cpu")
    tokens = lm.to_tokens("Hello world")
    assert tokens.tolist() == [[19556, 905]]
    got: list[torch.Tensor] = []
    with (
        torch.no_grad(),
        lm.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: got.append(x))]),
    ):
        logits = lm(tokens)
        want = hf(tokens, output_hidden_states=True)
    assert_close_scaled(logits, want.logits, rtol=1e-5, what="logits")
    assert_close_scaled(got[0], want.hidden_states[1], rtol=1e-5, what="blocks.1.hook_resid_pre")
