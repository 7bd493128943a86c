"""Frozen pydantic configs in the original e2e_sae schema (extra keys rejected).

A YAML config written for e2e_sae 2.1.1 loads unchanged. Additions are optional keys with defaults:
`tlens_config` (random-weight model), `saes.architecture` and friends, `run_name`, ...
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    ValidationError,
    model_validator,
)

from e2e_sae.errors import ConfigError, UserError

MAX_COUNT = 10**12
"""The largest count (windows, samples, tokens per chunk, steps, ...) a config may hold: far above
any run (a trillion windows), far below where int64 counters and seeded generators overflow."""
MAX_TRAIN_TOKENS = 10**13
"""The most tokens one run may train on (n_samples x n_ctx): 20 years at a million tokens/s."""
MAX_SEED = 2**32 - 1
"""Seeds are 0 .. 2**32 - 1 (numpy's range; larger ones overflow the data order's generator)."""
MAX_NAME_BYTES = 200
"""A run name becomes a directory name with `_<time>-<n>` appended (most filesystems: 255 bytes)."""

Count = Annotated[int, Field(gt=0, le=MAX_COUNT)]
"""A positive count, at most MAX_COUNT."""
Count0 = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def path_component_problem(name: str) -> str | None:
    """Why `name` is not one safe path component (None when it is): no separator, NUL or control
    character, not hidden, not `.` / `..`, not empty, at most MAX_NAME_BYTES bytes of UTF-8."""
    if not name:
        return "is empty"
    bad = next((c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"holds {bad!r}; it must be one folder name (no '/', '\\' or control characters)"
    if name.startswith("."):
        return "starts with '.' (a hidden folder, or '..': outside save_dir)"
    size = len(name.encode("utf-8", errors="surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long, over the {MAX_NAME_BYTES} a folder name may have here"
    return None


def _path_component(name: str | None) -> str | None:
    if name is not None and (problem := path_component_problem(name)) is not None:
        raise ValueError(f"{name[:40]!r}{'...' if len(name) > 40 else ''} {problem}")
    return name


PathComponent = Annotated[str, AfterValidator(_path_component)]
"""A name that becomes a file or folder name (a run name): one safe path component."""


def _to_list(v: Any) -> Any:
    """Accept a single value where a list is expected (as the original configs do)."""
    if v is None or isinstance(v, list):
        return v
    if isinstance(v, tuple):
        return list(v)
    return [v]


StrList = Annotated[list[str], BeforeValidator(_to_list)]


class _Frozen(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or a coefficient of .inf is refused naming the field
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class OptimizerConfig(_Frozen):
    """How every trainer here steps (SAE runs, `train-lm`, the MLP's SAEs): micro-batches of
    `batch_size` accumulated to `effective_batch_size`, the lr warmed up linearly over
    `warmup_samples` and then decayed (`lr_schedule`) to `min_lr_factor` x lr at the last step,
    gradients clipped to `max_grad_norm` (`e2e_sae.training.engine`)."""

    batch_size: Count
    effective_batch_size: Count | None = None
    lr: PositiveFloat
    lr_schedule: Literal["linear", "cosine", "constant"] = "cosine"
    min_lr_factor: NonNegativeFloat = 0.1
    warmup_samples: Count0 = 0
    max_grad_norm: PositiveFloat | None = None

    @model_validator(mode="after")
    def _accumulation(self) -> OptimizerConfig:
        if self.effective_batch_size is not None and self.effective_batch_size % self.batch_size:
            raise ValueError(
                f"effective_batch_size ({self.effective_batch_size}) must be a multiple of "
                f"batch_size ({self.batch_size})"
            )
        return self

    @property
    def samples_per_step(self) -> int:
        """Samples per optimizer step (of one process)."""
        return self.effective_batch_size or self.batch_size

    @property
    def grad_accum_steps(self) -> int:
        return self.samples_per_step // self.batch_size


class DatasetConfig(_Frozen):
    """Where tokens come from: a hub dataset, a local path, or a built-in corpus (`shakespeare`)."""

    dataset_name: str
    is_tokenized: bool = True
    tokenizer_name: str | None = None
    streaming: bool = True
    split: str = "train"
    n_ctx: Count
    seed: Seed | None = None
    column_name: str | None = None
    """Column holding token ids (default `input_ids`, then `tokens`) or text (default `text`)."""
    data_files: str | list[str] | None = None
    """Passed to `datasets.load_dataset` for hub datasets with several file sets."""
    n_documents: Count | None = None
    """Only read this many documents/rows (useful for quick runs on large local datasets)."""
    decode_errors: Literal["strict", "replace"] = "strict"
    """Local .txt/.md files: `strict` refuses a file that is not UTF-8 text (or is binary);
    `replace` reads bad bytes as U+FFFD, with a warning."""

    @model_validator(mode="after")
    def _tokenizer_for_text(self) -> DatasetConfig:
        if not self.is_tokenized and self.tokenizer_name is None:
            raise ValueError("tokenizer_name is required when is_tokenized is false")
        return self


class LossConfig(_Frozen):
    coeff: NonNegativeFloat


class SparsityLossConfig(LossConfig):
    p_norm: PositiveFloat = 1.0


class InToOrigLossConfig(_Frozen):
    """MSE of the spliced vs the clean run at later hooks; `total_coeff` is split evenly."""

    hook_positions: StrList
    total_coeff: NonNegativeFloat

    @property
    def coeff(self) -> float:
        return self.total_coeff / len(self.hook_positions)


class LossConfigs(_Frozen):
    sparsity: SparsityLossConfig | None = None
    in_to_orig: InToOrigLossConfig | None = None
    out_to_orig: LossConfig | None = None
    out_to_in: LossConfig | None = None
    logits_kl: LossConfig | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> LossConfigs:
        if not any(getattr(self, n) is not None for n in type(self).model_fields):
            raise ValueError("at least one loss term must be set")
        return self

    @property
    def needs_clean_run_past_saes(self) -> bool:
        """e2e-style terms need the layers after the SAEs (the clean and the spliced run)."""
        return self.logits_kl is not None or self.in_to_orig is not None

    @property
    def enabled(self) -> dict[str, LossConfig | InToOrigLossConfig]:
        return {n: v for n in type(self).model_fields if (v := getattr(self, n)) is not None}


class TranscoderConfig(_Frozen):
    input: str
    output: str


class TranscoderSetConfig(_Frozen):
    """One transcoder per listed block (`layers`: `all`, or block indices), each reading the
    block's `input` hook and replacing its `output` hook (TransformerLens names relative to the
    block: `ln2.hook_normalized` is the MLP's input as circuit-tracer's transcoders read it,
    `hook_mlp_in` the residual before ln2 where the model has it; `hook_mlp_out` its output).
    `skip`: each gets a linear skip path from input to output (skip transcoders). With
    `saes.architecture: clt` the layers make one cross-layer transcoder (consecutive layers)."""

    layers: Literal["all"] | list[Annotated[int, Field(ge=0)]] = "all"
    input: str = "ln2.hook_normalized"
    output: str = "hook_mlp_out"
    skip: bool = False

    @property
    def layer_list(self) -> list[int] | None:
        """The listed layers, None for `all`."""
        return None if self.layers == "all" else list(self.layers)


CLT_ARCHITECTURE = "clt"
"""The cross-layer transcoder's architecture name (`e2e_sae.saes.clt`)."""


