"""Issue 26 (speed where researchers run): `precision: auto`, a training loop that reads no
tensor values on non-logged steps, pinned non-blocking batch copies on CUDA, the opt-in
`compile`, and the device check script on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import only_run as _only_run
from conftest import parse_config as _config
from conftest import write_yaml as _write

from e2e_sae import resources
from e2e_sae.cli import main
from e2e_sae.config import Config
from e2e_sae.training import trainer as train_mod
from e2e_sae.training.trainer import setup

E2E = {"loss": {"sparsity": {"coeff": 0.1}, "logits_kl": {"coeff": 1.0}}}


# --- precision: auto ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, device, fast",
    [
        ({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, "cpu", True),
        ({"avx512f", "avx512_bf16"}, "cpu", False),  # AVX512-BF16 without AMX: slow bf16 GEMMs
        (set(), "cpu", False),
        ({"amx_bf16"}, "mps", False),
        ({"amx_bf16"}, "meta", False),
    ],
)
def test_bf16_is_fast_by_cpu_flags(monkeypatch, flags: set[str], device: str, fast: bool) -> None:
    monkeypatch.setattr(resources, "cpu_flags", lambda: flags)
    assert resources.bf16_is_fast(device) is fast


def test_bf16_is_fast_on_cuda_follows_torch(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resources.bf16_is_fast("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert not resources.bf16_is_fast("cuda")


def test_cpu_flags_reads_this_machine() -> None:
    flags = resources.cpu_flags()
    if Path("/proc/cpuinfo").is_file():
        assert flags, "no flags line read from /proc/cpuinfo"
    assert resources.bf16_is_fast("cpu") == ("amx_bf16" in flags)


@pytest.mark.parametrize("fast", [True, False])
def test_auto_resolves_in_setup(config_dict, monkeypatch, fast: bool) -> None:
    monkeypatch.setattr(train_mod, "bf16_is_fast", lambda device: fast)
    t = setup(_config(config_dict(precision="auto", **E2E)), device="cpu")
    want = "bf16" if fast else "fp32"
    assert t.config.precision == t.precision == t.plan.precision == want
    assert t.eval_plan.precision == "fp32"  # evaluation stays fp32


def test_default_and_original_configs_stay_fp32(config_dict) -> None:
    cfg = config_dict(**E2E)
    assert _config(cfg).precision == "fp32"  # no key (the original's schema has none): fp32
    assert setup(_config(cfg), device="cpu").precision == "fp32"


def test_auto_is_recorded_and_resume_keeps_it(
    config_dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The run directory records what `auto` chose; `--resume` of it on a machine where `auto`
    would choose otherwise continues in the recorded precision."""
    cfg = config_dict(precision="auto", n_samples=16, save_every_n_samples=8, **E2E)
    path = _write(tmp_path / "cfg.yaml", cfg)
    monkeypatch.setattr(train_mod, "bf16_is_fast", lambda device: True)
    assert main(["train", str(path)]) == 0
    run = _only_run(Path(cfg["save_dir"]))
    assert yaml.safe_load((run / "final_config.yaml").read_text())["precision"] == "bf16"

    monkeypatch.setattr(train_mod, "bf16_is_fast", lambda device: False)
    seen: list[str] = []
    orig = train_mod.setup

    def spy(config: Config, *args: Any, **kwargs: Any) -> Any:
        t = orig(config, *args, **kwargs)
        seen.append(t.precision)
        return t

    monkeypatch.setattr(train_mod, "setup", spy)
    longer = _write(tmp_path / "longer.yaml", {**cfg, "n_samples": 24})
    assert main(["train", str(longer), "--resume", str(run)]) == 0
    assert seen == ["bf16"]
    assert main(["train", str(longer), "--resume"]) == 0  # `latest` finds it with `auto` too
    assert seen == ["bf16", "bf16"]
    assert yaml.safe_load((run / "final_config.yaml").read_text())["precision"] == "bf16"


