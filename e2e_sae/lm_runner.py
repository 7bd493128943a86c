"""The one seam between SAE code and the frozen LM: an `LMRunner` per backend, chosen once.

`SAETransformer` holds a HookedTransformer or a TransformerBridge as `tlens_model` and talks to it
only through `make_runner(tlens_model)`: run with TransformerLens-style hooks (optionally stopping
at a block or from a block), the hook names in execution order, sizes, the tokenizer, the
unembedding, and the lean forward where one exists.

What each backend can do:

| | `HookedRunner` | `BridgeRunner` |
| --- | --- | --- |
| hooks, `stop_at_layer`, stop after a hook (exception) | yes | yes |
| `start_at_layer` (shared prefix of the e2e passes) | yes | no: both passes run from the tokens |
| lean forward (`fastlm`) | where `fastlm` supports the model | no |
| replacing `hook_resid_mid` | yes | no (an alias of `ln2.hook_in`: the skip connection would keep
the clean value) |
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.model_bridge import TransformerBridge

from e2e_sae.errors import UserError
from e2e_sae.fastlm import LeanLM, get_lean_lm

Hooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]
"""TransformerLens forward hooks: (hook name or name filter, fn(activation, hook) -> activation)."""
LM = HookedTransformer | TransformerBridge
"""The LM types `SAETransformer` accepts."""
BACKENDS = ("hooked", "bridge")

_RESID_MID_RE = re.compile(r"^blocks\.\d+\.hook_resid_mid$")


class LMRunner(Protocol):
    """What the SAE code needs from the frozen LM (see the module docstring for who does what)."""

    backend: str
    supports_start_at_layer: bool

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

    def lean(self, precision: str = "fp32") -> LeanLM | None:
        """The lean forward over these weights (None: use `run`)."""
        ...

    def embedding_weight(self) -> Tensor: ...

    def unembedding(self) -> tuple[Tensor, Tensor | None, bool]:
        """(W_U [d_model, d_vocab], the final norm's weight or None, whether the final norm
        subtracts the mean): what direct logit effects of a residual direction need."""
        ...

    def replace_problem(self, hook_name: str) -> str | None:
        """Why an SAE may not replace the activation at `hook_name` (None: it may)."""
        ...


class HookedRunner:
    """A HookedTransformer: every fast path applies."""

    backend = "hooked"
    supports_start_at_layer = True

    def __init__(self, model: HookedTransformer) -> None:
        self.model = model

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    @property
    def d_vocab(self) -> int:
        return self.model.cfg.d_vocab

    @property
    def n_ctx(self) -> int:
        return self.model.cfg.n_ctx

    @property
    def device(self) -> torch.device:
        return self.model.embed.W_E.device

    @property
    def is_split(self) -> bool:
        return self.model.cfg.n_devices > 1

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def hook_names(self) -> list[str]:
        return list(self.model.hook_dict)  # modules in definition order, which is run order

    def hooks(self, fwd_hooks: Hooks) -> AbstractContextManager[Any]:
        return self.model.hooks(fwd_hooks=fwd_hooks)

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


class BridgeRunner:
    """A TransformerBridge (any Hugging Face causal LM): hooks and `stop_at_layer` work; the
    bridge cannot start from a residual and has no lean forward, so callers run full passes."""

    backend = "bridge"
    supports_start_at_layer = False

    def __init__(self, model: TransformerBridge) -> None:
        self.model = model
        self._hook_names: list[str] | None = None

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
    def device(self) -> torch.device:
        return self.embedding_weight().device

    @property
    def is_split(self) -> bool:
        return int(getattr(self.model.cfg, "n_devices", 1) or 1) > 1

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def hook_names(self) -> list[str]:
        if self._hook_names is None:
            self._hook_names = _execution_order(self.model)
        return list(self._hook_names)

    def hooks(self, fwd_hooks: Hooks) -> AbstractContextManager[Any]:
        return self.model.hooks(fwd_hooks=fwd_hooks)

    def run(
        self,
        x: Tensor,
        *,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        return_type: str | None = "logits",
    ) -> Tensor | None:
        if start_at_layer is not None:
            raise UserError(
                "start_at_layer: not supported by backend bridge (TransformerBridge runs the "
                "Hugging Face forward from the tokens)"
            )
        # No KV cache: every pass here is a full-window forward.
        out = self.model(
            x.to(self.device), return_type=return_type, stop_at_layer=stop_at_layer, use_cache=False
        )
        # With device_map the logits come off the last device; the losses live with the SAEs.
        return out.to(self.device) if isinstance(out, Tensor) else out

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


def make_runner(model: LM) -> LMRunner:
    """The runner for this LM (the one place that looks at its type)."""
    if isinstance(model, TransformerBridge):
        return BridgeRunner(model)
    if isinstance(model, HookedTransformer):
        return HookedRunner(model)
    raise TypeError(f"expected a HookedTransformer or a TransformerBridge, got {type(model)}")


def _execution_order(bridge: TransformerBridge) -> list[str]:
    """The bridge's hook names in the order one forward pass fires them (its `hook_dict` lists
    aliases after the modules). Hook points that never fire (gated off) come last."""
    fired: dict[int, int] = {}

    def record(x: Any, hook: Any) -> Any:
        fired.setdefault(id(hook), len(fired))
        return x

    hook_dict = bridge.hook_dict
    device = bridge.W_E.device
    tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # "filter matched gated-off hook name ..."
        with bridge.hooks(fwd_hooks=[(lambda name: True, record)]):
            bridge(tokens, return_type=None, use_cache=False)
    late = len(hook_dict) + len(fired)
    index = {name: i for i, name in enumerate(hook_dict)}
    return sorted(hook_dict, key=lambda n: (fired.get(id(hook_dict[n]), late), index[n]))


def move_to(x: Tensor, device: torch.device) -> Tensor:
    """`x` on `device` (x itself when it is there already: no copy, no autograd node)."""
    return x if x.device == device else x.to(device)


__all__ = [
    "BACKENDS",
    "LM",
    "BridgeRunner",
    "HookedRunner",
    "Hooks",
    "LMRunner",
    "make_runner",
    "move_to",
]
