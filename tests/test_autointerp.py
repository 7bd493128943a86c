"""Automated interpretability: each metric against a direct computation, stratified sampling, the
HTTP client against a real server on loopback, the local model's probability scoring, and the
CLI end to end on tiny trained runs (explainer and scorer: a deterministic loopback server)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_config_dict

from e2e_sae.analysis.autointerp import metrics, prompts, sampling, store
from e2e_sae.analysis.autointerp.backends import HttpChat, LocalChat, env_setting
from e2e_sae.analysis.autointerp.examples import (
    Example,
    build_examples,
    random_windows,
    split_ranks,
    window_codes,
)
from e2e_sae.analysis.autointerp.scorers import detect, simulate_probs
from e2e_sae.analysis.browser import collect_feature_data
from e2e_sae.cli import main
from e2e_sae.config import Config, load_config
from e2e_sae.errors import UserError
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.training.runlog import read_metrics
from e2e_sae.training.trainer import train


# --- metrics -------------------------------------------------------------------------------------
def test_simulation_score_is_pooled_pearson_correlation() -> None:
    rng = np.random.default_rng(0)
    true = [rng.random(7).tolist(), rng.random(5).tolist()]
    pred = [rng.random(7).tolist(), rng.random(5).tolist()]
    direct = np.corrcoef(np.concatenate(true), np.concatenate(pred))[0, 1]
    assert metrics.simulation_score(true, pred) == pytest.approx(direct, rel=1e-12)
    # a perfect simulation up to scale and shift scores 1; a constant one 0
    assert metrics.simulation_score(true, [[3 * x + 1 for x in t] for t in true]) == pytest.approx(
        1
    )
    assert metrics.simulation_score(true, [[2.0] * 7, [2.0] * 5]) == 0.0
    assert np.isnan(metrics.simulation_score([[0.0, 0.0]], [[1.0, 2.0]]))
    with pytest.raises(ValueError):
        metrics.simulation_score([[1.0, 2.0]], [[1.0]])


def test_detection_accuracy_and_auc_match_direct_counts() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    labels = [bool(x) for x in rng.integers(0, 2, 40)]
    # scores with ties (rounded) to exercise the half-credit rule
    scores = [round(float(x), 1) for x in rng.random(40)]
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    auc = metrics.roc_auc(labels, scores)
    assert auc == pytest.approx(pairs / (len(pos) * len(neg)), rel=1e-12)
    assert auc == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    acc = sum((s > 0.5) == y for s, y in zip(scores, labels, strict=True)) / 40
    assert metrics.detection_accuracy(labels, scores) == pytest.approx(acc)
    assert metrics.roc_auc([True, False], [1.0, 0.0]) == 1.0
    assert metrics.roc_auc([True, True], [1.0, 0.0]) != metrics.roc_auc([True, True], [1.0, 0.0])


def test_bootstrap_intervals_match_a_direct_resampling_loop() -> None:
    rng = np.random.default_rng(2)
    values = rng.normal(0.3, 0.2, 25).tolist()
    n_res, seed = 2000, 7
    mean, lo, hi = metrics.bootstrap_ci(values + [float("nan")], seed=seed, n_resamples=n_res)
    # direct: the same seeded index draws, one resample at a time, percentiles by sorting
    idx = np.random.default_rng(seed).integers(0, 25, size=(n_res, 25))
    means = sorted(sum(values[i] for i in row) / 25 for row in idx)
    assert mean == pytest.approx(sum(values) / 25)
    assert lo == pytest.approx(np.quantile(means, 0.025), rel=1e-12)
    assert hi == pytest.approx(np.quantile(means, 0.975), rel=1e-12)
    assert lo < mean < hi
    # the percentile interval of a mean is about mean +- 1.96 standard errors
    se = np.std(values, ddof=1) / 5
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert metrics.bootstrap_ci(values, seed=seed, n_resamples=n_res) == (mean, lo, hi)

    other = rng.normal(0.0, 0.2, 30).tolist()
    d, dlo, dhi = metrics.bootstrap_diff_ci(values, other, seed=seed, n_resamples=n_res)
    ia = np.random.default_rng(seed).integers(0, 25, size=(n_res, 25))
    ib = np.random.default_rng(seed + 1).integers(0, 30, size=(n_res, 30))
    diffs = [
        np.mean([values[i] for i in a]) - np.mean([other[i] for i in b])
        for a, b in zip(ia, ib, strict=True)
    ]
    assert d == pytest.approx(np.mean(values) - np.mean(other))
    assert dlo == pytest.approx(np.quantile(diffs, 0.025), rel=1e-9)
    assert dhi == pytest.approx(np.quantile(diffs, 0.975), rel=1e-9)
    assert np.isnan(metrics.bootstrap_ci([float("nan")])[0])


# --- sampling ------------------------------------------------------------------------------------
def test_stratified_sample_properties() -> None:
    rng = np.random.default_rng(3)
    freq = (10 ** rng.uniform(-5, -1, 500)).tolist()
    freq[7] = 0.0  # dead
    eligible = [i for i in range(500) if freq[i] > 0 and i % 3 != 0]
    s = sampling.sample_features(freq, eligible, 41, seed=5, n_strata=4)
    assert len(s.features) == 41 == len(set(s.features))
    assert set(s.features) <= set(eligible)
    assert sorted(Counter(s.strata).values()) == [10, 10, 10, 11]
    # strata are frequency quantile groups: members lie within their stratum's bounds, in order
    strata = sampling.frequency_strata(freq, eligible, 4)
    sizes = [len(g) for g in strata]
    assert sum(sizes) == len(eligible) == 332 and max(sizes) - min(sizes) <= 1
    assert [i for g in strata for i in g] == sorted(eligible, key=lambda i: (freq[i], i))
    for f, st in zip(s.features, s.strata, strict=True):
        lo, hi = s.bounds[st]
        assert lo <= freq[f] <= hi
    assert all(s.bounds[i][1] <= s.bounds[i + 1][0] for i in range(3))
    # seeded; a larger sample extends a smaller one; another seed gives another sample
    assert sampling.sample_features(freq, eligible, 41, seed=5, n_strata=4) == s
    bigger = sampling.sample_features(freq, eligible, 60, seed=5, n_strata=4)
    assert set(s.features) < set(bigger.features)
    assert set(sampling.sample_features(freq, eligible, 41, seed=6).features) != set(s.features)
    # more than there are: all of them
    assert sorted(sampling.sample_features(freq, eligible[:5], 40).features) == eligible[:5]
    assert sampling.sample_features(freq, [], 10).features == []


# --- prompts and parsers -------------------------------------------------------------------------
def test_prompt_scale_marks_and_parsers() -> None:
    ex = Example([" the", " king", " of", " France"], [0.0, 2.0, 0.04, 1.0])
    msgs = prompts.explainer_messages([ex])
    user = msgs[-1]["content"]
    assert " the[[ king]][[ of]][[ France]]" in user
    assert '1. Tokens: " king" (10), " of" (1), " France" (5)' in user
    assert prompts.scale([0, 0.04, 0.06, 1.0], 1.0) == [0, 1, 1, 10]
    assert (
        prompts.parse_explanation('the feature is active on "I" (5).')
        == 'the feature is active on "I"'
    )

    assert prompts.parse_explanation('Sure!\nExplanation: "royal titles".\n') == "royal titles"
    assert prompts.parse_explanation("  the word king  ") == "the word king"
    reply = "1\t the\t0\n3\t of\t2.5\n2\t king\t12\ngarbage\n9\tx\t4"
    assert prompts.parse_simulation(reply, 4) == ([0.0, 10.0, 2.5, 0.0], 1)
    det = "Text 2: yes\n1: No\n 3) YES\n7: yes"
    assert prompts.parse_detection(det, 4) == ([0.0, 1.0, 1.0, 0.5], 1)


# --- HTTP client against a real server on loopback -----------------------------------------------
class FakeChat:
    """A deterministic OpenAI-compatible chat server: it explains a feature by the token marked
    most often, simulates 10 on that token and 0 elsewhere, and detects the token in a text.
    `fail` holds status codes (or "sleep") to answer the next requests with, in order."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail: list[int | str] = []
        self.lock = threading.Lock()

    def answer(self, body: dict[str, Any]) -> str:
        user = body["messages"][-1]["content"]
        if "What does the feature respond to?" in user:
            marked = Counter(re.findall(r"\[\[(.*?)\]\]", user))
            return f"Explanation: the token {marked.most_common(1)[0][0]}"
        target = re.search(r'explained as: "the token (.*?)"', user)
        tok = target.group(1) if target else "\0"
        if "one numbered token per line" in user:
            lines = re.findall(r"^(\d+)\t(.*)$", user, re.M)
            return "\n".join(f"{n}\t{t}\t{10 if t == tok else 0}" for n, t in lines)
        texts = re.findall(r"^Text (\d+): (.*)$", user, re.M)
        return "\n".join(f"{n}: {'yes' if tok in t else 'no'}" for n, t in texts)