def test_dry_run_says_what_auto_chooses(config_dict, tmp_path: Path, monkeypatch, capsys) -> None:
    path = _write(tmp_path / "cfg.yaml", config_dict(precision="auto", **E2E))
    monkeypatch.setattr(resources, "cpu_flags", lambda: {"amx_bf16"})
    assert main(["train", str(path), "--dry-run", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "precision: auto" in captured.out
    assert "# precision: auto -> bf16 on cpu" in captured.out


# --- a loop that does not wait on the host --------------------------------------------------------
class HostReads:
    """Counts reads of tensor values by the host while active: every op whose result depends on
    tensor values in a way the host must wait for (`aten._local_scalar_dense`: `.item()`,
    `float()`, `bool()`, `int()`; ops with a data-dependent output shape such as `nonzero`, and
    indexing with a boolean mask), plus `.tolist()`, `.numpy()` and `.cpu()`. On a GPU each one
    is a device-to-host synchronisation; on this CPU they are counted instead. Reads by the
    optimizer (torch keeps Adam's step count on the host) and by the data pipeline (host data)
    are not device reads and are left out. `step` (set by the caller) attributes each read."""

    SKIP = ("/torch/optim/", "/e2e_sae/data/")

    def __init__(self) -> None:
        self.step = -1
        self.reads: list[tuple[int, str, str]] = []

    def _record(self, what: str) -> None:
        import traceback

        frames = traceback.extract_stack()[:-2]
        if any(s in f.filename for f in frames for s in self.SKIP):
            return
        ours = [f for f in frames if "/e2e_sae/" in f.filename]
        where = f"{ours[-1].filename.split('/e2e_sae/')[-1]}:{ours[-1].lineno}" if ours else "?"
        self.reads.append((self.step, what, where))

    def __enter__(self) -> HostReads:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
                tags = set(func.tags)
                dynamic = torch.Tag.dynamic_output_shape in tags
                if func in (
                    torch.ops.aten.index.Tensor,
                    torch.ops.aten.index_put.default,
                    torch.ops.aten.index_put_.default,
                ):
                    idx = args[1] if len(args) > 1 else []
                    dynamic = any(
                        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx
                    )
                if torch.Tag.data_dependent_output in tags or dynamic:
                    counter._record(str(func))
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        self._patched = []
        for name in ("tolist", "numpy", "cpu"):
            orig = getattr(torch.Tensor, name)

            def wrapped(t: Any, *a: Any, _orig: Any = orig, _name: str = name, **k: Any) -> Any:
                counter._record(f"Tensor.{_name}")
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapped)
            self._patched.append((name, orig))
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        for name, orig in self._patched:
            setattr(torch.Tensor, name, orig)
        self._mode.__exit__(*exc)


def _reads_in_training(config: Config, monkeypatch) -> tuple[list[tuple[int, str, str]], set[int]]:
    """Train `config` with the host reads counted; returns them and the steps that may read
    (logged steps and the last one)."""
    from e2e_sae.training import loop as loop_mod

    counter = HostReads()
    orig = loop_mod.step_run

    def step_run(r: Any, *args: Any, **kwargs: Any) -> Any:
        counter.step = r.state.step
        out = orig(r, *args, **kwargs)
        counter.step = -2  # between steps: the loop's own bookkeeping
        return out

    monkeypatch.setattr(loop_mod, "step_run", step_run)
    with counter:
        train_mod.train(config, progress=False)
    n = config.n_grad_steps
    logged = {s for s in range(n) if (s + 1) % config.log_every_n_grad_steps == 0 or s == 0}
    return counter.reads, logged | {n - 1}


def _e2e_with(arch: str, **saes: Any) -> dict[str, Any]:
    return {
        "loss": {"logits_kl": {"coeff": 1.0}, "sparsity": {"coeff": 0.1}},
        "saes": {
            "sae_positions": ["blocks.1.hook_resid_pre"],
            "dict_size_to_input_ratio": 2.0,
            "architecture": arch,
            **saes,
        },
    }


NO_READ_CASES: dict[str, dict[str, Any]] = {
    "local": {"loss": {"sparsity": {"coeff": 0.1}, "out_to_in": {"coeff": 1.0}}},
    "e2e-ds-accum": {
        "loss": {
            "sparsity": {"coeff": 0.1},
            "logits_kl": {"coeff": 1.0},
            "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_post"], "total_coeff": 0.5},
        },
        "effective_batch_size": 8,
    },
    "topk-e2e": _e2e_with("topk", k=4),
    "topk-sparse-path-local": {
        "loss": {"out_to_in": {"coeff": 1.0}},
        "saes": {**_e2e_with("topk", k=1)["saes"]},
    },
    "batchtopk-e2e": _e2e_with("batchtopk", k=4),
    "matryoshka-e2e": _e2e_with(
        "matryoshka", k=4, architecture_kwargs={"matryoshka_widths": [8, 32]}
    ),
    "jumprelu-e2e": _e2e_with("jumprelu", architecture_kwargs={"init_threshold": 0.1}),
    "gated-e2e": _e2e_with("gated"),
}


