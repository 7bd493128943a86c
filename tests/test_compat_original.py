"""Run directories, checkpoints, configs and custom LMs of the original e2e_sae 2.1.1.

The files are written here in the original's format: `torch.save` of state dicts with its keys,
and its `final_config.yaml` schema as its `model_dump(mode="json")` + `yaml.dump` produces it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import hooked_state
from safetensors.torch import load_file
from torch import Tensor

from e2e_sae.cli import main
from e2e_sae.config import Config, LossConfig, load_config
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.interop.pretrained import load_pretrained_saes
from e2e_sae.lm import native
from e2e_sae.lm.load import load_tlens_model_from_path
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.lm.tl import HAS_HOOKED
from e2e_sae.runs.checkpoint import save_checkpoint, write_config

POS = "blocks.1.hook_resid_pre"
KEY = "blocks-1-hook_resid_pre"
D_MODEL, RATIO = 16, 2.0
D_SAE = int(D_MODEL * RATIO)
# what the original's train_tlens writes under tlens_config (its HookedTransformerPreConfig)
LM_FIELDS: dict[str, Any] = {
    "act_fn": "gelu",
    "d_head": 4,
    "d_model": D_MODEL,
    "d_vocab": 97,
    "n_ctx": 16,
    "n_layers": 2,
}
UNAVAILABLE_TOKENIZER = "no-such-org/tokenizer-not-available-offline"


# --- writing the original's files -----------------------------------------------------------------
def write_original_lm(folder: Path, dtype: str = "float32", epochs: int = 1) -> Path:
    """An `epoch_<N>.pt` custom LM with the `final_config.yaml` of the original's train_tlens."""
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    for epoch in range(1, epochs + 1):
        state = hooked_state({**LM_FIELDS, "dtype": torch_dtype, "seed": 100 + epoch})
        for i in range(LM_FIELDS["n_layers"]):  # the TransformerLens 2 it ran on: the full mask
            state[f"blocks.{i}.attn.mask"] = torch.tril(torch.ones(16, 16, dtype=torch.bool))
            state[f"blocks.{i}.attn.IGNORE"] = torch.tensor(-torch.inf)
        torch.save(state, folder / f"epoch_{epoch}.pt")
    tlens_config = {**LM_FIELDS, "dtype": dtype, "tokenizer_name": UNAVAILABLE_TOKENIZER}
    config = {
        "name": "tiny-lm",
        "seed": 0,
        "tlens_config": tlens_config,
        "train": {
            "batch_size": 16,
            "effective_batch_size": None,
            "lr": 0.001,
            "n_epochs": epochs,
            "save_dir": "/somewhere/else",
            "save_every_n_epochs": 1,
            "warmup_samples": 0,
        },
        "wandb_project": "e2e_sae-custom",
    }
    (folder / "final_config.yaml").write_text(yaml.dump(config))
    return folder / f"epoch_{epochs}.pt"


def original_sae_state(seed: int) -> dict[str, Tensor]:
    """`model.saes.state_dict()` of the original: decoder [d_in, d_sae], columns not unit norm."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{KEY}.encoder.0.weight": torch.randn(D_SAE, D_MODEL, generator=g) * 0.3,
        f"{KEY}.encoder.0.bias": torch.randn(D_SAE, generator=g) * 0.1,
        f"{KEY}.decoder.weight": torch.randn(D_MODEL, D_SAE, generator=g) * 3.0,
        f"{KEY}.decoder.bias": torch.randn(D_MODEL, generator=g) * 0.1,
    }


def original_config(lm_path: Path, data: Path, **overrides: Any) -> dict[str, Any]:
    """The full schema of the original's run_train_tlens_saes Config, as it dumps it."""
    dataset = {
        "dataset_name": str(data),
        "is_tokenized": True,
        "tokenizer_name": "gpt2",
        "streaming": False,
        "split": "train",
        "n_ctx": 16,
        "seed": None,
        "column_name": "input_ids",
    }
    config: dict[str, Any] = {
        "wandb_project": "gpt2",
        "wandb_run_name": None,
        "wandb_run_name_prefix": "",
        "seed": 0,
        "tlens_model_name": None,
        "tlens_model_path": str(lm_path),
        "save_dir": "/home/someone/e2e_sae/e2e_sae/scripts/train_tlens_saes/out",
        "n_samples": 400_000,
        "save_every_n_samples": None,
        "eval_every_n_samples": 40_000,
        "eval_n_samples": 4,
        "batch_size": 4,
        "effective_batch_size": None,
        "lr": 0.0005,
        "lr_schedule": "cosine",
        "min_lr_factor": 0.1,
        "warmup_samples": 20_000,
        "cooldown_samples": 0,
        "max_grad_norm": 10.0,
        "log_every_n_grad_steps": 20,
        "collect_act_frequency_every_n_samples": 40_000,
        "act_frequency_n_tokens": 500_000,
        "loss": {
            "sparsity": {"coeff": 1.5, "p_norm": 1.0},
            "in_to_orig": None,
            "out_to_orig": None,
            "out_to_in": {"coeff": 0.0},
            "logits_kl": {"coeff": 0.5},
        },
        "train_data": dataset,
        "eval_data": dict(dataset),
        "saes": {
            "dict_size_to_input_ratio": RATIO,
            "pretrained_sae_paths": None,
            "retrain_saes": False,
            "sae_positions": [POS],
        },
    }
    config.update(overrides)
    return config