@pytest.fixture
def chat_server() -> Iterator[tuple[str, FakeChat]]:
    state = FakeChat()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(body)
                state.headers.append(dict(self.headers))
                fail = state.fail.pop(0) if state.fail else None
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "no such route"}})
            if fail == "sleep":
                time.sleep(1.0)
                return self._send(200, {"choices": [{"message": {"content": "late"}}]})
            if fail == 429:
                self.send_response(429)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if isinstance(fail, int):
                return self._send(fail, {"error": {"message": f"failure {fail}"}})
            reply = state.answer(body)
            return self._send(200, {"choices": [{"message": {"content": reply}}], "id": "x"})

        def _send(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()


def test_http_client_posts_the_chat_shape_and_retries(chat_server, monkeypatch) -> None:
    url, state = chat_server
    client = HttpChat("m1", url, "sk-test", timeout=0.5, retries=3, backoff=0.01)
    msgs = [{"role": "user", "content": 'Text 1: a b\nsaid: "the token b"'}]
    reply = client.chat(msgs, max_tokens=9)
    body = state.requests[-1]
    assert body == {"model": "m1", "messages": msgs, "max_tokens": 9, "temperature": 0}
    assert state.headers[-1]["Authorization"] == "Bearer sk-test"
    assert reply.raw["id"] == "x" and reply.text == "1: no"
    # 503, 429 (Retry-After 0) and a timeout are retried; the answer then comes through
    state.fail = [503, 429, "sleep"]
    n = len(state.requests)
    assert client.chat(msgs, max_tokens=9).text == "1: no"
    assert len(state.requests) == n + 4
    # a 401 is not retried: one line naming the key's variable
    state.fail = [401]
    with pytest.raises(UserError, match="HTTP 401: failure 401.*AUTOINTERP_API_KEY"):
        client.chat(msgs, max_tokens=9)
    # retries run out: the last error and the number of tries
    state.fail = [500] * 4
    with pytest.raises(UserError, match=r"HTTP 500.*gave up after 4 tries"):
        client.chat(msgs, max_tokens=9)
    with pytest.raises(UserError, match="HTTP 404"):
        HttpChat("m1", url.removesuffix("/v1"), retries=0).chat(msgs, 5)
    # nothing listens there: connection refused, retried, then one line
    with pytest.raises(UserError, match="gave up after 2 tries"):
        HttpChat("m", "http://127.0.0.1:9/v1", retries=1, backoff=0.01).chat(msgs, 5)


def test_http_settings_from_environment_and_dotenv(tmp_path: Path, monkeypatch) -> None:
    for k in ("AUTOINTERP_BASE_URL", "AUTOINTERP_API_KEY", "AUTOINTERP_MODEL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("AUTOINTERP_MODEL=from-dotenv\nOPENAI_API_KEY=k1\n")
    c = HttpChat.from_env()
    assert (c.model, c.api_key, c.base_url) == ("from-dotenv", "k1", "https://api.openai.com/v1")
    monkeypatch.setenv("AUTOINTERP_MODEL", "from-env")
    monkeypatch.setenv("AUTOINTERP_BASE_URL", "http://localhost:8000/v1/")
    c = HttpChat.from_env()
    assert (c.model, c.url) == ("from-env", "http://localhost:8000/v1/chat/completions")
    assert "k1" not in json.dumps(c.describe())
    assert env_setting("NOPE_NOT_SET") is None
    monkeypatch.delenv("AUTOINTERP_MODEL")
    (tmp_path / ".env").write_text("")
    with pytest.raises(UserError, match="--model"):
        HttpChat.from_env()


# --- the local model: probabilities, one forward pass --------------------------------------------
class _Tok:
    """A character-level tokenizer with a chat template, for a tiny random Llama."""

    chat_template = "x"
    eos_token_id = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:  # noqa: ANN001
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # digits are single tokens, so "10" is two: the branch case
        return [1 + (ord(c) % 120) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 1) for i in ids)


@pytest.fixture(scope="module")
def tiny_local() -> LocalChat:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    return LocalChat(LlamaForCausalLM(cfg), _Tok(), "tiny")


def test_branch_probabilities_match_separate_forward_passes(tiny_local: LocalChat) -> None:
    ids = tiny_local.encode("abc\tdef\t?\nxy\t")
    probs, branch = tiny_local.next_token_probs(ids, [3, len(ids) - 1], [(4, 7), (len(ids), 9)])
    with torch.no_grad():
        full = torch.softmax(tiny_local.model(torch.tensor([ids])).logits[0].float(), -1)
        b1 = tiny_local.model(torch.tensor([ids[:4] + [7]])).logits[0, -1]
        b2 = tiny_local.model(torch.tensor([ids + [9]])).logits[0, -1]
    from conftest import assert_close_scaled

    assert_close_scaled(probs, full[[3, len(ids) - 1]], 1e-4, "slot distributions")
    assert_close_scaled(branch[0], torch.softmax(b1.float(), -1), 1e-4, "branch 1")
    assert_close_scaled(branch[1], torch.softmax(b2.float(), -1), 1e-4, "branch 2")


def test_probability_simulation_matches_a_direct_computation(tiny_local: LocalChat) -> None:
    ex = Example(["a", "bb"], [0.0, 1.0])
    msgs = prompts.simulation_messages("letters", ex)
    preds, dists = simulate_probs(tiny_local, msgs, ex)
    enc = tiny_local.encode
    ids = tiny_local.prompt_ids(msgs)
    model = tiny_local.model
    for n, tok in enumerate(ex.tokens, 1):
        ids = ids + enc(f"{n}\t{tok}\t")
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            q = torch.softmax(model(torch.tensor([ids + enc("1")])).logits[0, -1].double(), -1)
        mass = [float(p[enc(str(v))[0]]) for v in range(10)] + [0.0]
        one, zero = enc("1")[0], enc("0")[0]
        mass[1] = float(p[one] * (1 - q[zero]))
        mass[10] = float(p[one] * q[zero])
        dist = np.array(mass) / sum(mass)
        assert np.allclose(dists[n - 1], dist, atol=2e-4)
        assert preds[n - 1] == pytest.approx(float(dist @ np.arange(11)), abs=2e-3)
        ids = ids + enc("unknown\n")


def test_local_detection_reads_yes_no_probabilities(tiny_local: LocalChat) -> None:
    pos = [Example(["x", "y"], [0.0, 2.0])]
    neg = [Example(["z"], [0.0]), Example(["w"], [0.0])]
    det = detect(tiny_local, "letters", pos, neg, seed=0)
    assert sorted(det.order) == [0, 1, 2] and det.labels.count(True) == 1
    yes = [tiny_local.encode(w)[0] for w in ("Yes", "yes") if len(tiny_local.encode(w)) == 1]
    assert yes == []  # character-level: no one-token "Yes"; every score falls back to 0.5
    assert det.scores == [0.5, 0.5, 0.5] and det.auc == 0.5 and det.accuracy == 2 / 3


# --- examples from the browser's scan ------------------------------------------------------------
def _config(data: Path, save: Path, **kw: Any) -> Config:
    cfg = load_config(make_config_dict(data, save, **kw))
    assert isinstance(cfg, Config)
    return cfg


def test_examples_split_the_browser_scan_and_random_windows_are_exact(
    token_data: Path, tmp_path: Path
) -> None:
    cfg = _config(token_data, tmp_path)
    model = SAETransformer.from_config(cfg, device="cpu")
    pos = model.sae_positions[0]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 97, (4, 16), generator=g) for _ in range(3)]
    fd = collect_feature_data(model, pos, iter(batches), 3, None, top_k=5, before=3, after=2)
    tokens = torch.cat(batches)
    with torch.no_grad():
        _, cache = model.forward_raw(tokens, run_entire_model=False, cache_positions=[pos])
        c = model.sae(pos).encode(cache[pos])  # [12, 16, F]
    f = int((fd.top_values > 0).sum(0).argmax())
    windows = random_windows(12, 16, 6, 10, seed=0, skip_first=True)
    assert len(set(windows)) == 10 and all(1 <= s <= 10 for _, s in windows)
    codes = window_codes(model, pos, tokens, windows, 6, [f, 0], batch_size=5)
    for i, (s, st) in enumerate(windows):
        assert torch.allclose(codes[i, :, 0], c[s, st : st + 6, f], atol=1e-5, rtol=1e-4)
    ex = build_examples(
        fd,
        f,
        lambda ids: [str(i) for i in ids],
        n_score_top=2,
        random_windows=windows,
        random_acts=codes[:, :, 0],
        n_random=3,
        n_nonactivating=4,
    )
    explain_r, held = split_ranks(5, 2)
    assert (explain_r, held) == ([0, 2, 4], [1, 3])
    top_seqs = fd.sequences[:, f].tolist()
    firing = [r for r in range(5) if fd.top_values[r, f] > 0]
    assert len(ex.explain) == sum(r in explain_r for r in firing)
    for e, r in zip(ex.score_top, [r for r in held if r in firing], strict=True):
        assert max(e.acts) == pytest.approx(float(fd.top_values[r, f]))
        st = int(fd.starts[r, f])
        assert e.tokens == [str(t) for t in tokens[top_seqs[r], st : st + 6].tolist()]
    assert len(ex.score_random) == 3
    assert all(max(e.acts) <= 0 for e in ex.nonactivating)
    silent = [i for i in range(10) if float(codes[i, :, 0].max()) <= 0][:4]
    assert [e.acts for e in ex.nonactivating] == [codes[i, :, 0].tolist() for i in silent]
    assert 1 <= len(ex.quantile) <= 5


