"""Faults under a running command (issue 21): a full disk, a file size limit, a read-only or
forbidden run directory, a run directory deleted mid-run, a full filesystem for cache-acts, and
signals at any moment. Each is one line on stderr and a documented exit status, nothing is left
half-written, and `--resume` afterwards ends bit-identical to an uninterrupted run.

A full disk is a real tmpfs where this process may mount one (root with CAP_SYS_ADMIN), else
those rows are skipped; the file size limit is a real RLIMIT_FSIZE in a child process; errors
no test machine can produce on demand (EACCES as root, EDQUOT) are raised where the file is
written."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import only_run as _only_run
from conftest import parse_config as _config
from conftest import write_yaml as _write

from e2e_sae.cli import main
from e2e_sae.config import load_config
from e2e_sae.runs import checkpoint as checkpoint_mod
from e2e_sae.runs.checkpoint import list_checkpoints, read_tensors
from e2e_sae.training import trainer as train_mod
from e2e_sae.training.faults import WRITE_FAULTS
from e2e_sae.training.runlog import read_metrics

REPO = Path(__file__).resolve().parent.parent
LOCAL = {"loss": {"sparsity": {"coeff": 0.1}, "out_to_in": {"coeff": 1.0}}}


def _message_lines(err: str) -> list[str]:
    """stderr without progress bars (tqdm lines such as `train:  12%|█  | 2/16 ...`)."""
    lines = [ln.rsplit("\r", 1)[-1] for ln in err.splitlines()]
    return [ln for ln in lines if ln.strip() and not re.match(r"^[\w ]+: +\d+%\|", ln)]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line the command printed on stderr."""
    lines = _message_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    return lines[0]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run_dir)]


