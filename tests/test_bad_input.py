"""Bad input everywhere a user touches it: one stderr line naming what and where, exit status 2,
and no run directory (nothing half-written).

Each row of CASES builds its inputs in a temp folder and runs `e2e_sae.cli.main` in-process.
"""

from __future__ import annotations

import json
import shutil
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
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
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


def _arch_file(e: Env, architecture: str, **saes: Any) -> Path:
    """A checkpoint (random weights) of the config's SAE built as `architecture`."""
    spec = {"sae_positions": SAE, "dict_size_to_input_ratio": 2.0, "architecture": architecture}
    config = load_config(e.config(saes={**spec, **saes}))
    assert isinstance(config, Config)
    folder = e.root / f"{architecture}_sae"
    folder.mkdir(exist_ok=True)
    return save_checkpoint(folder, SAETransformer.from_config(config, device="cpu"), 8)


def _pretrained_arch(e: Env, architecture: str, **saes: Any) -> list[str]:
    """A relu config whose pretrained_sae_paths names another architecture's checkpoint."""
    return e.train(
        saes={
            "sae_positions": SAE,
            "dict_size_to_input_ratio": 2.0,
            "pretrained_sae_paths": str(_arch_file(e, architecture, **saes)),
        }
    )


def _run_holding(e: Env, architecture: str, **saes: Any) -> str:
    """A relu run directory whose samples file came from a run of `architecture`."""
    run = _run(e)
    shutil.copy(_arch_file(e, architecture, **saes), Path(run) / "samples_8.safetensors")
    return run


def _unchecked_tampered_run(e: Env) -> str:
    """A run whose samples file had its checksum key renamed and a weight byte flipped."""
    run = _run(e)
    path = Path(run) / "samples_8.safetensors"
    data = bytearray(path.read_bytes())
    at = data.index(b"e2e_sae.sha256")
    data[at : at + 14] = b"e2e_sae.sha257"
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    return run


def _yaml_with(e: Env, extra: str, **overrides: Any) -> list[str]:
    """The config as YAML text with `extra` lines appended (a key twice, an alias bomb, ...)."""
    return ["train", e.write(yaml.safe_dump(e.config(**overrides)) + extra)]


ALIAS_BOMB = "".join(  # 10 levels of 10 references: 10^9 values once expanded, 1.3 KB of YAML
    f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'lol'] * 10)}]\n" for i in range(10)
)


def _alias_bomb(e: Env, *flags: str) -> list[str]:
    cfg = e.config()
    del cfg["saes"]
    text = yaml.safe_dump(cfg) + f"saes:\n  sae_positions: {SAE}\n  architecture_kwargs:\n"
    return ["train", e.write(text + ALIAS_BOMB), *flags]


