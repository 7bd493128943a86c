"""Teacher cache: the clean model's next-token distributions (top-k + tail mass) on disk.

In an e2e step the clean run past the first SAE only provides P_clean for the KL term. With
P_clean cached, repeated epochs and sweeps over the same tokens skip that pass: the step runs the
shared prefix, the SAE-spliced pass, and the KL against the cache.

The approximation. Per token t, keep the k most likely tokens S of P = P_clean(.|t), their
log-probs, and the tail mass m = 1 - P(S). The KL is taken between P and Q = P_new coarsened to the
k + 1 outcomes S u {tail}:

    KL~_t = sum_{v in S} p_v (log p_v - log q_v) + m (log m - log Q(tail)),  Q(tail) = 1 - Q(S).

By the chain rule of the KL divergence, KL_t = KL~_t + m * KL(P(.|tail) || Q(.|tail)): KL~ is a
lower bound and its error is exactly m times the KL between the two distributions within the tail
(so it is at most m * log(1 / min_tail Q)); it vanishes as m -> 0. The gradient w.r.t. the new
logits is softmax(new) - P~, with P~ = p on S and the tail mass m spread over the tail in
proportion to Q (`topk_target`), so training uses the same chunked unembedding as the exact KL.

Layout of a cache folder (written to `<name>.tmp`, renamed when complete):
  meta.json        k, d_vocab, model name
  tokens.npy       int32 [n_windows, n_ctx]      windows are looked up by their tokens
  topk_ids.npy     int32 [n_windows, n_ctx, k]
  topk_logp.npy    float32 [n_windows, n_ctx, k]
  tail.npy         float32 [n_windows, n_ctx]    m (computed as a sum over the tail, not 1 - P(S))
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.caches.activations import n_cache_batches, training_batches
from e2e_sae.config import Config
from e2e_sae.errors import ConfigError, UserError
from e2e_sae.lm.runner import LMRunner, Unembedding, step_runner
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.objective.losses import KLTarget, chunked_unembed_kl
from e2e_sae.resources import check_device

META = "meta.json"
FORMAT_VERSION = 1
_FILES = ("tokens", "topk_ids", "topk_logp", "tail")


@dataclass
class TeacherRows:
    """The cached clean distributions of one batch, flattened over tokens."""

    ids: Tensor  # int64 [tokens, k]
    logp: Tensor  # fp32 [tokens, k]
    tail: Tensor  # fp32 [tokens]


def topk_distribution(logits: Tensor, k: int) -> TeacherRows:
    """Top-k log-probs and tail mass of softmax(logits) [..., d_vocab] (flattened over tokens)."""
    logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    top, ids = logp.topk(k, dim=-1)
    tail = logp.exp().scatter_(-1, ids, 0.0).sum(-1)
    return TeacherRows(ids, top, tail)


def topk_target(rows: TeacherRows, s: int, e: int, logp_new: Tensor) -> tuple[Tensor, Tensor]:
    """`losses.KLTarget` for the coarsened KL~ (module docstring) on token rows [s, e)."""
    ids, logp_t, m = rows.ids[s:e], rows.logp[s:e], rows.tail[s:e]
    p_t = logp_t.exp()
    q_top = logp_new.gather(-1, ids)
    # log Q(tail) = logsumexp over the tail of log q (exact, no 1 - Q(S) cancellation)
    log_q_tail = logp_new.scatter(-1, ids, float("-inf")).logsumexp(-1)
    m_log_m = torch.where(m > 0, m * m.clamp_min(1e-30).log(), torch.zeros_like(m))
    kl = (p_t * (logp_t - q_top)).sum(-1) + m_log_m - torch.where(m > 0, m * log_q_tail, 0.0)
    # P~: p on the top k; the tail mass spread over the tail like Q
    target = (logp_new - log_q_tail[:, None]).exp() * m[:, None]
    target.scatter_(-1, ids, p_t)
    return kl.sum(dtype=torch.float64), target


def kl_topk(
    rows: TeacherRows, new_final: Tensor, unembed: Unembedding, chunk_tokens: int | None = None
) -> Tensor:
    """mean_t KL~_t between the cached clean distributions and softmax(unembed(new_final))."""

    def target(s: int, e: int, logp_new: Tensor) -> tuple[Tensor, Tensor]:
        return topk_target(rows, s, e, logp_new)

    return chunked_unembed_kl(new_final, target, unembed, chunk_tokens)


def clean_logits(model: SAETransformer, tokens: Tensor, runner: LMRunner | None = None) -> Tensor:
    """The clean LM's logits through `runner` (default: the lean forward where it applies)."""
    lm = runner if runner is not None else step_runner(model.lm, [])
    final = lm.run_blocks(tokens)
    assert final is not None
    return lm.unembedding_fn()(final) if lm.final_is_residual else final


