"""`e2e-sae cache-acts` and `e2e-sae train-cached`: run directories like `train`'s, weights equal to
training from the cache directly and to a normal (LM) run of the same config, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY_TLENS, assert_close_scaled, make_config_dict, train_on_same_batches

from e2e_sae import SAETransformer
from e2e_sae.caches.activations import ActivationCache, build_for_config, n_cache_batches
from e2e_sae.cli import main
from e2e_sae.config import Config, load_config
from e2e_sae.data import create_data_loader, load_windows
from e2e_sae.runs.checkpoint import CONFIG_FILE, list_checkpoints, read_tensors
from e2e_sae.training.runlog import read_metrics
from e2e_sae.training.trainer import setup, train

HOOK = "blocks.1.hook_resid_pre"


def _loss(coeff: float) -> dict[str, Any]:
    return {"sparsity": {"coeff": coeff}, "out_to_in": {"coeff": 1.0}}


def _write(folder: Path, name: str, cfg: dict[str, Any]) -> str:
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _coeff(config: Config) -> float:
    assert config.loss.sparsity is not None
    return config.loss.sparsity.coeff


def _run_dirs(save_dir: Path) -> list[Path]:
    return sorted(p for p in save_dir.glob("*") if (p / CONFIG_FILE).is_file())


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cache_acts_then_train_cached_two_configs(
    config_dict: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = dict(n_samples=24, max_grad_norm=1.0, warmup_samples=4)
    dicts = [config_dict(loss=_loss(c), **extra) for c in (0.05, 0.5)]
    paths = [_write(tmp_path, f"c{i}.yaml", d) for i, d in enumerate(dicts)]
    cache_dir = tmp_path / "acts"
    rc, out, _ = _cli(["cache-acts", paths[0], "--out", str(cache_dir)], capsys)
    assert rc == 0 and HOOK in out and "tokens/s" in out and str(cache_dir) in out
    rc, out, _ = _cli(["train-cached", *paths, "--cache", str(cache_dir)], capsys)
    assert rc == 0 and "ce_loss_with_saes" in out and "dead_dict_elements" in out

    save_dir = Path(dicts[0]["save_dir"])
    run_dirs = _run_dirs(save_dir)
    assert len(run_dirs) == 2 and all(str(d) in out for d in run_dirs)
    # the same training directly with the library, on the same cache and initial SAEs
    configs: list[Config] = [load_config(d) for d in dicts]
    cache = ActivationCache(cache_dir)
    direct = [setup(c, device="cpu").fed_from_cache() for c in configs]
    batches = cache.batches(configs[0].batch_size, seed=configs[0].seed, in_order_epochs=1)
    logs = train_on_same_batches(direct, batches)
    by_coeff = {_coeff(c): (t, h) for c, t, h in zip(configs, direct, logs, strict=True)}
    weights = []
    for run_dir in run_dirs:
        want, history = by_coeff[_coeff(load_config(run_dir / CONFIG_FILE))]
        assert [p.name for p in list_checkpoints(run_dir)] == ["samples_24.safetensors"]
        model = SAETransformer.from_local_path(run_dir, device="cpu")
        got = model.saes.state_dict()
        for name, p in want.saes.state_dict().items():
            assert torch.equal(got[name], p), name  # the same ops on the same batches
        weights.append(got[f"{HOOK.replace('.', '-')}.encoder.0.weight"])
        records = read_metrics(run_dir)
        steps = [r for r in records if "loss" in r]
        assert [r["step"] for r in steps] == list(range(1, 7))  # log_every_n_grad_steps: 1
        assert [r["loss"] for r in steps] == pytest.approx([h["loss"] for h in history])
        assert all(f"l0/{HOOK}" in r and f"dead_dict_elements/{HOOK}" in r for r in steps)
        assert any(f"eval/l0/{HOOK}" in r for r in records)  # the final evaluation ran
        assert (run_dir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
        # the normal tools read it
        assert _cli(["eval", str(run_dir)], capsys)[0] == 0
        assert json.loads((run_dir / "eval.json").read_text())["per_sae"][HOOK]["l0"] > 0
    assert not torch.equal(weights[0], weights[1])


RESAMPLE = dict(save_every_n_samples=16, keep_last_n_checkpoints=None, act_frequency_n_tokens=16)


@pytest.mark.parametrize(
    ("n_samples", "extra"),
    [(24, {}), (80, {}), (48, RESAMPLE)],
    ids=["one-epoch", "past-the-data", "resample-and-checkpoints"],
)
def test_train_cached_equals_lm_training(
    config_dict: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    n_samples: int,
    extra: dict[str, Any],
) -> None:
    """A cache built from the config holds its training windows in training order (across the
    loader's epoch boundary too), so training from it repeats `train` exactly: the same engine
    takes the same steps, resampling and periodic checkpoints included."""
    d = config_dict(
        loss=_loss(0.1),
        n_samples=n_samples,
        effective_batch_size=8,
        max_grad_norm=1.0,
        warmup_samples=8,
        eval_n_samples=None,
        **extra,
    )
    if extra:
        d["saes"]["resample_every_n_samples"] = 8
    cfg = load_config(d)
    assert isinstance(cfg, Config)
    lm_dir = train(cfg, run_dir=tmp_path / "lm_run", device="cpu", progress=False)
    path = _write(tmp_path, "cfg.yaml", d)
    rc, _, err = _cli(["cache-acts", path, "--out", str(tmp_path / "acts")], capsys)
    assert rc == 0, err
    cache = ActivationCache(tmp_path / "acts")
    loader = create_data_loader(cfg.train_data, cfg.batch_size, cfg.seed)
    order = torch.cat([next(loader) for _ in range(n_cache_batches(cfg))])
    assert torch.equal(cache.tokens().long(), order)
    if n_samples == 80:
        assert len(load_windows(cfg.train_data)) < n_samples  # the loader reshuffled mid-run
    assert _cli(["train-cached", path, "--cache", str(tmp_path / "acts")], capsys)[0] == 0
    (cached_dir,) = (p for p in _run_dirs(Path(d["save_dir"])) if p != lm_dir)
    points = [p.name for p in list_checkpoints(lm_dir)]
    assert [p.name for p in list_checkpoints(cached_dir)] == points
    assert len(points) == (3 if extra else 1)
    for point in points:
        want, got = read_tensors(lm_dir / point), read_tensors(cached_dir / point)
        assert want.keys() == got.keys()
        for name, w in want.items():
            # bit-identical on CPU today (the cache holds the exact fp32 activations the LM run
            # feeds its SAEs, then the same ops); the tolerance leaves room for another matmul
            # kernel on a strided vs a contiguous input
            assert_close_scaled(got[name], w, rtol=1e-6, what=f"{point} {name}")
    lm_steps = [r for r in read_metrics(lm_dir) if "loss" in r]
    cached_steps = [r for r in read_metrics(cached_dir) if "loss" in r]
    assert [r["loss"] for r in cached_steps] == pytest.approx(
        [r["loss"] for r in lm_steps], rel=1e-6
    )
    assert all(f"l0/{HOOK}" in r for r in lm_steps)  # the engine logs L0 for both
    for key in (f"l0/{HOOK}", f"resampled/{HOOK}"):  # the same values are logged
        lm, cached = [r.get(key) for r in lm_steps], [r.get(key) for r in cached_steps]
        assert cached == pytest.approx(lm), key
    resampled = sum(r.get(f"resampled/{HOOK}", 0) for r in lm_steps)
    assert (resampled > 0) == bool(extra)  # the resampling case does resample


def test_train_cached_signal_then_resume_is_bit_exact(
    config_dict: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGINT mid-run: every run of the shared loop saves; `--resume` continues them on the same
    batches to the same weights, optimizer and RNG states as an uninterrupted train-cached."""
    import signal

    from e2e_sae.training.trainer import Trainer

    extra = dict(
        n_samples=48,
        save_every_n_samples=16,
        keep_last_n_checkpoints=None,
        max_grad_norm=1.0,
        warmup_samples=8,
    )
    ref_dicts = [config_dict(loss=_loss(c), **extra) for c in (0.05, 0.5)]
    save = tmp_path / "resumed"
    dicts = [{**d, "save_dir": str(save)} for d in ref_dicts]
    ref_paths = [_write(tmp_path, f"ref{i}.yaml", d) for i, d in enumerate(ref_dicts)]
    paths = [_write(tmp_path, f"c{i}.yaml", d) for i, d in enumerate(dicts)]
    cache = str(tmp_path / "acts")
    assert _cli(["cache-acts", paths[0], "--out", cache], capsys)[0] == 0
    assert _cli(["train-cached", *ref_paths, "--cache", cache], capsys)[0] == 0

    orig, calls = Trainer.train_step, [0]

    def step(self: Any, batches: Any, state: Any, **kwargs: Any) -> dict[str, float]:
        out = orig(self, batches, state, **kwargs)
        calls[0] += 1
        if calls[0] == 2 * 6:  # both runs took 6 steps (24 samples: not a save step)
            signal.raise_signal(signal.SIGINT)
        return out

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", step)
        rc, _, err = _cli(["train-cached", *paths, "--cache", cache], capsys)
    assert rc == 130 and "after step 6" in err and "train-cached" in err and "--resume" in err
    runs = _run_dirs(save)
    assert [sorted(p.name for p in list_checkpoints(r)) for r in runs] == [
        ["samples_16.safetensors", "samples_24.safetensors"]
    ] * 2
    assert _cli(["train-cached", *paths, "--cache", cache, "--resume"], capsys)[0] == 0
    refs = _run_dirs(Path(ref_dicts[0]["save_dir"]))
    for ref, run in zip(refs, runs, strict=True):
        assert load_config(ref / CONFIG_FILE).loss == load_config(run / CONFIG_FILE).loss
        for name in ("samples_48.safetensors", "resume_48.safetensors"):
            want, got = read_tensors(ref / name), read_tensors(run / name)
            assert want.keys() == got.keys()
            assert all(torch.equal(want[k], got[k]) for k in want), (run, name)
        steps = [r["step"] for r in read_metrics(run) if "loss" in r]
        assert steps == list(range(1, 13))  # the records past the checkpoint were not repeated


# --- bad inputs: exit 2, one line naming the field, nothing written -------------------------------
@pytest.fixture(scope="module")
def built(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A cache of blocks.1.hook_resid_pre from the standard tiny config, and a fresh folder."""
    root = tmp_path_factory.mktemp("bad")
    cfg = load_config(make_config_dict(token_data, root / "runs"))
    build_for_config(cfg, root / "acts", device="cpu", progress=False)
    return root, token_data


def _e2e(cfg: dict[str, Any]) -> None:
    cfg["loss"] = {"sparsity": {"coeff": 0.1}, "logits_kl": {"coeff": 1.0}}


def _ds(cfg: dict[str, Any]) -> None:
    cfg["loss"] = {
        **_loss(0.1),
        "in_to_orig": {"hook_positions": ["blocks.2.hook_resid_pre"], "total_coeff": 1.0},
    }


BAD: dict[str, tuple[Any, str]] = {
    "e2e": (_e2e, "loss.logits_kl"),
    "downstream": (_ds, "loss.in_to_orig"),
    "hook-not-cached": (
        lambda c: c["saes"].update(sae_positions=["blocks.2.hook_resid_pre"]),
        "saes.sae_positions",
    ),
    "transcoder-target-not-cached": (
        lambda c: c["saes"].update(
            sae_positions=[], transcoders=[{"input": HOOK, "output": "blocks.1.hook_mlp_out"}]
        ),
        "saes.transcoders.output",
    ),
    "n_ctx": (lambda c: c["train_data"].update(n_ctx=8), "train_data.n_ctx"),
    "other-model": (lambda c: c["tlens_config"].update(seed=1), "tlens_config"),
    "model-by-name": (
        lambda c: c.update(tlens_config=None, tlens_model_name="shakespeare-lm"),
        "tlens_model_name",
    ),
    "bf16": (lambda c: c.update(precision="bf16"), "precision"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_train_cached_bad_config(
    built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    root, data = built
    cfg = make_config_dict(data, tmp_path / "runs")
    edit, field = BAD[case]
    edit(cfg)
    rc, _, err = _cli(
        ["train-cached", _write(tmp_path, "bad.yaml", cfg), "--cache", str(root / "acts")], capsys
    )
    assert rc == 2 and err.count("\n") == 1 and field in err, err
    assert not (tmp_path / "runs").exists()


def test_train_cached_bad_inputs(
    built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, data = built
    good = _write(tmp_path, "good.yaml", make_config_dict(data, tmp_path / "runs"))
    bigger = _write(tmp_path, "b.yaml", make_config_dict(data, tmp_path / "runs", batch_size=8))
    cases = {
        "activation cache": ["train-cached", good, "--cache", str(tmp_path / "nope")],
        "batch_size": ["train-cached", good, bigger, "--cache", str(root / "acts")],
        "loss.logits_kl": [
            "cache-acts",
            _write(
                tmp_path,
                "e2e.yaml",
                make_config_dict(data, tmp_path / "runs", loss={"logits_kl": {"coeff": 1.0}}),
            ),
        ],
        "--out": ["cache-acts", good, "--out", str(root / "acts")],
        "--n-samples": ["cache-acts", good, "--n-samples", "0"],
    }
    for field, args in cases.items():
        rc, _, err = _cli(args, capsys)
        assert rc == 2 and err.count("\n") == 1 and field in err, (field, err)
    assert not (tmp_path / "runs").exists()


def test_cache_without_recorded_model_checks_the_loaded_model(
    token_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cache built through the Python API records no config: the loaded LM is compared."""
    cfg = load_config(make_config_dict(token_data, tmp_path / "runs"))
    t = setup(cfg, device="cpu")
    batches = create_data_loader(cfg.train_data, cfg.batch_size, cfg.seed)
    ActivationCache.build(t.model, batches, 2, tmp_path / "acts", progress=False)
    other = make_config_dict(token_data, tmp_path / "runs")
    other["tlens_config"] = {**TINY_TLENS, "n_layers": 4}
    rc, _, err = _cli(
        ["train-cached", _write(tmp_path, "o.yaml", other), "--cache", str(tmp_path / "acts")],
        capsys,
    )
    assert rc == 2 and err.count("\n") == 1 and "model:" in err, err
    assert not (tmp_path / "runs").exists()


# --- cache-teacher --------------------------------------------------------------------------------
E2E_LOSS = {"sparsity": {"coeff": 0.1}, "logits_kl": {"coeff": 1.0}}


def test_cache_teacher_then_train_with_it(
    config_dict: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from e2e_sae.caches.teacher import TeacherCache, clean_logits, topk_distribution

    cfg = config_dict(loss=E2E_LOSS, n_samples=16)
    path = _write(tmp_path, "e2e.yaml", cfg)
    out_dir = tmp_path / "teacher"
    rc, out, _ = _cli(["cache-teacher", path, "--k", "8", "--out", str(out_dir)], capsys)
    assert rc == 0 and "16 windows, top 8 of 97 tokens" in out and str(out_dir) in out

    # the cache holds the clean model's top-8 distributions of the training windows, in order
    config = load_config(cfg)
    t = setup(config, device="cpu")
    first = next(create_data_loader(config.train_data, config.batch_size, config.seed))
    cache = TeacherCache(out_dir)
    want = topk_distribution(clean_logits(t.model, first), 8)
    got = cache.lookup(first)
    torch.testing.assert_close(got.logp.sort(-1).values, want.logp.sort(-1).values)
    torch.testing.assert_close(got.tail, want.tail)
    assert torch.equal(torch.from_numpy(cache.tokens[: len(first)].astype("int64")), first)

    taught = _write(tmp_path, "taught.yaml", {**cfg, "teacher_cache": str(out_dir)})
    rc, out, err = _cli(["train", taught], capsys)
    assert rc == 0, err
    (run,) = _run_dirs(Path(cfg["save_dir"]))
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "loss, args, message",
    [
        (_loss(0.1), [], "teacher_cache: only for logits_kl runs without in_to_orig"),
        (E2E_LOSS, ["--k", "0"], "--k: expected 1 to 96"),
        (E2E_LOSS, ["--n-samples", "0"], "--n-samples: expected a positive number"),
    ],
    ids=["local-config", "k-zero", "no-samples"],
)
def test_cache_teacher_bad_inputs(
    config_dict: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    loss: dict[str, Any],
    args: list[str],
    message: str,
) -> None:
    path = _write(tmp_path, "c.yaml", config_dict(loss=loss))
    rc, _, err = _cli(["cache-teacher", path, "--out", str(tmp_path / "t"), *args], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.tmp").exists()