# --- the CLI end to end --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_runs(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ai_runs")
    specs = {
        "local": {},
        "e2e": {"loss": {"sparsity": {"coeff": 0.1}, "logits_kl": {"coeff": 1.0}}},
    }
    return {
        name: train(_config(token_data, root, n_samples=64, **kw), root / name, progress=False)
        for name, kw in specs.items()
    }


def _env(monkeypatch, url: str) -> None:
    monkeypatch.setenv("AUTOINTERP_BASE_URL", url)
    monkeypatch.setenv("AUTOINTERP_API_KEY", "sk-test")
    monkeypatch.setenv("AUTOINTERP_MODEL", "fake-chat")


ARGS = ["--backend", "http", "--n-tokens", "1024", "--n-explain", "3", "--n-score-top", "2"]


def test_cli_explains_scores_resumes_and_compares(
    tiny_runs: dict[str, Path], chat_server, monkeypatch, tmp_path: Path, capsys
) -> None:
    url, state = chat_server
    _env(monkeypatch, url)
    run, other = tiny_runs["e2e"], tiny_runs["local"]
    out = tmp_path / "ai"
    argv = ["autointerp", str(run), *ARGS, "--n-features", "6", "--out", str(out)]
    assert main([*argv, "--compare", str(other)]) == 0
    printed = capsys.readouterr().out
    assert "simulation (Pearson r)" in printed and "Δ simulation vs 1" in printed
    res = store.read_results(out / run.name)
    assert res["n_features"] == 6 and res["sae_type"] == "e2e"
    # no eval.json: the CE increase of the last in-training evaluation
    last = [m for m in read_metrics(run) if "eval/ce_loss_increase" in m][-1]
    assert res["ce_loss_increase"] == pytest.approx(last["eval/ce_loss_increase"])
    assert res["ce_loss_increase_source"].startswith("metrics.jsonl")
    assert res["explainer"] == {"kind": "http", "model": "fake-chat", "base_url": url}
    # per feature: 1 explain + 7 simulation requests (2 top + 5 random) + 1 detection request
    n_req = len(state.requests)
    assert n_req == 2 * 6 * (1 + 7 + 1)
    # the summary is the bootstrap of the per-feature files' scores
    sims, aucs = [], []
    for row in res["features"]:
        rec = json.loads((out / run.name / "features" / f"{row['feature']}.json").read_text())
        ex = rec["simulation"]["examples"]
        assert rec["simulation"]["score"] == pytest.approx(
            metrics.simulation_score([e["acts"] for e in ex], [e["predicted"] for e in ex])
        )
        ctx = rec["detection"]["contexts"]
        auc = metrics.roc_auc([c["label"] for c in ctx], [c["score"] for c in ctx])
        # no silent window for a feature that fires everywhere: no AUC (null)
        assert rec["detection"]["auc"] == (None if np.isnan(auc) else pytest.approx(auc))
        assert [c["label"] for c in ctx].count(True) == 2
        assert rec["records"]["explain"]["messages"][-1]["role"] == "user"
        assert rec["records"]["explain"]["reply"].startswith("Explanation: the token")
        assert rec["explanation"] == rec["records"]["explain"]["reply"][len("Explanation: ") :]
        sims.append(rec["simulation"]["score"])
        aucs.append(auc)
    s = res["summary"]["simulation"]
    assert (s["mean"], s["low"], s["high"]) == pytest.approx(metrics.bootstrap_ci(sims, 0))
    if not np.isnan(aucs).all():
        assert res["summary"]["detection_auc"]["mean"] == pytest.approx(np.nanmean(aucs))
    cmp = json.loads((out / "autointerp_comparison.json").read_text())
    assert [r["run"] for r in cmp["runs"]] == [run.name, other.name]
    d = cmp["runs"][1]["simulation_diff"]
    other_sims = [r["simulation"] for r in store.read_results(out / other.name)["features"]]
    assert d["mean"] == pytest.approx(np.nanmean(other_sims) - np.mean(sims))
    assert (out / "autointerp_scores.png").stat().st_size > 10_000
    from e2e_sae.analysis.autointerp.report import load_run_results

    assert load_run_results([run, other]) == ([], [run.name, other.name])  # results in --out

    # a rerun does nothing new; more features only do the new ones
    assert main(argv) == 0
    assert len(state.requests) == n_req
    assert main([*argv[:-4], "--n-features", "8", "--out", str(out)]) == 0
    assert len(state.requests) == n_req + 2 * 9
    res8 = store.read_results(out / run.name)
    assert {r["feature"] for r in res["features"]} < {r["feature"] for r in res8["features"]}
    # other settings in the same folder: one line, exit 2; --overwrite starts over
    capsys.readouterr()
    assert main([*argv, "--n-random", "1"]) == 2
    assert "other settings" in capsys.readouterr().err
    n_req = len(state.requests)
    assert main([*argv, "--n-random", "1", "--overwrite"]) == 0
    assert len(state.requests) == n_req + 6 * (1 + 3 + 1)
    assert len(list((out / run.name / "features").iterdir())) == 6
    rec = json.loads(next((out / run.name / "features").iterdir()).read_text())
    assert [e["kind"] for e in rec["simulation"]["examples"]] == ["top", "top", "random"]