def _assert_same_run(ref: Path, run: Path) -> None:
    """Bit-identical final weights and optimizer state, and the same metric records."""
    a, b = read_tensors(list_checkpoints(ref)[-1]), read_tensors(list_checkpoints(run)[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    n = list_checkpoints(ref)[-1].name.removeprefix("samples_")
    ra, rb = read_tensors(ref / f"resume_{n}"), read_tensors(run / f"resume_{n}")
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    assert _records(ref) == _records(run)


def _no_temp_files(run: Path) -> None:
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


# --- a real small filesystem ---------------------------------------------------------------------
class SmallFS:
    """A tmpfs of `size` bytes at `path`, filled up to `leave_free` with `fill()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self, leave_free: int) -> None:
        free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
        self.filler.write_bytes(b"x" * max(0, free - leave_free))

    def free_up(self) -> None:
        self.filler.unlink(missing_ok=True)


def _mount(path: Path, size: str) -> SmallFS:
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    return SmallFS(path)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[SmallFS]:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a tmpfs needs root on Linux")
    fs = _mount(tmp_path / "mnt", "400k")
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(fs.path)], check=False)


def test_disk_full_mid_run_is_one_line_and_resume_is_exact(
    config_dict, tmp_path: Path, small_fs: SmallFS, capsys
) -> None:
    over = {"n_samples": 64, "save_every_n_samples": 8, "keep_last_n_checkpoints": 2}
    cfg = {
        **config_dict(eval_n_samples=None, **over, **LOCAL),
        "save_dir": str(small_fs.path / "runs"),
    }
    path = _write(tmp_path / "cfg.yaml", cfg)
    small_fs.fill(leave_free=170_000)  # room for two checkpoints (~72 kB each), not for three
    assert main(["train", str(path)]) == 2
    line = _error_line(capsys)
    run = _only_run(small_fs.path / "runs")
    assert line.startswith("error: cannot write ") and "the disk is full" in line, line
    assert f"continue with `e2e-sae train CONFIG --resume {run}`" in line, line
    last = list_checkpoints(run)[-1].name
    assert f"the last complete checkpoint, {last}, is intact" in line, line
    assert last != "samples_64.safetensors"
    _no_temp_files(run)

    small_fs.free_up()
    assert main(["train", str(path), "--resume", str(run)]) == 0
    ref = train_mod.train(_config(cfg), run_dir=tmp_path / "ref", progress=False)
    _assert_same_run(ref, run)


def test_full_save_dir_at_start_leaves_no_directory(
    config_dict, tmp_path: Path, small_fs: SmallFS, capsys
) -> None:
    save_dir = small_fs.path / "runs"
    save_dir.mkdir()
    path = _write(tmp_path / "cfg.yaml", {**config_dict(**LOCAL), "save_dir": str(save_dir)})
    small_fs.fill(leave_free=0)
    assert main(["train", str(path)]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: save_dir: ") and "No space left on device" in line, line
    assert list(save_dir.iterdir()) == []


def _after_step(monkeypatch: pytest.MonkeyPatch, k: int, action: Any) -> None:
    orig, calls = train_mod.Trainer.train_step, [0]

    def step(self: Any, batches: Any, state: Any, **kwargs: Any) -> dict[str, float]:
        out = orig(self, batches, state, **kwargs)
        calls[0] += 1
        if calls[0] == k:
            action()
        return out

    monkeypatch.setattr(train_mod.Trainer, "train_step", step)


# --- a real file size limit (EFBIG) --------------------------------------------------------------
_LIMITED = (
    "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0})); "
    "from e2e_sae.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_file_size_limit_is_one_line_and_resume_is_exact(config_dict, tmp_path: Path) -> None:
    """metrics.jsonl (one ~300-byte line a step) outgrows a 36 kB limit that every checkpoint
    file (< 32 kB with 16 latents) fits: EFBIG at a metrics line; --resume without it is exact."""
    saes = {"sae_positions": "blocks.1.hook_resid_pre", "dict_size_to_input_ratio": 0.5}
    cfg = config_dict(
        n_samples=600, save_every_n_samples=40, eval_n_samples=None, saes=saes, **LOCAL
    )
    path = _write(tmp_path / "cfg.yaml", cfg)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", _LIMITED.format(36_000), "train", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = _message_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    run = _only_run(Path(cfg["save_dir"]))
    assert lines[0].startswith(f"error: cannot write {run / 'metrics.jsonl'}: a file reached"), (
        lines[0]
    )
    assert "file size limit" in lines[0] and f"--resume {run}`" in lines[0], lines[0]
    _no_temp_files(run)
    assert main(["train", str(path), "--resume", str(run)]) == 0
    _assert_same_run(train_mod.train(_config(cfg), run_dir=tmp_path / "ref", progress=False), run)


# --- every write fault, where the file is written ------------------------------------------------
@pytest.mark.parametrize("code", sorted(WRITE_FAULTS), ids=errno.errorcode.get)
def test_write_faults_are_one_line_naming_the_file_and_the_resume(
    config_dict, tmp_path: Path, monkeypatch, capsys, code: int
) -> None:
    cfg = config_dict(n_samples=32, save_every_n_samples=8, eval_n_samples=None, **LOCAL)
    path = _write(tmp_path / "cfg.yaml", cfg)
    orig, calls = checkpoint_mod._save_file, [0]

    def save(tensors: Any, target: Path, metadata: Any) -> None:
        calls[0] += 1
        if calls[0] == 5:  # the third resume file (resume_24)
            raise OSError(code, os.strerror(code), str(target))
        orig(tensors, target, metadata)

    with monkeypatch.context() as m:
        m.setattr(checkpoint_mod, "_save_file", save)
        assert main(["train", str(path)]) == 2
    line = _error_line(capsys)
    run = _only_run(Path(cfg["save_dir"]))
    assert line == (
        f"error: cannot write {run / 'resume_24.safetensors'}: {WRITE_FAULTS[code]} "
        f"({os.strerror(code)}); training stopped and the last complete checkpoint, "
        "samples_16.safetensors, is intact; make room or fix the permissions, then continue "
        f"with `e2e-sae train CONFIG --resume {run}`"
    )
    _no_temp_files(run)
    if code == errno.EACCES:  # one of them continued to the end
        assert main(["train", str(path), "--resume", str(run)]) == 0
        ref = train_mod.train(_config(cfg), run_dir=tmp_path / "ref", progress=False)
        _assert_same_run(ref, run)


def test_read_only_run_directory_as_a_user(config_dict, tmp_path: Path, capsys) -> None:
    """EACCES for real needs a user that permissions bind (not root)."""
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    cfg = config_dict(n_samples=8, eval_n_samples=None, **LOCAL)
    run = train_mod.train(_config(cfg), progress=False)
    path = _write(tmp_path / "cfg.yaml", {**cfg, "n_samples": 16})
    os.chmod(run, 0o500)
    try:
        assert main(["train", str(path), "--resume", str(run)]) == 2
    finally:
        os.chmod(run, 0o700)
    assert "--resume" in _error_line(capsys)


@pytest.mark.parametrize("given", [False, True], ids=["new-run-directory", "given-folder"])
def test_config_write_failing_at_start(
    config_dict, tmp_path: Path, monkeypatch, given: bool
) -> None:
    """A run directory made for the run goes again; a folder the caller gave (a sweep's run
    folder, perhaps holding an earlier attempt) is left as it was."""
    from e2e_sae.errors import UserError

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint_mod, "atomic_write_bytes", full)
    config = _config(config_dict(**LOCAL))
    folder = tmp_path / "given"
    if given:
        folder.mkdir()
        (folder / "notes.txt").write_text("an earlier attempt")
    with pytest.raises(UserError, match="No space left on device") as err:
        train_mod.train(config, run_dir=folder if given else None, progress=False)
    assert len(str(err.value).splitlines()) == 1
    if given:
        assert sorted(p.name for p in folder.iterdir()) == [".lock", "notes.txt"]
    else:
        assert list(Path(config.save_dir or "").iterdir()) == []


def test_run_directory_deleted_mid_run_is_not_recreated(
    config_dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    import shutil

    cfg = config_dict(n_samples=64, save_every_n_samples=16, **LOCAL)
    save_dir = Path(cfg["save_dir"])
    _after_step(monkeypatch, 3, lambda: shutil.rmtree(_only_run(save_dir)))
    assert main(["train", str(_write(tmp_path / "cfg.yaml", cfg))]) == 2
    line = _error_line(capsys)
    assert "was deleted while the run was writing to it" in line, line
    assert list(save_dir.iterdir()) == []


# --- cache-acts onto a full filesystem -----------------------------------------------------------
def test_cache_acts_larger_than_the_free_space_is_refused(
    config_dict, tmp_path: Path, small_fs: SmallFS, capsys
) -> None:
    """256 windows x 16 tokens x 32 floats = 512 kB: refused before anything is written."""
    out = small_fs.path / "acts"
    path = _write(tmp_path / "cfg.yaml", config_dict(n_samples=256, **LOCAL))
    assert main(["cache-acts", str(path), "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: activation cache: 256 windows x 16 tokens") and "free" in line
    assert "--n-samples" in line and sorted(p.name for p in small_fs.path.iterdir()) == []


def test_cache_acts_disk_full_while_writing_leaves_no_tmp(
    config_dict, tmp_path: Path, small_fs: SmallFS, monkeypatch, capsys
) -> None:
    """Past the size check (as if another process filled the disk meanwhile): the files' blocks
    are reserved up front, so the full disk is one line, not a bus error, and acts.tmp goes."""
    from e2e_sae.caches import activations

    monkeypatch.setattr(activations, "check_disk", lambda *args: None)
    out = small_fs.path / "acts"
    path = _write(tmp_path / "cfg.yaml", config_dict(n_samples=256, **LOCAL))
    assert main(["cache-acts", str(path), "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: activation cache {out}: cannot write"), line
    assert "No space left on device" in line and "the partial cache was removed" in line
    assert sorted(p.name for p in small_fs.path.iterdir()) == []


# --- signals -------------------------------------------------------------------------------------
def _start(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "e2e_sae", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("delay", [0.5, 2.0])
def test_ctrl_c_during_start_up_is_one_line_exit_130(
    config_dict, tmp_path: Path, delay: float
) -> None:
    """During the imports (torch, transformer_lens) and the model load: no traceback."""
    cfg = config_dict(n_samples=100_000, **LOCAL)
    proc = _start(["train", str(_write(tmp_path / "cfg.yaml", cfg))])
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert _message_lines(err)[-1].startswith("interrupted"), err
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("when", ["start-up", "training"])
def test_two_sigterms_20ms_apart_exit_143(config_dict, tmp_path: Path, when: str) -> None:
    cfg = config_dict(n_samples=100_000, eval_n_samples=None, save_every_n_samples=400, **LOCAL)
    proc = _start(["train", str(_write(tmp_path / "cfg.yaml", cfg))])
    if when == "start-up":
        time.sleep(0.5)
    else:
        deadline = time.monotonic() + 300
        metrics = Path(cfg["save_dir"])
        while time.monotonic() < deadline and proc.poll() is None:
            if any(metrics.glob("*/metrics.jsonl")):
                break
            time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert _message_lines(err)[-1].startswith("interrupted"), err
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_the_final_evaluation_is_honoured(
    config_dict, tmp_path: Path, monkeypatch, capsys, signum: int
) -> None:
    """The final checkpoint is written before the final evaluation; a signal there ends it."""
    cfg = config_dict(n_samples=16, **LOCAL)
    orig, seen = train_mod.Trainer.run_eval, []

    def run_eval(self: Any, progress: bool = False, desc: str = "eval") -> Any:
        seen.append(desc)
        signal.raise_signal(signum)  # lands inside the evaluation
        return orig(self, progress=progress, desc=desc)

    monkeypatch.setattr(train_mod.Trainer, "run_eval", run_eval)
    assert main(["train", str(_write(tmp_path / "cfg.yaml", cfg))]) == 128 + signum
    run = _only_run(Path(cfg["save_dir"]))
    name = signal.Signals(signum).name
    assert _error_line(capsys) == (
        f"interrupted: stopped by {name} during the final evaluation; the final checkpoint "
        f"samples_16.safetensors is saved; evaluate it with `e2e-sae eval {run}`"
    )
    assert seen == ["final eval"] and list_checkpoints(run)[-1].name == "samples_16.safetensors"
    assert not any("eval/ce_loss_clean" in r for r in read_metrics(run))  # it did not finish
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_from_local_path_refuses_a_checkpoint_without_its_checksum(
    config_dict, tmp_path: Path
) -> None:
    from e2e_sae import SAETransformer, UserError

    run = train_mod.train(_config(config_dict(n_samples=8, **LOCAL)), progress=False)
    path = list_checkpoints(run)[-1]
    data = bytearray(path.read_bytes())
    at = data.index(b"e2e_sae.sha256")
    data[at : at + 14] = b"e2e_sae.sha257"
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="has no checksum"):
        SAETransformer.from_local_path(run)


def test_export_skips_a_damaged_newest_checkpoint_as_eval_does(
    config_dict, tmp_path: Path, caplog
) -> None:
    import logging

    from safetensors.torch import load_file

    cfg = config_dict(n_samples=16, save_every_n_samples=8, keep_last_n_checkpoints=None, **LOCAL)
    run = train_mod.train(_config(cfg), progress=False)
    newest = run / "samples_16.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert main(["export", str(run), str(tmp_path / "out")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "samples_16.safetensors" in warnings[0], warnings
    exported = load_file(tmp_path / "out" / "blocks.1.hook_resid_pre" / "sae_weights.safetensors")
    kept = read_tensors(run / "samples_8.safetensors")
    assert torch.equal(exported["b_dec"], kept["blocks-1-hook_resid_pre.decoder.bias"])


def test_resume_refuses_files_of_another_architecture(config_dict, tmp_path: Path, capsys) -> None:
    """A relu run whose newest checkpoint and resume file came from a topk run."""
    import shutil

    relu = train_mod.train(_config(config_dict(n_samples=16, **LOCAL)), progress=False)
    topk_cfg = config_dict(
        n_samples=16,
        saes={"sae_positions": "blocks.1.hook_resid_pre", "architecture": "topk", "k": 4},
        **LOCAL,
    )
    topk_cfg["save_dir"] = str(tmp_path / "topk")
    topk = train_mod.train(_config(topk_cfg), progress=False)
    for name in ("samples_16.safetensors", "resume_16.safetensors"):
        shutil.copy(topk / name, relu / name)
    assert main(["train", str(relu / "final_config.yaml"), "--resume", str(relu)]) == 2
    line = _error_line(capsys)
    assert "holds topk SAEs, but the config builds relu SAEs" in line, line


def test_the_shipped_configs_pass_the_new_checks() -> None:
    """The bounds, the run-name rule and the YAML checks accept every config and sweep we ship."""
    from e2e_sae.mlp import load_mlp_config
    from e2e_sae.training.sweep import load_sweep

    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(paths) > 10
    for path in paths:
        if path.name.startswith("mlp_"):
            load_mlp_config(path)
        elif path.name.startswith("sweep_"):
            assert load_sweep(path).runs
        else:
            load_config(path)
