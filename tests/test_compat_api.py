"""The original e2e_sae 2.1.1's API as its users call it: import paths, `generate`, `forward_raw`,
`forward`, `all_sae_positions`, `hook_shapes` and the helpers of `e2e_sae.utils` / `loader` /
`hooks`, each checked against a direct TransformerLens computation or an exact value."""

from __future__ import annotations

import math
import random
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_TLENS

from e2e_sae import Config, SAETransformer
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.load import build_random_model, builtin_model_dir
from e2e_sae.lm.tl import HAS_HOOKED
from e2e_sae.saes import CacheActs, SAEActs

POSITIONS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]


def tiny_model() -> Any:
    """A random TINY_TLENS model (a HookedTransformer; on TransformerLens 4.x a bridge)."""
    return build_random_model(TINY_TLENS, device="cpu").train()


@pytest.fixture
def model() -> SAETransformer:
    torch.manual_seed(0)
    m = SAETransformer(tiny_model(), POSITIONS, 2.0)
    with torch.no_grad():  # a visible change when spliced in
        for sae in m.saes.values():
            sae.decoder.bias.normal_(0, 2.0)  # pyright: ignore[reportCallIssue]
    return m


def tokens(batch: int = 2, pos: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, TINY_TLENS["d_vocab"], (batch, pos), generator=torch.Generator().manual_seed(seed)
    )


def greedy(tl: Any, toks: torch.Tensor, n: int, hooks=()) -> torch.Tensor:
    """Greedy decoding by hand: one full pass per new token."""
    with torch.no_grad(), tl.hooks(fwd_hooks=list(hooks)):
        for _ in range(n):
            nxt = tl(toks)[:, -1].argmax(-1, keepdim=True)
            toks = torch.cat([toks, nxt], dim=1)
    return toks


def sae_hooks(model: SAETransformer, positions: list[str]) -> list:
    """Hooks that replace each activation by its SAE's output, written out by hand."""

    def replace(sae):
        return lambda x, hook: sae(x)[0]

    return [(p, replace(model.sae(p))) for p in positions]


# --- import paths ------------------------------------------------------------------------------
def test_original_import_paths_give_our_objects() -> None:
    import e2e_sae
    from e2e_sae import saes
    from e2e_sae.hooks import CacheActs, SAEActs, cache_hook, sae_hook
    from e2e_sae.lm.load import load_tlens_model as ours_load
    from e2e_sae.loader import load_pretrained_saes, load_tlens_model
    from e2e_sae.models.sparsifiers import SAE
    from e2e_sae.models.transformers import SAETransformer as ST
    from e2e_sae.utils import (
        filter_names,
        get_cosine_schedule_with_warmup,
        get_hook_shapes,
        get_linear_lr_schedule,
        load_config,
        replace_pydantic_model,
        save_module,
        set_seed,
        to_numpy,
    )

    assert ST is e2e_sae.SAETransformer is SAETransformer
    assert SAE is saes.SAE and SAEActs is saes.SAEActs and CacheActs is saes.CacheActs
    assert load_tlens_model is ours_load
    for f in (
        cache_hook,
        sae_hook,
        load_pretrained_saes,
        filter_names,
        get_hook_shapes,
        get_linear_lr_schedule,
        get_cosine_schedule_with_warmup,
        load_config,
        replace_pydantic_model,
        save_module,
        set_seed,
        to_numpy,
    ):
        assert callable(f)
    # the original's SAE constructor and forward contract
    sae = SAE(input_size=4, n_dict_components=6, init_decoder_orthogonal=True)
    x = torch.randn(3, 4)
    out, c = sae(x)
    assert out.shape == (3, 4) and c.shape == (3, 6) and bool((c >= 0).all())
    expected = torch.relu(sae.encoder[0](x)) @ sae.dict_elements.T + sae.decoder.bias
    torch.testing.assert_close(out, expected)
    assert torch.allclose(sae.dict_elements.norm(dim=0), torch.ones(6))


