"""Long-run reliability: exact resume, SIGTERM / SIGKILL at random moments, NaN faults and
divergence, damaged checkpoints, concurrent runs, and torchrun DDP (2 CPU processes) against one
process with the double batch."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import only_run as _only_run
from conftest import parse_config as _config
from conftest import write_yaml as _write
from torch import Tensor

from e2e_sae.cli import main
from e2e_sae.errors import TrainingInterrupted
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.runs import rundir
from e2e_sae.runs.checkpoint import atomic_save_tensors, list_checkpoints, read_tensors
from e2e_sae.runs.rundir import RunLock
from e2e_sae.training import engine as engine_mod
from e2e_sae.training import trainer as train_mod
from e2e_sae.training.resume import resume_points
from e2e_sae.training.runlog import read_metrics

LOCAL = {"loss": {"sparsity": {"coeff": 0.1}, "out_to_in": {"coeff": 1.0}}}
E2E_DS = {
    "loss": {
        "sparsity": {"coeff": 0.1},
        "logits_kl": {"coeff": 1.0},
        "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_post"], "total_coeff": 0.5},
    },
    "max_grad_norm": 1.0,
}
REPO = Path(__file__).resolve().parent.parent
SAE_KEY = "blocks-1-hook_resid_pre"  # the conftest config's SAE in the ModuleDict


def _newest_weights(run_dir: Path) -> dict[str, Tensor]:
    return read_tensors(list_checkpoints(run_dir)[-1])


def _assert_bit_exact(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run_dir)]


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, k: int, signum: int) -> None:
    """Deliver `signum` to this process right after the k-th optimizer step."""
    orig = train_mod.Trainer.train_step
    calls = [0]

    def step(self: Any, batches: Any, state: Any, **kwargs: Any) -> dict[str, float]:
        out = orig(self, batches, state, **kwargs)
        calls[0] += 1
        if calls[0] == k:
            signal.raise_signal(signum)
        return out

    monkeypatch.setattr(train_mod.Trainer, "train_step", step)


# --- exact resume --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, signum",
    [
        ({**LOCAL, "effective_batch_size": 8}, signal.SIGINT),  # with gradient accumulation
        (E2E_DS, signal.SIGTERM),
    ],
    ids=["local-accum-sigint", "e2e-ds-sigterm"],
)
def test_signal_then_resume_is_bit_exact(
    config_dict, tmp_path: Path, monkeypatch, capsys, extra: dict[str, Any], signum: int
) -> None:
    cfg = config_dict(
        n_samples=64,
        save_every_n_samples=16,
        keep_last_n_checkpoints=2,
        warmup_samples=8,
        eval_every_n_samples=32,
        **extra,
    )
    ref = train_mod.train(_config(cfg), run_dir=tmp_path / "ref", progress=False)

    path = _write(tmp_path / "cfg.yaml", cfg)
    with monkeypatch.context() as m:
        _interrupt_after(m, 3, signum)
        assert main(["train", str(path)]) == 128 + signum
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name} after step 3" in err
    run = _only_run(Path(cfg["save_dir"]))
    bs = cfg.get("effective_batch_size", cfg["batch_size"])
    assert resume_points(run)[-1].n_samples == 3 * bs  # the signal wrote a checkpoint

    assert main(["train", str(path), "--resume"]) == 0  # alone: the newest run of this config
    _assert_bit_exact(_newest_weights(ref), _newest_weights(run))
    # optimizer moments, scheduler and RNG states too
    _assert_bit_exact(
        read_tensors(ref / "resume_64.safetensors"), read_tensors(run / "resume_64.safetensors")
    )
    for name in ("samples_64.safetensors", "resume_64.safetensors"):  # the files, byte for byte
        assert _sha(ref / name) == _sha(run / name), name
    assert _records(ref) == _records(run)  # metrics past the checkpoint were not duplicated
    # keep_last_n_checkpoints=2 (+ the final one)
    assert [p.name for p in list_checkpoints(run)] == [
        f"samples_{n}.safetensors" for n in (32, 48, 64)
    ]


def test_resume_rejects_a_different_config(config_dict, tmp_path: Path, capsys) -> None:
    cfg = config_dict(n_samples=8, **LOCAL)
    run = train_mod.train(_config(cfg), progress=False)
    changed = _write(tmp_path / "other.yaml", {**cfg, "lr": 0.5})
    assert main(["train", str(changed), "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'lr'" in err and "final_config.yaml" in err


def test_resume_rejects_a_different_global_batch(config_dict, tmp_path: Path, capsys) -> None:
    cfg = config_dict(n_samples=16, **LOCAL)
    run = train_mod.train(_config(cfg), progress=False)
    other = _write(tmp_path / "other.yaml", {**cfg, "batch_size": 2})
    assert main(["train", str(other), "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "global batch" in err


# --- crash safety --------------------------------------------------------------------------------
# `e2e-sae train ARGS` with the run directories' time stamp frozen (as if started in one second)
_FROZEN_CLOCK = (
    "import sys, e2e_sae.runs.rundir as t; t._stamp = lambda: '20250101-000000'; "
    "from e2e_sae.cli import main; sys.exit(main())"
)


def _start(args: list[str], frozen_clock: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = ["-c", _FROZEN_CLOCK] if frozen_clock else ["-m", "e2e_sae"]
    cmd = [sys.executable, *run, "train", *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _last_step(save_dir: Path) -> int:
    runs = list(save_dir.glob("*/metrics.jsonl"))
    return max((r.get("step", 0) for r in read_metrics(runs[0].parent)), default=0) if runs else 0


def _wait_for_progress(proc: subprocess.Popen[str], save_dir: Path, past_step: int) -> None:
    """Until the child has logged a training step beyond `past_step` (or has exited)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if _last_step(save_dir) > past_step:
            return
        time.sleep(0.002)