def test_cli_user_errors_exit_2_without_writing(
    tiny_runs: dict[str, Path], chat_server, monkeypatch, tmp_path: Path, capsys
) -> None:
    url, state = chat_server
    _env(monkeypatch, url)
    run = tiny_runs["e2e"]
    out = tmp_path / "x"
    assert main(["autointerp", str(tmp_path / "nope"), *ARGS]) == 2
    assert main(["autointerp", str(run), *ARGS, "--n-features", "0", "--out", str(out)]) == 2
    assert "n_features" in capsys.readouterr().err
    assert main(["autointerp", str(run), *ARGS, "--n-explain", "70", "--out", str(out)]) == 2
    assert "no feature fires in 72 of the 64 scanned sequences" in capsys.readouterr().err
    assert not out.exists() and not state.requests
    state.fail = [401]
    assert main(["autointerp", str(run), *ARGS, "--out", str(out)]) == 2
    assert "HTTP 401" in capsys.readouterr().err


def test_browser_shows_the_explanation(
    tiny_runs: dict[str, Path], chat_server, monkeypatch, tmp_path: Path
) -> None:
    from e2e_sae.analysis.browser import write_browser

    url, _ = chat_server
    _env(monkeypatch, url)
    run = tiny_runs["local"]
    assert main(["autointerp", str(run), *ARGS, "--n-features", "3"]) == 0
    res = store.read_results(run / "autointerp")
    from e2e_sae.analysis.autointerp.report import load_run_results

    assert load_run_results([run]) == ([res], [])
    html = write_browser(run, tmp_path / "b", n_tokens=1024, page_size=1000)
    data = tmp_path / "b" / "data"
    index = _read_js(data / "index.js", "registerIndex")
    assert "autointerp" in [c["key"] for c in index["columns"]]
    by_id = dict(zip(index["ids"], index["autointerp"], strict=True))
    _, page = _read_js(data / "page_0.js", "registerPage")
    for row in res["features"]:
        assert by_id[row["feature"]] == pytest.approx(row["simulation"], abs=1e-3)
        slot = index["slot"][index["ids"].index(row["feature"])]
        assert page["features"][slot]["expl"][0] == row["explanation"]
    assert sum(v is not None for v in index["autointerp"]) == 3
    assert "explanation" in html.read_text()


