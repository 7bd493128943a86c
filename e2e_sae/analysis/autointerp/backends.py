"""The models that explain and score: any OpenAI-compatible chat endpoint, or a local
instruction-tuned Hugging Face model run here (default: the bundled SmolLM2-135M-Instruct).

`HttpChat` posts to `<base URL>/chat/completions` with the standard library (no SDK): greedy
(temperature 0), a timeout per request, and retries with exponential backoff on connection
errors, timeouts, 408/409/429 and 5xx (honouring a `Retry-After` header). Its settings come from
the environment, else from `.env` in the working directory:

- `AUTOINTERP_BASE_URL` (else `OPENAI_BASE_URL`, else https://api.openai.com/v1),
- `AUTOINTERP_API_KEY` (else `OPENAI_API_KEY`; may be empty for a local server),
- `AUTOINTERP_MODEL` (or `--model`).

`LocalChat` runs a causal LM with its chat template. Besides generating text it reads the model's
next-token probabilities, which the scorers use instead of parsing free text (see `scorers`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from e2e_sae.errors import UserError

logger = logging.getLogger(__name__)

ENV_BASE_URL = "AUTOINTERP_BASE_URL"
ENV_API_KEY = "AUTOINTERP_API_KEY"
ENV_MODEL = "AUTOINTERP_MODEL"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
LOCAL_DEFAULT = "smollm2-135m"
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class Reply:
    """A model's answer: the text and the raw response (kept with the results)."""

    text: str
    raw: Any


class ChatBackend(Protocol):
    """What the explainer and the text-parsing scorers need."""

    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int) -> Reply: ...

    def describe(self) -> dict[str, Any]:
        """What identifies this backend in the results (never the API key)."""
        ...


def env_setting(name: str, fallback: str | None = None, env_file: Path | None = None) -> str | None:
    """`name` from the environment, else from `.env` (working directory), else `fallback`'s
    (the same way), else None."""
    from dotenv import dotenv_values

    file = env_file if env_file is not None else Path.cwd() / ".env"
    dot = dotenv_values(file) if file.is_file() else {}
    for key in (name, fallback):
        if key is None:
            continue
        if os.environ.get(key):
            return os.environ[key]
        if dot.get(key):
            return dot[key]
    return None


