"""Bad input everywhere a user touches it: one stderr line naming what and where, exit status 2,
and no run directory (nothing half-written).

Each row of CASES builds its inputs in a temp folder and runs `e2e_sae.cli.main` in-process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY_TLENS, make_config_dict, write_token_jsonl

from e2e_sae.cli import main
from e2e_sae.config import Config, load_config
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.runs.checkpoint import save_checkpoint


@dataclass
class Env:
    root: Path
    data: Path

    @property
    def save_dir(self) -> Path:
        return self.root / "runs"

    def config(self, **overrides: Any) -> dict[str, Any]:
        return {**make_config_dict(self.data, self.save_dir), **overrides}

    def write(self, content: Any, name: str = "cfg.yaml") -> str:
        path = self.root / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return str(path)

    def train(self, **overrides: Any) -> list[str]:
        return ["train", self.write(self.config(**overrides))]

    def data_file(self, name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        path = self.root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"dataset_name": str(path), "n_ctx": 16, "streaming": False}


def _text_dir(e: Env) -> dict[str, Any]:
    (e.root / "text").mkdir()
    (e.root / "text" / "a.txt").write_text("some words for a tokenizer that does not exist")
    return {
        "dataset_name": str(e.root / "text"),
        "n_ctx": 16,
        "streaming": False,
        "is_tokenized": False,
        "tokenizer_name": "no-such-tokenizer",
    }


def _no_batch_size(e: Env) -> list[str]:
    cfg = e.config()
    del cfg["batch_size"]
    return ["train", e.write(cfg)]


def _text_file(e: Env, data: bytes) -> dict[str, Any]:
    (e.root / "text").mkdir()
    (e.root / "text" / "a.txt").write_bytes(data)
    return {
        "dataset_name": str(e.root / "text"),
        "n_ctx": 16,
        "streaming": False,
        "is_tokenized": False,
        "tokenizer_name": "gpt2",
    }


def _sae_file(e: Env, ratio: float = 2.0) -> str:
    """A checkpoint of the config's SAE (random weights), with `ratio` latents per input dim."""
    config = load_config(e.config(saes={"sae_positions": SAE, "dict_size_to_input_ratio": ratio}))
    assert isinstance(config, Config)
    return str(save_checkpoint(e.root, SAETransformer.from_config(config, device="cpu"), 0))


def _pretrained(e: Env, **extra: Any) -> list[str]:
    return e.train(
        saes={
            "sae_positions": SAE,
            "dict_size_to_input_ratio": 2.0,
            "pretrained_sae_paths": _sae_file(e),
            **extra,
        }
    )


def _run(e: Env, scale: float = 1.0) -> str:
    """A run directory outside save_dir (config + one checkpoint, weights `scale`d)."""
    run = e.root / "run"
    run.mkdir()
    config = load_config(e.config(eval_n_samples=4))
    assert isinstance(config, Config)
    (run / "final_config.yaml").write_text(yaml.safe_dump(e.config(eval_n_samples=4)))
    model = SAETransformer.from_config(config, device="cpu")
    with torch.no_grad():
        for name, p in model.saes.named_parameters():
            if "encoder" in name:
                p.mul_(scale)
    save_checkpoint(run, model, 8)
    return str(run)


def _file(e: Env) -> str:
    (e.root / "a_file").write_text("mine")
    return str(e.root / "a_file")


def _used_folder(e: Env) -> str:
    (e.root / "export").mkdir()
    (e.root / "export" / "notes.txt").write_text("an earlier export")
    return str(e.root / "export")


TEXT_ROWS = [{"text": "hello world"}] * 4
SAE = "blocks.1.hook_resid_pre"
LOCAL_SPARSITY = {"sparsity": {"coeff": 0.1}}