def _read_js(path: Path, fn: str) -> Any:
    text = path.read_text(encoding="utf-8")
    args = json.loads("[" + text[len(fn) + 1 : -3] + "]")
    return args[0] if len(args) == 1 else args


# --- the real local model ------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_backend_explains_and_scores_two_features(
    tiny_runs: dict[str, Path], tmp_path: Path
) -> None:
    from e2e_sae.analysis.autointerp.pipeline import make_settings, run_autointerp

    local = LocalChat.load(device="cpu")
    settings = make_settings(n_features=2, n_tokens=1024, n_explain=3, n_score_top=2)
    res = run_autointerp(tiny_runs["e2e"], local, settings=settings, out=tmp_path / "s")
    assert res["explainer"] == {"kind": "local", "model": "smollm2-135m"}
    assert res["n_features"] == 2
    for row in res["features"]:
        rec = json.loads((tmp_path / "s" / "features" / f"{row['feature']}.json").read_text())
        assert rec["explanation"] and rec["records"]["explain"]["raw"]["completion_tokens"] > 0
        for e in rec["simulation"]["examples"]:
            assert all(0 <= p <= 10 for p in e["predicted"])
        dists = rec["records"]["simulation"][0]["raw"]["label_probs"]
        assert all(abs(sum(d) - 1) < 1e-3 for d in dists)
        assert all(0 < c["score"] < 1 for c in rec["detection"]["contexts"])
        assert -1 <= row["simulation"] <= 1


