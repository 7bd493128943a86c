"""benchmarks/device_check.py on the CPU, small: it runs every mode, writes its report, and our
fp32 step gives the reference path's loss."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "device_check.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module
    spec.loader.exec_module(module)
    return module


def test_device_check_runs_on_cpu(tmp_path: Path) -> None:
    dc = load_script()
    argv = "--device cpu --no-tests --modes local,e2e_ds,cache --variants ref,fp32,bf16,auto"
    argv += f" --steps 2 --warmup 0 --batch-size 1 --n-ctx 16 --out {tmp_path}"
    result = dc.main(argv.split())
    rows = {(r["mode"], r["variant"].split(" ")[0]): r for r in result["rows"]}
    for mode in ("local", "e2e_ds"):
        for v in ("ref", "fp32", "bf16", "auto"):
            r = rows[(mode, v)]
            assert r["tokens_per_s"] > 0 and len(r["step_s_all"]) == 2
            assert r["peak_mib"] > 0
        # same SAE init, same batch: our fp32 loss is the reference's up to float rounding
        assert rows[(mode, "fp32")]["first_step_rel_loss_diff_vs_ref"] < 1e-5
        assert rows[(mode, "bf16")]["first_step_rel_loss_diff_vs_ref"] < 3e-2
    assert rows[("cache", "cache-build")]["tokens_per_s"] > 0
    # auto names what it chose on this machine
    auto = rows[("local", "auto")]["variant"]
    assert auto in ("auto (fp32)", "auto (bf16)")
    (md,) = tmp_path.glob("device-cpu-*.md")
    (js,) = tmp_path.glob("device-cpu-*.json")
    assert "| e2e_ds | fp32 |" in md.read_text()
    assert json.loads(js.read_text())["args"]["model"] == "tiny"


def test_device_check_refuses_unknown_names_and_a_missing_gpu(monkeypatch) -> None:
    dc = load_script()
    with pytest.raises(SystemExit):
        dc.parse(["--device", "cpu", "--modes", "e2e,bogus"])
    with pytest.raises(SystemExit):
        dc.parse(["--device", "cpu", "--variants", "fp16"])
    monkeypatch.setattr(dc.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        dc.parse(["--device", "cuda"])
    args = dc.parse(["--device", "cpu"])
    assert (args.model, args.batch_size, args.n_ctx) == ("tiny", 4, 128)


def test_compiled_variants_leave_the_uncompiled_ones_alone(tmp_path: Path, monkeypatch) -> None:
    """fp32+compile beside fp32 (dynamo's eager backend: traced, no code generated): the compiled
    variant runs on its own copy of the LM, so the uncompiled one's lean blocks stay eager; the
    losses agree and the report gives compile's ratio."""
    import torch

    from e2e_sae.lm.fastlm import get_lean_lm

    real = torch.compile

    def eager_compile(fn: object = None, **kwargs: object) -> object:
        return real(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    dc = load_script()
    argv = "--device cpu --no-tests --modes e2e --variants fp32,fp32+compile --steps 2"
    argv += f" --warmup 1 --batch-size 1 --n-ctx 16 --out {tmp_path}"
    result = dc.main(argv.split())
    shared, copied = dc.lm_on("tiny", "cpu"), dc.lm_copy("tiny", "cpu")
    assert shared is not copied
    lean_shared, lean_copied = get_lean_lm(shared), get_lean_lm(copied)
    assert lean_shared is not None and lean_copied is not None
    assert lean_shared.compiled is None and lean_copied.compiled is not None
    (row,) = [r for r in result["rows"] if r["variant"] == "fp32+compile"]
    assert row["speedup_vs_uncompiled"] > 0
    assert row["max_rel_loss_diff_vs_uncompiled"] < 1e-5
    (md,) = tmp_path.glob("device-cpu-*.md")
    assert "vs uncompiled" in md.read_text()