# --- attributes --------------------------------------------------------------------------------
def test_raw_and_all_sae_positions_and_hook_shapes() -> None:
    m = SAETransformer(tiny_model(), ["hook_resid_pre"], 2.0)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(3)]
    assert m.raw_sae_positions == names
    assert m.all_sae_positions == [n.replace(".", "-") for n in names] == list(m.saes.keys())
    assert m.hook_shapes["blocks.1.hook_resid_pre"][-1] == TINY_TLENS["d_model"]
    assert set(m.hook_shapes) == set(names)
    assert m.hook_shapes(["blocks.0.mlp.hook_post"])["blocks.0.mlp.hook_post"][-1] == 64


def test_to_dtype_updates_the_lm_config(model: SAETransformer) -> None:
    assert model.to(torch.float64) is model
    assert model.tlens_model.cfg.dtype == torch.float64
    assert model.sae(POSITIONS[0]).decoder.weight.dtype == torch.float64
    logits, _ = model.forward(tokens())
    assert logits is not None and logits.dtype == torch.float64


# --- generate ----------------------------------------------------------------------------------
def test_generate_none_is_the_clean_model_and_all_splices_every_sae(model) -> None:
    toks = tokens()
    tl = model.tlens_model
    clean = greedy(tl, toks, 6)
    spliced = greedy(tl, toks, 6, sae_hooks(model, POSITIONS))
    one = greedy(tl, toks, 6, sae_hooks(model, POSITIONS[1:]))
    assert not torch.equal(clean, spliced)  # otherwise the test could not tell them apart
    kw = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(model.generate(toks, sae_positions=None, **kw), clean)
    assert torch.equal(model.generate(toks, sae_positions="all", **kw), spliced)
    assert torch.equal(model.generate(toks, **kw), spliced)  # "all" is the default
    assert torch.equal(model.generate(toks, sae_positions=POSITIONS[1:], **kw), one)
    assert torch.equal(model.generate(toks, sae_positions=[], **kw), clean)
    # the original's own test samples with temperature=0: greedy
    assert torch.equal(model.generate(toks, None, 6, temperature=0.0), clean)


def test_generate_sampling_matches_transformer_lens_sampling(model) -> None:
    from transformer_lens.utilities import sample_logits

    toks = tokens(batch=1)
    tl = model.tlens_model
    torch.manual_seed(3)
    expected = toks
    with torch.no_grad():
        for _ in range(4):
            nxt = sample_logits(tl(expected)[:, -1], top_k=5, temperature=0.7, tokens=expected)
            expected = torch.cat([expected, nxt[:, None]], dim=1)
    torch.manual_seed(3)
    got = model.generate(toks, None, 4, top_k=5, temperature=0.7)
    assert torch.equal(got, expected)


def test_generate_stops_at_eos_and_pads_finished_rows(model) -> None:
    toks = tokens()
    n_prompt = toks.shape[1]
    clean = greedy(model.tlens_model, toks, 5)
    eos = int(clean[0, n_prompt + 1])  # row 0's second new token
    # each row: its greedy tokens up to its first EOS, then EOS; done when every row is
    lengths = []
    for row in clean[:, n_prompt:].tolist():
        lengths.append(row.index(eos) + 1 if eos in row else len(row))
    expected = clean[:, : n_prompt + max(lengths)].clone()
    for r, k in enumerate(lengths):
        expected[r, n_prompt + k :] = eos
    got = model.generate(toks, None, 5, do_sample=False, eos_token_id=eos)
    assert torch.equal(got, expected)
    assert torch.equal(model.generate(toks, None, 5, do_sample=False, eos_token_id=[eos]), expected)
    full = model.generate(toks, None, 5, do_sample=False, eos_token_id=eos, stop_at_eos=False)
    assert torch.equal(full, clean)
    # one row whose first new token is the EOS: done after one token
    first = int(clean[1, n_prompt])
    got = model.generate(toks[1:], None, 5, do_sample=False, eos_token_id=first)
    assert torch.equal(got, clean[1:, : n_prompt + 1])


def test_generate_without_a_known_eos_runs_to_max_new_tokens(model) -> None:
    assert model.tlens_model.tokenizer is None
    got = model.generate(tokens(), max_new_tokens=7, do_sample=False)
    assert isinstance(got, torch.Tensor) and got.shape == (2, 5 + 7)


