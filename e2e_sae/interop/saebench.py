"""Our SAEs behind SAEBench's custom-SAE interface, without importing `sae_bench`.

SAEBench's evals take `(name, sae)` pairs where `sae` is an `nn.Module` with `W_enc` [d_in, d_sae],
`W_dec` [d_sae, d_in] (unit-norm rows), `b_enc`, `b_dec`, `encode`, `decode`, `forward`, `dtype`,
`device` and a `cfg` carrying `d_in`, `d_sae`, `hook_name`, `hook_layer`, `model_name`, `dtype`,
`device` and a few SAELens-style fields. `SAEBenchSAE` is such a module, built from the same tensors
as the SAELens export (so it encodes/decodes exactly like our SAE)::

    from e2e_sae import SAETransformer
    from e2e_sae.interop import to_saebench
    import sae_bench.evals.core.main as core

    model = SAETransformer.from_local_path("runs/my_run")
    sae = to_saebench(model, "blocks.6.hook_resid_pre", model_name="gpt2")
    core.multiple_evals(selected_saes=[("my_run_l6", sae)], ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from e2e_sae.errors import UserError
from e2e_sae.interop.saelens import saelens_state
from e2e_sae.lm.sites import hook_layer
from e2e_sae.saes import SAEBase

if TYPE_CHECKING:
    from e2e_sae.lm.splice import SAETransformer


@dataclass
class SAEBenchConfig:
    """The fields of SAEBench's `CustomSAEConfig` (its core eval reads several through SAELens)."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = ""
    apply_b_dec_to_input: bool = False
    finetuning_scaling_factor: bool = False
    activation_fn_str: str = "relu"
    activation_fn_kwargs: dict[str, Any] = field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    model_from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    seqpos_slice: tuple[int | None, ...] = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: str | None = None
    neuronpedia_id: str | None = None


class SAEBenchSAE(nn.Module):
    """A standalone copy of one of our SAEs in SAEBench's layout (see the module docstring)."""

    def __init__(
        self,
        sae: SAEBase,
        hook_name: str,
        model_name: str,
        hook_layer: int,
        *,
        context_size: int | None = None,
    ) -> None:
        super().__init__()

        if sae.output_size != sae.input_size:
            raise UserError("SAEBench: transcoders are not supported (d_out != d_in)")
        arch, tensors, extra = saelens_state(sae)
        # gated: two encoder paths, not SAEBench's W_enc / b_enc; skip_transcoder: its W_skip term
        # is not part of SAEBench's SAE interface
        if "b_enc" not in tensors or "W_skip" in tensors:
            raise UserError(f"SAEBench: architecture '{sae.architecture}' is not supported")
        self.architecture = arch
        self.W_enc = nn.Parameter(tensors["W_enc"].clone())
        self.b_enc = nn.Parameter(tensors["b_enc"].clone())
        self.W_dec = nn.Parameter(tensors["W_dec"].clone())
        self.b_dec = nn.Parameter(tensors["b_dec"].clone())
        self.k: int | None = extra.get("k")
        self.threshold: Tensor | None
        if "threshold" in tensors:
            self.register_buffer("threshold", tensors["threshold"].clone())
        else:
            self.threshold = None
        self.dtype: torch.dtype = self.W_enc.dtype
        self.device: torch.device = self.W_enc.device
        self.cfg = SAEBenchConfig(
            model_name=model_name,
            d_in=sae.input_size,
            d_sae=sae.n_dict_components,
            hook_layer=hook_layer,
            hook_name=hook_name,
            context_size=context_size,
            architecture=arch,
            activation_fn_str="topk" if self.k is not None else "relu",
            activation_fn_kwargs={"k": self.k} if self.k is not None else {},
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
        )

    def encode(self, x: Tensor) -> Tensor:
        """Codes [..., d_sae] for activations x [..., d_in]."""
        pre = x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc
        if self.k is not None:
            vals, idx = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        acts = pre.relu()
        if self.threshold is not None:
            acts = acts * (pre > self.threshold)
        return acts

    def decode(self, feature_acts: Tensor) -> Tensor:
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction (SAEBench calls `sae(x)` for it)."""
        return self.decode(self.encode(x))

    def to(self, *args: Any, **kwargs: Any) -> SAEBenchSAE:  # type: ignore[override]
        """Move/cast and keep `device`, `dtype` and `cfg` in step (SAEBench reads them)."""
        super().to(*args, **kwargs)
        self.device, self.dtype = self.W_enc.device, self.W_enc.dtype
        self.cfg.device = str(self.device)
        self.cfg.dtype = str(self.dtype).removeprefix("torch.")
        return self

    @torch.no_grad()
    def check_decoder_norms(self, atol: float | None = None) -> bool:
        """True when every decoder row has unit norm (SAEBench's SCR/TPP/absorption need it)."""
        norms = self.W_dec.float().norm(dim=1)
        tol = (
            atol
            if atol is not None
            else (1e-2 if self.dtype in (torch.bfloat16, torch.float16) else 1e-5)
        )
        return bool(((norms - 1).abs() <= tol).all())


def to_saebench(
    model: SAETransformer,
    position: str,
    model_name: str | None = None,
    context_size: int | None = None,
) -> SAEBenchSAE:
    """Wrap the SAE at `position` of `model`. `model_name` is what SAEBench loads with
    `HookedTransformer.from_pretrained` (default: the run config's `tlens_model_name`)."""

    if position not in model.sae_positions:
        raise UserError(f"SAEBench: no SAE at '{position}' (have {model.sae_positions})")
    config = model.run_config
    if model_name is None and config is not None:
        model_name = config.tlens_model_name or config.hf_model_name
    if context_size is None and config is not None:
        context_size = config.train_data.n_ctx
    name = model_name or str(model.tlens_model.cfg.model_name)
    hook = model.sites[position].input_hook
    layer = hook_layer(hook, model.n_layers)
    return SAEBenchSAE(model.sae(position), hook, name, layer, context_size=context_size).to(
        model.sae(position).device
    )
