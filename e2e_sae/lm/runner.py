"""The one seam between SAE code and the frozen LM: an `LMRunner` per backend, chosen once.

`SAETransformer` holds a HookedTransformer or a TransformerBridge as `tlens_model` and talks to it
only through `make_runner(tlens_model)` (`model.lm`): run with TransformerLens-style hooks, the
hook names in execution order, sizes, the tokenizer, the unembedding. The training / eval
forward (`e2e_sae.objective.forward`) needs only the step-level part: `embed`, `run_blocks` (from
a block, with hooks, stopping after some hooks or before a block; else returning the final
normalised residual) and `unembedding_fn` (final residual -> logits). `step_runner` picks, once
per step plan, the lean runner (`LeanRunner` over `fastlm.LeanLM`) where it supports the model
and the plan's hooks, else the backend's runner.

What each runner can do:

| | `LeanRunner` | `HookedRunner` | `BridgeRunner` |
| --- | --- | --- | --- |
| hooks, `stop_at_layer`, stop after hooks | `blocks.L.*` hooks | yes | yes |
| `start_at_layer` (shared prefix of the e2e passes) | yes | yes (1) | no (2) |
| final residual + `unembedding_fn` (chunked KL, teacher cache) | yes | yes (3) | yes (4) |
| replacing `hook_resid_mid` | yes | yes | no (5) |

(1) Not for shortformer positions or a left-padding tokenizer: past the embedding TransformerLens
no longer has the tokens. (2) Both e2e passes run from the tokens. (3) Not with
`output_logits_soft_cap`: `run_blocks` returns logits. (4) Captured at `unembed.hook_in`; not
when spread over devices or when the HF model changes its logits after `lm_head` (checked once):
logits. (5) An alias of `ln2.hook_in`: the skip connection would keep the clean value.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.model_bridge import TransformerBridge

from e2e_sae.errors import UserError
from e2e_sae.lm.fastlm import LeanLM, get_lean_lm

Hooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]
"""TransformerLens forward hooks: (hook name or name filter, fn(activation, hook) -> activation)."""
StepHooks = Sequence[tuple[str | Callable[..., Any], Callable[..., Any]]]
"""Hooks for `run_blocks` (by hook name: the lean runner takes no filters)."""
LM = HookedTransformer | TransformerBridge
"""The LM types `SAETransformer` accepts."""
BACKENDS = ("hooked", "bridge")

_RESID_MID_RE = re.compile(r"^blocks\.\d+\.hook_resid_mid$")
_FINAL_HOOK = "unembed.hook_in"
"""The bridge's hook on `lm_head`'s input: the final normalised residual."""


_NO_START = (
    "start_at_layer: not supported by backend bridge (TransformerBridge runs the "
    "Hugging Face forward from the tokens)"
)


class _Stop(Exception):
    """Raised from a hook to end a pass early: the one way any pass here stops (every hook in
    `stop_after` has run, or the bridge's final residual is captured); `run_blocks` catches it."""


@dataclass(frozen=True)
class Unembedding:
    """The frozen LM's unembedding: logits = (final @ weight.T in weight's dtype), fp32, + bias."""

    weight: Tensor  # [d_vocab, d_model]
    bias: Tensor | None = None

    def __call__(self, final: Tensor) -> Tensor:
        out = F.linear(final.to(self.weight.dtype), self.weight).float()
        return out if self.bias is None else out + self.bias


class LMRunner(Protocol):
    """What the SAE code needs from the frozen LM (see the module docstring for who does what)."""

    backend: str
    supports_start_at_layer: bool
    """`run_blocks` takes a residual from a block `start > 0` (else: tokens with start 0 only)."""

    @property
    def final_is_residual(self) -> bool:
        """`run_blocks` returns the final normalised residual and `unembedding_fn` maps it to
        the logits (False: `run_blocks` returns the logits themselves)."""
        ...

    @property
    def model(self) -> LM:
        """The wrapped LM (what `SAETransformer.tlens_model` is)."""
        ...

    @property
    def n_layers(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    @property
    def d_vocab(self) -> int: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def device(self) -> torch.device:
        """Where the LM takes its input (the embedding's device); the SAEs live there too."""
        ...

    @property
    def is_split(self) -> bool:
        """Spread over several devices (`n_devices` / `device_map`): `.to()` must not move it."""
        ...

    @property
    def tokenizer(self) -> Any: ...

    def hook_names(self) -> list[str]:
        """Every hook name (aliases included), in the order a forward pass runs them."""
        ...

    def hooks(self, fwd_hooks: Hooks) -> AbstractContextManager[Any]:
        """The hooks active for the duration (removed on exit, also after an exception)."""
        ...

    def run(
        self,
        x: Tensor,
        *,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        return_type: str | None = "logits",
    ) -> Tensor | None:
        """Logits [batch, pos, d_vocab] of tokens x (or of residual x before block
        `start_at_layer`), the residual before block `stop_at_layer`, or None."""
        ...

    def embed(self, tokens: Tensor) -> Tensor:
        """The residual stream before block 0 [batch, pos, d_model]."""
        ...

    def run_blocks(
        self,
        x: Tensor,
        start: int = 0,
        hooks: StepHooks = (),
        *,
        stop_after: Sequence[str] = (),
        stop_at_layer: int | None = None,
    ) -> Tensor | None:
        """Blocks `start..` on tokens x (start 0) or on the residual before block `start`, with
        `hooks` (by hook name). Returns None once every hook in `stop_after` has run (nothing
        later is computed), else the residual before block `stop_at_layer`, else the final
        normalised residual [batch, pos, d_model] (the logits if not `final_is_residual`)."""
        ...

    def unembedding_fn(self) -> Unembedding:
        """Final normalised residual -> logits (what the chunked KL and the teacher use)."""
        ...

    def lean(self, precision: str = "fp32") -> LeanLM | None:
        """The lean forward over these weights (None: there is none; see `step_runner`)."""
        ...

    def embedding_weight(self) -> Tensor: ...

    def unembedding(self) -> tuple[Tensor, Tensor | None, bool]:
        """(W_U [d_model, d_vocab], the final norm's weight or None, whether the final norm
        subtracts the mean): what direct logit effects of a residual direction need."""
        ...

    def replace_problem(self, hook_name: str) -> str | None:
        """Why an SAE may not replace the activation at `hook_name` (None: it may)."""
        ...


class _TLRunner:
    """What HookedTransformer and TransformerBridge share: sizes from their TransformerLens
    config, the tokenizer, TransformerLens-style hooks."""

    model: Any

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.model.cfg.d_vocab)

    @property
    def n_ctx(self) -> int:
        return int(self.model.cfg.n_ctx)

    @property
    def is_split(self) -> bool:
        return int(getattr(self.model.cfg, "n_devices", 1) or 1) > 1

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def hooks(self, fwd_hooks: Hooks) -> AbstractContextManager[Any]:
        return self.model.hooks(fwd_hooks=fwd_hooks)


class HookedRunner(_TLRunner):
    """A HookedTransformer through TransformerLens' own forward."""

    backend = "hooked"

    def __init__(self, model: HookedTransformer) -> None:
        self.model = model
        cfg = model.cfg
        tok = getattr(model, "tokenizer", None)
        # Past the embedding TransformerLens no longer has the tokens: a shortformer's position
        # embedding (added in attention) and a left-padding tokenizer's mask would be lost.
        self.supports_start_at_layer = cfg.positional_embedding_type != "shortformer" and (
            getattr(tok, "padding_side", "right") != "left"
        )
        self.final_is_residual = (cfg.output_logits_soft_cap or -1) <= 0

    @property
    def device(self) -> torch.device:
        return self.model.embed.W_E.device

    def hook_names(self) -> list[str]:
        return list(self.model.hook_dict)  # modules in definition order, which is run order

    def run(
        self,
        x: Tensor,
        *,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        return_type: str | None = "logits",
    ) -> Tensor | None:
        kwargs: dict[str, Any] = {}
        if start_at_layer is not None:
            kwargs["start_at_layer"] = start_at_layer
        if stop_at_layer is not None:
            kwargs["stop_at_layer"] = stop_at_layer
        return self.model(x, return_type=return_type, **kwargs)

    def embed(self, tokens: Tensor) -> Tensor:
        resid = self.model(tokens, stop_at_layer=0)
        assert isinstance(resid, Tensor)
        return resid

    def run_blocks(
        self,
        x: Tensor,
        start: int = 0,
        hooks: StepHooks = (),
        *,
        stop_after: Sequence[str] = (),
        stop_at_layer: int | None = None,
    ) -> Tensor | None:
        kwargs: dict[str, Any] = {}
        if x.is_floating_point():
            kwargs["start_at_layer"] = start
        else:
            assert start == 0, "token input needs start=0"
        if stop_at_layer is not None:
            kwargs["stop_at_layer"] = stop_at_layer
        elif self.final_is_residual:
            kwargs["stop_at_layer"] = self.n_layers  # then the final norm, below
        try:
            with self.model.hooks(fwd_hooks=_with_stop(hooks, stop_after)):
                out = self.model(x, **kwargs)
                if stop_at_layer is None and self.final_is_residual:
                    # What TransformerLens' forward does next, before the unembedding.
                    if self.model.cfg.normalization_type is not None:
                        out = self.model.ln_final(out)
        except _Stop:
            return None
        return out

    def unembedding_fn(self) -> Unembedding:
        return Unembedding(self.model.unembed.W_U.T, self.model.unembed.b_U)

    def lean(self, precision: str = "fp32") -> LeanLM | None:
        return get_lean_lm(self.model, precision)

    def embedding_weight(self) -> Tensor:
        return self.model.embed.W_E

    def unembedding(self) -> tuple[Tensor, Tensor | None, bool]:
        w_ln = getattr(getattr(self.model, "ln_final", None), "w", None)
        centred = self.model.cfg.normalization_type in ("LN", "LNPre")
        return self.model.W_U, w_ln if isinstance(w_ln, Tensor) else None, centred

    def replace_problem(self, hook_name: str) -> str | None:
        return None


class BridgeRunner(_TLRunner):
    """A TransformerBridge (any Hugging Face causal LM): hooks and `stop_at_layer` work; the
    bridge cannot start from a residual and has no lean forward, so callers run full passes."""

    backend = "bridge"
    supports_start_at_layer = False

    def __init__(self, model: TransformerBridge) -> None:
        self.model = model
        self._hook_names: list[str] | None = None
        self._final_is_residual: bool | None = None

    @property
    def final_is_residual(self) -> bool:
        if self._final_is_residual is None:
            self._probe()
        assert self._final_is_residual is not None
        return self._final_is_residual

    @property
    def device(self) -> torch.device:
        return self.embedding_weight().device

    def hook_names(self) -> list[str]:
        if self._hook_names is None:
            self._probe()
        assert self._hook_names is not None
        return list(self._hook_names)

    def _probe(self) -> None:
        self._hook_names, head_ok = _probe(self.model, self.unembedding_fn())
        # Spread over devices the final residual and `lm_head` sit on the last one, the losses
        # with the SAEs: the logits come back instead (as `run` returns them).
        self._final_is_residual = head_ok and not self.is_split

    def run(
        self,
        x: Tensor,
        *,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        return_type: str | None = "logits",
    ) -> Tensor | None:
        if start_at_layer is not None:
            raise UserError(_NO_START)
        # No KV cache: every pass here is a full-window forward.
        out = self.model(
            x.to(self.device), return_type=return_type, stop_at_layer=stop_at_layer, use_cache=False
        )
        # With device_map the logits come off the last device; the losses live with the SAEs.
        return out.to(self.device) if isinstance(out, Tensor) else out

    def embed(self, tokens: Tensor) -> Tensor:
        resid = self.run(tokens, stop_at_layer=0)
        assert resid is not None
        return resid

    def run_blocks(
        self,
        x: Tensor,
        start: int = 0,
        hooks: StepHooks = (),
        *,
        stop_after: Sequence[str] = (),
        stop_at_layer: int | None = None,
    ) -> Tensor | None:
        if start != 0 or x.is_floating_point():
            raise UserError(_NO_START)
        all_hooks = _with_stop(hooks, stop_after)
        final: list[Tensor] = []
        if stop_at_layer is None and self.final_is_residual and not stop_after:

            def capture(resid: Tensor, hook: Any = None) -> Tensor:
                final.append(resid)
                raise _Stop

            all_hooks = [*all_hooks, (_FINAL_HOOK, capture)]
        try:
            with self.model.hooks(fwd_hooks=all_hooks):
                return self.run(x, stop_at_layer=stop_at_layer)
        except _Stop:
            return final[0] if final else None

    def unembedding_fn(self) -> Unembedding:
        head: Any = self.model.unembed.original_component  # the HF `lm_head`
        return Unembedding(head.weight, head.bias)

    def lean(self, precision: str = "fp32") -> LeanLM | None:
        return None

    def embedding_weight(self) -> Tensor:
        return self.model.W_E

    def unembedding(self) -> tuple[Tensor, Tensor | None, bool]:
        norm = getattr(self.model, "ln_final", None)
        hf_norm = getattr(norm, "original_component", None)
        w = getattr(hf_norm, "weight", None)
        centred = str(self.model.cfg.normalization_type) in ("LN", "LNPre")
        return self.model.W_U, w if isinstance(w, Tensor) else None, centred

    def replace_problem(self, hook_name: str) -> str | None:
        if _RESID_MID_RE.match(hook_name):
            point = self.model.hook_dict.get(hook_name)
            target = point.name if point is not None else "the second norm's input"
            return (
                f"on backend bridge '{hook_name}' is an alias of {target} (the second norm's "
                "input): replacing it would leave the residual stream clean; use hook_resid_pre "
                "/ hook_resid_post / hook_mlp_out, or backend hooked"
            )
        return None


class LeanRunner(HookedRunner):
    """A HookedTransformer whose step-level passes (`embed`, `run_blocks`, `unembedding_fn`) run
    on the lean forward `fastlm.LeanLM` at one precision; everything else is `HookedRunner`'s.

    Each pass that starts from tokens (one per step) first checks that the LM's weights are those
    the layout was built from, and rebuilds it if not (`LeanLM.is_stale`)."""

    def __init__(self, lean: LeanLM) -> None:
        super().__init__(lean.tl)
        self.supports_start_at_layer = True
        self.final_is_residual = True
        self.precision = lean.precision
        self._lean = lean

    def _fresh(self) -> LeanLM:
        if self._lean.is_stale():
            lean = get_lean_lm(self.model, self.precision)
            if lean is None:
                raise RuntimeError(
                    "the LM's weights changed and the lean forward no longer "
                    "matches TransformerLens; make the step plan again"
                )
            if self._lean.compiled is not None:
                lean.compile()
            self._lean = lean
        return self._lean

    def embed(self, tokens: Tensor) -> Tensor:
        return self._fresh().embed(tokens)

    def run_blocks(
        self,
        x: Tensor,
        start: int = 0,
        hooks: StepHooks = (),
        *,
        stop_after: Sequence[str] = (),
        stop_at_layer: int | None = None,
    ) -> Tensor | None:
        lean = self._lean if x.is_floating_point() else self._fresh()
        try:
            return lean.run(x, start, _with_stop(hooks, stop_after), stop_at_layer=stop_at_layer)
        except _Stop:
            return None

    def unembedding_fn(self) -> Unembedding:
        return Unembedding(self._lean.w_u, self._lean.b_u)

    def lean(self, precision: str = "fp32") -> LeanLM | None:
        return self._lean if precision == self.precision else super().lean(precision)


def step_runner(lm: LMRunner, hook_names: Sequence[str], precision: str = "fp32") -> LMRunner:
    """The runner for a step plan with these hooks: the lean forward where `fastlm` supports the
    model and every hook, else `lm` itself (chosen once, when the plan is made)."""
    lean = lm.lean(precision)
    if lean is not None and lean.supports(hook_names):
        return LeanRunner(lean)
    return lm


def make_runner(model: LM) -> LMRunner:
    """The runner for this LM (the one place that looks at its type)."""
    if isinstance(model, TransformerBridge):
        return BridgeRunner(model)
    if isinstance(model, HookedTransformer):
        return HookedRunner(model)
    raise TypeError(f"expected a HookedTransformer or a TransformerBridge, got {type(model)}")


def _probe(bridge: TransformerBridge, head: Unembedding) -> tuple[list[str], bool]:
    """One short pass: the bridge's hook names in the order it fires them (its `hook_dict` lists
    aliases after the modules; hook points that never fire, gated off, come last), and whether
    its logits are `lm_head` of the final residual (`unembed.hook_in`) and nothing more (a soft
    cap or a logit scale after `lm_head` would make that False)."""
    fired: dict[int, int] = {}
    final: list[Tensor] = []

    def record(x: Any, hook: Any) -> Any:
        fired.setdefault(id(hook), len(fired))
        return x

    def capture(x: Tensor, hook: Any) -> Tensor:
        final.append(x)
        return x

    hook_dict = bridge.hook_dict
    device = bridge.W_E.device
    tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # "filter matched gated-off hook name ..."
        hooks: Hooks = [(lambda name: True, record)]
        if _FINAL_HOOK in hook_dict:
            hooks.append((_FINAL_HOOK, capture))
        with bridge.hooks(fwd_hooks=hooks):
            logits = bridge(tokens, return_type="logits", use_cache=False)
    late = len(hook_dict) + len(fired)
    index = {name: i for i, name in enumerate(hook_dict)}
    order = sorted(hook_dict, key=lambda n: (fired.get(id(hook_dict[n]), late), index[n]))
    head_ok = False
    if final and isinstance(logits, Tensor):
        want = logits.float()
        got = head(final[0].to(head.weight.device)).to(want.device)
        head_ok = got.shape == want.shape and bool(
            (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
        )
    return order, head_ok


def _with_stop(hooks: StepHooks, stop_after: Sequence[str]) -> Hooks:
    """`hooks`, then hooks that raise `_Stop` once every hook in `stop_after` has run (registered
    after the others at the same points, so those run first)."""
    return [*hooks, *_stop_hooks(stop_after)] if stop_after else list(hooks)


def _stop_hooks(names: Sequence[str]) -> Hooks:
    wanted = set(names)
    seen: set[str] = set()

    def make(name: str) -> Callable[..., Tensor]:
        def hook(x: Tensor, hook: Any = None) -> Tensor:
            seen.add(name)
            if len(seen) == len(wanted):
                raise _Stop
            return x

        return hook

    return [(h, make(h)) for h in wanted]


def move_to(x: Tensor, device: torch.device) -> Tensor:
    """`x` on `device` (x itself when it is there already: no copy, no autograd node)."""
    return x if x.device == device else x.to(device)


def cache_into(
    store: dict[str, Any],
    name: str,
    device: torch.device,
    wrap: Callable[[Tensor], Any] | None = None,
) -> Callable[..., Tensor]:
    """A hook that stores its activation (on `device`; `wrap`ped) as `store[name]` and leaves it
    unchanged. Keyed by the name it was registered under: a bridge calls hooks with its canonical
    hook point, not the alias asked for."""
    if wrap is None:

        def hook(x: Tensor, hook: Any = None) -> Tensor:
            store[name] = move_to(x, device)
            return x

    else:

        def hook(x: Tensor, hook: Any = None) -> Tensor:
            store[name] = wrap(move_to(x, device))
            return x

    return hook


def check_vocab(lm: LMRunner, tokens: Tensor, field: str) -> None:
    """Token ids and window length must fit the model (a wrong tokenizer or n_ctx otherwise
    fails deep inside the forward pass)."""
    if tokens.shape[-1] > lm.n_ctx:
        raise UserError(
            f"{field}.n_ctx: {tokens.shape[-1]} is longer than the model's context n_ctx={lm.n_ctx}"
        )
    low, top = int(tokens.min()), int(tokens.max())
    if low < 0:
        raise UserError(f"{field}: token id {low} is negative (token ids are 0 .. d_vocab - 1)")
    if top >= lm.d_vocab:
        raise UserError(
            f"{field}: token id {top} >= the model's d_vocab {lm.d_vocab} "
            "(tokenizer_name does not match the model)"
        )


__all__ = [
    "BACKENDS",
    "LM",
    "BridgeRunner",
    "HookedRunner",
    "Hooks",
    "LMRunner",
    "LeanRunner",
    "StepHooks",
    "cache_into",
    "check_vocab",
    "make_runner",
    "move_to",
    "step_runner",
]