class SAEsConfig(_Frozen):
    """Which SAEs to splice in and how. `sae_positions` are hook names or substrings."""

    sae_positions: StrList = Field(default_factory=list)
    dict_size_to_input_ratio: PositiveFloat = 1.0
    pretrained_sae_paths: Annotated[list[Path] | None, BeforeValidator(_to_list)] = None
    retrain_saes: bool | StrList = False
    """True: continue training all pretrained SAEs; a list: only those hook names train."""
    type_of_sparsifier: Literal["sae"] | None = "sae"
    init_decoder_orthogonal: bool = True
    architecture: str = "relu"
    """A registered architecture (`e2e_sae.saes.ARCHITECTURES`): relu, topk, jumprelu, ..."""
    k: Count | None = None
    """Active latents per token for the TopK family."""
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra architecture options (see `e2e_sae.saes`). topk / batchtopk: `k_aux`, `aux_coeff`
    (AuxK), `dead_tokens_threshold`; batchtopk: `threshold_momentum`; jumprelu: `bandwidth`,
    `init_threshold`; gated: `aux_coeff`; matryoshka (batchtopk's and): `matryoshka_widths`,
    `matryoshka_e2e`, `prefix_weights`, `inner_mse_coeff`."""
    transcoders: list[TranscoderConfig] = Field(default_factory=list)
    transcoder_set: TranscoderSetConfig | None = None
    """A transcoder (or, with `architecture: clt`, one cross-layer transcoder) for every listed
    block's MLP, trained jointly."""
    init_b_dec: Literal["zeros", "mean", "geometric_median"] = "zeros"
    tied_init: bool = False
    resample_every_n_samples: Count | None = None
    """relu only, off by default: every this many training samples, re-initialise the latents
    that have not fired for `act_frequency_n_tokens` tokens from high-loss inputs
    (`e2e_sae.saes.resample`)."""

    @model_validator(mode="after")
    def _some_position(self) -> SAEsConfig:
        if not self.sae_positions and not self.transcoders and self.transcoder_set is None:
            raise ValueError(
                "sae_positions (or transcoders, or transcoder_set) must name at least one hook"
            )
        if self.architecture == CLT_ARCHITECTURE:
            if self.transcoder_set is None:
                raise ValueError(
                    "architecture: clt is a cross-layer transcoder over the layers of "
                    "transcoder_set (set saes.transcoder_set)"
                )
            if self.sae_positions or self.transcoders:
                raise ValueError(
                    "architecture: clt covers transcoder_set's layers only; sae_positions and "
                    "transcoders must be empty"
                )
            layers = self.transcoder_set.layer_list
            if layers is not None and sorted(set(layers)) != list(
                range(min(layers, default=0), max(layers, default=-1) + 1)
            ):
                raise ValueError(
                    f"transcoder_set.layers: a cross-layer transcoder needs consecutive layers "
                    f"(its features write to every later layer), got {layers}"
                )
            if self.transcoder_set.skip:
                raise ValueError("transcoder_set.skip: not for a cross-layer transcoder (clt)")
        if self.resample_every_n_samples is not None and self.architecture != "relu":
            raise ValueError(
                "resample_every_n_samples: only for architecture relu (the TopK family has AuxK)"
            )
        return self


MODEL_SOURCES = ("tlens_model_name", "tlens_model_path", "tlens_config", "hf_model_name")
"""The config keys that name the LM; exactly one is set."""


class Config(OptimizerConfig):
    """A training run of one or more SAEs spliced into a TransformerLens model (a
    HookedTransformer, or a TransformerBridge around any Hugging Face causal LM)."""

    wandb_project: str | None = None
    wandb_run_name: str | None = None
    """The W&B run's name; also the run directory's name when `run_name` is not set."""
    wandb_run_name_prefix: str = ""
    seed: Seed = 0
    tlens_model_name: str | None = None
    tlens_model_path: Path | None = None
    tlens_config: dict[str, Any] | None = None
    """HookedTransformerConfig fields (+ optional `seed`) for a random-weight model."""
    hf_model_name: str | None = None
    """Any Hugging Face causal LM: a hub name, or a local folder with config.json + weights
    (+ tokenizer files). Loaded through TransformerLens' TransformerBridge unless `backend`
    says hooked (see `backend`)."""
    backend: Literal["auto", "hooked", "bridge"] = "auto"
    """How the LM runs: `hooked` (HookedTransformer; the lean forward where `fastlm` supports it),
    `bridge` (TransformerBridge: any HF causal LM, plain forward passes), or `auto`: hooked for
    tlens_config / tlens_model_path / built-in models / models HookedTransformer supports, bridge
    otherwise (and whenever `device_map` is set)."""
    device_map: str | dict[str, str | int] | None = None
    """Passed to Hugging Face `from_pretrained` (e.g. "auto", "cpu", or a module -> device
    mapping); backend bridge only. The SAEs live on the embedding's device."""
    n_devices: Count | None = None
    """Split the LM over this many GPUs (HookedTransformer's `n_devices`; the bridge balances
    the layers over that many GPUs). Not together with device_map."""
    save_dir: Path | None = Path("runs")
    run_name: PathComponent | None = None
    """The run directory's name (`<save_dir>/<run_name>_<time>`): one folder name, no '/'."""
    n_samples: Count | None = None
    save_every_n_samples: Count | None = None
    keep_last_n_checkpoints: Count | None = 3
    """Keep this many newest checkpoints (+ the final one); null keeps all."""
    eval_every_n_samples: Count | None = None
    eval_n_samples: Count | None = None
    log_every_n_grad_steps: Count = 20
    collect_act_frequency_every_n_samples: Count0 = 20_000
    act_frequency_n_tokens: Count = 100_000
    divergence_factor: PositiveFloat | None = 1000.0
    """Stop training when a step's loss is over this many times the median loss of the last 100
    steps, naming the step and the loss term (the checkpoint of the weights that gave it is set
    aside, the one before is kept). null: off."""
    loss: LossConfigs
    train_data: DatasetConfig
    eval_data: DatasetConfig | None = None
    saes: SAEsConfig
    device: str | None = None
    """`cpu`, `cuda`, ... (default: cuda when available)."""
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    """Training forward/backward precision. `bf16`: the LM's matmuls and attention and the SAEs
    under bf16 autocast (residual stream, norms, softmax and KL stay fp32). `auto`: bf16 where
    the device multiplies bf16 fast (`resources.bf16_is_fast`: CUDA with bf16, CPUs with AMX),
    else fp32; a run records the precision it chose (final_config.yaml), and `--resume` keeps
    it. Default fp32 (configs of the original, which has no such key, train as they did).
    Evaluation is fp32."""
    compile: bool = False
    """`torch.compile` (inductor) the trained SAEs and the LM blocks a training pass hooks nothing
    in (the lean forward's; `fastlm.LeanLM.compile`). Opt-in: the first steps compile (about a
    minute); the losses are the same up to float rounding. Meant for GPUs (see the README's Speed
    section for what it gave on CPUs)."""
    kl_chunk_tokens: Count | None = None
    """Tokens per chunk of the `logits_kl` term's [tokens, d_vocab] temporaries (null: ~8M
    elements per chunk). Only memory changes, not the value."""
    teacher_cache: Path | None = None
    """A teacher cache folder (`e2e_sae.caches.teacher`): `logits_kl` against the cached top-k
    clean distributions (an approximation, see there) instead of a clean pass past the SAEs.
    Every training window must be in the cache; not with `in_to_orig`."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        sources = [n for n in MODEL_SOURCES if getattr(self, n)]
        if len(sources) != 1:
            got = ", ".join(sources) if sources else "none"
            raise ValueError(f"exactly one of {', '.join(MODEL_SOURCES)} must be set (got {got})")
        hooked_only = self.tlens_config is not None or self.tlens_model_path is not None
        if self.backend == "bridge" and hooked_only:
            raise ValueError(
                f"backend: bridge needs a Hugging Face model (hf_model_name or tlens_model_name); "
                f"{sources[0]} builds a HookedTransformer"
            )
        if self.device_map is not None:
            if self.backend == "hooked" or hooked_only:
                raise ValueError(
                    "device_map: only for backend bridge with a Hugging Face model "
                    "(HookedTransformer splits over GPUs with n_devices)"
                )
            if self.n_devices is not None:
                raise ValueError("device_map: give device_map or n_devices, not both")
        if self.n_samples is None:
            raise ValueError("n_samples is required")
        batch = self.samples_per_step
        if self.n_samples < batch:
            name = "effective_batch_size" if self.effective_batch_size else "batch_size"
            raise ValueError(
                f"n_samples: {self.n_samples} is less than one optimizer step ({name} {batch})"
            )
        tokens = self.n_samples * self.train_data.n_ctx
        if tokens > MAX_TRAIN_TOKENS:
            raise ValueError(
                f"n_samples: {self.n_samples:.3g} windows x n_ctx {self.train_data.n_ctx} = "
                f"{tokens:.3g} tokens, over the {MAX_TRAIN_TOKENS:.0e} one run may train on "
                f"(at a million tokens/s: {tokens / 1e6 / 3.156e7:.3g} years)"
            )
        self._check_run_dir_name()
        return self

    def _check_run_dir_name(self) -> None:
        """The run directory is named after `run_name`, else `wandb_run_name`, else
        `wandb_run_name_prefix` + a name made of the settings: each must stay one folder name."""
        if self.run_name is not None:
            return  # (checked by its type)
        for key in ("wandb_run_name", "wandb_run_name_prefix"):
            value = getattr(self, key)
            if not value:
                continue
            problem = path_component_problem(value)
            if problem is not None:
                raise ValueError(
                    f"{key}: {value[:40]!r} {problem} (it names the run directory when "
                    "run_name is not set)"
                )
            if key == "wandb_run_name":
                return

    @property
    def train_tokens(self) -> int:
        """Training tokens of the run: n_samples windows of train_data.n_ctx tokens."""
        assert self.n_samples is not None
        return self.n_samples * self.train_data.n_ctx

    @property
    def n_grad_steps(self) -> int:
        assert self.n_samples is not None
        return max(1, self.n_samples // self.samples_per_step)


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the field at `loc` (for 'did you mean' suggestions)."""
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        annotation: Any = field.annotation
        while typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
        options = (
            typing.get_args(annotation)
            if isinstance(annotation, types.UnionType)
            or (typing.get_origin(annotation) is typing.Union)
            else (annotation,)
        )
        models = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:
            return None
        cls = models[0]
    return cls


def format_validation_error(
    err: ValidationError, source: str = "config", model: type[BaseModel] | None = None
) -> str:
    """One line: every unknown key (with 'did you mean' for near misses among `model`'s fields)
    and every missing required field; otherwise the first failing field and what was expected."""
    errors = err.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    missing = [e for e in errors if e["type"] == "missing"]
    parts = []
    for e in unknown:
        loc = ".".join(str(p) for p in e["loc"])
        holder = _model_at(model, e["loc"][:-1]) if model is not None else None
        known = list(holder.model_fields) if holder is not None else []
        close = difflib.get_close_matches(str(e["loc"][-1]), known, 1, 0.75)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        parts.append(f"{loc}: unknown key{hint}")
    if len(missing) == 1:
        parts.append(f"{'.'.join(str(p) for p in missing[0]['loc'])}: required field is missing")
    elif missing:
        names = ", ".join(".".join(str(p) for p in e["loc"]) for e in missing)
        parts.append(f"required fields are missing: {names}")
    if not parts:
        e = errors[0]
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
        shown = 1
    else:
        shown = len(unknown) + len(missing)
    extra = f" (and {len(errors) - shown} more)" if len(errors) > shown else ""
    return f"{source}: {'; '.join(parts)}{extra}"


def parse_model(cls: type[BaseModel], data: Any, source: str = "config") -> Any:
    """Validate `data` into `cls`, turning pydantic errors into a one-line ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, cls)) from None


MAX_YAML_VALUES = 100_000
"""The most values a YAML document may expand to, an alias counted in full each time it is used (a
config has a few hundred; a 1 KB 'billion laughs' alias bomb has billions)."""


class YAMLRefused(yaml.YAMLError):
    """A YAML document that parses but is refused (a duplicate key, an alias bomb)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line
        """1-based line of the offending node, if known."""


class YAMLLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads `5e-3` / `1.0e5` as floats (YAML 1.1 (PyYAML) needs a dot
    and a signed exponent, so a config's `lr: 5e-3` would otherwise be the string '5e-3'), and
    refuses a key given twice in one mapping (PyYAML keeps the last silently; `<<` merges may
    still be overridden) and documents whose aliases expand beyond `MAX_YAML_VALUES` values or
    refer to themselves."""

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise YAMLRefused(f"duplicate key {key!r} (first at line {first})", line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: Any) -> None:
    """Count the values of the document with every alias expanded (each shared node once, in a
    post-order walk): YAMLRefused past MAX_YAML_VALUES, or for an alias inside its own anchor."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_YAML_VALUES:
                raise YAMLRefused(
                    f"aliases expand to over {MAX_YAML_VALUES} values (an alias bomb?)",
                    node.start_mark.line + 1,
                )
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YAMLRefused("an alias refers to itself (recursive)", node.start_mark.line + 1)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def yaml_load(stream: Any) -> Any:
    """Parse YAML text or a file object safely (`YAMLLoader`: no Python objects, `5e-3` a float,
    duplicate keys and alias bombs refused with a `YAMLRefused`)."""
    loader = YAMLLoader(stream)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise YAMLRefused("nested too deeply") from None
    finally:
        loader.dispose()


def read_text_config(path: Path) -> str:
    """A config file's text: UTF-8 (a BOM is allowed); binary or other encodings are one line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(f"{path}: not a YAML text file (binary: NUL byte at offset {nul})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {data[err.start]:#04x} at offset {err.start})"
        ) from None


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = read_text_config(path)
    try:
        return yaml_load(text)
    except YAMLRefused as err:
        where = f" line {err.line}" if err.line is not None else ""
        raise ConfigError(f"{path}{where}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML") from None


def load_config(path_or_dict: str | Path | dict[str, Any], config_model: type[BaseModel] = Config):
    """Load and validate a YAML config (or dict). Errors are one-line `ConfigError`s."""
    if isinstance(path_or_dict, dict):
        return parse_model(config_model, path_or_dict)
    return parse_model(config_model, read_yaml(path_or_dict), source=str(path_or_dict))


def config_to_yaml_dict(config: BaseModel) -> dict[str, Any]:
    """A plain dict (paths as strings) that `load_config` reads back to an equal config."""
    return config.model_dump(mode="json")


DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
"""The packaged demo config (`e2e-sae demo`; a copy is configs/demo.yaml in the repository)."""


def demo_config() -> dict[str, Any]:
    """The demo config as a plain dict: change any field, then `load_config` it."""
    return dict(read_yaml(DEMO_CONFIG))


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """d["a"]["b"]["c"] = value for key "a.b.c", creating (or replacing a null) parent mappings."""
    *parents, last = key.split(".")
    cur = d
    for p in parents:
        if not isinstance(cur.get(p), dict):
            cur[p] = {}
        cur = cur[p]
    cur[last] = copy.deepcopy(value)


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """`--set key.sub=value` items -> {dotted key: YAML-parsed value}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set: expected KEY=VALUE (e.g. n_samples=1000), got '{item}'")
        try:
            out[key.strip()] = yaml_load(value)
        except YAMLRefused as err:
            raise UserError(f"--set {key}: {err}") from None
        except yaml.YAMLError:
            raise UserError(f"--set {key}: '{value}' is not a YAML value") from None
    return out


def apply_overrides(raw: dict[str, Any], sets: Iterable[str]) -> dict[str, Any]:
    """`raw` (a config's mapping) with `--set KEY=VALUE` items applied in place."""
    for key, value in parse_set(sets).items():
        set_dotted(raw, key, value)
    return raw
