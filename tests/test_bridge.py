"""Backend bridge: SAEs spliced into a TransformerBridge around a Hugging Face causal LM.

Most tests use a tiny random `LlamaForCausalLM` saved as a local HF folder (boots in ~0.1 s) and
check the bridge path against the HF model itself; one module fixture loads SmolLM2-135M once
and checks hooks and losses of the bridge against the HookedTransformer on the same weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformer_lens import HookedTransformer
from transformer_lens.model_bridge import TransformerBridge
from transformers import LlamaConfig, LlamaForCausalLM

from e2e_sae.cli import main
from e2e_sae.config import Config, LossConfigs, load_config
from e2e_sae.data.tokenizer import load_tokenizer
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.interop.saelens import saelens_transformer
from e2e_sae.lm.bridge import load_bridge
from e2e_sae.lm.load import load_lm, resolve_backend
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.objective.forward import make_plan, run_forward
from e2e_sae.objective.losses import build_loss_terms, compute_losses

TINY_VOCAB = 4096  # the packaged shakespeare-bpe tokenizer's; the test data uses ids < 97


def tiny_llama(vocab: int = TINY_VOCAB, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local Hugging Face model folder: config.json, weights, tokenizer files."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    load_tokenizer("shakespeare-bpe").save_pretrained(str(folder))
    return folder


@pytest.fixture
def bridge_config(config_dict: Any, hf_dir: Path):
    def make(**overrides: Any) -> dict[str, Any]:
        cfg = config_dict(**overrides)
        cfg.pop("tlens_config")
        cfg.setdefault("hf_model_name", str(hf_dir))
        cfg.setdefault("backend", "bridge")
        return cfg

    return make


E2E_DS_LOSS = {
    "sparsity": {"coeff": 0.1},
    "logits_kl": {"coeff": 1.0},
    "in_to_orig": {"hook_positions": ["blocks.1.hook_resid_post"], "total_coeff": 0.5},
}


# --- config ---------------------------------------------------------------------------------------
def test_exactly_one_model_source(config_dict: Any) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(config_dict(hf_model_name="some/model"))
    msg = str(err.value)
    assert "\n" not in msg
    assert "exactly one of tlens_model_name, tlens_model_path, tlens_config, hf_model_name" in msg
    assert "(got tlens_config, hf_model_name)" in msg
    cfg = config_dict()
    cfg.pop("tlens_config")
    with pytest.raises(ConfigError, match=r"hf_model_name must be set \(got none\)"):
        load_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"backend": "turbo"}, "backend: Input should be"),
        ({"backend": "bridge"}, "backend: bridge needs a Hugging Face model"),
        ({"device_map": "auto"}, "device_map: only for backend bridge"),
    ],
)
def test_bad_backend_settings_exit_2(
    config_dict: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: Any,
    needle: str,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_dict(**overrides)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err, err


def test_device_map_and_n_devices_exclusive(bridge_config: Any) -> None:
    with pytest.raises(ConfigError, match="device_map: give device_map or n_devices, not both"):
        load_config(bridge_config(device_map="cpu", n_devices=1))


def test_auto_backend(config_dict: Any, bridge_config: Any) -> None:
    def backend(**kw: Any) -> str:
        cfg = config_dict(**kw)
        if "tlens_config" not in kw and any(k in kw for k in ("hf_model_name", "tlens_model_name")):
            cfg.pop("tlens_config")
        return resolve_backend(load_config(cfg))

    assert backend() == "hooked"
    assert backend(tlens_model_name="smollm2-135m") == "hooked"
    assert backend(tlens_model_name="shakespeare-lm") == "hooked"
    assert backend(hf_model_name="gpt2") == "hooked"  # HookedTransformer knows it
    assert backend(hf_model_name="some-org/some-new-model") == "bridge"
    assert backend(hf_model_name="smollm2-135m", device_map="cpu") == "bridge"
    assert resolve_backend(load_config(bridge_config(backend="auto"))) == "bridge"  # a folder


def test_hub_failure_is_one_line(bridge_config: Any) -> None:
    config = load_config(bridge_config(hf_model_name="no-such-org/no-such-model-e2e"))
    with pytest.raises(UserError) as err:
        SAETransformer.from_config(config, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("hf_model_name: cannot load 'no-such-org/no-such-model-e2e'"), msg


def test_local_folder_problems(bridge_config: Any, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="hf_model_name: .* has no config.json"):
        SAETransformer.from_config(
            load_config(bridge_config(hf_model_name=str(tmp_path))), device="cpu"
        )
    with pytest.raises(UserError, match="hf_model_name: .* not found"):
        SAETransformer.from_config(
            load_config(bridge_config(hf_model_name=str(tmp_path / "x"))), device="cpu"
        )
    hooked = bridge_config(backend="hooked")
    with pytest.raises(UserError, match="backend: hooked cannot load the local folder"):
        SAETransformer.from_config(load_config(hooked), device="cpu")


# --- the bridge against the HF model it wraps -----------------------------------------------------
def test_bridge_hooks_match_hf(hf_dir: Path) -> None:
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    model = SAETransformer(load_bridge(str(hf_dir)), ["blocks.1.hook_resid_pre"], 2.0)
    assert model.backend == "bridge"
    names = model.all_hook_names
    order = [names.index(f"blocks.{i}.hook_resid_{w}") for i in (0, 1) for w in ("pre", "post")]
    assert order == sorted(order)  # execution order, aliases included
    tokens = torch.randint(0, TINY_VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        logits, cache = model.forward_raw(tokens, cache_positions=["blocks.0.hook_resid_pre"])
        _, stopped = model.forward_raw(tokens, run_entire_model=False)
    assert logits is not None
    torch.testing.assert_close(logits, ref.logits)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], ref.hidden_states[0])
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], ref.hidden_states[1])
    torch.testing.assert_close(stopped["blocks.1.hook_resid_pre"], ref.hidden_states[1])


def test_bridge_e2e_losses_match_a_direct_hf_computation(hf_dir: Path) -> None:
    """KL, downstream MSE and reconstruction MSE from `run_forward` on the bridge equal the same
    terms computed on the bare HF model with the SAE applied by a forward pre-hook."""
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    torch.manual_seed(3)
    model = SAETransformer(load_bridge(str(hf_dir)), ["blocks.1.hook_resid_pre"], 2.0)
    sae = model.sae("blocks.1.hook_resid_pre")
    loss_cfg = LossConfigs.model_validate(
        {"out_to_in": {"coeff": 1.0}, **{k: E2E_DS_LOSS[k] for k in ("logits_kl", "in_to_orig")}}
    )
    plan = make_plan(model, loss_cfg)
    terms = build_loss_terms(loss_cfg, plan.new_cache)
    tokens = torch.randint(0, TINY_VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    _, got = compute_losses(terms, run_forward(model, tokens, plan))

    layer1 = hf.model.layers[1]
    seen: dict[str, torch.Tensor] = {}

    def splice(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        out, _ = sae(seen["x"])
        seen["out"] = out
        return ((out, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": out})

    post: dict[str, torch.Tensor] = {}

    def grab(module: Any, args: Any, output: Any) -> None:
        post["h"] = output[0] if isinstance(output, tuple) else output

    with torch.no_grad():
        h = layer1.register_forward_hook(grab)
        clean = hf(tokens).logits
        clean_post = post["h"]
        s = layer1.register_forward_pre_hook(splice, with_kwargs=True)
        spliced = hf(tokens).logits
        s.remove()
        h.remove()
    p = torch.log_softmax(clean, -1)
    kl = (p.exp() * (p - torch.log_softmax(spliced, -1))).sum(-1).mean()
    torch.testing.assert_close(got["logits_kl"].detach(), kl, rtol=1e-4, atol=1e-6)
    ds = (post["h"] - clean_post).pow(2).mean()
    torch.testing.assert_close(got["in_to_orig"].detach(), ds, rtol=1e-4, atol=1e-6)
    mse = (seen["out"] - seen["x"]).pow(2).mean()
    torch.testing.assert_close(got["out_to_in"].detach(), mse, rtol=1e-4, atol=1e-6)


def test_resid_mid_cannot_be_replaced_on_the_bridge(hf_dir: Path) -> None:
    bridge = load_bridge(str(hf_dir))
    with pytest.raises(ConfigError, match="saes.sae_positions: .*alias of blocks.1.ln2.hook_in"):
        SAETransformer(bridge, ["blocks.1.hook_resid_mid"], 2.0)
    # Reading it (a transcoder's input) is fine.
    SAETransformer(
        bridge, [], 2.0, transcoders=[("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")]
    )


def test_device_map_cpu_and_n_devices_1(bridge_config: Any, config_dict: Any) -> None:
    tokens = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    outs = []
    for extra in ({}, {"device_map": "cpu"}, {"n_devices": 1}):
        model = SAETransformer.from_config(load_config(bridge_config(**extra)), device="cpu")
        assert model.lm.device == torch.device("cpu") and not model.lm.is_split
        with torch.no_grad():
            outs.append(model.forward_raw(tokens)[0])
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"^n_devices: n_devices=2 requires CUDA"):
            SAETransformer.from_config(load_config(bridge_config(n_devices=2)), device="cpu")
    hooked = SAETransformer.from_config(load_config(config_dict(n_devices=1)), device="cpu")
    assert hooked.backend == "hooked" and hooked.tlens_model.cfg.n_devices == 1


# --- training, eval, export, browser through the CLI / API ----------------------------------------
@pytest.fixture
def bridge_run(bridge_config: Any, tmp_path: Path) -> Path:
    """A tiny e2e + downstream run with backend bridge, trained through `e2e-sae train`."""
    path = tmp_path / "bridge.yaml"
    cfg = bridge_config(
        loss=E2E_DS_LOSS,
        n_samples=8,
        eval_n_samples=4,
        saes={"sae_positions": ["blocks.1.hook_resid_pre"], "dict_size_to_input_ratio": 2.0},
    )
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    return run_dir


def test_train_eval_export_with_backend_bridge(bridge_run: Path, tmp_path: Path) -> None:
    model = SAETransformer.from_local_path(bridge_run, device="cpu")
    assert isinstance(model.tlens_model, TransformerBridge) and model.backend == "bridge"
    assert main(["eval", str(bridge_run), "--out", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["ce_loss_clean"] > 0 and "blocks.1.hook_resid_pre" in metrics["per_sae"]

    out = tmp_path / "export"
    assert main(["export", str(bridge_run), str(out)]) == 0
    cfg = json.loads((out / "blocks.1.hook_resid_pre" / "cfg.json").read_text())
    assert cfg["metadata"]["model_class_name"] == "TransformerBridge"
    again = saelens_transformer(model.tlens_model, [out / "blocks.1.hook_resid_pre"])
    x = torch.randn(3, 32)
    torch.testing.assert_close(
        again.sae("blocks.1.hook_resid_pre")(x)[0], model.sae("blocks.1.hook_resid_pre")(x)[0]
    )

    from e2e_sae.analysis.browser import write_browser

    page = write_browser(model, tmp_path / "browser", n_tokens=32, page_size=8, ablate=2)
    assert page.is_file() and (page.parent / "data").is_dir()


def test_local_training_with_backend_bridge(bridge_config: Any) -> None:
    from e2e_sae.training.trainer import train

    config = load_config(bridge_config(n_samples=8, eval_n_samples=4))
    assert isinstance(config, Config)
    run_dir = train(config, device="cpu", progress=False)
    assert SAETransformer.from_local_path(run_dir, device="cpu").backend == "bridge"


# --- smollm2-135m: the bridge and the HookedTransformer on the same weights -----------------------
def test_smollm2_bridge_loader_glue(config_dict: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tlens_model_name: smollm2-135m` + `backend: bridge` boots the bridge on the HF model built
    from the GGUF, with the GGUF tokenizer (no BOS). A tiny stand-in HF model saves ~15 s."""
    from e2e_sae.lm import bridge as bridge_module

    calls: list[dict[str, Any]] = []

    def fake_hf(**kwargs: Any) -> LlamaForCausalLM:
        calls.append(kwargs)
        return tiny_llama(vocab=49152)

    monkeypatch.setattr(bridge_module, "load_smollm2_hf", fake_hf)
    cfg = config_dict(tlens_model_name="smollm2-135m", backend="bridge", device_map="cpu")
    cfg.pop("tlens_config")
    lm = load_lm(load_config(cfg), device="cpu")
    assert isinstance(lm, TransformerBridge)
    assert calls == [{"device_map": "cpu"}]
    assert lm.to_tokens("Hello world").tolist() == [[19556, 905]]


