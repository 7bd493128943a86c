"""Which TransformerLens is installed (3.x or 4.x), and the names that differ between them.

TransformerLens 4.0 removed `HookedTransformer` and `HookedTransformerConfig`; 4.x runs every model
through `TransformerBridge`. Modules that need the 3.x classes import them from here: on 4.x they
are stand-ins of which no instance exists (`isinstance` is False), and `require_hooked` turns a
3.x-only feature into one line naming the installed version.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from e2e_sae.errors import UserError

try:
    TL_VERSION = version("transformer-lens")
except PackageNotFoundError:  # an unusual install (e.g. a source checkout on sys.path)
    import transformer_lens as _tl

    TL_VERSION = str(getattr(_tl, "__version__", "3"))
TL_MAJOR = int(TL_VERSION.split(".")[0])
HAS_HOOKED = TL_MAJOR < 4
"""HookedTransformer exists (TransformerLens 3.x)."""

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
elif HAS_HOOKED:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
else:

    class HookedTransformer:
        """Removed in TransformerLens 4.0: no instance exists."""

    class HookedTransformerConfig:
        """Removed in TransformerLens 4.0: no instance exists."""


def require_hooked(what: str) -> None:
    """A one-line UserError on TransformerLens 4.x for a feature that needs HookedTransformer."""
    if not HAS_HOOKED:
        raise UserError(
            f"{what} needs HookedTransformer, which TransformerLens {TL_VERSION} no longer has "
            "(removed in 4.0); install transformer-lens>=3.9,<4 for it"
        )


__all__ = [
    "HAS_HOOKED",
    "TL_MAJOR",
    "TL_VERSION",
    "HookedTransformer",
    "HookedTransformerConfig",
    "require_hooked",
]