def write_original_run(
    run_dir: Path, lm_path: Path, data: Path, samples: tuple[int, ...] = (10, 20), **overrides: Any
) -> dict[int, dict[str, Tensor]]:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = original_config(lm_path, data, **overrides)
    (run_dir / "final_config.yaml").write_text(yaml.dump(config))
    states = {}
    for n in samples:
        states[n] = original_sae_state(seed=n)
        torch.save(states[n], run_dir / f"samples_{n}.pt")
    return states


@pytest.fixture
def lm_path(tmp_path: Path) -> Path:
    return write_original_lm(tmp_path / "tiny-lm_lr-0.001_bs-16_2024-04-21_14-01-14")


@pytest.fixture
def original_run(tmp_path: Path, lm_path: Path, token_data: Path):
    run = tmp_path / "orig_run"
    return run, write_original_run(run, lm_path, token_data)


# --- the original's model computed by hand --------------------------------------------------------
def _ln(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w + b


def hand_logits(pt: Path, state: dict[str, Tensor], tokens: Tensor) -> Tensor:
    """The original's LM (pre-LN GPT-2 style, gelu; no TransformerLens) with its SAE spliced in
    at POS: c = relu(x W_enc^T + b_enc), x_hat = c (unit-norm W_dec cols)^T + b_dec."""
    w_enc, b_enc = state[f"{KEY}.encoder.0.weight"], state[f"{KEY}.encoder.0.bias"]
    w_dec, b_dec = state[f"{KEY}.decoder.weight"], state[f"{KEY}.decoder.bias"]
    lm = torch.load(pt, weights_only=True)
    n = tokens.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        x = lm["embed.W_E"][tokens] + lm["pos_embed.W_pos"][:n]
        for i in range(LM_FIELDS["n_layers"]):
            if f"blocks.{i}.hook_resid_pre" == POS:
                x = torch.relu(x @ w_enc.T + b_enc) @ F.normalize(w_dec, dim=0).T + b_dec
            p = f"blocks.{i}"
            h = _ln(x, lm[f"{p}.ln1.w"], lm[f"{p}.ln1.b"])
            q, k, v = (
                torch.einsum("bpm,nmh->bpnh", h, lm[f"{p}.attn.W_{c}"]) + lm[f"{p}.attn.b_{c}"]
                for c in "QKV"
            )
            scores = torch.einsum("bqnh,bknh->bnqk", q, k) / q.shape[-1] ** 0.5
            pattern = scores.masked_fill(~causal, -torch.inf).softmax(-1)
            z = torch.einsum("bnqk,bknh->bqnh", pattern, v)
            x = x + torch.einsum("bqnh,nhm->bqm", z, lm[f"{p}.attn.W_O"]) + lm[f"{p}.attn.b_O"]
            h = _ln(x, lm[f"{p}.ln2.w"], lm[f"{p}.ln2.b"])
            h = F.gelu(h @ lm[f"{p}.mlp.W_in"] + lm[f"{p}.mlp.b_in"])
            x = x + h @ lm[f"{p}.mlp.W_out"] + lm[f"{p}.mlp.b_out"]
        x = _ln(x, lm["ln_final.w"], lm["ln_final.b"])
        return x @ lm["unembed.W_U"] + lm["unembed.b_U"]


TOKENS = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))