def test_demo_local_config_is_the_demo_with_a_local_loss() -> None:
    """The README's autointerp example compares the demo's e2e SAE with this local one."""
    repo = Path(__file__).resolve().parents[1]
    demo = load_config(repo / "configs" / "demo.yaml")
    local = load_config(repo / "configs" / "demo_local.yaml")
    assert isinstance(demo, Config) and isinstance(local, Config)
    assert demo.model_dump(exclude={"loss"}) == local.model_dump(exclude={"loss"})
    assert local.loss.logits_kl is None and local.loss.out_to_in is not None


def test_scores_figure_layout() -> None:
    from e2e_sae.analysis.autointerp.report import scores_figure

    rng = np.random.default_rng(0)

    def res(kind: str, l0: float) -> dict[str, Any]:
        feats = [
            {
                "feature": i,
                "frequency": float(10 ** rng.uniform(-4, -1)),
                "simulation": float(rng.normal(0.2, 0.2)),
                "detection_auc": float(rng.uniform(0.3, 1)),
                "detection_accuracy": 0.5,
            }
            for i in range(12)
        ]
        return {"sae_type": kind, "l0": l0, "features": feats}

    runs = [res("e2e", 16.2), res("local", 16.1)]
    fig = scores_figure(runs)
    sim, det, freq = fig.axes
    assert [t.get_text() for t in sim.get_xticklabels()] == ["1. e2e, L0 16.2", "2. local, L0 16.1"]
    assert sim.get_ylabel() == "simulation score (Pearson r)"
    assert det.get_ylabel() == "detection AUC"
    assert freq.get_xlabel() == "firing frequency (fraction of tokens)"
    assert freq.get_xscale() == "log"
    # every feature a point; the black mean markers sit at the means
    from matplotlib.collections import PathCollection

    dots = [c for c in sim.collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in dots) == 24
    means = sorted(float(ln.get_ydata()[0]) for ln in sim.lines if ln.get_marker() == "o")
    assert means == pytest.approx(
        sorted(np.mean([f["simulation"] for f in r["features"]]) for r in runs)
    )
    fig.canvas.draw()
    legend = freq.get_legend()
    assert legend is not None and legend.get_window_extent().y1 <= freq.get_window_extent().y0