@pytest.mark.parametrize("case", sorted(NO_READ_CASES))
def test_no_host_reads_on_non_logged_steps(config_dict, monkeypatch, case: str) -> None:
    cfg = config_dict(
        n_samples=48, log_every_n_grad_steps=5, max_grad_norm=1.0, **NO_READ_CASES[case]
    )
    reads, may_read = _reads_in_training(_config(cfg), monkeypatch)
    steps = {s for s, _, _ in reads if s >= 0}
    assert steps & may_read, "no read on a logged step: the counter is not counting"
    bad = [r for r in reads if r[0] >= 0 and r[0] not in may_read]
    assert not bad, f"host reads on non-logged steps: {sorted(set(bad))[:12]}"


@pytest.mark.parametrize(
    "inject, expected, kept",
    [  # step 7 is neither logged nor saving; the next read (the save after step 9) finds it
        ("_nan_loss", "non-finite loss at step 7: term 'sparsity' is nan", [12]),
        (
            "_nan_gradient",
            "non-finite gradient at step 7: saes.blocks-1-hook_resid_pre.encoder.0.bias",
            [12],
        ),
        (
            "_inf_weight",
            "non-finite weight at step 7: saes.blocks-1-hook_resid_pre.decoder.weight",
            [12, 24],
        ),
        ("_spike_loss", "loss diverged at step 7: ", [12]),
    ],
    ids=["loss", "gradient", "weight", "divergence"],
)
def test_a_problem_found_later_names_its_step(
    config_dict, tmp_path: Path, monkeypatch, capsys, inject: str, expected: str, kept: list[int]
) -> None:
    """Detected on the device at a step that reads nothing, reported at the next read with the
    step, term or parameter it would have named at once; the checkpoints from its weights on are
    set aside, none is written after it, and the run resumes from the one before."""
    import test_reliability as rel

    from e2e_sae.training.resume import resume_points

    cfg = config_dict(
        n_samples=60,
        save_every_n_samples=12,
        keep_last_n_checkpoints=None,
        log_every_n_grad_steps=5,
        eval_n_samples=None,
        loss={"sparsity": {"coeff": 0.1}, "out_to_in": {"coeff": 1.0}},
    )
    path = _write(tmp_path / "cfg.yaml", cfg)
    getattr(rel, inject)(monkeypatch, 7)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    head = err[err.index("error:") :]
    assert err.count("error:") == 1 and "\n" not in head, err
    assert expected in head, head
    run = _only_run(Path(cfg["save_dir"]))
    assert [p.n_samples for p in resume_points(run)] == kept  # nothing written after step 7
    if kept == [12]:
        assert "last checkpoint before it: samples_12.safetensors" in head, head
        assert sorted(p.name for p in run.glob("samples_*.diverged")) == [
            "samples_24.safetensors.diverged"
        ]
    monkeypatch.undo()
    assert main(["train", str(path), "--resume", str(run)]) == 0


# --- batches to the device ------------------------------------------------------------------------
def test_to_device_on_cpu_is_the_tensor_itself() -> None:
    import torch

    from e2e_sae.training.feeds import to_device

    t = torch.arange(6).reshape(2, 3)
    assert to_device(t, torch.device("cpu")) is t


