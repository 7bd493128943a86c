"""Name -> SAE class. Adding an architecture means one new module that registers itself."""

from __future__ import annotations

from typing import Any, TypeVar

from e2e_sae.errors import ConfigError
from e2e_sae.saes.base import SAEBase

ARCHITECTURES: dict[str, type[SAEBase]] = {}

T = TypeVar("T", bound=type[SAEBase])


def register_architecture(cls: T) -> T:
    ARCHITECTURES[cls.architecture] = cls
    return cls


def is_cross_layer(architecture: str) -> bool:
    """Whether `architecture` is a cross-layer transcoder's (False for an unknown name, which
    `build_sae` refuses)."""
    cls = ARCHITECTURES.get(architecture)
    return cls is not None and cls.cross_layer


def build_sae(
    architecture: str,
    input_size: int,
    n_dict_components: int,
    init_decoder_orthogonal: bool = True,
    output_size: int | None = None,
    **kwargs: Any,
) -> SAEBase:
    if architecture not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"saes.architecture: unknown '{architecture}' (known: {known})")
    cls = ARCHITECTURES[architecture]
    try:
        return cls(
            input_size,
            n_dict_components,
            init_decoder_orthogonal=init_decoder_orthogonal,
            output_size=output_size,
            **kwargs,
        )
    except TypeError as err:
        raise ConfigError(f"saes.architecture_kwargs for '{architecture}': {err}") from None