def assert_loaded(model: SAETransformer, state: dict[str, Tensor], lm: Path) -> None:
    own = model.saes.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k  # exactly the file's tensors, decoder not renormalised
    assert torch.equal(own[f"{KEY}.tokens_since_fired"], torch.zeros(D_SAE, dtype=torch.long))
    assert not model.training and not any(m.training for m in model.modules())
    with torch.no_grad():
        logits, _ = model(TOKENS)
    assert logits is not None
    torch.testing.assert_close(logits, hand_logits(lm, state, TOKENS), rtol=1e-5, atol=1e-5)


# --- loading --------------------------------------------------------------------------------------
def test_from_local_path_reads_an_original_run_dir(
    original_run, lm_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run, states = original_run
    norms = states[20][f"{KEY}.decoder.weight"].norm(dim=0)
    assert (norms - 1).abs().min() > 0.5  # the file's decoder is far from unit norm
    with caplog.at_level(logging.INFO, logger="e2e_sae.runs.original"):
        model = SAETransformer.from_local_path(run, device="cpu")
    ignored = [r.getMessage() for r in caplog.records if "ignoring keys" in r.getMessage()]
    assert len(ignored) == 1 and ignored[0].endswith(": cooldown_samples")
    assert_loaded(model, states[20], lm_path)  # the newest of samples_10.pt, samples_20.pt
    cfg: Config = model.run_config  # type: ignore[attr-defined]
    assert cfg.wandb_project == "gpt2" and cfg.loss.logits_kl == LossConfig(coeff=0.5)
    assert cfg.tlens_model_path == lm_path and cfg.n_samples == 400_000

    # the original's keywords: checkpoint_dir, and checkpoint_file + config_file from elsewhere
    assert_loaded(SAETransformer.from_local_path(checkpoint_dir=run), states[20], lm_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(run / "samples_10.pt", elsewhere / "sae.pt")
    shutil.copy(run / "final_config.yaml", elsewhere / "my_config.yaml")
    model = SAETransformer.from_local_path(
        checkpoint_file=elsewhere / "sae.pt", config_file=elsewhere / "my_config.yaml"
    )
    assert_loaded(model, states[10], lm_path)
    assert_loaded(SAETransformer.from_local_path(run / "samples_10.pt"), states[10], lm_path)
    with pytest.raises(UserError, match="not both"):
        SAETransformer.from_local_path(run, checkpoint_dir=run)
    with pytest.raises(UserError, match="config_file: file not found"):
        SAETransformer.from_local_path(checkpoint_file=run / "samples_10.pt", config_file="nope")


def test_original_n_samples_null_and_strictness_for_our_configs(
    tmp_path: Path, lm_path: Path, token_data: Path
) -> None:
    run = tmp_path / "run"
    # keys of earlier versions: saes.type_of_sparsifier / saes.k (its codebook's size), and a
    # field it later dropped
    old_saes = {
        "type_of_sparsifier": "sae",
        "k": 5,
        "dict_size_to_input_ratio": RATIO,
        "sae_positions": POS,
        "retrain_saes": False,
    }
    old = {"saes": old_saes, "collect_output_metrics_every_n_samples": 100, "n_samples": None}
    states = write_original_run(run, lm_path, token_data, samples=(7,), **old)
    model = SAETransformer.from_local_path(run)
    assert model.run_config.n_samples == 7  # type: ignore[attr-defined]
    assert_loaded(model, states[7], lm_path)
    # our own final_config.yaml still rejects a key it does not know
    ours = yaml.safe_load((run / "final_config.yaml").read_text())
    ours.update(precision="fp32", cooldown_samples=0)
    (run / "final_config.yaml").write_text(yaml.safe_dump(ours))
    with pytest.raises(ConfigError, match="every_n_samples: unknown key"):
        SAETransformer.from_local_path(run)
    write_original_run(
        run, lm_path, token_data, samples=(7,), saes={**old_saes, "type_of_sparsifier": "codebook"}
    )
    with pytest.raises(ConfigError, match="type_of_sparsifier: 'codebook' is not supported"):
        SAETransformer.from_local_path(run)


class Sentinel:
    """Unpickling this with a full unpickle would run __setstate__."""

    unpickled: list[int] = []

    def __setstate__(self, state: Any) -> None:
        Sentinel.unpickled.append(1)


def test_a_pt_that_needs_a_full_unpickle_is_refused(
    original_run, tmp_path: Path, config_dict
) -> None:
    run, _ = original_run
    evil = run / "samples_30.pt"
    torch.save({f"{KEY}.decoder.bias": torch.zeros(D_MODEL), "extra": Sentinel()}, evil)
    for load in (
        lambda: SAETransformer.from_local_path(run),  # the newest is refused, not skipped
        lambda: SAETransformer.from_local_path(evil),
        lambda: read_pretrained(config_dict, [evil]),
    ):
        with pytest.raises(UserError) as err:
            load()
        msg = str(err.value)
        assert "\n" not in msg and str(evil) in msg and "needs a full unpickle" in msg
        assert "Sentinel" in msg
    assert Sentinel.unpickled == []
    # a pickle of something that is not a state dict of tensors
    torch.save([torch.zeros(2)], evil)
    with pytest.raises(UserError, match="is not a state dict of tensors"):
        SAETransformer.from_local_path(evil)


def read_pretrained(config_dict, paths: list[Path], **saes: Any) -> SAETransformer:
    cfg = config_dict()
    cfg["tlens_config"] = {**LM_FIELDS, "d_mlp": 4 * D_MODEL}
    cfg["saes"] = {"sae_positions": [POS], "dict_size_to_input_ratio": RATIO, **saes}
    model = SAETransformer.from_config(load_config(cfg), device="cpu")
    model.frozen = load_pretrained_saes(model, paths, retrain=False)  # type: ignore[attr-defined]
    return model


def test_pretrained_sae_paths_take_original_pt_files(original_run, config_dict) -> None:
    run, states = original_run
    for path, n in ((run / "samples_10.pt", 10), (run, 20)):  # a file, or its run dir's newest
        model = read_pretrained(config_dict, [path])
        own = model.saes.state_dict()
        assert all(torch.equal(own[k], v) for k, v in states[n].items())
        assert model.frozen == {POS}  # type: ignore[attr-defined]
    # another architecture: the training statistics start at zero, its own buffers keep their init
    model = read_pretrained(config_dict, [], architecture="batchtopk", k=4)
    sae = model.sae(POS)
    sae.tokens_since_fired.fill_(5)
    load_pretrained_saes(model, [run / "samples_20.pt"], retrain=True)
    assert torch.equal(sae.tokens_since_fired, torch.zeros(D_SAE, dtype=torch.long))
    assert torch.isnan(sae.threshold)  # type: ignore[attr-defined]
    assert torch.equal(sae.decoder.weight, states[20][f"{KEY}.decoder.weight"])
    # a parameter missing is still an error
    torch.save({k: v for k, v in states[20].items() if "encoder.0.bias" not in k}, run / "p.pt")
    with pytest.raises(UserError, match=r"lacks blocks-1-hook_resid_pre\.encoder\.0\.bias"):
        read_pretrained(config_dict, [run / "p.pt"])


def test_train_fine_tunes_from_an_original_pt(original_run, lm_path: Path, config_dict) -> None:
    from e2e_sae.training.trainer import train

    run, states = original_run
    cfg = config_dict(n_samples=8, eval_n_samples=None, tlens_model_path=str(lm_path))
    del cfg["tlens_config"]
    cfg["saes"] = {
        "sae_positions": ["blocks.0.hook_resid_pre", POS],
        "dict_size_to_input_ratio": RATIO,
        "pretrained_sae_paths": [str(run / "samples_20.pt")],
    }
    out = train(load_config(cfg), progress=False)
    own = SAETransformer.from_local_path(out).saes.state_dict()
    for k, v in states[20].items():  # frozen: unchanged (the decoder up to column norms, which
        if k.endswith("decoder.weight"):  # a forward may renormalise in place)
            torch.testing.assert_close(F.normalize(own[k], dim=0), F.normalize(v, dim=0))
        else:
            assert torch.equal(own[k], v), k
    assert "blocks-0-hook_resid_pre.decoder.weight" in own


def test_tlens_model_path_to_an_epoch_pt(tmp_path: Path, lm_path: Path) -> None:
    saved = torch.load(lm_path, weights_only=True)
    for path in (lm_path, lm_path.parent):  # the file, or the folder (its newest epoch)
        lm = load_tlens_model_from_path(path, device="cpu")
        params = (
            dict(lm.named_parameters()) if HAS_HOOKED else native.from_native(lm, native.FIELDS[lm])
        )
        assert len(params) == 6 + 2 * 16  # W_E, W_pos, ln_final w/b, W_U/b_U; 16 per block
        assert all(torch.equal(saved[k], v) for k, v in params.items())
        assert lm.cfg.tokenizer_name == UNAVAILABLE_TOKENIZER and lm.tokenizer is None
        assert lm.cfg.n_heads == 4 and lm.cfg.d_mlp == 4 * D_MODEL and lm.cfg.dtype == torch.float32
    newest = write_original_lm(tmp_path / "three", epochs=3)
    lm = load_tlens_model_from_path(newest.parent, device="cpu")
    assert torch.equal(lm.embed.W_E, torch.load(newest, weights_only=True)["embed.W_E"])
    f64 = write_original_lm(tmp_path / "f64", dtype="float64")
    assert load_tlens_model_from_path(f64).embed.W_E.dtype == torch.float64
    (lm_path.parent / "final_config.yaml").unlink()
    with pytest.raises(UserError, match="has no final_config.yaml beside it"):
        load_tlens_model_from_path(lm_path)
    with pytest.raises(UserError, match="file not found"):
        load_tlens_model_from_path(tmp_path / "epoch_9.pt")


# --- convert --------------------------------------------------------------------------------------
def test_convert_writes_one_of_our_runs(
    original_run, lm_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from e2e_sae.eval.evaluate import evaluate_run
    from e2e_sae.interop.saelens import export_run_saelens

    run, states = original_run
    out = tmp_path / "converted"
    assert main(["convert", str(run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "final_config.yaml",
        "samples_20.safetensors",
        "tlens_model",
    ]
    tensors = load_file(str(out / "samples_20.safetensors"))
    assert set(tensors) == {*states[20], f"{KEY}.tokens_since_fired"}
    assert all(torch.equal(tensors[k], v) for k, v in states[20].items())
    config = load_config(out / "final_config.yaml")  # our strict schema
    assert isinstance(config, Config) and str(config.tlens_model_path) == "tlens_model"
    before = evaluate_run(run, n_tokens=64, device="cpu").flat()
    lm_copy = tmp_path / "lm_copy.pt"
    shutil.copy(lm_path, lm_copy)
    shutil.rmtree(lm_path.parent)  # the converted run no longer needs the original's files
    shutil.rmtree(run)
    assert_loaded(SAETransformer.from_local_path(out), states[20], lm_copy)
    after = evaluate_run(out, n_tokens=64, device="cpu").flat()
    assert after == before and after["eval/n_tokens"] == 64 and f"eval/l0/{POS}" in after
    (folder,) = export_run_saelens(out, tmp_path / "export")
    assert (folder / "cfg.json").is_file()
    # a second convert into a non-empty folder is a one-line error, nothing written
    capsys.readouterr()
    assert main(["convert", str(out), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists and is not empty" in err


def test_convert_via_the_console_command(original_run, tmp_path: Path) -> None:
    import subprocess
    import sys

    run, states = original_run
    out = tmp_path / "c"
    cmd = [
        sys.executable,
        "-m",
        "e2e_sae",
        "convert",
        str(run),
        str(out),
        "--checkpoint",
        "samples_10.pt",
    ]
    env = {"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    tensors = load_file(str(out / "samples_10.safetensors"))
    assert all(torch.equal(tensors[k], v) for k, v in states[10].items())


# --- W&B ------------------------------------------------------------------------------------------
def test_from_wandb_picks_the_newest_pt(
    original_run, lm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("E2E_SAE_CACHE", str(tmp_path / "cache"))
    run, states = original_run
    torch.save(original_sae_state(seed=3), run / "samples_3.pt")

    class File:
        def __init__(self, name: str) -> None:
            self.name = name

        def download(self, root: str, replace: bool = False) -> None:
            shutil.copy(run / self.name, Path(root) / self.name)

    class Run:
        def files(self) -> list[File]:
            names = ["final_config.yaml", "samples_3.pt", "samples_20.pt", "samples_10.pt"]
            return [File(n) for n in names]

    class Api:
        def run(self, path: str) -> Run:
            assert path == "sparsify/gpt2/abc123"
            return Run()

    monkeypatch.setattr(wandb, "Api", Api)
    model = SAETransformer.from_wandb("sparsify/gpt2/abc123", device="cpu")
    assert_loaded(model, states[20], lm_path)
    local = tmp_path / "cache" / "wandb" / "sparsify_gpt2_abc123"
    assert sorted(p.name for p in local.iterdir()) == ["final_config.yaml", "samples_20.pt"]


# --- damaged checkpoints --------------------------------------------------------------------------
def _flip_tensor_byte(path: Path, tensor: Tensor) -> None:
    data = bytearray(path.read_bytes())
    at = bytes(data).find(tensor.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "emptied", "bit-flipped"])
def test_damaged_newest_pt_falls_back(
    original_run, lm_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    run, states = original_run
    newest = run / "samples_20.pt"
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "emptied":
        newest.write_bytes(b"")
    else:
        _flip_tensor_byte(newest, states[20][f"{KEY}.decoder.weight"])
    with caplog.at_level(logging.WARNING):
        model = SAETransformer.from_local_path(run)
    assert_loaded(model, states[10], lm_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "samples_10.pt" in warnings[0]
    shutil.copy(newest, run / "samples_10.pt")  # now nothing is intact
    with pytest.raises(UserError) as err:
        SAETransformer.from_local_path(run)
    assert "\n" not in str(err.value) and str(newest) in str(err.value)
    with pytest.raises(UserError, match="is damaged"):
        SAETransformer.from_local_path(checkpoint_file=newest)  # a named file: no fallback


def test_damaged_newest_safetensors_falls_back(
    config_dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(config_dict())
    run = tmp_path / "ours"
    run.mkdir()
    write_config(run, config)
    model = SAETransformer.from_config(config, device="cpu")
    old = save_checkpoint(run, model, 4)
    expected = {k: v.clone() for k, v in model.saes.state_dict().items()}
    enc = model.sae(POS).encoder[0]
    assert isinstance(enc, torch.nn.Linear)
    with torch.no_grad():
        enc.bias.add_(1.0)
    newest = save_checkpoint(run, model, 8)
    _flip_tensor_byte(newest, enc.weight.detach())
    with caplog.at_level(logging.WARNING):
        loaded = SAETransformer.from_local_path(run)
    assert all(torch.equal(loaded.saes.state_dict()[k], v) for k, v in expected.items())
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(newest) in warning and "checksum" in warning and old.name in warning


# --- eval mode ------------------------------------------------------------------------------------
def test_loaded_models_are_in_eval_mode(config_dict, tmp_path: Path) -> None:
    """A BatchTopK SAE in training mode would keep the batch's top k*n latents, not apply its
    threshold."""
    saes = {
        "sae_positions": [POS],
        "dict_size_to_input_ratio": 4.0,
        "architecture": "batchtopk",
        "k": 3,
    }
    config = load_config(config_dict(saes=saes))
    run = tmp_path / "btk"
    run.mkdir()
    write_config(run, config)
    model = SAETransformer.from_config(config, device="cpu")
    model.sae(POS).threshold.fill_(0.05)  # type: ignore[operator]
    save_checkpoint(run, model, 4)
    loaded = SAETransformer.from_local_path(run)
    sae = loaded.sae(POS)
    assert not loaded.training and not sae.training
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        _, c = sae.forward(x)
        pre = sae.pre_acts(x)
    assert torch.equal(c, torch.where(pre > 0.05, pre, torch.zeros_like(pre)))