def _check_consistent(run: Path) -> int:
    """Every samples file has its resume file, and the newest complete point loads."""
    points = resume_points(run)
    assert points, "no complete checkpoint"
    samples = {p.name for p in run.glob("samples_*.safetensors")}
    assert samples == {p.samples_path.name for p in points}
    SAETransformer.from_local_path(run)
    read_tensors(points[-1].resume_path)
    return points[-1].n_samples


def test_sigterm_and_sigkill_at_random_moments_then_resume(config_dict, tmp_path: Path) -> None:
    cfg = config_dict(
        n_samples=640,
        save_every_n_samples=8,
        keep_last_n_checkpoints=2,
        eval_n_samples=None,
        log_every_n_grad_steps=1,
        **LOCAL,
    )
    path = _write(tmp_path / "cfg.yaml", cfg)
    save_dir = Path(cfg["save_dir"])
    rng = random.Random(1234)

    # SIGTERM: finish the step, write a checkpoint, exit 143. These tiny steps take a few ms each,
    # so a sleep before the signal could outlast the run on a busy machine: freeze the child as soon
    # as it has logged a step, queue SIGTERM, and let it go on; the signal lands mid-run.
    proc = _start([str(path)])
    _wait_for_progress(proc, save_dir, 0)
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    run = _only_run(save_dir)
    n = _check_consistent(run)
    assert f"after step {n // cfg['batch_size']};" in err

    # SIGKILL twice at random moments while the resumed run trains
    for _ in range(2):
        logged = _last_step(save_dir)  # the resumed run re-logs from its checkpoint on
        proc = _start([str(path), "--resume"])
        _wait_for_progress(proc, save_dir, logged)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.communicate(timeout=60)
        n = _check_consistent(run)

    assert main(["train", str(path), "--resume", str(run)]) == 0
    ref = train_mod.train(_config(cfg), run_dir=tmp_path / "ref", progress=False)
    _assert_bit_exact(_newest_weights(ref), _newest_weights(run))
    assert _records(ref) == _records(run)