# (id, argv builder, text the one-line message must contain)
# fmt: off
CASES: list[tuple[str, Callable[[Env], list[str]], str]] = [
    # --- command line ---
    ("no-subcommand", lambda e: [], "command"),
    ("unknown-option", lambda e: [*e.train(), "--bogus"], "--bogus"),
    ("config-not-found", lambda e: ["train", str(e.root / "missing.yaml")], "missing.yaml"),
    ("resume-dir-missing", lambda e: [*e.train(), "--resume", str(e.root / "nope")], "--resume"),
    ("resume-no-run-yet", lambda e: [*e.train(), "--resume"], "--resume"),
    ("resume-not-a-run", lambda e: ["train", "--resume", str(e.root)], "--resume"),
    ("eval-no-run", lambda e: ["eval", str(e.root / "no_run")], "no_run"),
    ("device-unknown", lambda e: [*e.train(), "--device", "tpu"], "device"),
    ("device-no-cuda", lambda e: e.train(device="cuda:7"), "device"),
    # --- config files ---
    ("yaml-invalid", lambda e: ["train", e.write("lr: [1, 2\nbatch_size: 3\n")], "invalid YAML"),
    ("yaml-not-mapping", lambda e: ["train", e.write("- 1\n- 2\n")], "mapping"),
    ("unknown-key", lambda e: e.train(bogus_key=1), "bogus_key"),
    ("missing-field", _no_batch_size, "batch_size"),
    ("wrong-type", lambda e: e.train(lr="fast"), "lr"),
    ("negative-n-samples", lambda e: e.train(n_samples=-5), "n_samples"),
    ("two-model-sources", lambda e: e.train(tlens_model_name="gpt2"), "tlens_model_name"),
    ("no-loss-term", lambda e: e.train(loss={}), "loss"),
    ("bad-keep-last", lambda e: e.train(keep_last_n_checkpoints=0), "keep_last_n_checkpoints"),
    ("effective-batch", lambda e: e.train(effective_batch_size=6), "effective_batch_size"),
    ("sae-position", lambda e: e.train(saes={"sae_positions": "blocks.9.x"}), "sae_positions"),
    ("architecture", lambda e: e.train(saes={"sae_positions": SAE, "architecture": "nope"}),
     "architecture"),
    ("pretrained-missing", lambda e: e.train(saes={"sae_positions": SAE,
     "pretrained_sae_paths": str(e.root / "x.safetensors")}), "pretrained_sae_paths"),
    ("save-dir-is-file", lambda e: e.train(save_dir=str(e.data)), "save_dir"),
    # --- models ---
    ("model-path", lambda e: e.train(tlens_config=None, tlens_model_path=str(e.root / "m")),
     "tlens_model_path"),
    ("model-name", lambda e: e.train(tlens_config=None, tlens_model_name="no-such-model-x"),
     "tlens_model_name"),
    ("tlens-config", lambda e: e.train(tlens_config={"d_model": 8}), "tlens_config"),
    ("n-ctx-too-long", lambda e: e.train(tlens_config={**TINY_TLENS, "n_ctx": 8}), "n_ctx"),
    ("vocab-too-small", lambda e: e.train(tlens_config={**TINY_TLENS, "d_vocab": 5}), "d_vocab"),
    # --- datasets ---
    ("data-missing", lambda e: e.train(train_data={"dataset_name": str(e.root / "no.jsonl"),
     "n_ctx": 16}), "train_data: dataset_name"),
    ("data-empty", lambda e: e.train(train_data=e.data_file("e.jsonl", [])),
     "train_data: dataset_name"),
    ("data-short", lambda e: e.train(train_data=e.data_file("s.jsonl", [{"input_ids": [1, 2]}])),
     "fewer than one window"),
    ("data-wrong-column", lambda e: e.train(train_data=e.data_file("c.jsonl",
     [{"ids": list(range(40))}])), "column_name"),
    ("data-column-name", lambda e: e.train(train_data={**e.config()["train_data"],
     "column_name": "nope"}), "column_name"),
    ("data-text-as-tokens", lambda e: e.train(train_data={**e.data_file("t.jsonl", TEXT_ROWS),
     "column_name": "text"}), "token ids"),
    ("data-fewer-windows-than-batch", lambda e: e.train(batch_size=100, n_samples=200), "batch"),
    ("tokenizer-name", lambda e: e.train(train_data=_text_dir(e)), "tokenizer_name"),
    ("eval-data-empty", lambda e: e.train(eval_data=e.data_file("e.jsonl", [])),
     "eval_data: dataset_name"),
    ("data-negative-token-id", lambda e: e.train(train_data=e.data_file("n.jsonl",
     [{"input_ids": [5, -1, *range(40)]}])), "token id -1"),
    ("text-not-utf8", lambda e: e.train(train_data=_text_file(e, b"caf\xe9 \xff\xfe words")),
     "not UTF-8"),
    ("text-binary", lambda e: e.train(train_data=_text_file(e, b"ELF\x00\x01\x02 words")),
     "binary"),
    # --- config values that only the model can check ---
    ("in-to-orig-before-sae", lambda e: e.train(loss={**LOCAL_SPARSITY, "in_to_orig": {
     "hook_positions": "blocks.0.hook_resid_post", "total_coeff": 1.0}}),
     "loss.in_to_orig.hook_positions"),
    ("in-to-orig-at-sae", lambda e: e.train(loss={**LOCAL_SPARSITY, "in_to_orig": {
     "hook_positions": SAE, "total_coeff": 1.0}}), "loss.in_to_orig.hook_positions"),
    ("n-samples-below-batch", lambda e: e.train(n_samples=3), "n_samples"),
    ("n-samples-below-effective-batch", lambda e: e.train(n_samples=6, effective_batch_size=8),
     "n_samples"),
    ("sae-position-twice", lambda e: e.train(saes={"sae_positions": [SAE, "hook_resid_pre"]}),
     "both match blocks.1.hook_resid_pre"),
    ("transcoder-ambiguous-input", lambda e: e.train(saes={"transcoders": [
     {"input": "hook_resid_mid", "output": "blocks.1.hook_mlp_out"}]}),
     "saes.transcoders.input: 'hook_resid_mid' matches"),
    ("transcoder-output-has-an-sae", lambda e: e.train(saes={"sae_positions": SAE, "transcoders": [
     {"input": "blocks.0.hook_resid_mid", "output": SAE}]}), "saes.transcoders.output"),
    ("cache-transcoder-ambiguous", lambda e: ["cache-acts", e.write(e.config(saes={"transcoders": [
     {"input": "blocks.0.hook_resid_mid", "output": "hook_mlp_out"}]}))],
     "saes.transcoders.output: 'hook_mlp_out' matches"),
    ("dry-run-sae-position-twice", lambda e: [*e.train(saes={"sae_positions": [SAE, SAE]}),
     "--dry-run"], "list each hook once"),
    ("zero-latents", lambda e: e.train(saes={"sae_positions": SAE,
     "dict_size_to_input_ratio": 0.01}), "saes.dict_size_to_input_ratio"),
    ("retrain-saes-no-such-sae", lambda e: _pretrained(e, retrain_saes=["blocks.2.hook_resid_pre"]),
     "saes.retrain_saes"),
    ("pretrained-wrong-shape", lambda e: e.train(saes={"sae_positions": SAE,
     "dict_size_to_input_ratio": 2.0, "pretrained_sae_paths": _sae_file(e, ratio=3.0)}),
     "saes.pretrained_sae_paths"),
    # --- other commands ---
    ("export-onto-a-file", lambda e: ["export", _run(e), _file(e)], "is a file"),
    ("export-onto-an-export", lambda e: ["export", _run(e), _used_folder(e)], "--overwrite"),
    ("plot-onto-a-file", lambda e: ["plot", _run(e), "--out", _file(e)], "--out"),
    ("eval-huge-weights", lambda e: ["eval", _run(e, scale=1e30)], "non-finite"),
    ("eval-inf-weights", lambda e: ["eval", _run(e, scale=float("inf"))], "non-finite weights"),
]
# fmt: on


@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], build, expected: str
) -> None:
    env = Env(tmp_path, write_token_jsonl(tmp_path / "tokens.jsonl"))
    argv = build(env)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.rsplit("\r", 1)[-1].strip()  # after an erased progress bar
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err
    assert not env.save_dir.exists() or not any(env.save_dir.iterdir())


def test_export_overwrite_replaces_only_the_sae_folders(tmp_path: Path, capsys) -> None:
    env = Env(tmp_path, write_token_jsonl(tmp_path / "tokens.jsonl"))
    run, out = _run(env), _used_folder(env)
    stale = Path(out) / SAE / "sparsity.safetensors"  # from an export with frequencies
    stale.parent.mkdir()
    stale.write_text("old")
    assert main(["export", run, out]) == 2
    assert stale.read_text() == "old"  # refused: nothing touched
    assert main(["export", run, out, "--overwrite"]) == 0
    assert sorted(p.name for p in (Path(out) / SAE).iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    assert (Path(out) / "notes.txt").read_text() == "an earlier export"