def _sweep(e: Env, parameters: dict[str, Any], *flags: str) -> list[str]:
    base = e.write(e.config(), "base.yaml")
    return ["sweep", e.write({"base_config": base, "parameters": parameters}, "sw.yaml"), *flags]


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
    # --- issue 21: paths a run name can reach (one folder name inside save_dir) ---
    ("run-name-escapes", lambda e: e.train(run_name="../../escape"), "run_name: '../../escape'"),
    ("run-name-nested", lambda e: e.train(run_name="a/b"), "run_name: 'a/b' holds '/'"),
    ("run-name-newline", lambda e: e.train(run_name="a\nb"), "run_name: 'a\\nb' holds"),
    ("run-name-hidden", lambda e: e.train(run_name=".hidden"), "run_name: '.hidden' starts"),
    ("run-name-dot", lambda e: e.train(run_name="."), "run_name: '.' starts"),
    ("run-name-nul", lambda e: e.train(run_name="a\0b"), "run_name: 'a\\x00b' holds"),
    ("run-name-backslash", lambda e: e.train(run_name="a\\b"), "run_name"),
    ("run-name-5000-chars", lambda e: e.train(run_name="x" * 5000), "run_name: 'xxx"),
    ("run-name-dry-run", lambda e: [*e.train(run_name="../x"), "--dry-run"], "run_name"),
    ("wandb-run-name-as-dir", lambda e: e.train(wandb_run_name="a/../../b"), "wandb_run_name"),
    ("sweep-name-escapes", lambda e: ["sweep", e.write({"base_config": e.write(e.config(),
     "base.yaml"), "name": "../up", "parameters": {"lr": [0.1]}}, "sw.yaml")], "name: '../up'"),
    # --- issue 21: sizes that never end or exhaust memory ---
    ("n-samples-1e30", lambda e: e.train(n_samples=10**30), "n_samples: Input should be less"),
    ("n-samples-tokens", lambda e: e.train(n_samples=10**12), "n_samples: 1e+12 windows x"),
    ("eval-n-samples-1e15", lambda e: e.train(eval_n_samples=10**15), "eval_n_samples"),
    ("eval-n-samples-over-the-set", lambda e: e.train(eval_n_samples=100),
     "eval_n_samples: 100 windows in batches of 4, but the eval set"),
    ("eval-n-tokens-1e12", lambda e: ["eval", _run(e), "--n-tokens", str(10**12)],
     "--n-tokens: 1000000000000 tokens"),
    ("eval-n-tokens-over-the-set", lambda e: ["eval", _run(e), "--n-tokens", "8192"],
     "holds 64 windows of 16 tokens"),
    ("ratio-1e12", lambda e: e.train(saes={"sae_positions": SAE,
     "dict_size_to_input_ratio": 1e12}), "saes.dict_size_to_input_ratio: 1 SAE(s) of up to"),
    ("ratio-inf", lambda e: e.train(saes={"sae_positions": SAE,
     "dict_size_to_input_ratio": float("inf")}), "saes.dict_size_to_input_ratio: Input should"),
    ("d-vocab-1e12", lambda e: e.train(tlens_config={**TINY_TLENS, "d_vocab": 10**12}),
     "tlens_config: the model's weights need"),
    ("seed-2-70", lambda e: e.train(seed=2**70), "seed: Input should be less than or equal"),
    ("data-seed-2-64", lambda e: e.train(train_data={**e.config()["train_data"],
     "seed": 2**64}), "train_data.seed"),
    ("alias-bomb", _alias_bomb, "aliases expand to over 100000 values"),
    ("alias-bomb-dry-run", lambda e: _alias_bomb(e, "--dry-run"), "aliases expand"),
    ("alias-recursive", lambda e: _yaml_with(e, "eval_data: &r {a: [*r]}\n", eval_data=None),
     "refers to itself"),
    ("sweep-grid-1e6", lambda e: _sweep(e, {"lr": [1e-3] * 1000, "seed": list(range(1000))},
     "--dry-run"), "the grid has 1,000,000 runs (1000 x 1000)"),
    # --- issue 21: values that should never be accepted ---
    ("lr-inf", lambda e: e.train(lr=float("inf")), "lr: Input should be a finite number"),
    ("coeff-inf", lambda e: e.train(loss={"sparsity": {"coeff": float("inf")}, "out_to_in": {
     "coeff": 1.0}}), "loss.sparsity.coeff: Input should be a finite number"),
    ("coeff-nan", lambda e: e.train(loss={"sparsity": {"coeff": float("nan")}, "out_to_in": {
     "coeff": 1.0}}), "loss.sparsity.coeff"),
    ("data-float-token-ids", lambda e: e.train(train_data=e.data_file("f.jsonl",
     [{"input_ids": [i + 0.5 for i in range(40)]}])), "holds 0.5; token ids are integers"),
    ("data-integral-float-ids", lambda e: e.train(train_data=e.data_file("f.jsonl",
     [{"input_ids": [float(i) for i in range(40)]}])), "holds 0.0; token ids are integers"),
    ("yaml-duplicate-key", lambda e: _yaml_with(e, "lr: 0.5\n"),
     "duplicate key 'lr' (first at line"),
    ("yaml-duplicate-nested-key", lambda e: ["train", e.write("saes:\n  k: 1\n  k: 2\n")],
     "cfg.yaml line 3: duplicate key 'k' (first at line 2)"),
    ("config-random-bytes", lambda e: ["train", e.write(bytes(range(256)) * 4)], "text file"),
    ("config-latin-1", lambda e: ["train", e.write("lr: 0.1 # caf\xe9\n".encode("latin-1"))],
     "not a UTF-8 text file (byte 0xe9"),
    ("browse-top-k-negative", lambda e: ["browse", _run(e), "--out", str(e.root / "b"),
     "--top-k", "-1"], "--top-k: must be >= 1"),
    ("browse-batch-size-0", lambda e: ["browse", _run(e), "--out", str(e.root / "b"),
     "--batch-size", "0"], "--batch-size"),
    ("eval-batch-size-0", lambda e: ["eval", _run(e), "--batch-size", "0"], "--batch-size"),
    ("eval-n-tokens-0", lambda e: ["eval", _run(e), "--n-tokens", "0"], "--n-tokens"),
    ("eval-out-a-folder", lambda e: ["eval", _run(e), "--out", str(e.root)], "--out"),
    ("set-duplicate-key", lambda e: _sweep(e, {"lr": [0.1]}, "--set", "saes={k: 1, k: 2}"),
     "--set saes: duplicate key 'k'"),
    # --- issue 21: weights that are not what the run says ---
    ("pretrained-topk-into-relu", lambda e: _pretrained_arch(e, "topk", k=4),
     "holds topk SAEs, but the config builds relu SAEs"),
    ("pretrained-gated-into-relu", lambda e: _pretrained_arch(e, "gated"),
     "holds gated SAEs, but the config builds relu SAEs"),
    ("eval-relu-run-jumprelu-files", lambda e: ["eval", _run_holding(e, "jumprelu")],
     "holds jumprelu SAEs, but the config builds relu SAEs"),
    ("export-relu-run-topk-files", lambda e: ["export", _run_holding(e, "topk", k=4),
     str(e.root / "x")], "holds topk SAEs, but"),
    ("export-nan-weights", lambda e: ["export", _run(e, scale=float("nan")),
     str(e.root / "x")], "non-finite weights"),
    ("browse-nan-weights", lambda e: ["browse", _run(e, scale=float("nan")), "--out",
     str(e.root / "b")], "non-finite weights"),
    ("eval-checksum-removed", lambda e: ["eval", _unchecked_tampered_run(e)], "has no checksum"),
    ("export-checksum-removed", lambda e: ["export", _unchecked_tampered_run(e),
     str(e.root / "x")], "has no checksum"),
    # --- issue 21: a sweep validates every run before training any ---
    ("sweep-second-run-invalid", lambda e: _sweep(e, {"saes.sae_positions": [SAE,
     "blocks.9.hook_resid_pre"]}), "(run 1: "),
    ("sweep-dry-run-second-run-invalid", lambda e: _sweep(e, {"saes.sae_positions": [SAE,
     "blocks.9.hook_resid_pre"]}, "--dry-run"), "saes.sae_positions"),
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