def test_generate_bad_input_is_a_user_error(model) -> None:
    with pytest.raises(UserError, match="needs a tokenizer"):
        model.generate("hello")
    with pytest.raises(UserError, match="return_type"):
        model.generate(tokens(), return_type="embeds")
    with pytest.raises(UserError, match="not an SAE position"):
        model.generate(tokens(), sae_positions=["blocks.2.hook_resid_pre"])
    with pytest.raises(UserError, match="max_new_tokens=20"):
        model.generate(tokens(pos=5), max_new_tokens=20)  # n_ctx is 16


def test_generate_keeps_each_module_training_flag(model) -> None:
    model.train()
    model.tlens_model.eval()
    model.generate(tokens(), max_new_tokens=1)
    assert all(s.training for s in model.saes.values()) and not model.tlens_model.training


# --- forward_raw / forward ---------------------------------------------------------------------
def test_forward_raw_caches_the_sae_positions_plus_cache_positions(model) -> None:
    toks = tokens()
    extra = ["blocks.2.hook_resid_post", "blocks.0.attn.hook_z"]
    ref_logits, ref = model.tlens_model.run_with_cache(
        toks, names_filter=POSITIONS + extra, return_cache_object=False
    )
    ref = {k: v for k, v in ref.items() if k in POSITIONS + extra}  # (a bridge adds aliases)
    logits, cache = model.forward_raw(toks, run_entire_model=True, cache_positions=extra)
    assert isinstance(logits, torch.Tensor) and torch.equal(logits, ref_logits)
    assert set(cache) == set(POSITIONS + extra) == set(ref)
    for k in ref:
        assert torch.equal(cache[k], ref[k])
    _, cache = model.forward_raw(toks)  # the original always caches the SAE positions
    assert set(cache) == set(POSITIONS)
    _, cache = model.forward_raw(toks, cache_positions=extra, cache_sae_positions=False)
    assert set(cache) == set(extra)


@pytest.mark.parametrize("k", [1, 2])
def test_forward_raw_final_layer_returns_the_residual(model, k: int) -> None:
    toks = tokens()
    extra = ["blocks.0.hook_mlp_out", "blocks.2.hook_resid_post"]
    ref_out, ref = model.tlens_model.run_with_cache(
        toks, names_filter=POSITIONS + extra, return_cache_object=False, stop_at_layer=k
    )
    ref = {k: v for k, v in ref.items() if k in POSITIONS + extra}  # (a bridge adds aliases)
    out, cache = model.forward_raw(toks, False, final_layer=k, cache_positions=extra)
    assert out is not None and torch.equal(out, model.tlens_model(toks, stop_at_layer=k))
    assert torch.equal(out, ref_out) and out.shape == (2, 5, TINY_TLENS["d_model"])
    stop = f"blocks.{k}.hook_resid_pre"
    if not HAS_HOOKED and stop in cache and stop not in ref:
        # TransformerLens 4.x: the bridge stops inside block k's input hook, so that hook (the
        # residual handed back) has run
        assert torch.equal(cache.pop(stop), out)
    assert set(cache) == set(ref)
    for key in ref:
        assert torch.equal(cache[key], ref[key])


def test_forward_raw_without_final_layer_stops_after_the_last_cached_hook(model) -> None:
    calls = []
    model.tlens_model.blocks[2].register_forward_pre_hook(lambda m, a: calls.append(1))
    out, cache = model.forward_raw(tokens(), run_entire_model=False)
    assert out is None and set(cache) == set(POSITIONS) and not calls
    with pytest.raises(UserError, match="final_layer needs run_entire_model=False"):
        model.forward_raw(tokens(), run_entire_model=True, final_layer=1)


