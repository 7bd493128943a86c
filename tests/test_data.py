"""Data sources: local text / jsonl / parquet / saved datasets, streaming, windows, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from e2e_sae.config import DatasetConfig
from e2e_sae.data import create_data_loader, load_windows, tokenize_documents
from e2e_sae.data.tokenizer import load_tokenizer
from e2e_sae.errors import UserError

TEXTS = [
    "To be, or not to be, that is the question. " * 8,
    "Now is the winter of our discontent made glorious summer. " * 8,
    "All the world's a stage, and all the men and women merely players. " * 8,
]


def _cfg(name: str | Path, **kw) -> DatasetConfig:
    base = {"dataset_name": str(name), "n_ctx": 16, "streaming": False}
    return DatasetConfig.model_validate({**base, **kw})


def test_text_folder_is_tokenized_and_cut_into_windows(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, t in enumerate(TEXTS):
        (folder / f"doc{i}.txt").write_text(t)
    tok = load_tokenizer("gpt2")
    stream = tokenize_documents(TEXTS, tok)
    # documents in sorted-file order, each followed by end-of-text
    ids = []
    for t in TEXTS:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
    assert stream.tolist() == ids
    windows = load_windows(_cfg(folder, is_tokenized=False, tokenizer_name="gpt2")).tokens
    n = len(ids) // 16
    assert torch.equal(windows, torch.tensor(ids[: n * 16]).reshape(n, 16))
    # second load comes from the on-disk token cache and is identical
    again = load_windows(_cfg(folder, is_tokenized=False, tokenizer_name="gpt2")).tokens
    assert torch.equal(windows, again)


def test_jsonl_parquet_and_saved_dataset_give_the_same_windows(tmp_path: Path) -> None:
    rows = [{"tokens": list(range(i, i + 16))} for i in range(0, 80, 16)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    expected = torch.arange(80).reshape(5, 16)
    for name in ("a.jsonl", "a.parquet", "saved"):
        assert torch.equal(load_windows(_cfg(tmp_path / name)).tokens, expected), name


def test_batches_are_seeded_and_cover_each_epoch(tmp_path: Path) -> None:
    rows = [{"input_ids": list(range(i * 16, (i + 1) * 16))} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _cfg(tmp_path / "d.jsonl")
    a = create_data_loader(cfg, batch_size=2, global_seed=1)
    b = create_data_loader(cfg, batch_size=2, global_seed=1)
    c = create_data_loader(cfg, batch_size=2, global_seed=2)
    first_a = [next(a) for _ in range(4)]
    first_b = [next(b) for _ in range(4)]
    first_c = [next(c) for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(first_a, first_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first_a, first_c, strict=True))
    starts = sorted(int(w[0]) for batch in first_a for w in batch)
    assert starts == [i * 16 for i in range(8)]  # one epoch = every window once
    # resuming at batch 3 continues the same sequence
    resumed = create_data_loader(cfg, batch_size=2, global_seed=1, start_batch=3)
    assert torch.equal(next(resumed), first_a[3])


def test_rank_shards_concatenate_to_the_single_process_batch(tmp_path: Path) -> None:
    rows = [{"input_ids": list(range(i * 16, (i + 1) * 16))} for i in range(12)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _cfg(tmp_path / "d.jsonl")
    single = create_data_loader(cfg, batch_size=4, global_seed=0)
    r0 = create_data_loader(cfg, batch_size=2, global_seed=0, rank=0, world_size=2)
    r1 = create_data_loader(cfg, batch_size=2, global_seed=0, rank=1, world_size=2)
    for _ in range(5):
        assert torch.equal(next(single), torch.cat([next(r0), next(r1)]))


def test_streaming_hub_dataset_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The streaming code path, with `datasets.load_dataset` answering from memory."""
    rows = [{"input_ids": list(range(i, i + 8))} for i in range(0, 64, 8)]

    def fake_load_dataset(name, split, streaming, **kw):
        assert name == "someone/tokenized-corpus" and streaming and split == "train"
        return datasets.Dataset.from_list(rows).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DatasetConfig(dataset_name="someone/tokenized-corpus", n_ctx=16, streaming=True)
    batches = list(create_data_loader(cfg, batch_size=2, global_seed=0))
    assert len(batches) == 2 and batches[0].shape == (2, 16)
    seen = sorted(int(w[0]) for b in batches for w in b)
    assert len(set(seen)) == 4


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"dataset_name": "/definitely/missing"}, "does not exist"),
        ({"column_name": "nope"}, "column_name: 'nope'"),
        ({"n_ctx": 10_000}, "fewer than one window"),
    ],
)
def test_bad_dataset_inputs(tmp_path: Path, kw: dict, needle: str) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps({"input_ids": list(range(32))}))
    with pytest.raises(UserError, match=needle):
        load_windows(_cfg(tmp_path / "d.jsonl", **kw))


def test_empty_text_folder_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.txt").write_text("")
    with pytest.raises(UserError, match="fewer than one window"):
        load_windows(_cfg(tmp_path / "e", is_tokenized=False, tokenizer_name="gpt2"))