class TeacherCache:
    """A teacher cache folder opened read-only (memory-mapped), looked up by token windows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / META).is_file():
            raise UserError(f"teacher cache {self.path}: no {META} (not a finished cache)")
        self.meta = json.loads((self.path / META).read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"teacher cache {self.path}: unsupported format version")
        self.k = int(self.meta["k"])
        arrays = {
            f: np.load(self.path / f"{f}.npy", mmap_mode="r", allow_pickle=False) for f in _FILES
        }
        self.tokens, self.ids, self.logp, self.tail = (arrays[f] for f in _FILES)
        self._index = {np.asarray(row).tobytes(): i for i, row in enumerate(self.tokens)}

    @classmethod
    def build(
        cls,
        model: SAETransformer,
        batches: Iterable[Tensor],
        n_batches: int,
        path: str | Path,
        k: int = 64,
        progress: bool = True,
    ) -> TeacherCache:
        """Run the clean LM over `n_batches` token batches and store top-k + tail per token."""
        path = Path(path)
        if path.exists():
            raise UserError(f"teacher cache {path}: already exists")
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        device = next(model.saes.parameters()).device
        runner = step_runner(model.lm, [])
        out: dict[str, np.memmap] = {}
        it = iter(batches)
        row = 0
        with torch.no_grad():
            for _ in tqdm(range(n_batches), desc="teacher", unit="batch", disable=not progress):
                tokens = next(it).to(device)
                logits = clean_logits(model, tokens, runner)
                b, n = tokens.shape
                rows = topk_distribution(logits, k)
                if not out:
                    nw = n_batches * b
                    shapes = {
                        "tokens": (nw, n),
                        "topk_ids": (nw, n, k),
                        "topk_logp": (nw, n, k),
                        "tail": (nw, n),
                    }
                    for f, shape in shapes.items():
                        dt = np.int32 if f in ("tokens", "topk_ids") else np.float32
                        out[f] = np.lib.format.open_memmap(
                            tmp / f"{f}.npy", mode="w+", dtype=dt, shape=shape
                        )
                out["tokens"][row : row + b] = tokens.cpu().numpy()
                out["topk_ids"][row : row + b] = rows.ids.reshape(b, n, k).cpu().numpy()
                out["topk_logp"][row : row + b] = rows.logp.reshape(b, n, k).cpu().numpy()
                out["tail"][row : row + b] = rows.tail.reshape(b, n).cpu().numpy()
                row += b
        if not out:
            raise UserError("teacher cache: got no batches")
        for a in out.values():
            a.flush()
        cfg = model.tlens_model.cfg
        meta = {
            "format_version": FORMAT_VERSION,
            "k": k,
            "d_vocab": cfg.d_vocab,
            "n_windows": row,
            "model": str(getattr(cfg, "model_name", "")),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        del out
        os.replace(tmp, path)
        return cls(path)

    def kl_target(self, tokens: Tensor) -> KLTarget:
        """`losses.KLTarget` of the coarsened KL~ for these windows (`forward.Teacher`)."""
        rows = self.lookup(tokens)
        rows = TeacherRows(
            rows.ids.to(tokens.device), rows.logp.to(tokens.device), rows.tail.to(tokens.device)
        )

        def target(s: int, e: int, logp_new: Tensor) -> tuple[Tensor, Tensor]:
            return topk_target(rows, s, e, logp_new)

        return target

    def lookup(self, tokens: Tensor) -> TeacherRows:
        """The cached distributions of the windows in `tokens` [batch, n_ctx] (all cached)."""
        arr = tokens.cpu().numpy().astype(np.int32)
        idx = []
        for row in arr:
            i = self._index.get(row.tobytes())
            if i is None:
                raise UserError(f"teacher cache {self.path}: a batch window is not in the cache")
            idx.append(i)
        sel = np.asarray(idx)
        k = self.k
        return TeacherRows(
            ids=torch.from_numpy(np.asarray(self.ids[sel], dtype=np.int64)).reshape(-1, k),
            logp=torch.from_numpy(np.asarray(self.logp[sel], dtype=np.float32)).reshape(-1, k),
            tail=torch.from_numpy(np.asarray(self.tail[sel], dtype=np.float32)).reshape(-1),
        )


def check_teacher_config(config: Config) -> None:
    """A teacher cache replaces the clean pass of `logits_kl`-only e2e runs."""
    if config.loss.logits_kl is None or config.loss.in_to_orig is not None:
        raise ConfigError("teacher_cache: only for logits_kl runs without in_to_orig")


def open_teacher_cache(config: Config) -> TeacherCache:
    """The teacher cache a run config names (`teacher_cache`), checked against the config."""
    check_teacher_config(config)
    assert config.teacher_cache is not None
    return TeacherCache(config.teacher_cache)


def build_for_config(
    config: Config,
    path: str | Path,
    k: int = 64,
    n_windows: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> TeacherCache:
    """Cache the clean distributions of the windows `config` trains on: one epoch of the run
    (or `n_windows`, rounded up to whole batches), read as its training reads them. Nothing is
    written until the model and the first batch have loaded."""

    check_teacher_config(config)
    if Path(path).exists():
        raise UserError(f"teacher cache {path}: already exists")
    check_device(device or config.device)
    model = SAETransformer.from_config(config, device=device)
    d_vocab = model.lm.d_vocab
    if not 0 < k < d_vocab:
        raise UserError(f"--k: expected 1 to {d_vocab - 1} (the model's d_vocab - 1), got {k}")
    batches = training_batches(config, model)
    return TeacherCache.build(model, batches, n_cache_batches(config, n_windows), path, k, progress)