def test_forward_as_the_original_calls_it(model) -> None:
    toks = tokens()
    tl = model.tlens_model
    expected = tl.run_with_hooks(toks, fwd_hooks=sae_hooks(model, POSITIONS))
    cache_pos = ["blocks.2.hook_resid_pre"]
    logits, acts = model.forward(
        toks, sae_positions=model.raw_sae_positions, cache_positions=cache_pos
    )
    assert logits is not None and torch.allclose(logits, expected, atol=1e-5)
    assert all(isinstance(acts[p], SAEActs) for p in POSITIONS)
    assert isinstance(acts["blocks.2.hook_resid_pre"], CacheActs)
    seen = {}
    with tl.hooks(fwd_hooks=sae_hooks(model, POSITIONS)):
        tl.run_with_hooks(toks, fwd_hooks=[(cache_pos[0], lambda x, hook: seen.setdefault("x", x))])
    torch.testing.assert_close(acts[cache_pos[0]].input, seen["x"])  # the spliced run's value
    # local: orig_acts from forward_raw go straight through the SAEs, no logits
    _, orig = model.forward_raw(toks, run_entire_model=False)
    none, local = model.forward(toks, sae_positions=POSITIONS, orig_acts=orig)
    assert none is None
    for p in POSITIONS:
        out, c = model.sae(p)(orig[p])
        a = local[p]
        assert isinstance(a, SAEActs) and torch.equal(a.input, orig[p])
        torch.testing.assert_close(a.output, out)
        torch.testing.assert_close(a.c, c)
    # substrings and "all" name SAE positions; an unknown one is a one-line UserError
    _, acts = model.forward(toks, "hook_resid_pre")
    assert set(acts) == {POSITIONS[1]}
    assert set(model.forward(toks, "all")[1]) == set(POSITIONS)
    with pytest.raises(UserError, match="orig_acts has no activation"):
        model.forward(toks, POSITIONS, orig_acts={})


def test_hook_functions_with_partial_as_the_original_used_them(model) -> None:
    from e2e_sae.hooks import cache_hook, sae_hook

    toks = tokens()
    store: dict = {}
    p = POSITIONS[1]
    hooks = [
        (p, partial(sae_hook, sae=model.sae(p), hook_acts=store, hook_key=p)),
        ("blocks.2.hook_resid_pre", partial(cache_hook, hook_acts=store, hook_key="x")),
    ]
    logits = model.tlens_model.run_with_hooks(toks, fwd_hooks=hooks)
    ref_logits, acts = model.forward(toks, [p], ["blocks.2.hook_resid_pre"])
    # (close, not equal: the SAE renormalises its decoder in place at every call)
    torch.testing.assert_close(logits, ref_logits)
    ours = acts[p]
    assert isinstance(store[p], SAEActs) and isinstance(ours, SAEActs)
    torch.testing.assert_close(store[p].c, ours.c)
    assert isinstance(store["x"], CacheActs)
    torch.testing.assert_close(store["x"].input, acts["blocks.2.hook_resid_pre"].input)


# --- e2e_sae.utils -----------------------------------------------------------------------------
def test_utils_filter_names_get_hook_shapes_set_seed_to_numpy() -> None:
    from e2e_sae.utils import filter_names, get_hook_shapes, set_seed, to_numpy

    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]
    assert filter_names(names, "hook_resid_pre") == [names[0], names[2]]
    assert filter_names(names, ["mlp_out", "blocks.1"]) == names[1:]
    assert filter_names(names, ["nothing"]) == []
    shapes = get_hook_shapes(tiny_model(), ["blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post"])
    assert shapes == {"blocks.0.hook_resid_pre": [1, 1, 32], "blocks.0.mlp.hook_post": [1, 1, 64]}
    draws = []
    for _ in range(2):
        set_seed(5)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    assert to_numpy(torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]
    assert to_numpy([1, 2]).tolist() == [1, 2] and to_numpy(3).item() == 3


def test_utils_lr_schedules() -> None:
    from e2e_sae.utils import get_cosine_schedule_with_warmup, get_linear_lr_schedule

    f = get_linear_lr_schedule(0, 0, None, 10)
    assert all(f(s) == 1.0 for s in range(50))
    f = get_linear_lr_schedule(100, 0, None, 10)  # 10 warmup steps
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.6) and f(10) == 1.0
    f = get_linear_lr_schedule(100, 100, 1000, 10)  # 101 steps, cooldown from step 91
    assert f(50) == 1.0 and f(92) == pytest.approx(0.9) and f(101) == 0.0
    assert get_linear_lr_schedule(0, 100, 1000, 10, min_lr_factor=0.25)(101) == 0.25
    with pytest.raises(ConfigError, match="needs n_samples"):
        get_linear_lr_schedule(100, 50, None, 10)
    with pytest.raises(ConfigError, match="before warmup ends"):
        get_linear_lr_schedule(100, 100, 150, 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = get_cosine_schedule_with_warmup(opt, 4, 24, min_lr_factor=0.1)
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1.0) and lrs[4] == pytest.approx(2.0)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lrs[14] == pytest.approx(2.0 * mid) and lrs[24] == pytest.approx(0.2)


