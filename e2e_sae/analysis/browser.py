"""A static, self-contained HTML feature browser for one SAE (opens from disk; inline CSS and a few
lines of inline JS for the search box; no server, nothing fetched).

Per feature (dictionary element): its firing frequency over the scanned tokens, its top-activating
snippets with every token shaded by the feature's activation, and the tokens its decoder direction
promotes most through the unembedding.

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

import html
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from e2e_sae.errors import UserError
from e2e_sae.splice import SAETransformer


@dataclass
class FeatureData:
    """Everything the page shows, for features `indices` of the SAE at `position`.

    Top-k arrays are [k, n_features] (entry [j, f]: the j-th strongest sequence for feature f);
    `windows` is [k, window, n_features]; `sequences` indexes `tokens` [n_seqs, n_ctx]."""

    position: str
    indices: Tensor
    n_tokens: int
    counts: Tensor
    top_values: Tensor
    sequences: Tensor
    starts: Tensor
    windows: Tensor
    tokens: Tensor
    promoted: Tensor | None = None
    promoted_logits: Tensor | None = None

    @property
    def frequency(self) -> Tensor:
        return self.counts.double() / self.n_tokens


def top_windows_update(
    c: Tensor, seq_offset: int, state: dict[str, Tensor], k: int, before: int, after: int
) -> None:
    """Merge one batch of codes c [B, T, F] into the running top-k `state` (in place).

    Per sequence and feature the max activation is a candidate; its window of activations
    (`before` tokens before it, `after` after, shifted to stay inside the sequence) comes along."""
    b, t, f = c.shape
    w = min(before + after + 1, t)
    values, argmax = c.max(dim=1)  # [B, F]
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
) -> FeatureData:
    """Scan `n_batches` batches of tokens and keep, per feature, the top-k snippets and counts."""
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
    counts = torch.zeros(idx.numel(), dtype=torch.long, device=device)
    kept: list[Tensor] = []
    n_seq = 0
    bar = tqdm(batches, total=n_batches, desc="scan", disable=not progress, leave=False)
    for _, tokens in zip(range(n_batches), bar, strict=False):
        tokens = tokens.to(device)
        _, cache = model.forward_raw(
            tokens, run_entire_model=False, cache_positions=[hook], cache_sae_positions=False
        )
        c = sae.encode(cache[hook])
        if features is not None:
            c = c.index_select(-1, dev_idx)
        counts += (c != 0).sum((0, 1))
        top_windows_update(c, n_seq, state, top_k, before, after)
        kept.append(tokens.cpu())
        n_seq += tokens.shape[0]
    if not kept:
        raise UserError("browse: the dataset gave no batches")
    all_tokens = torch.cat(kept)
    data = FeatureData(
        position, idx, all_tokens.numel(), counts.cpu(), state["values"].cpu(),
        state["sequences"].cpu(), state["starts"].cpu(), state["windows"].cpu(), all_tokens,
    )  # fmt: skip
    promoted = promoted_tokens(model, position, idx)
    if promoted is not None:
        data.promoted, data.promoted_logits = promoted
    return data


@torch.no_grad()
def promoted_tokens(
    model: SAETransformer, position: str, features: Tensor, n: int = 10, chunk: int = 512
) -> tuple[Tensor, Tensor] | None:
    """Per feature, the `n` tokens whose logits its dictionary element raises most (see the module
    docstring for the approximation): ([F, n] token ids, [F, n] logit contributions), or None when
    the SAE does not write to a d_model-sized activation."""
    tl = model.tlens_model
    dirs = model.sae(position).dict_elements[:, features.to(model.sae(position).device)]
    w_u = tl.W_U
    if dirs.shape[0] != w_u.shape[0]:
        return None
    dirs = dirs.float()
    if tl.cfg.normalization_type in ("LN", "LNPre"):
        dirs = dirs - dirs.mean(0, keepdim=True)
    w_ln = getattr(tl.ln_final, "w", None)
    if isinstance(w_ln, Tensor):
        dirs = dirs * w_ln[:, None]
    ids, vals = [], []
    for s in range(0, dirs.shape[1], chunk):
        logits = dirs[:, s : s + chunk].T @ w_u.float()  # [chunk, d_vocab]
        v, i = logits.topk(min(n, logits.shape[1]), dim=1)
        ids.append(i.cpu())
        vals.append(v.cpu())
    return torch.cat(ids), torch.cat(vals)


# --- rendering ------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:70em}
h1{font-size:1.3em} .meta{color:#666;font-size:.85em;font-weight:normal}
section{border-top:1px solid #ddd;padding:.4em 0} h3{margin:.2em 0;font-size:1em}
.ex{font-family:ui-monospace,monospace;font-size:.82em;white-space:pre;overflow-x:auto;
margin:1px 0;padding:1px 3px;background:#fafafa} .ex b{color:#555;font-weight:normal;
display:inline-block;min-width:4em} .promo code{background:#e8f0fe;margin-right:.3em;
padding:0 .2em;white-space:pre} #q{width:20em}
""" + "".join(f".s{i}{{background:rgba(255,90,0,{i / 9:.2f})}}" for i in range(1, 10))

_JS = """
function filt(q){q=q.toLowerCase();for(const s of document.querySelectorAll('section'))
s.style.display=(!q||s.dataset.k.includes(q)||s.textContent.toLowerCase().includes(q))?'':'none'}
"""


def _token_strings(ids: set[int], tokenizer: Any) -> dict[int, str]:
    if tokenizer is None:
        return {i: f"<{i}>" for i in ids}
    order = sorted(ids)
    texts = tokenizer.batch_decode([[i] for i in order])
    return {i: t for i, t in zip(order, texts, strict=True)}