def test_paper_figures_shows_the_runs_autointerp_comparison(
    tiny_runs: dict[str, Path], chat_server, monkeypatch, tmp_path: Path
) -> None:
    """`paper-figures` on runs with autointerp results: the comparison table and figure of those
    runs (in the order given), a note for a run without; with none, a note and no section."""
    import shutil

    from e2e_sae.analysis import paper
    from e2e_sae.analysis.autointerp.report import compare, comparison_table
    from e2e_sae.analysis.autointerp.section import TITLE, autointerp_section, register

    monkeypatch.setattr(paper, "SECTIONS", list(paper.SECTIONS))
    register()
    register()  # once only
    assert [t for t, _ in paper.SECTIONS].count(TITLE) == 1

    url, _ = chat_server
    _env(monkeypatch, url)
    runs = {k: tmp_path / k for k in ("e2e", "local", "bare")}
    shutil.copytree(tiny_runs["e2e"], runs["e2e"])
    shutil.copytree(tiny_runs["local"], runs["local"])
    shutil.copytree(tiny_runs["local"], runs["bare"])
    for r in runs.values():
        shutil.rmtree(r / "autointerp", ignore_errors=True)  # another test's results
    sections = [("Runs", paper.runs_section), (TITLE, autointerp_section)]

    paper.paper_figures(list(runs.values()), tmp_path / "none", sections=sections)
    index = (tmp_path / "none" / "index.md").read_text()
    assert "no run has results" in index and f"## {TITLE}" not in index
    assert not list((tmp_path / "none").glob("autointerp_*"))

    for name in ("local", "e2e"):
        assert main(["autointerp", str(runs[name]), *ARGS, "--n-features", "3"]) == 0
    out = tmp_path / "fig"
    paper.paper_figures(list(runs.values()), out, sections=sections)
    index = (out / "index.md").read_text()
    assert f"## {TITLE}" in index and "(autointerp_scores.png)" in index
    assert "[autointerp_comparison.md](autointerp_comparison.md)" in index
    assert "no results for bare" in index
    assert 'src="autointerp_scores.png"' in (out / "index.html").read_text()
    results = [store.read_results(runs[n] / "autointerp") for n in ("e2e", "local")]
    table = (out / "autointerp_comparison.md").read_text()
    assert table == "# Autointerp comparison\n\n" + comparison_table(compare(results)) + "\n"
    cmp = json.loads((out / "autointerp_comparison.json").read_text())
    assert [r["run"] for r in cmp["runs"]] == ["e2e", "local"]