def test_utils_load_config_and_replace_pydantic_model(tmp_path: Path) -> None:
    from e2e_sae.utils import load_config, replace_pydantic_model

    config_file = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    cfg = load_config(config_file, Config)
    assert isinstance(cfg, Config) and load_config(cfg, Config) is cfg
    assert load_config(str(config_file), Config) == cfg
    new = replace_pydantic_model(cfg, {"seed": 7}, {"saes": {"dict_size_to_input_ratio": 3.0}})
    assert new.seed == 7 and new.saes.dict_size_to_input_ratio == 3.0
    assert new.saes.sae_positions == cfg.saes.sae_positions and new.lr == cfg.lr
    with pytest.raises(ConfigError):
        replace_pydantic_model(cfg, {"lr": "fast"})


def test_save_module_and_load_pretrained_saes_as_in_the_original(tmp_path: Path) -> None:
    from e2e_sae.loader import load_pretrained_saes
    from e2e_sae.utils import save_module

    tl_cfg = {"n_layers": 3, "d_model": 4, "n_ctx": 3, "d_head": 2, "act_fn": "gelu", "d_vocab": 5}
    first = SAETransformer(build_random_model(tl_cfg), ["blocks.0.hook_resid_post"], 2.0)
    save_module({"seed": 0}, tmp_path / "run", first.saes, "sae.pth")
    assert (tmp_path / "run" / "final_config.yaml").read_text().strip() == "seed: 0"
    # an original-style .pt state dict (torch.save) for another position
    second = SAETransformer(build_random_model(tl_cfg), ["blocks.1.hook_resid_post"], 2.0)
    params = {k: v for k, v in second.saes.state_dict().items() if "tokens_since" not in k}
    torch.save(params, tmp_path / "samples_1.pt")
    positions = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    new = SAETransformer(build_random_model(tl_cfg), positions, 2.0)
    names = [n for n, _ in new.saes.named_parameters()]
    paths = [tmp_path / "run" / "sae.pth", tmp_path / "samples_1.pt"]
    trainable = load_pretrained_saes(new.saes, paths, names, retrain_saes=False)
    assert trainable == [n for n in names if n.startswith("blocks-2-")]
    assert load_pretrained_saes(new.saes, paths, names, retrain_saes=True) == names
    got = new.saes.state_dict()
    for src in (first.saes.state_dict(), params):
        for k, v in src.items():
            assert torch.equal(got[k], v), k
    with pytest.raises(UserError, match="matches no parameter"):
        load_pretrained_saes(first.saes, [tmp_path / "samples_1.pt"], [], False)


# --- built-in model with its tokenizer (offline) -----------------------------------------------
@pytest.mark.skipif(builtin_model_dir("shakespeare-lm") is None, reason="shakespeare-lm missing")
def test_builtin_shakespeare_lm_generates_text_offline() -> None:
    from e2e_sae.loader import load_tlens_model

    tl = load_tlens_model(tlens_model_name="shakespeare-lm", tlens_model_path=None)
    tok = tl.tokenizer
    assert tok is not None and tok.eos_token_id is not None
    model = SAETransformer(tl, ["blocks.2.hook_resid_pre"], 2.0)
    prompt = "To be, or not"
    text = model.generate(prompt, sae_positions=None, max_new_tokens=8, do_sample=False)
    assert isinstance(text, str) and text.startswith(prompt) and len(text) > len(prompt)
    ids = tl.to_tokens(prompt)
    expected = greedy(tl, ids, 8)
    n = expected.shape[1]
    if tok.eos_token_id in expected[0, ids.shape[1] :].tolist():  # stopped at EOS
        n = ids.shape[1] + expected[0, ids.shape[1] :].tolist().index(tok.eos_token_id) + 1
    assert text == tok.decode(expected[0, :n])
    out = model.generate(ids, max_new_tokens=3)  # token ids, stop_at_eos=True by default
    assert isinstance(out, torch.Tensor) and out.shape[1] <= ids.shape[1] + 3