def _visible(text: str) -> str:
    return html.escape(text.replace("\n", "⏎").replace("\t", "⇥"), quote=False)


def render_html(
    data: FeatureData, token_text: Callable[[set[int]], dict[int, str]], title: str = ""
) -> str:
    """The page as a string. `token_text` maps a set of token ids to display strings."""
    k, w, _ = data.windows.shape
    ids: set[int] = set()
    seq_rows = data.sequences.clamp(min=0)
    offs = data.starts[:, None, :] + torch.arange(w)[None, :, None]  # [k, W, F]
    snippet_ids = data.tokens[seq_rows[:, None, :].expand(-1, w, -1), offs]  # [k, W, F]
    ids.update(snippet_ids.unique().tolist())
    if data.promoted is not None:
        ids.update(data.promoted.unique().tolist())
    text = token_text(ids)
    freq = data.frequency.tolist()
    vals = data.top_values
    # Shade relative to each feature's strongest activation: 10 levels (0 = not firing).
    peak = vals[0].clamp(min=1e-12)
    levels = (data.windows / peak[None, None, :] * 9).round().clamp(0, 9).to(torch.int8)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_JS}</script>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        f"<p class=meta>SAE at <b>{html.escape(data.position)}</b>; "
        f"{data.n_tokens} tokens scanned; "
        f"{len(freq)} features shown; {sum(1 for f in freq if f == 0)} dead (fired on none of "
        f"the {data.n_tokens} tokens scanned). "
        "Snippets: the feature's top-activating sequences, tokens shaded by its activation "
        "(hover for the value). Promoted tokens: the dictionary element times the unembedding "
        "(final layer norm linearised, later layers skipped).</p>",
        "<p><input id=q placeholder='filter: feature id or token' oninput='filt(this.value)'></p>",
    ]
    win_levels = levels.permute(2, 0, 1).tolist()  # [F, k, W]
    win_vals = data.windows.permute(2, 0, 1).tolist()
    win_ids = snippet_ids.permute(2, 0, 1).tolist()
    top_vals = vals.T.tolist()  # [F, k]
    promoted = data.promoted.tolist() if data.promoted is not None else None
    dead: list[str] = []
    for j, fi in enumerate(data.indices.tolist()):
        if freq[j] == 0:
            dead.append(str(fi))
            continue
        out = [
            f"<section id=f{fi} data-k='#{fi} '><h3>feature {fi} <span class=meta>"
            f"frequency {freq[j]:.3g} · fires on {int(data.counts[j])} tokens · "
            f"max activation {top_vals[j][0]:.3g}</span></h3>"
        ]
        if promoted is not None:
            toks = "".join(f"<code>{_visible(text[t])}</code>" for t in promoted[j])
            out.append(f"<div class=promo>promotes: {toks}</div>")
        for r in range(k):
            if top_vals[j][r] <= 0:
                break
            spans = []
            for t, lv, v in zip(win_ids[j][r], win_levels[j][r], win_vals[j][r], strict=True):
                tok = _visible(text[t])
                spans.append(f"<span class=s{lv} title='{v:.3g}'>{tok}</span>" if v else tok)
            out.append(f"<div class=ex><b>{top_vals[j][r]:.3g}</b> {''.join(spans)}</div>")
        out.append("</section>")
        parts.append("".join(out))
    if dead:
        parts.append(f"<p class=meta>dead (fired on none of the {data.n_tokens} tokens scanned): "
                     f"{', '.join(dead)}</p>")  # fmt: skip
    parts.append("</body></html>")
    return "\n".join(parts)


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
) -> Path:
    """Scan about `n_tokens` eval tokens of a run (directory or loaded model) and write the page.

    `n_tokens` defaults to what `e2e-sae eval` uses (the run's `eval_n_samples`, else 50, windows),
    and the batches come in the same order, so both count the same dead latents."""
    from e2e_sae.checkpoint import load_run
    from e2e_sae.config import Config
    from e2e_sae.data import create_data_loader
    from e2e_sae.evaluate import eval_dataset

    model = run if isinstance(run, SAETransformer) else load_run(run, device=device)
    config: Config = model.run_config  # type: ignore[attr-defined]
    if position is None:
        if len(model.sae_positions) != 1:
            raise UserError(f"--sae: the run has several SAEs ({', '.join(model.sae_positions)})")
        position = model.sae_positions[0]
    ds = (
        eval_dataset(config, data, split)
        if (config.eval_data or data or split)
        else config.train_data
    )
    bs = batch_size or config.batch_size
    n_tokens = n_tokens or (config.eval_n_samples or 50) * ds.n_ctx  # as evaluate_run
    n_batches = max(1, math.ceil(n_tokens / (bs * ds.n_ctx)))
    batches = create_data_loader(ds, bs, config.seed + 42)
    model.eval()
    fd = collect_feature_data(
        model, position, batches, n_batches, features, top_k, progress=progress
    )
    tokenizer = _tokenizer_for(model, ds.tokenizer_name)
    name = Path(run).name if not isinstance(run, SAETransformer) else "SAE"
    page = render_html(fd, lambda ids: _token_strings(ids, tokenizer), f"{name}: {position}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _tokenizer_for(model: SAETransformer, name: str | None) -> Any:
    """The data's tokenizer (offline resolution), else the model's own, else None (show ids)."""
    if name:
        from e2e_sae.data.tokenizer import load_tokenizer

        try:
            return load_tokenizer(name)
        except UserError:
            pass
    return getattr(model.tlens_model, "tokenizer", None)