def test_interrupted_write_leaves_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A failure between writing the temp file and renaming it keeps the old file intact and
    removes the temp file (a kill leaves it; `--resume` removes those: `clean_stale_temp_files`)."""
    path = tmp_path / "samples_8.safetensors"
    atomic_save_tensors({"w": torch.ones(3)}, path)

    def crash(*args: Any) -> None:
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_save_tensors({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(read_tensors(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


# --- numerical faults ----------------------------------------------------------------------------
def _nan_loss(monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    from e2e_sae.objective.losses import SparsityLoss

    orig, calls = SparsityLoss.__call__, [0]

    def call(self: Any, inputs: Any) -> Tensor:
        calls[0] += 1
        value = orig(self, inputs)
        return value * float("nan") if calls[0] == at_call else value

    monkeypatch.setattr(SparsityLoss, "__call__", call)


def _nan_gradient(monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    orig, calls = engine_mod.average_gradients, [0]

    def average(params: Any, d: Any) -> None:
        params = list(params)
        orig(params, d)
        calls[0] += 1
        if calls[0] == at_call:
            params[1].grad[0] = float("nan")  # encoder.0.bias

    monkeypatch.setattr(engine_mod, "average_gradients", average)


def _inf_weight(monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    orig, calls = torch.optim.Adam.step, [0]

    def step(self: Any, closure: Any = None) -> Any:
        out = orig(self, closure)
        calls[0] += 1
        if calls[0] == at_call:
            with torch.no_grad():
                self.param_groups[0]["params"][2][0, 0] = float("inf")  # decoder.weight
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)


@pytest.mark.parametrize(
    "inject, expected, kept",
    [  # a loss / gradient at step 5 comes from the weights after step 4 (samples_16): set aside
        (_nan_loss, "non-finite loss at step 5: term 'sparsity'", [8]),
        (_nan_gradient, f"non-finite gradient at step 5: saes.{SAE_KEY}.encoder.0.bias", [8]),
        (_inf_weight, f"non-finite weight at step 5: saes.{SAE_KEY}.decoder.weight", [8, 16]),
    ],
    ids=["loss", "gradient", "weight"],
)
def test_numerical_fault_stops_and_keeps_last_good_checkpoint(
    config_dict, tmp_path: Path, monkeypatch, capsys, inject: Any, expected: str, kept: list[int]
) -> None:
    cfg = config_dict(n_samples=40, save_every_n_samples=8, keep_last_n_checkpoints=None, **LOCAL)
    path = _write(tmp_path / "cfg.yaml", cfg)
    inject(monkeypatch, 5)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("error:") == 1 and "\n" not in err[err.index("error:") :], err  # one line
    assert expected in err, err
    run = _only_run(Path(cfg["save_dir"]))
    assert [p.n_samples for p in resume_points(run)] == kept  # steps 2 (and 4); none after
    assert f"last checkpoint before it: samples_{kept[-1]}.safetensors" in err or kept == [8, 16]
    aside = sorted(p.name for p in run.glob("*.diverged"))
    assert aside == (
        [] if 16 in kept else ["resume_16.safetensors.diverged", "samples_16.safetensors.diverged"]
    )
    assert all(torch.isfinite(t).all() for t in _newest_weights(run).values())
    monkeypatch.undo()
    assert main(["train", str(path), "--resume", str(run)]) == 0  # and it continues from there


# --- damaged checkpoints -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, token_data: Path) -> Path:
    from conftest import make_config_dict

    root = tmp_path_factory.mktemp("finished")
    cfg = make_config_dict(token_data, root / "runs", n_samples=16, **LOCAL)
    return train_mod.train(_config(cfg), progress=False)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_data_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes: the header still parses
    p.write_bytes(bytes(data))


def _garble_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[8:20] = b"#" * 12
    p.write_bytes(bytes(data))


def _resize_config(run: Path) -> None:
    cfg = yaml.safe_load((run / "final_config.yaml").read_text())
    cfg["saes"]["dict_size_to_input_ratio"] = 3.0
    (run / "final_config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize(
    "damage, command, expected",
    [
        (lambda r: _truncate(r / "samples_16.safetensors"), "eval", "samples_16.safetensors"),
        (lambda r: _flip_data_byte(r / "samples_16.safetensors"), "eval", "checksum"),
        (lambda r: _garble_header(r / "samples_16.safetensors"), "eval", "samples_16"),
        (_resize_config, "eval", "shape"),
        (lambda r: _truncate(r / "resume_16.safetensors"), "resume", "resume_16.safetensors"),
        (lambda r: _flip_data_byte(r / "resume_16.safetensors"), "resume", "checksum"),
        (lambda r: _edit_samples_metadata(r / "samples_16.safetensors"), "eval", "checksum"),
    ],
    ids=[
        "truncated",
        "bit-flip",
        "bad-header",
        "shape-vs-config",
        "resume-truncated",
        "resume-bit-flip",
        "metadata-edit",
    ],
)
def test_damaged_checkpoint_is_a_one_line_error(
    finished_run: Path, tmp_path: Path, capsys, damage: Any, command: str, expected: str
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    if command == "eval":
        argv = ["eval", str(run)]
    else:
        argv = ["train", str(run / "final_config.yaml"), "--resume", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def _edit_step_counter(p: Path) -> None:
    """A digit of the step counter in the resume file metadata (the header still parses)."""
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = re.sub(rb'(\\"step\\": )8', rb"\g<1>3", data[8 : 8 + n], count=1)
    assert header != data[8 : 8 + n]
    p.write_bytes(data[:8] + header + data[8 + n :])


def _edit_samples_metadata(p: Path) -> None:
    data = p.read_bytes()
    assert b'"architecture":"relu"' in data
    p.write_bytes(data.replace(b'"architecture":"relu"', b'"architecture":"topk"', 1))


@pytest.fixture(scope="module")
def pointed_run(tmp_path_factory: pytest.TempPathFactory, token_data: Path) -> Path:
    """A finished run with resume points at 8, 16, 24 and 32 samples (steps 2, 4, 6, 8)."""
    from conftest import make_config_dict

    root = tmp_path_factory.mktemp("pointed")
    cfg = make_config_dict(
        token_data,
        root / "runs",
        n_samples=32,
        save_every_n_samples=8,
        keep_last_n_checkpoints=None,
        eval_n_samples=None,
        **LOCAL,
    )
    return train_mod.train(_config(cfg), progress=False)


@pytest.mark.parametrize(
    "damage, damaged",
    [
        (lambda r: _truncate(r / "samples_32.safetensors"), "samples_32.safetensors"),
        (lambda r: (r / "samples_32.safetensors").write_bytes(b""), "samples_32.safetensors"),
        (lambda r: (r / "resume_32.safetensors").write_bytes(b""), "resume_32.safetensors"),
        (lambda r: _flip_data_byte(r / "resume_32.safetensors"), "resume_32.safetensors"),
        (lambda r: _edit_step_counter(r / "resume_32.safetensors"), "resume_32.safetensors"),
        (
            lambda r: shutil.copy(r / "samples_24.safetensors", r / "samples_32.safetensors"),
            "samples_32.safetensors",
        ),
    ],
    ids=[
        "samples-truncated",
        "samples-emptied",
        "resume-emptied",
        "resume-bit-flip",
        "resume-step-digit",
        "samples-of-another-point",
    ],
)
def test_resume_falls_back_to_the_newest_intact_point(
    pointed_run: Path, tmp_path: Path, caplog, damage: Any, damaged: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(pointed_run, run)
    original = {n: _sha(run / n) for n in ("samples_32.safetensors", "resume_32.safetensors")}
    records = _records(run)
    damage(run)
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(run / "final_config.yaml"), "--resume", str(run)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and damaged in warnings[0], warnings
    assert (run / f"{damaged}.damaged").exists()
    # continued from samples_24: the redone steps write the same files, byte for byte
    assert {n: _sha(run / n) for n in original} == original
    assert _records(run) == records


def test_make_run_dir_never_reuses_a_directory(config_dict, monkeypatch) -> None:
    monkeypatch.setattr(rundir, "_stamp", lambda: "20250101-000000")
    config = _config(config_dict(run_name="same"))
    a, b, c = (rundir.make_run_dir(config) for _ in range(3))
    assert [a.name, b.name, c.name] == [f"same_20250101-000000{s}" for s in ("", "-2", "-3")]


def test_runs_started_together_get_their_own_directories(config_dict, tmp_path: Path) -> None:
    """Same run_name and save_dir, started at once: two directories, neither touched by the other,
    and (same config and seed) byte-identical checkpoint files."""
    cfg = config_dict(
        run_name="same",
        n_samples=64,
        save_every_n_samples=8,
        keep_last_n_checkpoints=1,
        eval_n_samples=None,
        **LOCAL,
    )
    path = _write(tmp_path / "cfg.yaml", cfg)
    procs = [_start([str(path)], frozen_clock=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    runs = sorted(p for p in Path(cfg["save_dir"]).iterdir() if p.is_dir())
    assert [r.name for r in runs] == ["same_20250101-000000", "same_20250101-000000-2"]
    for run in runs:
        assert [r["step"] for r in read_metrics(run)] == list(range(1, 17))
        assert [p.name for p in list_checkpoints(run)] == [
            "samples_56.safetensors",
            "samples_64.safetensors",
        ]
        RunLock(run).acquire("test").release()  # released when the process ended
    for name in ("samples_64.safetensors", "resume_64.safetensors"):
        assert _sha(runs[0] / name) == _sha(runs[1] / name), name


def test_resume_refuses_a_directory_a_live_run_holds(
    finished_run: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    argv = ["train", str(run / "final_config.yaml"), "--resume", str(run)]
    lock = RunLock(run).acquire("test")  # (flock: a second open file conflicts, same process too)
    try:
        assert main(argv) == 2
    finally:
        lock.release()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in use by a running training" in err, err
    assert f"pid {os.getpid()}" in err
    assert main(argv) == 0  # free again


# --- divergence ----------------------------------------------------------------------------------
def _spike_loss(monkeypatch: pytest.MonkeyPatch, at_call: int, factor: float = 1e7) -> None:
    from e2e_sae.objective.losses import SparsityLoss

    orig, calls = SparsityLoss.__call__, [0]

    def call(self: Any, inputs: Any) -> Tensor:
        calls[0] += 1
        value = orig(self, inputs)
        return value * factor if calls[0] == at_call else value

    monkeypatch.setattr(SparsityLoss, "__call__", call)


def test_divergence_guard_stops_and_keeps_the_checkpoint_before(
    config_dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    cfg = config_dict(
        n_samples=40,
        save_every_n_samples=8,
        keep_last_n_checkpoints=None,
        eval_n_samples=None,
        **LOCAL,
    )
    path = _write(tmp_path / "cfg.yaml", cfg)
    with monkeypatch.context() as m:
        _spike_loss(m, 5)
        assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("error:") == 1, err
    head = err[err.index("error:") :]
    assert re.match(
        r"error: loss diverged at step 5: \S+ is over 1000x the median \S+ of the "
        r"last 4 steps; term 'sparsity'",
        head,
    ), head
    assert "last checkpoint before it: samples_8.safetensors" in head, head
    run = _only_run(Path(cfg["save_dir"]))
    assert [p.n_samples for p in resume_points(run)] == [8]
    assert (run / "samples_16.safetensors.diverged").exists()

    # the guard's window is part of a resume point: stopped after step 3 and resumed, the same
    # spike gives the same verdict
    other = _write(tmp_path / "other.yaml", {**cfg, "save_dir": str(tmp_path / "other")})
    with monkeypatch.context() as m:
        _interrupt_after(m, 3, signal.SIGTERM)
        assert main(["train", str(other)]) == 143
    with monkeypatch.context() as m:
        _spike_loss(m, 2)  # step 5 is the resumed run's second step
        assert main(["train", str(other), "--resume"]) == 2
    err2 = capsys.readouterr().err
    again = err2[err2.index("error:") :].strip()
    assert again.split(" (divergence_factor")[0] == head.split(" (divergence_factor")[0]

    # off: the same spike trains through
    off = _write(
        tmp_path / "off.yaml", {**cfg, "divergence_factor": None, "save_dir": str(tmp_path / "off")}
    )
    with monkeypatch.context() as m:
        _spike_loss(m, 5)
        assert main(["train", str(off)]) == 0


def test_a_huge_learning_rate_is_stopped_at_the_spike(config_dict, tmp_path: Path, capsys) -> None:
    """lr 1e10: the loss jumps from ~0.7 to ~1e22 at step 2 (it used to train on silently)."""
    cfg = config_dict(n_samples=64, lr=1e10, eval_n_samples=None, **LOCAL)
    assert main(["train", str(_write(tmp_path / "cfg.yaml", cfg))]) == 2
    err = capsys.readouterr().err.strip()
    assert "error: loss diverged at step 2:" in err and "term 'out_to_in'" in err, err


def test_second_ctrl_c_ends_quietly(config_dict, tmp_path: Path) -> None:
    """SIGINT, then SIGINT again every 10 ms until the process is gone: whichever moment the
    second one hits (the step, the save, the exit handlers), exit 130 and no traceback."""
    cfg = config_dict(n_samples=100_000, eval_n_samples=None, save_every_n_samples=400, **LOCAL)
    path = _write(tmp_path / "cfg.yaml", cfg)
    proc = _start([str(path)])
    _wait_for_progress(proc, Path(cfg["save_dir"]), 0)
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


# --- torchrun DDP --------------------------------------------------------------------------------
def _torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    port = str(29500 + os.getpid() % 1000)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--master_port",
        port,
        "-m",
        "e2e_sae",
        "train",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_equal_one_with_double_batch(config_dict, tmp_path: Path) -> None:
    """e2e + downstream loss under DDP: 2 ranks x batch 2 == 1 process x batch 4 (1e-5)."""
    over = {**E2E_DS, "n_samples": 48, "warmup_samples": 8, "save_every_n_samples": 24}
    cfg2 = config_dict(batch_size=2, **over)
    proc = _torchrun(2, [str(_write(tmp_path / "ddp.yaml", cfg2))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_run = _only_run(Path(cfg2["save_dir"]))  # rank 0 alone made a run directory

    cfg1 = config_dict(batch_size=4, **over)
    ref = train_mod.train(_config(cfg1), run_dir=tmp_path / "ref", progress=False)
    a, b = _newest_weights(ref), _newest_weights(ddp_run)
    assert list_checkpoints(ddp_run)[-1].name == "samples_48.safetensors"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    ra, rb = read_metrics(ref), read_metrics(ddp_run)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]  # one log line per step, rank 0
    for x, y in zip(ra, rb, strict=True):
        for k in ("loss", "logits_kl", "in_to_orig", "sparsity"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), k


@pytest.mark.slow
def test_torchrun_resumes_a_single_process_run(config_dict, tmp_path: Path, monkeypatch) -> None:
    """Interrupted with 1 process x batch 4, continued by 2 ranks x batch 2 (same global batch)."""
    over = {**LOCAL, "n_samples": 48, "save_every_n_samples": 8}
    cfg1 = config_dict(batch_size=4, **over)
    with monkeypatch.context() as m:
        _interrupt_after(m, 5, signal.SIGTERM)
        with pytest.raises(TrainingInterrupted):
            train_mod.train(_config(cfg1), run_dir=tmp_path / "run", progress=False)
    path2 = _write(tmp_path / "two.yaml", {**cfg1, "batch_size": 2})
    proc = _torchrun(2, [str(path2), "--resume", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = train_mod.train(_config(cfg1), run_dir=tmp_path / "ref", progress=False)
    a, b = _newest_weights(ref), _newest_weights(tmp_path / "run")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