@pytest.mark.cuda
def test_to_device_pins_and_does_not_block() -> None:
    import torch

    from e2e_sae.training.feeds import to_device

    t = torch.arange(4 * 128).reshape(4, 128)
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a synchronising copy would raise here
    try:
        got = to_device(t, dev)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), t)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["local", "e2e-ds-accum", "topk-e2e", "topk-sparse-path-local"])
def test_non_logged_steps_never_synchronise_on_cuda(config_dict, monkeypatch, case: str) -> None:
    """On a GPU: every non-logged training step runs with CUDA's sync debug mode set to
    "error", so any device-to-host read or synchronising copy in the step raises."""
    import torch

    from e2e_sae.training import loop as loop_mod

    cfg = _config(
        config_dict(
            n_samples=48,
            log_every_n_grad_steps=5,
            max_grad_norm=1.0,
            device="cuda",
            eval_n_samples=None,
            **NO_READ_CASES[case],
        )
    )
    n = cfg.n_grad_steps
    logged = {s for s in range(n) if (s + 1) % 5 == 0 or s == 0} | {n - 1}
    orig, checked = loop_mod.step_run, []

    def step_run(r: Any, *args: Any, **kwargs: Any) -> Any:
        strict = r.state.step not in logged
        if strict:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            checked.append(r.state.step)
        try:
            return orig(r, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(loop_mod, "step_run", step_run)
    train_mod.train(cfg, progress=False)
    assert checked == sorted(set(range(n)) - logged)


# --- compile: true --------------------------------------------------------------------------------
COMPILE_CASES = {
    "relu-e2e-rotary": (
        {"loss": {"sparsity": {"coeff": 0.1}, "logits_kl": {"coeff": 1.0}}},
        {"normalization_type": "RMS", "positional_embedding_type": "rotary"},
    ),
    "topk-local": ({**_e2e_with("topk", k=4), "loss": {"out_to_in": {"coeff": 1.0}}}, {}),
}


def _compiled_vs_eager(config_dict, case: str, n_steps: int = 3) -> tuple[list, list, int]:
    """Losses of `n_steps` steps with and without `compile: true` (same init, same batches),
    and how many block passes went through the compiled function."""
    import torch
    from conftest import TINY_TLENS

    from e2e_sae.training.engine import TrainState

    extra, lm = COMPILE_CASES[case]
    logs, calls = {}, [0]
    for comp in (False, True):
        t = setup(
            _config(config_dict(tlens_config={**TINY_TLENS, **lm}, compile=comp, **extra)),
            device="cpu",
        )
        lean = getattr(t.plan.runner, "_lean", None)
        if comp and lean is not None and lean.compiled is not None:
            inner = lean.compiled

            def counted(*a: Any, _inner: Any = inner) -> Any:
                calls[0] += 1
                return _inner(*a)

            lean.compiled = counted
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 97, (4, 16), generator=g) for _ in range(n_steps)]
        state = TrainState()
        logs[comp] = [dict(t.train_step(iter([b]), state)) for b in batches]
    return logs[False], logs[True], calls[0]


@pytest.mark.parametrize("case", sorted(COMPILE_CASES))
def test_compile_runs_the_same_step(config_dict, monkeypatch, case: str) -> None:
    """The plumbing, with dynamo's `eager` backend (traced, no code generated: seconds): the
    hook-free blocks go through the compiled function and the losses are the eager ones."""
    import torch

    real = torch.compile

    def eager_compile(fn: Any = None, **kwargs: Any) -> Any:
        return real(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    eager, compiled, block_calls = _compiled_vs_eager(config_dict, case)
    if case.endswith("e2e-rotary"):
        assert block_calls > 0  # (the clean pass and the spliced pass after the SAE's block)
    for a, b in zip(eager, compiled, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(COMPILE_CASES))
def test_compile_with_inductor_gives_the_same_losses(config_dict, case: str) -> None:
    """`compile: true` as users get it (inductor, generated C++ on CPU: minutes)."""
    eager, compiled, _ = _compiled_vs_eager(config_dict, case)
    for a, b in zip(eager, compiled, strict=True):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (k, a[k], b[k])
