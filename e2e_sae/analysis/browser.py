"""A static feature browser for one SAE that opens from disk (no server, nothing fetched).

`write_browser(run, DIR)` writes DIR/index.html (the app, assets/browser/app.js and app.css
inlined), DIR/data/index.js (one row per live feature: the sortable columns) and
DIR/data/page_<n>.js (`page_size` features each: snippets, histogram, quantile examples,
promoted/suppressed tokens, neighbours, token texts), each a `registerPage(n, {...})` call loaded
through a script tag when one of its features is opened (fetch() of file:// URLs is blocked).
The browser is always a folder: an `out` ending in .html is refused.

Per feature (dictionary element): its firing frequency over the scanned tokens, its top-activating
snippets with every token shaded by the feature's activation, and the tokens its decoder direction
promotes (and suppresses) most through the unembedding.

Activations are the SAE's code on the clean model's activations at the SAE's input hook (the
other SAEs of the run are not spliced in). The top-k snippets are kept with a vectorised running
top-k over all features at once: per batch, each sequence's maximum per feature and the window of
activations around it are gathered, merged with the current top-k and cut back to k. A sequence
appears at most once per feature.

Promoted tokens approximate the direct effect of a dictionary element d on the logits, skipping
every layer after the SAE and linearising the final layer norm: logits ≈ (w_ln ⊙ center(d)) @ W_U,
where center subtracts the mean over d_model (LN models; not RMSNorm ones) and w_ln is ln_final's
weight when the model has one (folded models have none). The layer norm's division by the
residual norm only rescales all logits together and is dropped; so are its bias and b_U, which do
not depend on d.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.analysis.autointerp.store import explanations_for_run
from e2e_sae.data.tokenizer import load_tokenizer
from e2e_sae.errors import UserError
from e2e_sae.eval.evaluate import (
    check_count,
    check_finite_weights,
    eval_dataset,
    eval_request,
    eval_window_batches,
    eval_windows,
    open_run,
)
from e2e_sae.lm.splice import SAETransformer
from e2e_sae.saes import SAEBase

# Histogram / quantile-sample bins of a feature's nonzero activations: 4 per decade over
# [1e-2, 1e4]; bin 0 takes everything <= 1e-2, the last everything above 1e4.
HIST_EDGES = [10 ** (e / 4) for e in range(-8, 17)]
SAMPLES_PER_BIN = 5
"""Examples kept per feature and histogram bin: each of the five quantile rows can show its own
token even when several quantiles fall in one bin."""
QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class FeatureData:
    """Everything the page shows, for features `indices` of the SAE at `position`.

    Top-k arrays are [k, n_features] (entry [j, f]: the j-th strongest sequence for feature f);
    `windows` is [k, window, n_features]; `sequences` indexes `tokens` [n_seqs, n_ctx].
    `hist` [n_features, n_bins] counts the feature's nonzero activations per HIST_EDGES bin over
    the example tokens (all tokens but the skipped ones); `sample_*` hold, per feature and bin,
    up to SAMPLES_PER_BIN uniformly drawn example tokens from that bin (sequence, window start, the
    token's position, window [.., W], its activation; sequence -1 where a slot is empty),
    flattened to [n_features * n_bins * SAMPLES_PER_BIN, ..]. `all_counts` [d_sae]: firing
    counts of every latent of the SAE (not only `indices`); `code_*`: the SAE's code on the first
    `code_tokens` scanned tokens as sparse (token, latent, value) triples, for activation
    correlations; `other_counts`: firing counts of a `compare_sae`'s latents."""

    position: str
    indices: Tensor
    n_tokens: int
    counts: Tensor
    top_values: Tensor
    sequences: Tensor
    starts: Tensor
    windows: Tensor
    tokens: Tensor
    sums: Tensor | None = None
    hist: Tensor | None = None
    sample_seqs: Tensor | None = None
    sample_starts: Tensor | None = None
    sample_positions: Tensor | None = None
    sample_windows: Tensor | None = None
    sample_values: Tensor | None = None
    skip_first: bool = False
    skip_reason: str = ""
    n_example_tokens: int = 0
    all_counts: Tensor | None = None
    code_tokens: int = 0
    code_rows: Tensor | None = None
    code_cols: Tensor | None = None
    code_values: Tensor | None = None
    other_counts: Tensor | None = None

    @property
    def frequency(self) -> Tensor:
        return self.counts.double() / self.n_tokens

    @property
    def mean_activation(self) -> Tensor:
        """Mean activation over the tokens where the feature fires (0 where it never does)."""
        assert self.sums is not None
        return self.sums / self.counts.clamp(min=1)


def top_windows_update(
    c: Tensor,
    seq_offset: int,
    state: dict[str, Tensor],
    k: int,
    before: int,
    after: int,
    rank: Tensor | None = None,
) -> None:
    """Merge one batch of codes c [B, T, F] into the running top-k `state` (in place).

    Per sequence and feature the max activation is a candidate; its window of activations
    (`before` tokens before it, `after` after, shifted to stay inside the sequence) comes along.
    `rank` (default c): the values the maximum is taken over, e.g. c with skipped positions
    zeroed; the windows always show c."""
    b, t, f = c.shape
    w = min(before + after + 1, t)
    values, argmax = (c if rank is None else rank).max(dim=1)  # [B, F]
    starts = (argmax - before).clamp(0, t - w)
    idx = starts[:, None, :] + torch.arange(w, device=c.device)[None, :, None]  # [B, W, F]
    windows = c.gather(1, idx)
    seqs = (torch.arange(b, device=c.device) + seq_offset)[:, None].expand(b, f)
    if state:
        values = torch.cat([state["values"], values])
        seqs = torch.cat([state["sequences"], seqs])
        starts = torch.cat([state["starts"], starts])
        windows = torch.cat([state["windows"], windows])
    top, pick = values.topk(min(k, values.shape[0]), dim=0)  # [k, F]
    state["values"] = top
    state["sequences"] = seqs.gather(0, pick)
    state["starts"] = starts.gather(0, pick)
    state["windows"] = windows.gather(0, pick[:, None, :].expand(-1, w, -1))


def sample_update(
    c: Tensor,
    seq_offset: int,
    state: dict[str, Tensor],
    before: int,
    after: int,
    generator: torch.Generator,
    per_bin: int = SAMPLES_PER_BIN,
) -> None:
    """Histogram one batch of codes c [B, T, F] (zeros are not counted) into `state["hist"]`
    [F * n_bins] and keep, per feature and bin, `per_bin` uniformly drawn examples (without
    replacement): every nonzero entry gets a random key and a cell keeps the entries with the
    `per_bin` largest keys seen so far (the top m of i.i.d. keys are a uniform m-subset), in slots
    `cell * per_bin + rank`. Keys are float64 so ties do not occur in practice."""
    b, t, f = c.shape
    w = min(before + after + 1, t)
    nb = len(HIST_EDGES) + 1
    m = per_bin
    dev = c.device
    if not state:
        state["hist"] = torch.zeros(f * nb, dtype=torch.long, device=dev)
        state["key"] = torch.full((f * nb * m,), -1.0, dtype=torch.float64, device=dev)
        state["seq"] = torch.full((f * nb * m,), -1, dtype=torch.long, device=dev)
        state["start"] = torch.zeros(f * nb * m, dtype=torch.long, device=dev)
        state["pos"] = torch.zeros(f * nb * m, dtype=torch.long, device=dev)
        state["value"] = torch.zeros(f * nb * m, dtype=c.dtype, device=dev)
        state["window"] = torch.zeros(f * nb * m, w, dtype=c.dtype, device=dev)
    bi, ti, fi = (c > 0).nonzero().unbind(1)
    if bi.numel() == 0:
        return
    v = c[bi, ti, fi]
    edges = torch.tensor(HIST_EDGES, dtype=v.dtype, device=dev)
    cell = fi * nb + torch.bucketize(v, edges)
    state["hist"] += torch.bincount(cell, minlength=f * nb)
    key = torch.rand(v.shape, generator=generator, dtype=torch.float64, device=generator.device)
    key = key.to(dev)
    # Candidates: this batch's entries and the kept examples of the cells they fall in.
    touched = torch.zeros(f * nb, dtype=torch.bool, device=dev)
    touched[cell] = True
    slots = (touched.repeat_interleave(m) & (state["key"] >= 0)).nonzero().squeeze(1)
    n_new = cell.numel()
    all_cell = torch.cat([cell, slots // m])
    all_key = torch.cat([key, state["key"][slots]])
    order = all_key.argsort(descending=True, stable=True)
    order = order[all_cell[order].argsort(stable=True)]  # by cell, then key descending
    sorted_cell = all_cell[order]
    rank = torch.arange(order.numel(), device=dev) - torch.searchsorted(sorted_cell, sorted_cell)
    keep = rank < m
    pick, dest = order[keep], sorted_cell[keep] * m + rank[keep]
    new, old = pick < n_new, pick >= n_new
    src_old = slots[pick[old] - n_new]
    saved = {
        k: state[k][src_old].clone() for k in ("key", "seq", "start", "pos", "value", "window")
    }
    state["key"][touched.repeat_interleave(m)] = -1.0  # the touched cells are rewritten below
    state["seq"][touched.repeat_interleave(m)] = -1
    for k, val in saved.items():
        state[k][dest[old]] = val
    e = pick[new]
    starts = (ti[e] - before).clamp(0, t - w)
    offs = starts[:, None] + torch.arange(w, device=dev)[None, :]
    d = dest[new]
    state["key"][d] = key[e]
    state["seq"][d] = bi[e] + seq_offset
    state["start"][d] = starts
    state["pos"][d] = ti[e]
    state["value"][d] = v[e]
    state["window"][d] = c[bi[e][:, None], offs, fi[e][:, None]]


def skip_mask(tokens: Tensor, skip_first: bool, special_ids: Sequence[int] = ()) -> Tensor | None:
    """[B, T] bool, True where a token may serve as an example (None: all may)."""
    if not skip_first:
        return None
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    if special_ids:
        keep &= ~torch.isin(tokens, torch.tensor(list(special_ids), device=tokens.device))
    return keep


def first_position_outlier(x: Tensor, factor: float = 3.0) -> tuple[bool, float]:
    """Whether the first position's mean activation norm exceeds `factor` times the mean norm of
    the other positions (x [B, T, d]); returns (decision, the ratio)."""
    norms = x.float().norm(dim=-1)
    if norms.shape[1] < 2:
        return False, 1.0
    ratio = float(norms[:, 0].mean() / norms[:, 1:].mean().clamp(min=1e-12))
    return ratio > factor, ratio


@torch.no_grad()
def collect_feature_data(
    model: SAETransformer,
    position: str,
    batches: Iterator[Tensor],
    n_batches: int,
    features: Sequence[int] | None = None,
    top_k: int = 8,
    before: int = 12,
    after: int = 4,
    progress: bool = False,
    skip_first: bool | None = False,
    special_ids: Sequence[int] = (),
    bos_id: int | None = None,
    compare_sae: SAEBase | None = None,
    code_tokens: int = 65_536,
) -> FeatureData:
    """Scan `n_batches` batches of tokens and keep, per feature, the top-k snippets, counts, the
    activation histogram and a few examples per histogram bin; for every latent of the SAE its
    firing count and (on the first `code_tokens` tokens) its sparse code, for correlations; and
    the firing counts of `compare_sae` (another SAE reading the same activation) if given.

    Counts (frequency, dead) are over all tokens, as `e2e-sae eval` counts them. With
    `skip_first` the examples and the histogram leave out every sequence's first position and
    the `special_ids` tokens; None decides from the first batch: on when every sequence starts
    with `bos_id` or when the first position's mean activation norm at the SAE input exceeds 3x
    the other positions' (see `first_position_outlier`)."""
    if position not in model.sites:
        raise UserError(f"--sae: no SAE at '{position}' (has {', '.join(model.sae_positions)})")
    sae = model.sae(position)
    hook = model.sites[position].input_hook
    idx = torch.arange(sae.n_dict_components) if features is None else torch.tensor(list(features))
    if idx.numel() == 0 or int(idx.max()) >= sae.n_dict_components or int(idx.min()) < 0:
        raise UserError(f"--features: indices must lie in [0, {sae.n_dict_components})")
    device = sae.device
    dev_idx = idx.to(device)
    state: dict[str, Tensor] = {}
    samples: dict[str, Tensor] = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    counts = torch.zeros(idx.numel(), dtype=torch.long, device=device)
    all_counts = torch.zeros(sae.n_dict_components, dtype=torch.long, device=device)
    other_counts = None
    if compare_sae is not None:
        other_counts = torch.zeros(compare_sae.n_dict_components, dtype=torch.long)
    sums = torch.zeros(idx.numel(), dtype=torch.float64, device=device)
    kept: list[Tensor] = []
    code: list[list[Tensor]] = [[], [], []]
    n_code = 0
    n_seq = n_example = 0
    reason = "off (--no-skip-first)" if skip_first is False else "on (--skip-first)"
    bar = tqdm(batches, total=n_batches, desc="scan", disable=not progress, leave=False)
    for _, tokens in zip(range(n_batches), bar, strict=False):
        tokens = tokens.to(device)
        _, cache = model.forward_raw(
            tokens, run_entire_model=False, cache_positions=[hook], cache_sae_positions=False
        )
        x = cache[hook]
        if skip_first is None:
            outlier, ratio = first_position_outlier(x)
            bos = bos_id is not None and bool((tokens[:, 0] == bos_id).all())
            skip_first = outlier or bos
            reason = (
                f"{'on' if skip_first else 'off'} (auto: first-position / other-position mean "
                f"activation norm {ratio:.2f}, rule > 3; every sequence starts with BOS: {bos})"
            )
        c = sae.encode(x)
        all_counts += (c != 0).sum((0, 1))
        if n_code < code_tokens:
            flat = c.reshape(-1, c.shape[-1])[: code_tokens - n_code]
            rows, cols = flat.nonzero().unbind(1)
            for lst, part in zip(code, (rows + n_code, cols, flat[rows, cols]), strict=True):
                lst.append(part.cpu())
            n_code += flat.shape[0]
        if compare_sae is not None and other_counts is not None:
            other = compare_sae.encode(x.to(compare_sae.device))
            other_counts += (other != 0).sum((0, 1)).cpu()
        if features is not None:
            c = c.index_select(-1, dev_idx)
        counts += (c != 0).sum((0, 1))
        sums += c.double().sum((0, 1))
        keep = skip_mask(tokens, skip_first, special_ids)
        ranked = c if keep is None else c * keep[:, :, None]
        n_example += tokens.numel() if keep is None else int(keep.sum())
        top_windows_update(c, n_seq, state, top_k, before, after, rank=ranked)
        sample_update(ranked, n_seq, samples, before, after, gen)
        kept.append(tokens.cpu())
        n_seq += tokens.shape[0]
    if not kept:
        raise UserError("browse: the dataset gave no batches")
    all_tokens = torch.cat(kept)
    nb = len(HIST_EDGES) + 1
    return FeatureData(
        position,
        idx,
        all_tokens.numel(),
        counts.cpu(),
        state["values"].cpu(),
        state["sequences"].cpu(),
        state["starts"].cpu(),
        state["windows"].cpu(),
        all_tokens,
        sums=sums.cpu(),
        hist=samples["hist"].view(-1, nb).cpu(),
        sample_seqs=samples["seq"].cpu(),
        sample_starts=samples["start"].cpu(),
        sample_positions=samples["pos"].cpu(),
        sample_windows=samples["window"].cpu(),
        sample_values=samples["value"].cpu(),
        skip_first=bool(skip_first),
        skip_reason=reason,
        n_example_tokens=n_example,
        all_counts=all_counts.cpu(),
        code_tokens=n_code,
        code_rows=torch.cat(code[0]),
        code_cols=torch.cat(code[1]),
        code_values=torch.cat(code[2]).float(),
        other_counts=other_counts,
    )


@torch.no_grad()
def promoted_tokens(
    model: SAETransformer, position: str, features: Tensor, n: int = 10, chunk: int = 512
) -> tuple[Tensor, Tensor] | None:
    """Per feature, the `n` tokens whose logits its dictionary element raises most (see the module
    docstring for the approximation): ([F, n] token ids, [F, n] logit contributions), or None when
    the SAE does not write to a d_model-sized activation."""
    eff = logit_effects(model, position, features, n, chunk)
    return None if eff is None else (eff.top_ids, eff.top_logits)


LOGIT_HIST_BINS = 40


@dataclass
class LogitEffects:
    """Direct logit effect of each dictionary element (module docstring): the `n` most promoted
    and most suppressed tokens with their logit contributions ([F, n] each), `rms` [F], the
    root-mean-square over the vocabulary of the effect after subtracting its vocabulary mean (a
    shift of every logit changes no probability), and the histogram of the effect over the whole
    vocabulary: `hist` [F, LOGIT_HIST_BINS] token counts in equal bins from `hist_range` [F, 2]
    (min, max)."""

    top_ids: Tensor
    top_logits: Tensor
    bottom_ids: Tensor
    bottom_logits: Tensor
    rms: Tensor
    hist: Tensor
    hist_range: Tensor


@torch.no_grad()
def logit_effects(
    model: SAETransformer, position: str, features: Tensor, n: int = 10, chunk: int = 512
) -> LogitEffects | None:
    """Promoted and suppressed tokens per feature (None when the SAE does not write to a
    d_model-sized activation)."""
    dirs = model.sae(position).dict_elements[:, features.to(model.sae(position).device)]
    w_u, w_ln, centred = model.lm.unembedding()
    if dirs.shape[0] != w_u.shape[0]:
        return None
    dirs = dirs.float().to(w_u.device)
    if centred:
        dirs = dirs - dirs.mean(0, keepdim=True)
    if w_ln is not None:
        dirs = dirs * w_ln.float()[:, None]
    out: list[list[Tensor]] = [[], [], [], [], [], [], []]
    k = min(n, w_u.shape[1])
    for s in range(0, dirs.shape[1], chunk):
        logits = dirs[:, s : s + chunk].T @ w_u.float()  # [chunk, d_vocab]
        v, i = logits.topk(k, dim=1)
        bv, bi = logits.topk(k, dim=1, largest=False)
        rms = (logits - logits.mean(1, keepdim=True)).pow(2).mean(1).sqrt()
        lo, hi = logits.amin(1, keepdim=True), logits.amax(1, keepdim=True)
        span = (hi - lo).clamp(min=1e-12)
        b = ((logits - lo) / span * LOGIT_HIST_BINS).long().clamp(0, LOGIT_HIST_BINS - 1)
        hist = torch.zeros(b.shape[0], LOGIT_HIST_BINS, dtype=torch.long, device=b.device)
        hist.scatter_add_(1, b, torch.ones_like(b))
        parts = (i, v, bi, bv, rms, hist, torch.cat([lo, hi], 1))
        for lst, t in zip(out, parts, strict=True):
            lst.append(t.cpu())
    return LogitEffects(*(torch.cat(t) for t in out))


@torch.no_grad()
def nearest_features(
    dirs: Tensor,
    others: Tensor,
    k: int = 8,
    exclude: Tensor | None = None,
    chunk: int = 1024,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per column of `dirs` [d, F], the `k` columns of `others` [d, G] with the largest cosine
    ([F, k] indices into others, [F, k] cosines). `exclude` [F]: per column of dirs, a column of
    others to leave out (its own index when both come from one dictionary); `allowed` [G] bool:
    the columns that may be listed (e.g. the live ones)."""
    a = dirs.float() / dirs.float().norm(dim=0, keepdim=True).clamp(min=1e-12)
    b = others.float() / others.float().norm(dim=0, keepdim=True).clamp(min=1e-12)
    n_ok = b.shape[1] if allowed is None else int(allowed.sum())
    kk = max(0, min(k, n_ok - (1 if exclude is not None else 0)))
    ids, vals = [], []
    for s in range(0, a.shape[1], chunk):
        cos = a[:, s : s + chunk].T @ b  # [chunk, G]
        if allowed is not None:
            cos[:, ~allowed.to(cos.device)] = -3.0
        if exclude is not None:
            r = torch.arange(cos.shape[0], device=cos.device)
            cos[r, exclude[s : s + chunk].to(cos.device)] = -2.0
        v, i = cos.topk(kk, dim=1)
        ids.append(i.cpu())
        vals.append(v.cpu())
    return torch.cat(ids), torch.cat(vals)


@torch.no_grad()
def correlated_features(
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    n_tokens: int,
    d_sae: int,
    features: Tensor,
    k: int = 8,
    chunk: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Per feature in `features`, the `k` other latents whose activations correlate most with its
    own over `n_tokens` tokens (Pearson r of the activations, zeros included; latents that never
    fire there are left out), from the code's nonzero entries (`rows` = token, `cols` = latent,
    `values`). Returns ([F, k] latent ids, [F, k] r); fewer than k live latents: padded with
    id -1, r nan."""
    # float32 products and correlations (3 digits are shown); means and variances in float64
    c = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values.float(), (n_tokens, d_sae), check_invariants=True
    ).coalesce()
    mean = torch.zeros(d_sae, dtype=torch.float64).index_add_(0, cols, values.double()) / n_tokens
    sq = torch.zeros(d_sae, dtype=torch.float64).index_add_(0, cols, values.double() ** 2)
    sd = (sq / n_tokens - mean**2).clamp(min=0).sqrt()
    live = sd > 0
    n_ok = int(live.sum())
    kk = min(k, max(0, n_ok - 1))
    ct = c.t().coalesce()
    chunk = max(16, min(chunk, 2**24 // max(1, n_tokens)))  # [tokens, chunk] stays <= 64 MB
    mean32, sd32 = mean.float(), sd.float()
    slot_of = torch.full((d_sae,), -1, dtype=torch.long)
    ids_out, r_out = [], []
    for s in range(0, features.numel(), chunk):
        f = features[s : s + chunk]
        slot_of[f] = torch.arange(f.numel())
        slot = slot_of[cols]
        sel = slot >= 0
        slot_of[f] = -1
        dense = torch.zeros(n_tokens, f.numel())
        dense.index_put_((rows[sel], slot[sel]), values[sel].float(), accumulate=True)
        gram = torch.sparse.mm(ct, dense).T  # [chunk, d_sae]: sum_t c_f(t) c_j(t)
        r = gram.div_(n_tokens).sub_(mean32[f][:, None] * mean32[None, :])
        r.div_((sd32[f][:, None] * sd32[None, :]).clamp_(min=1e-30))
        r[:, ~live] = -2.0
        r[torch.arange(f.numel()), f] = -2.0
        v, i = r.topk(kk, dim=1)
        dead_row = ~live[f]
        v[dead_row], i[dead_row] = float("nan"), -1
        ids_out.append(i)
        r_out.append(v)
    pad = k - kk
    ids, rs = torch.cat(ids_out), torch.cat(r_out)
    if pad:
        ids = torch.cat([ids, torch.full((ids.shape[0], pad), -1, dtype=ids.dtype)], 1)
        rs = torch.cat([rs, torch.full((rs.shape[0], pad), float("nan"))], 1)
    return ids, rs


@torch.no_grad()
def ablation_kl(
    model: SAETransformer, position: str, tokens: Tensor, features: Sequence[int]
) -> tuple[list[float | None], int]:
    """Per feature (indices into the SAE), the mean over the tokens of `tokens` [B, T] where it
    fires of KL(spliced || spliced with that feature's c_f * d_f removed from the SAE output), in
    nats; None where it does not fire there. Only this SAE is spliced in. Returns (values, the
    number of tokens used). One forward pass per feature: meant for a few dozen features."""
    sae = model.sae(position)
    site = model.sites[position]
    tokens = tokens.to(sae.device)
    _, cache = model.forward_raw(
        tokens, run_entire_model=False, cache_positions=[site.input_hook], cache_sae_positions=False
    )
    x = cache[site.input_hook]
    c = sae.encode(x)
    out = sae.add_skip(sae.decode(c), x)  # (a skip transcoder's skip path stays in)

    def logprobs(act: Tensor) -> Tensor:
        def put(a: Tensor, hook: Any) -> Tensor:
            return act.to(a.dtype)

        with model.lm.hooks([(site.output_hook, put)]):
            logits = model.lm.run(tokens)
        assert logits is not None
        return torch.log_softmax(logits.float(), dim=-1)

    logp = logprobs(out)
    p = logp.exp()
    dirs = sae.dict_elements
    values: list[float | None] = []
    for f in features:
        cf = c[..., f]
        fires = cf > 0
        if not bool(fires.any()):
            values.append(None)
            continue
        logq = logprobs(out - cf[..., None] * dirs[:, f])
        kl = (p * (logp - logq)).sum(-1)
        values.append(float(kl[fires].mean()))
    return values, tokens.numel()


# --- token text ---------------------------------------------------------------------------------
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2-style byte-level BPE writes each byte as one printable character: the printable
    Latin-1 bytes as themselves and the other 68 bytes as code points 256, 257, ... in byte
    order. Inverse map: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_OF = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_text(raw: bytes) -> str:
    """UTF-8 text of `raw`, each byte that is not part of a valid character shown as ⟨0xNN⟩."""
    text = raw.decode("utf-8", errors="surrogateescape")
    return "".join(
        f"⟨0x{ord(ch) - 0xDC00:02X}⟩" if 0xDC80 <= ord(ch) <= 0xDCFF else ch for ch in text
    )


def token_text(tokenizer: Any, token_id: int) -> str:
    """Readable text of one token: its decoding, or, where that has a replacement character
    (a token holding part of a multi-byte character), its bytes with the undecodable ones shown
    as ⟨0xNN⟩ (byte-level BPE and SentencePiece byte-fallback tokens)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:
            return _bytes_text(bytes([int(m.group(1), 16)]))
        if piece and all(ch in _BYTE_OF for ch in piece):
            return _bytes_text(bytes(_BYTE_OF[ch] for ch in piece))
    return text.replace("\ufffd", "⟨?⟩")


def _token_strings(ids: set[int], tokenizer: Any) -> dict[int, str]:
    if tokenizer is None:
        return {i: f"<{i}>" for i in ids}
    return {i: token_text(tokenizer, i) for i in sorted(ids)}


def readable(text: str) -> str:
    """Newlines and tabs as ⏎ and ⇥, other control bytes as ⟨0xNN⟩ and invisible format or
    unassigned characters as ⟨U+NNNN⟩ (so no token renders as nothing or as an empty box)."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("⏎")
        elif ch == "\t":
            out.append("⇥")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs", "Cn"):
            out.append(f"⟨0x{ord(ch):02X}⟩" if ord(ch) < 0x100 else f"⟨U+{ord(ch):04X}⟩")
        else:
            out.append(ch)
    return "".join(out)


# --- the folder browser (index + lazily loaded pages) ----------------------------------------
# The page's script and style live in e2e_sae/assets/browser/ (inlined into index.html).
_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "browser"

_APP_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>feature browser</title><style>{css}</style></head>
<body><header><div id="top"><h1 id="title">feature browser</h1><span id="summary"></span>
<details id="about"><summary>about these numbers</summary><ul id="meta"></ul></details></div>
<div id="bar"><input id="q" placeholder="search: #id, or text (tokens, contexts)">
sort <select id="sort"></select> <button id="dir"></button> <span id="count"></span></div></header>
<main><div id="left"><table><thead><tr id="head"></tr></thead><tbody id="rows"></tbody></table>
<button id="more">show more</button></div><div id="detail"></div></main>
<noscript>This page needs JavaScript (it loads its data from data/*.js).</noscript>
<script>{js}</script>
<script src="data/index.js" charset="utf-8"></script>
</body></html>
"""


def js_call(fn: str, *args: Any) -> str:
    """`fn(arg, ...)` with JSON arguments, safe inside a <script> element or a .js file: no
    `</` (cannot close the element), no raw U+2028/U+2029."""
    body = ", ".join(json.dumps(a, ensure_ascii=False, separators=(",", ":")) for a in args)
    body = body.replace("</", "<\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f"{fn}({body});\n"


def _r3(x: float) -> float:
    return float(f"{x:.3g}")


def quantile_rows(
    hist: Tensor, available: Tensor, qs: Sequence[float] = QUANTILES
) -> list[list[tuple[float, int, int]]]:
    """Per feature (row of hist [F, n_bins]), one (quantile, bin, sample slot) per quantile: the
    bin holding the q-quantile of its nonzero activations and which of the bin's kept examples
    to show (`available` [F, n_bins]: how many it kept), a different one for each quantile in
    the same bin while there are enough. Empty for a feature with no nonzero activation."""
    total = hist.sum(1, keepdim=True)
    cum = hist.cumsum(1)
    q = torch.tensor(qs, dtype=torch.float64)
    # bin of quantile q: the first bin whose cumulative count reaches q * total
    b = torch.searchsorted(cum.double(), (q[None, :] * total.double()).contiguous())
    out: list[list[tuple[float, int, int]]] = []
    for row, tot, avail in zip(b.tolist(), total[:, 0].tolist(), available.tolist(), strict=True):
        if tot == 0:
            out.append([])
            continue
        seen: dict[int, int] = {}
        rows = []
        for qq, bin_ in zip(qs, row, strict=True):
            n = seen.get(bin_, 0)
            seen[bin_] = n + 1
            rows.append((qq, bin_, n % max(1, avail[bin_])))
        out.append(rows)
    return out


def check_out_folder(out: Path) -> None:
    """Refuse an `out` that is a .html name (the browser is a folder), or that exists and is
    neither empty nor an earlier browser folder."""
    if out.suffix.lower() in (".html", ".htm"):
        raise UserError(
            f"--out: the browser is a folder (index.html + data/); give a folder name, e.g. "
            f"--out {out.with_suffix('')}, and open {out.with_suffix('')}/index.html"
        )
    if out.exists() and not ((out / "index.html").is_file() and (out / "data").is_dir()):
        if out.is_file() or any(out.iterdir()):
            raise UserError(f"--out: '{out}' exists and is not a browser folder")


def matryoshka_prefix(sae: Any, n_features: int) -> list[int] | None:
    """Per latent of a Matryoshka SAE, the width of the smallest prefix it belongs to (None for
    other architectures)."""
    widths = getattr(sae, "widths", None)
    if not widths:
        return None
    return [next(w for w in widths if j < w) for j in range(n_features)]


@dataclass
class Neighbours:
    """Per listed feature: its nearest features by decoder cosine in this SAE (`near`), in the
    compared SAE (`far`), and by activation correlation (`corr`); each ([F, k] ids, [F, k] values),
    ids -1 where there are fewer than k."""

    near: tuple[Tensor, Tensor] | None = None
    far: tuple[Tensor, Tensor] | None = None
    corr: tuple[Tensor, Tensor] | None = None


def _pairs(ids: Tensor, vals: Tensor, j: int) -> list[list[float]]:
    return [
        [int(i), _r3(float(v))]
        for i, v in zip(ids[j].tolist(), vals[j].tolist(), strict=True)
        if i >= 0
    ]


def write_folder(
    data: FeatureData,
    token_text_fn: Callable[[set[int]], dict[int, str]],
    out: str | Path,
    *,
    title: str = "",
    effects: LogitEffects | None = None,
    neighbours: Neighbours | None = None,
    other_label: str = "",
    other_href: str = "",
    page_size: int = 256,
    notes: Sequence[str] = (),
    summary: str = "",
    ablation: Sequence[float | None] | None = None,
    autointerp: dict[int, dict[str, Any]] | None = None,
    prefix: Sequence[int] | None = None,
) -> Path:
    """Write the browser folder `out`: index.html, data/index.js (one row per live feature: the
    sortable columns and the text search looks in) and data/page_<n>.js (features
    n*page_size .. of the requested ones, with their snippets, histograms, tokens and
    neighbours), loaded when a feature on that page is opened. `other_href`: the compared run's
    browser folder, relative to `out` (its features are linked there).

    Written to a sibling temporary folder and renamed into place; an existing `out` is replaced
    only when it is an earlier browser folder (index.html + data/)."""
    out = Path(out)
    check_out_folder(out)
    nb_ = neighbours or Neighbours()
    k, w, n_feat = data.windows.shape
    assert data.hist is not None and data.sample_seqs is not None and data.sums is not None
    assert data.sample_starts is not None and data.sample_windows is not None
    assert data.sample_values is not None and data.sample_positions is not None
    nb = data.hist.shape[1]
    m = data.sample_seqs.numel() // (n_feat * nb)
    ids = data.indices.tolist()
    freq = data.frequency.tolist()
    counts = data.counts.tolist()
    top_vals = data.top_values.T.tolist()  # [F, k]
    seq_rows = data.sequences.clamp(min=0)
    offs = data.starts[:, None, :] + torch.arange(w)[None, :, None]
    snip_ids = data.tokens[seq_rows[:, None, :].expand(-1, w, -1), offs].permute(2, 0, 1).tolist()
    snip_acts = data.windows.permute(2, 0, 1).tolist()  # [F, k, W]
    mean_act = data.mean_activation.tolist()
    available = (data.sample_seqs.view(n_feat, nb, m) >= 0).sum(2)
    qrows = quantile_rows(data.hist, available)
    s_seq = data.sample_seqs.tolist()
    s_start = data.sample_starts.tolist()
    s_pos = data.sample_positions.tolist()
    s_val = data.sample_values.tolist()
    hist = data.hist.tolist()
    n_top = [sum(1 for v in top_vals[j] if v > 0) for j in range(n_feat)]
    top_tok = [
        snip_ids[j][0][int(torch.tensor(snip_acts[j][0]).argmax())] if n_top[j] else -1
        for j in range(n_feat)
    ]
    effect = None
    if effects is not None:
        effect = [_r3(a * float(r)) for a, r in zip(mean_act, effects.rms.tolist(), strict=True)]
        up_ids, up_v = effects.top_ids.tolist(), effects.top_logits.tolist()
        dn_ids, dn_v = effects.bottom_ids.tolist(), effects.bottom_logits.tolist()
        lhist, lrange = effects.hist.tolist(), effects.hist_range.tolist()
    index_ids = {t for t in top_tok if t >= 0}
    for j in range(n_feat):  # the top snippets' text, for search
        for r in range(min(3, n_top[j])):
            index_ids.update(snip_ids[j][r])
    if effects is not None:
        index_ids.update(t for row in up_ids for t in row[:3])
    index_text = {t: readable(x) for t, x in token_text_fn(index_ids).items()}

    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "data").mkdir(parents=True)
    n_pages = max(1, math.ceil(n_feat / page_size))
    for n in range(n_pages):
        feats: list[dict[str, Any]] = []
        used: set[int] = set()
        for j in range(n * page_size, min(n_feat, (n + 1) * page_size)):
            top = []
            for r in range(n_top[j]):
                # mark the token the value belongs to (a skipped position may be larger)
                mark = snip_acts[j][r].index(top_vals[j][r])
                acts = [_r3(a) for a in snip_acts[j][r]]
                top.append([_r3(top_vals[j][r]), snip_ids[j][r], acts, mark])
                used.update(snip_ids[j][r])
            qex = []
            for q, b, slot in qrows[j]:
                cell = (j * nb + b) * m + slot
                if s_seq[cell] < 0:
                    continue
                toks = data.tokens[s_seq[cell], s_start[cell] : s_start[cell] + w].tolist()
                acts = [_r3(a) for a in data.sample_windows[cell].tolist()]
                lo = "0" if b == 0 else f"{HIST_EDGES[b - 1]:.3g}"
                hi = f"{HIST_EDGES[b]:.3g}" if b < len(HIST_EDGES) else "∞"
                mark = s_pos[cell] - s_start[cell]
                qex.append([f"{q:.0%}", f"{lo}–{hi}", _r3(s_val[cell]), toks, acts, mark])
                used.update(toks)
            f: dict[str, Any] = {"hist": hist[j], "top": top, "q": qex}
            if autointerp and ids[j] in autointerp:
                a = autointerp[ids[j]]
                f["expl"] = [a["explanation"], a["simulation"], a["detection_auc"]]
            if effects is not None:
                f["up"] = [[t, _r3(v)] for t, v in zip(up_ids[j], up_v[j], strict=True)]
                f["down"] = [[t, _r3(v)] for t, v in zip(dn_ids[j], dn_v[j], strict=True)]
                f["lhist"] = lhist[j]
                f["lrange"] = [_r3(x) for x in lrange[j]]
                used.update(up_ids[j])
                used.update(dn_ids[j])
            for key, pair in (("near", nb_.near), ("far", nb_.far), ("corr", nb_.corr)):
                if pair is not None:
                    f[key] = _pairs(*pair, j)
            feats.append(f)
        texts = {str(t): readable(x) for t, x in token_text_fn(used).items()}
        (tmp / "data" / f"page_{n}.js").write_text(
            js_call("registerPage", n, {"features": feats, "tokens": texts}), encoding="utf-8"
        )
    columns = [
        {"key": "ids", "label": "feature", "sort": True},
        {
            "key": "freq",
            "label": "density",
            "sort": True,
            "pct": True,
            "title": "% of the scanned tokens on which the feature fires",
        },
        {"key": "max", "label": "max act", "sort": True, "title": "largest activation seen"},
        {
            "key": "mean",
            "label": "mean act",
            "sort": True,
            "title": "mean activation over the tokens where it fires",
        },
    ]
    if prefix is not None:
        columns.append(
            {
                "key": "prefix",
                "label": "prefix",
                "sort": True,
                "title": "the smallest Matryoshka prefix (first N latents) holding the feature",
            }
        )
    if effect is not None:
        columns.append(
            {
                "key": "effect",
                "label": "logit effect",
                "sort": True,
                "title": "mean act x RMS over the vocabulary of the direct logit change "
                "per unit activation (a proxy for the effect of ablating it)",
            }
        )
    if ablation is not None:
        columns.append(
            {
                "key": "ablation",
                "label": "ablation KL",
                "sort": True,
                "title": "mean KL(spliced || spliced without this feature) over the "
                "tokens where it fires; only for the most frequent features",
            }
        )
    if autointerp:
        columns.append(
            {
                "key": "autointerp",
                "label": "autointerp",
                "sort": True,
                "title": "simulation score (Pearson r) of its autointerp explanation; "
                "only for the features `e2e-sae autointerp` explained",
            }
        )
    columns.append({"key": "top_token", "label": "top token"})
    if effects is not None:
        columns.append({"key": "promoted", "label": "promotes"})
    alive = [j for j in range(n_feat) if counts[j] > 0]
    index: dict[str, Any] = {
        "title": title,
        "summary": summary,
        "notes": list(notes),
        "page_size": page_size,
        "columns": columns,
        "hist_edges": [_r3(e) for e in HIST_EDGES],
        "hist_bins_per_decade": 4,
        "quantiles": [f"{q:.0%}" for q in QUANTILES],
        "other_label": other_label,
        "other_href": other_href,
        "n_tokens": data.n_tokens,
        "dead": [ids[j] for j in range(n_feat) if counts[j] == 0],
        # The index lists live features only; `slot` is each one's position in the pages,
        # which hold every requested feature (page n: positions n*page_size ...).
        "slot": alive,
        "ids": [ids[j] for j in alive],
        "freq": [_r3(freq[j]) for j in alive],
        "count": [counts[j] for j in alive],
        "max": [_r3(top_vals[j][0]) for j in alive],
        "mean": [_r3(mean_act[j]) for j in alive],
        "top_token": [index_text.get(top_tok[j], "") for j in alive],
        "ctx": [
            " … ".join(
                "".join(index_text[t] for t in snip_ids[j][r]) for r in range(min(3, n_top[j]))
            )[:240]
            for j in alive
        ],
    }
    if prefix is not None:
        index["prefix"] = [prefix[ids[j]] for j in alive]
    if ablation is not None:
        index["ablation"] = [ablation[j] for j in alive]
    if effect is not None:
        index["effect"] = [effect[j] for j in alive]
        index["promoted"] = [[index_text[t] for t in up_ids[j][:3]] for j in alive]
    if autointerp:
        sims = [(autointerp.get(ids[j]) or {}).get("simulation") for j in alive]
        index["autointerp"] = [None if v is None else _r3(v) for v in sims]
    (tmp / "data" / "index.js").write_text(js_call("registerIndex", index), encoding="utf-8")
    css = (_ASSETS / "app.css").read_text(encoding="utf-8")
    js = (_ASSETS / "app.js").read_text(encoding="utf-8")
    page = _APP_HTML.replace("{css}", css).replace("{js}", js)
    (tmp / "index.html").write_text(page, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
    return out / "index.html"


def parse_features(spec: str | None) -> list[int] | None:
    """`--features`: None (all), `K` (the first K features) or a comma list `3,17,40`."""
    if spec is None:
        return None
    try:
        if "," in spec:
            return [int(s) for s in spec.split(",") if s.strip()]
        return list(range(int(spec)))
    except ValueError:
        raise UserError(
            f"--features: expected K or a comma list of indices, got '{spec}'"
        ) from None


def write_browser(
    run: str | Path | SAETransformer,
    out: str | Path,
    *,
    position: str | None = None,
    n_tokens: int | None = None,
    features: Sequence[int] | None = None,
    top_k: int = 8,
    batch_size: int | None = None,
    data: str | None = None,
    split: str | None = None,
    device: str | None = None,
    progress: bool = False,
    skip_first: bool | None = None,
    compare: str | Path | SAETransformer | None = None,
    compare_browser: str | Path | None = None,
    page_size: int = 256,
    ablate: int = 64,
    ablate_tokens: int = 512,
) -> Path:
    """Scan about `n_tokens` eval tokens of a run (directory or loaded model) and write the
    browser folder `out` (index.html + data/; a name ending in .html is refused). Returns
    out/index.html.

    `n_tokens` defaults to what `e2e-sae eval` uses (the run's `eval_n_samples`, else 50, windows),
    and the windows come in the same order, so both count the same dead latents. `skip_first`:
    see `collect_feature_data` (None: decide from the data). `compare`: a second run whose SAE at
    the same position supplies each feature's nearest decoder directions across runs, linked to
    `compare_browser` (that run's browser folder; default: a folder named after the run next to
    `out`). `ablate`: for this many of the most frequent features, the true ablation effect
    (`ablation_kl`) over the first `ablate_tokens` scanned tokens (whole sequences)."""

    out = Path(out)
    if page_size < 1:
        raise UserError(f"--page-size: must be >= 1, got {page_size}")
    if ablate < 0:
        raise UserError(f"--ablate: must be >= 0, got {ablate}")
    if top_k < 1:
        raise UserError(f"--top-k: must be >= 1, got {top_k}")
    check_count(batch_size, "--batch-size")
    check_count(n_tokens, "--n-tokens")
    check_out_folder(out)  # before the scan
    model, config = open_run(run, device, "browse")
    check_finite_weights(model.saes, run if not isinstance(run, SAETransformer) else "model")
    if position is None:
        if len(model.sae_positions) != 1:
            raise UserError(f"--sae: the run has several SAEs ({', '.join(model.sae_positions)})")
        position = model.sae_positions[0]
    other_sae = None
    other_label = other_href = ""
    if compare is not None:
        other = (
            compare
            if isinstance(compare, SAETransformer)
            else SAETransformer.from_local_path(compare, device="cpu")
        )
        if position not in other.sites:
            raise UserError(f"--compare: that run has no SAE at '{position}'")
        other_sae = other.sae(position)
        if other_sae.input_size != model.sae(position).input_size:
            raise UserError(
                f"--compare: its SAE reads {other_sae.input_size} dims, not "
                f"{model.sae(position).input_size}"
            )
        other_label = "other run" if isinstance(compare, SAETransformer) else Path(compare).name
        target = Path(compare_browser) if compare_browser else out.parent / (other_label or "other")
        other_href = os.path.relpath(target.absolute(), out.absolute()).replace(os.sep, "/")
    ds = (
        eval_dataset(config, data, split)
        if (config.eval_data or data or split)
        else config.train_data
    )
    bs = batch_size or config.batch_size
    # the windows `e2e-sae eval` scans, in its order, so both count the same dead latents
    asked = eval_request(config, n_tokens)
    n_windows = eval_windows(config, n_tokens, ds.n_ctx)
    batches, n_batches, _ = eval_window_batches(ds, bs, n_windows, config.seed, asked)
    model.eval()
    tokenizer = _tokenizer_for(model, ds.tokenizer_name)
    special = list(getattr(tokenizer, "all_special_ids", None) or [])
    bos = getattr(tokenizer, "bos_token_id", None)
    fd = collect_feature_data(
        model,
        position,
        batches,
        n_batches,
        features,
        top_k,
        progress=progress,
        skip_first=skip_first,
        special_ids=special,
        bos_id=bos,
        compare_sae=other_sae,
    )
    name = Path(run).name if not isinstance(run, SAETransformer) else "SAE"
    title = f"{name}: {position}"
    texts: Callable[[set[int]], dict[int, str]] = lambda ids: _token_strings(ids, tokenizer)
    sae = model.sae(position)
    effects = logit_effects(model, position, fd.indices)
    dirs = sae.dict_elements.detach().cpu()
    assert fd.all_counts is not None
    live = fd.all_counts > 0
    nbrs = Neighbours(near=nearest_features(dirs[:, fd.indices], dirs, 8, fd.indices, allowed=live))
    if other_sae is not None:
        assert fd.other_counts is not None
        other_dirs = other_sae.dict_elements.detach().cpu()
        nbrs.far = nearest_features(dirs[:, fd.indices], other_dirs, 8, allowed=fd.other_counts > 0)
    assert fd.code_rows is not None and fd.code_cols is not None and fd.code_values is not None
    nbrs.corr = correlated_features(
        fd.code_rows,
        fd.code_cols,
        fd.code_values,
        fd.code_tokens,
        sae.n_dict_components,
        fd.indices,
    )
    n_dead = int((fd.counts == 0).sum())
    ablation: list[float | None] = [None] * len(fd.indices)
    site = model.sites[position]
    # a CLT layer's features write to later layers too, where the other layers' features write:
    # ablating one feature needs the whole CLT spliced in, which `ablation_kl` does not do
    n_ablate = 0 if site.later_outputs else min(ablate, len(fd.indices) - n_dead)
    n_abl_tok = 0
    if n_ablate > 0:
        order = fd.counts.argsort(descending=True, stable=True)[:n_ablate].tolist()
        n_seq = max(1, math.ceil(ablate_tokens / fd.tokens.shape[1]))
        vals, n_abl_tok = ablation_kl(
            model, position, fd.tokens[:n_seq], fd.indices[order].tolist()
        )
        for j, v in zip(order, vals, strict=True):
            ablation[j] = None if v is None else _r3(v)
    prefix = matryoshka_prefix(sae, sae.n_dict_components)
    n_live = len(fd.indices) - n_dead
    summary = (
        f"{n_live:,} of {len(fd.indices):,} features fired on the {fd.n_tokens:,} tokens scanned "
        f"({n_dead:,} dead, not listed)"
    )
    notes = [
        f"SAE at {position}; {fd.n_tokens:,} tokens scanned ({ds.dataset_name}, split "
        f"{ds.split}); {len(fd.indices):,} features, {n_dead:,} dead (fired on none of them).",
        f"Density: % of the scanned tokens where the feature fires. Skip first position and "
        f"special tokens in examples and histograms: {fd.skip_reason}; {fd.n_example_tokens:,} "
        "example tokens. Density and dead counts use every token.",
        "Quantile rows: a random token from the histogram bin holding that quantile of the "
        "feature's nonzero activations.",
        "Logit effect (proxy, not an ablation): mean activation when firing × RMS over the "
        "vocabulary of the feature's direct logit change per unit activation (decoder direction "
        "through the final layer norm, linearised, and the unembedding; later layers skipped). "
        "Promoted / suppressed tokens: the largest / smallest entries of that direct logit "
        "change, with their values; its histogram is over the whole vocabulary.",
        "Nearest features: cosine of the decoder directions, live features only. Correlated "
        f"features: Pearson r of the activations over the first {fd.code_tokens:,} scanned "
        "tokens.",
    ]
    if n_ablate > 0:
        notes.append(
            f"Ablation KL (nats): for the {n_ablate} most frequent features only, the mean over "
            f"the first {n_abl_tok:,} scanned tokens where the feature fires of KL(SAE spliced "
            "in || SAE spliced in with this feature's contribution removed); only this SAE is "
            "spliced."
        )
    else:
        notes.append("Ablation KL: not computed (--ablate 0).")
    if other_sae is not None:
        notes.append(
            f"Other run ({other_label}): its live features nearest by decoder cosine, linked to "
            f"its browser at {other_href}/ (write it with `e2e-sae browse {other_label} --out "
            "...`)."
        )
    if prefix is not None:
        widths = ", ".join(str(w) for w in getattr(sae, "widths", []))
        notes.append(f"Matryoshka prefixes (first N latents): {widths}.")
    if effects is None:
        notes[3] = "Logit effect: not available (the SAE does not write to the residual size)."
    interp = None if isinstance(run, SAETransformer) else explanations_for_run(run, position)
    if interp:
        notes.append(
            f"Autointerp: {len(interp)} features explained (`e2e-sae autointerp`, "
            "<run>/autointerp/); the column is the explanation's simulation score."
        )
    if site.is_transcoder:
        kind = "cross-layer transcoder layer" if site.later_outputs else "transcoder"
        notes.append(
            f"A {kind}: its features read {site.input_hook} and write to "
            f"{', '.join(site.targets)}"
            + (
                " (decoder directions, logit effects and nearest features use the sum of its "
                "decoders over those layers; ablation KL is not computed for a CLT)."
                if site.later_outputs
                else "."
            ),
        )
    return write_folder(
        fd,
        texts,
        out,
        title=title,
        effects=effects,
        neighbours=nbrs,
        other_label=other_label,
        other_href=other_href,
        page_size=page_size,
        notes=notes,
        summary=summary,
        ablation=ablation if n_ablate > 0 else None,
        autointerp=interp,
        prefix=prefix,
    )


def _tokenizer_for(model: SAETransformer, name: str | None) -> Any:
    """The data's tokenizer (offline resolution), else the model's own, else None (show ids)."""
    if name:
        try:
            return load_tokenizer(name)
        except UserError:
            pass
    return model.lm.tokenizer
