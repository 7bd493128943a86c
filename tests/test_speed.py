"""Issue 26 (speed where researchers run): `precision: auto`, a training loop that reads no
tensor values on non-logged steps, pinned non-blocking batch copies on CUDA, the opt-in
`compile`, and the device check script on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e_sae import resources
from e2e_sae.cli import main
from e2e_sae.config import Config, load_config
from e2e_sae.training import trainer as train_mod
from e2e_sae.training.trainer import setup

E2E = {"loss": {"sparsity": {"coeff": 0.1}, "logits_kl": {"coeff": 1.0}}}


def _config(cfg: dict[str, Any]) -> Config:
    config = load_config(cfg)
    assert isinstance(config, Config)
    return config


def _write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _only_run(save_dir: Path) -> Path:
    (run,) = [p for p in save_dir.iterdir() if p.is_dir()]
    return run


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
    assert "# precision: auto -> bf16 on cpu" in captured.err
