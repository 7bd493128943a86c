"""Name -> SAE class. Adding an architecture means one new module that registers itself."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

from e2e_sae.config import Config
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


def architecture_class(architecture: str) -> type[SAEBase]:
    """The registered class of `architecture` (ConfigError with the closest name if none)."""
    if architecture in ARCHITECTURES:
        return ARCHITECTURES[architecture]
    by_lower = {a.lower(): a for a in ARCHITECTURES}
    close = difflib.get_close_matches(architecture.lower(), list(by_lower), 1, 0.6)
    hint = f"did you mean '{by_lower[close[0]]}'? " if close else ""
    known = ", ".join(sorted(ARCHITECTURES))
    raise ConfigError(f"saes.architecture: unknown '{architecture}' ({hint}known: {known})")


def build_sae(
    architecture: str,
    input_size: int,
    n_dict_components: int,
    init_decoder_orthogonal: bool = True,
    output_size: int | None = None,
    **kwargs: Any,
) -> SAEBase:
    cls = architecture_class(architecture)
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


def sae_kwargs(
    architecture: str, architecture_kwargs: dict[str, Any], k: int | None, run_tokens: int | None
) -> dict[str, Any]:
    """The constructor keywords of a config's SAEs: `architecture_kwargs` and `k` over the
    architecture's run-length defaults (`SAEBase.run_defaults`)."""
    kwargs = {**architecture_class(architecture).run_defaults(run_tokens), **architecture_kwargs}
    if k is not None:
        kwargs["k"] = k
    return kwargs


def idle_aux_warnings(config: Config, saes: Mapping[str, SAEBase]) -> list[str]:
    """One line per auxiliary mechanism that can never act in this run (AuxK whose dead
    threshold the run never reaches, resampling after the run's first half, ...): such a run
    trains as if it were off, with no other sign."""
    tokens = config.train_tokens
    lines = [f"{pos}: {why}" for pos, sae in saes.items() for why in sae.idle_aux_losses(tokens)]
    every = config.saes.resample_every_n_samples
    assert config.n_samples is not None
    if every is not None:
        half = config.n_samples // 2
        window = config.act_frequency_n_tokens
        if every > half:
            lines.append(
                f"resampling can never act: saes.resample_every_n_samples ({every:,}) is more "
                f"than half the run ({half:,} samples; it resamples in the first half only)"
            )
        elif window >= half * config.train_data.n_ctx:
            lines.append(
                f"resampling can never act: a latent counts as dead after act_frequency_n_tokens "
                f"({window:,}) tokens, more than the first half of the run "
                f"({half * config.train_data.n_ctx:,} tokens)"
            )
    return lines
