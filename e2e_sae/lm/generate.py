"""Sampling from the LM with SAEs spliced in: `SAETransformer.generate`, the original library's
signature and meaning, one full forward pass per new token (no KV cache)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens.utilities import LocallyOverridenDefaults, sample_logits

from e2e_sae.errors import UserError
from e2e_sae.lm.runner import Hooks, LMRunner


class Spliced(Protocol):
    """What generation needs of `SAETransformer`."""

    tlens_model: Any
    lm: LMRunner

    def resolve_sae_positions(
        self, sae_positions: Sequence[str] | str | None, field: str = ...
    ) -> list[str]: ...

    def splice_hooks(
        self, sae_positions: Sequence[str], cache_positions: Sequence[str] | None = None
    ) -> tuple[Hooks, dict[str, Any]]: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def eval(self) -> Any: ...


@torch.no_grad()
def generate(
    model: Spliced,
    input: str | Tensor = "",
    sae_positions: Sequence[str] | str | None = "all",
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    do_sample: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    prepend_bos: bool | None = None,
    padding_side: Literal["left", "right"] | None = None,
    return_type: str | None = "input",
    verbose: bool = False,
) -> Tensor | str:
    """Sample up to `max_new_tokens` tokens, one full forward pass per token (no KV cache).

    The original library's signature and meaning: `sae_positions="all"` (default) splices
    every SAE in, a list splices those, None runs the clean model; `input` is a string (needs
    the model's tokenizer) or a [batch, pos] token tensor; `return_type` "input" returns the
    input's type, "str" the decoded first sequence (without a prepended BOS), "tensor" /
    "tokens" the token ids. `do_sample=False` (or temperature 0) is greedy. A sequence ends
    at `eos_token_id` (default: the tokenizer's EOS) when `stop_at_eos`; ours differs in
    that a model with no known EOS generates `max_new_tokens` instead of failing, and
    `verbose` (a progress bar) defaults to False.
    """
    tl: Any = model.tlens_model  # HookedTransformer or TransformerBridge: the same text API
    positions = None if sae_positions is None else model.resolve_sae_positions(sae_positions)
    if return_type not in ("input", "str", "tensor", "tokens", None):
        raise UserError(f"generate: return_type '{return_type}' must be 'input', 'str' or 'tensor'")
    if isinstance(input, str):
        if tl.tokenizer is None:
            raise UserError(
                "generate: a string prompt needs a tokenizer (model.tlens_model.tokenizer is "
                "None); pass token ids [batch, pos] instead"
            )
        want_str = return_type in ("input", "str")
    elif isinstance(input, Tensor) and input.ndim == 2:
        want_str = return_type == "str"
    else:
        raise UserError("generate: input must be a string or a [batch, pos] token tensor")
    if want_str and tl.tokenizer is None:
        raise UserError("generate: return_type 'str' needs the model's tokenizer")
    with LocallyOverridenDefaults(tl, prepend_bos=prepend_bos, padding_side=padding_side):
        if isinstance(input, str):
            tokens = tl.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = input.to(tl.cfg.device)
        if tokens.shape[1] + max_new_tokens > tl.cfg.n_ctx:
            raise UserError(
                f"generate: {tokens.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} "
                f"exceed the model's context of {tl.cfg.n_ctx} tokens"
            )
        stops = stop_tokens(model.lm, stop_at_eos, eos_token_id)
        hooks = model.splice_hooks(positions)[0] if positions is not None else []
        with eval_mode(model), model.lm.hooks(hooks):
            tokens = sample(
                model.lm,
                tokens,
                max_new_tokens,
                stops,
                do_sample,
                top_k,
                top_p,
                temperature,
                freq_penalty,
                verbose,
            )
        if not want_str:
            return tokens
        assert tl.tokenizer is not None
        first = tokens[0, 1:] if tl.cfg.default_prepend_bos else tokens[0]
        text = tl.tokenizer.decode(first)
        assert isinstance(text, str)
        return text


def stop_tokens(
    lm: LMRunner, stop_at_eos: bool, eos_token_id: int | Sequence[int] | None
) -> list[int]:
    """The token ids that end a sequence ([]: none; the tokenizer's EOS by default)."""
    if not stop_at_eos:
        return []
    if eos_token_id is None:
        tok = lm.tokenizer
        eos_token_id = getattr(tok, "eos_token_id", None) if tok is not None else None
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


def sample(
    lm: LMRunner,
    tokens: Tensor,
    max_new_tokens: int,
    stop_tokens: list[int],
    do_sample: bool,
    top_k: int | None,
    top_p: float | None,
    temperature: float,
    freq_penalty: float,
    verbose: bool,
) -> Tensor:
    """`tokens` [batch, pos] with up to `max_new_tokens` sampled (or greedy) tokens appended,
    with whatever hooks are active on `lm`."""
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    stops = torch.tensor(stop_tokens, dtype=tokens.dtype, device=tokens.device)
    for _ in tqdm(range(max_new_tokens), disable=not verbose, leave=False):
        logits = lm.run(tokens)
        assert logits is not None
        final_logits = logits[:, -1, :]
        if do_sample:
            new = sample_logits(
                final_logits,
                top_k=top_k,
                top_p=top_p,
                temperature=temperature,
                freq_penalty=freq_penalty,
                tokens=tokens,
            )
        else:
            new = final_logits.argmax(-1)
        new = new.to(tokens.device)
        if stop_tokens:
            # A finished sequence is padded with the (first) EOS token.
            new[finished] = stop_tokens[0]
            finished |= torch.isin(new, stops)
        tokens = torch.cat([tokens, new.unsqueeze(-1)], dim=-1)
        if stop_tokens and bool(finished.all()):
            break
    return tokens


@contextmanager
def eval_mode(model: Spliced) -> Iterator[None]:
    """Eval mode for the duration (e.g. BatchTopK uses its threshold), then each module's
    previous mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