@pytest.fixture(scope="module")
def smollm2_pair() -> Iterator[tuple[HookedTransformer, TransformerBridge]]:
    """SmolLM2-135M as a HookedTransformer and as a bridge over the same dequantized weights
    (loaded once, ~20 s on 2 CPU cores)."""
    from e2e_sae.lm.bridge import smollm2_bridge_from_hf
    from e2e_sae.lm.gguf import load_smollm2_hf, smollm2_from_hf

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        hf_model = load_smollm2_hf()
        hooked = smollm2_from_hf(hf_model)  # first: the bridge wraps the HF modules in place
        yield hooked, smollm2_bridge_from_hf(hf_model)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_smollm2_bridge_matches_hooked(smollm2_pair: tuple[HookedTransformer, TransformerBridge]):
    hooked_lm, bridge_lm = smollm2_pair
    position = "blocks.6.hook_resid_pre"
    torch.manual_seed(0)
    hooked = SAETransformer(hooked_lm, [position], 0.5)
    bridge = SAETransformer(bridge_lm, [position], 0.5)
    bridge.saes.load_state_dict(hooked.saes.state_dict())
    tokens = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))

    hooks = ["blocks.3.hook_resid_pre", "blocks.29.hook_resid_post", "blocks.10.hook_mlp_out"]
    with torch.no_grad():
        _, want = hooked.forward_raw(tokens, run_entire_model=False, cache_positions=hooks)
        _, got = bridge.forward_raw(tokens, run_entire_model=False, cache_positions=hooks)
    for h in hooks:
        assert _rel_err(got[h], want[h]) < 1e-4, h

    ds = {"hook_positions": ["blocks.12.hook_resid_pre"], "total_coeff": 1.0}
    local = {"out_to_in": {"coeff": 1.0}}
    for loss in (local, {**local, "logits_kl": {"coeff": 1.0}, "in_to_orig": ds}):
        loss_cfg = LossConfigs.model_validate(loss)
        values = []
        for model in (hooked, bridge):
            plan = make_plan(model, loss_cfg)
            with torch.no_grad():
                inputs = run_forward(model, tokens, plan)
            values.append(compute_losses(build_loss_terms(loss_cfg, plan.new_cache), inputs)[1])
        for name in values[0]:
            a, b = float(values[1][name]), float(values[0][name])
            assert abs(a - b) <= 1e-4 * abs(b), (name, a, b)


def test_dry_run_and_cache_source_with_backend_bridge(
    bridge_config: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from e2e_sae.caches.activations import model_source

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(bridge_config()))
    assert main(["train", str(path), "--dry-run"]) == 0
    assert "# not checked against the model: backend bridge" in capsys.readouterr().out
    config = load_config(bridge_config())
    assert model_source(config) == {"hf_model_name": config.hf_model_name, "backend": "bridge"}
    hooked = load_config(bridge_config(hf_model_name="gpt2", backend="auto"))
    assert model_source(hooked) == {"hf_model_name": "gpt2"}  # as caches recorded it before