class HttpChat:
    """An OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 2.0,
        max_backoff: float = 60.0,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        if not model:
            raise UserError(f"--model: the chat backend needs a model name (or set {ENV_MODEL})")
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"{ENV_BASE_URL}: expected an http(s):// URL, got '{base_url}'")
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.extra_body = dict(extra_body or {})

    @classmethod
    def from_env(cls, model: str | None = None, **kw: Any) -> HttpChat:
        base = env_setting(ENV_BASE_URL, "OPENAI_BASE_URL") or DEFAULT_BASE_URL
        key = env_setting(ENV_API_KEY, "OPENAI_API_KEY")
        return cls(model or env_setting(ENV_MODEL) or "", base, key, **kw)

    def describe(self) -> dict[str, Any]:
        return {"kind": "http", "model": self.model, "base_url": self.base_url}

    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int) -> Reply:
        body = {
            "model": self.model,
            "messages": [dict(m) for m in messages],
            "max_tokens": max_tokens,
            "temperature": 0,
            **self.extra_body,
        }
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            wait = min(self.max_backoff, self.backoff * 2**attempt)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = json.loads(resp.read().decode("utf-8"))
                return Reply(_content(raw, self.url), raw)
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                last = f"HTTP {err.code}: {detail}"
                if err.code not in _RETRY_STATUS:
                    raise UserError(f"{self.url}: {last}{_hint(err.code)}") from None
                after = err.headers.get("Retry-After") if err.headers else None
                if after and after.strip().replace(".", "", 1).isdigit():
                    wait = min(self.max_backoff, float(after))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = str(getattr(err, "reason", err))
            except json.JSONDecodeError:
                last = "the reply is not JSON"
            if attempt < self.retries:
                logger.warning("%s: %s; retry %d in %.1f s", self.url, last, attempt + 1, wait)
                time.sleep(wait)
        raise UserError(f"{self.url}: {last} (gave up after {self.retries + 1} tries)")


def _content(raw: Any, url: str) -> str:
    try:
        return raw["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise UserError(f"{url}: the reply has no choices[0].message.content") from None


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read().decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - the status code alone is enough
        return str(err.reason)
    try:
        msg = json.loads(body).get("error", {})
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
        return " ".join(str(msg).split())[:300]
    except (json.JSONDecodeError, AttributeError):
        return " ".join(body.split())[:300] or str(err.reason)


def _hint(code: int) -> str:
    if code in (401, 403):
        return f" (check {ENV_API_KEY} / OPENAI_API_KEY)"
    if code == 404:
        return f" (check {ENV_BASE_URL} and the model name)"
    return ""


class LocalChat:
    """A local causal LM with a chat template: `smollm2-135m` (the bundled GGUF file, offline)
    or a folder with a Hugging Face model and tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, name: str, device: str = "cpu") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"--model {name}: its tokenizer has no chat template")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = device

    @classmethod
    def load(cls, name: str | None = None, device: str | None = None) -> LocalChat:
        from e2e_sae.data.tokenizer import canonical_gguf_name, load_smollm2_tokenizer
        from e2e_sae.lm.gguf import load_smollm2_hf

        name = name or LOCAL_DEFAULT
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model: Any
        if canonical_gguf_name(name) is not None:
            model, tok = load_smollm2_hf(), load_smollm2_tokenizer()
        elif Path(name).is_dir():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(name)
        else:
            raise UserError(
                f"--model {name}: the local backend takes '{LOCAL_DEFAULT}' or a folder with a "
                "Hugging Face model (use --backend http for a served model)"
            )
        return cls(model.to(device), tok, name, device)

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "model": self.name}

    def prompt_ids(self, messages: Sequence[Mapping[str, str]], prefill: str = "") -> list[int]:
        """Token ids of the chat up to the assistant's turn, plus `prefill` (its first words)."""
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        return self.encode(text + prefill)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id, *self.encode("\n")[-1:]}
        return sorted(i for i in ids if i is not None)

    @torch.no_grad()
    def chat(
        self, messages: Sequence[Mapping[str, str]], max_tokens: int, prefill: str = ""
    ) -> Reply:
        """Greedy generation without repeated 3-grams (a small model otherwise loops: 'active on
        "active on "...'); with `prefill` the reply starts with it (and stops at a newline)."""
        ids = torch.tensor([self.prompt_ids(messages, prefill)], device=self.device)
        eos = self.stop_ids() if prefill else [self.tokenizer.eos_token_id]
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            no_repeat_ngram_size=3,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.eos_token_id,
        )
        new = out[0, ids.shape[1] :].tolist()
        text = prefill + self.tokenizer.decode(new, skip_special_tokens=True)
        return Reply(text, {"prompt_tokens": ids.shape[1], "completion_tokens": len(new)})

    @torch.no_grad()
    def next_token_probs(
        self, ids: Sequence[int], at: Sequence[int], branches: Sequence[tuple[int, int]] = ()
    ) -> tuple[Tensor, Tensor]:
        """One forward pass over `ids`: the next-token distributions [len(at), vocab] after each
        position in `at`, and [len(branches), vocab] after each branch (p, t): token t placed at
        position p instead of ids[p] (it sees ids[:p] and itself; a 4D attention mask appends
        the branches to the sequence, so they cost one pass together)."""
        n, k = len(ids), len(branches)
        seq = torch.tensor([*ids, *(t for _, t in branches)], device=self.device)[None]
        pos = torch.tensor([*range(n), *(p for p, _ in branches)], device=self.device)[None]
        mask = torch.zeros(n + k, n + k, dtype=torch.bool, device=self.device)
        mask[:n, :n] = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        for j, (p, _) in enumerate(branches):
            mask[n + j, :p] = True
            mask[n + j, n + j] = True
        # Additive float mask: eager and SDPA attention both take it as it is.
        dtype = next(self.model.parameters()).dtype
        add = torch.zeros(mask.shape, dtype=dtype, device=self.device)
        add.masked_fill_(~mask, torch.finfo(dtype).min)
        # The unembedding only where a distribution is read (~20% of SmolLM2's forward otherwise).
        keep = torch.tensor([*at, *range(n, n + k)], device=self.device)
        logits = self.model(
            seq, attention_mask=add[None, None], position_ids=pos, logits_to_keep=keep
        ).logits[0]
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        return probs[: len(at)], probs[len(at) :]
