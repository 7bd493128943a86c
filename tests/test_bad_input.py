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
import yaml
from conftest import TINY_TLENS, make_config_dict, write_token_jsonl

from e2e_sae.cli import main


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
    return {"dataset_name": str(e.root / "text"), "n_ctx": 16, "streaming": False,
            "is_tokenized": False, "tokenizer_name": "no-such-tokenizer"}  # fmt: skip


def _no_batch_size(e: Env) -> list[str]:
    cfg = e.config()
    del cfg["batch_size"]
    return ["train", e.write(cfg)]


TEXT_ROWS = [{"text": "hello world"}] * 4
SAE = "blocks.1.hook_resid_pre"

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
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err
    assert not env.save_dir.exists() or not any(env.save_dir.iterdir())
