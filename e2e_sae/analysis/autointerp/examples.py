"""The text a feature is explained from and scored on.

Top and quantile examples come from the feature browser's scan (`collect_feature_data`: per
feature the top-k sequences with the window around each one's maximum, and one random token per
bin of the activation histogram). The top-k are split: the odd ranks 1, 3, 5, ... (up to
`n_score_top`) are held out for scoring, the others explain; the quantile examples (the bins
holding the 10/30/50/70/90% quantiles of the nonzero activations, as in the browser) are shown to
the explainer too, unless they come from one of the feature's top-k sequences (a repeat, or a
held-out example shown). Random windows of the scanned text (the same windows for every feature,
with their true activations) are scored as well, and windows where a feature is silent
throughout serve as its non-activating contexts for detection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from e2e_sae.analysis.browser import FeatureData, quantile_rows
from e2e_sae.lm.splice import SAETransformer


@dataclass
class Example:
    """A window of text: one display string per token and the feature's activation on each."""

    tokens: list[str]
    acts: list[float]

    def to_json(self) -> dict[str, object]:
        return {"tokens": self.tokens, "acts": list(self.acts)}


@dataclass
class FeatureExamples:
    """Everything one feature is explained from (`explain`, `quantile`) and scored on
    (`score_top` + `score_random` for simulation; `score_top` vs `nonactivating` for detection)."""

    feature: int
    explain: list[Example] = field(default_factory=list)
    quantile: list[Example] = field(default_factory=list)
    score_top: list[Example] = field(default_factory=list)
    score_random: list[Example] = field(default_factory=list)
    nonactivating: list[Example] = field(default_factory=list)


def split_ranks(top_k: int, n_score: int) -> tuple[list[int], list[int]]:
    """(explain ranks, held-out ranks) of a top-k list: held out the odd ranks 1, 3, ... up to
    `n_score` of them (so both halves reach the top), the rest explain."""
    held = [r for r in range(1, top_k, 2)][:n_score]
    return [r for r in range(top_k) if r not in held], held


def n_activating_sequences(data: FeatureData) -> Tensor:
    """[F] how many of the top-k slots hold a sequence where the feature fires."""
    return (data.top_values > 0).sum(0)


@torch.no_grad()
def window_codes(
    model: SAETransformer,
    position: str,
    tokens: Tensor,
    windows: Sequence[tuple[int, int]],
    width: int,
    features: Sequence[int],
    batch_size: int = 16,
) -> Tensor:
    """[len(windows), width, len(features)]: the features' activations on each window
    (sequence row of `tokens` [n_seq, T], start), computed over the whole sequence (the clean
    model's activation at the SAE's input, as the browser scans)."""
    sae = model.sae(position)
    hook = model.sites[position].input_hook
    idx = torch.tensor(list(features), device=sae.device)
    rows = sorted({s for s, _ in windows})
    codes: dict[int, Tensor] = {}
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        batch = tokens[chunk].to(sae.device)
        _, cache = model.forward_raw(
            batch, run_entire_model=False, cache_positions=[hook], cache_sae_positions=False
        )
        c = sae.encode(cache[hook]).index_select(-1, idx).cpu()
        for i, s in enumerate(chunk):
            codes[s] = c[i]
    out = torch.zeros(len(windows), width, len(features))
    for i, (s, start) in enumerate(windows):
        out[i] = codes[s][start : start + width]
    return out


def random_windows(
    n_seq: int, seq_len: int, width: int, n: int, seed: int, skip_first: bool
) -> list[tuple[int, int]]:
    """`n` distinct (sequence, start) windows of `width` tokens, drawn uniformly (seeded); they
    start at position 1 or later when the first position is skipped."""
    lo = 1 if skip_first and seq_len > width else 0
    starts = max(1, seq_len - width + 1 - lo)
    total = n_seq * starts
    rng = np.random.default_rng(seed)
    pick = rng.choice(total, size=min(n, total), replace=False)
    return [(int(p // starts), int(p % starts) + lo) for p in pick]


def build_examples(
    data: FeatureData,
    slot: int,
    texts: Callable[[list[int]], list[str]],
    *,
    n_score_top: int,
    random_windows: Sequence[tuple[int, int]],
    random_acts: Tensor,
    n_random: int,
    n_nonactivating: int,
) -> FeatureExamples:
    """The examples of the feature in column `slot` of `data` (see the module docstring).

    `random_acts` [len(random_windows), width]: this feature's activations on the random
    windows (`window_codes`); the first `n_random` windows are scored for
    simulation, and the first `n_nonactivating` windows where this feature is silent throughout
    are its non-activating contexts. `texts` maps token ids to display strings. With
    `data.skip_first`, a window's first position is left out when it is a sequence's first."""
    feature = int(data.indices[slot])
    k = data.windows.shape[0]
    explain_ranks, held = split_ranks(k, n_score_top)
    out = FeatureExamples(feature)

    def window(seq: int, start: int, acts: Sequence[float]) -> Example:
        ids = data.tokens[seq, start : start + len(acts)].tolist()
        acts = [float(a) for a in acts]
        if data.skip_first and start == 0:
            ids, acts = ids[1:], acts[1:]
        return Example(texts(ids), acts)

    for rank in range(k):
        if float(data.top_values[rank, slot]) <= 0:
            continue
        ex = window(
            int(data.sequences[rank, slot]),
            int(data.starts[rank, slot]),
            data.windows[rank, :, slot].tolist(),
        )
        (out.score_top if rank in held else out.explain).append(ex)
    top_seqs = {int(data.sequences[r, slot]) for r in range(k) if data.top_values[r, slot] > 0}
    if data.hist is not None and data.sample_seqs is not None and data.sample_windows is not None:
        assert data.sample_starts is not None
        n_feat, nb = data.hist.shape
        m = data.sample_seqs.numel() // (n_feat * nb)  # examples kept per bin
        available = (data.sample_seqs.view(n_feat, nb, m)[slot : slot + 1] >= 0).sum(2)
        cells = [
            (slot * nb + b) * m + k
            for _, b, k in quantile_rows(data.hist[slot : slot + 1], available)[0]
        ]
        for cell in dict.fromkeys(cells):  # the browser's quantile rows, each example once
            seq = int(data.sample_seqs[cell])
            # not a top sequence again: no repeat for the explainer, no held-out one shown
            if seq >= 0 and seq not in top_seqs:
                start = int(data.sample_starts[cell])
                out.quantile.append(window(seq, start, data.sample_windows[cell].tolist()))
    for i, (seq, start) in enumerate(random_windows):
        acts = random_acts[i].tolist()
        if i < n_random:
            out.score_random.append(window(seq, start, acts))
        if len(out.nonactivating) < n_nonactivating and max(acts) <= 0:
            out.nonactivating.append(window(seq, start, acts))
    return out
