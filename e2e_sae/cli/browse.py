"""`e2e-sae browse RUN_DIR --out DIR`: a static HTML feature browser for one SAE."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def cmd_browse(args: argparse.Namespace) -> int:
    from e2e_sae.analysis.browser import parse_features, write_browser

    t0 = time.perf_counter()
    out = write_browser(
        args.run_dir,
        args.out,
        position=args.sae,
        n_tokens=args.n_tokens,
        features=parse_features(args.features),
        top_k=args.top_k,
        batch_size=args.batch_size,
        data=args.data,
        split=args.split,
        device=args.device,
        progress=True,
        skip_first=args.skip_first,
        compare=args.compare,
        compare_browser=args.compare_browser,
        page_size=args.page_size,
        ablate=args.ablate,
    )
    files = [p for p in out.parent.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files) / 1e6
    print(f"wrote {out} ({len(files)} files, {size:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("browse", help="write a static HTML feature browser for one SAE")
    b.add_argument("run_dir", type=Path)
    b.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder to write (index.html + data/, opens from disk)",
    )
    b.add_argument("--sae", default=None, help="SAE position (needed when the run has several)")
    b.add_argument(
        "--n-tokens",
        type=int,
        default=None,
        help="tokens to scan (default: as many as `e2e-sae eval` uses, so both count "
        "the same dead latents)",
    )
    b.add_argument("--features", default=None, help="K (the first K) or a comma list of indices")
    b.add_argument("--top-k", type=int, default=8, help="snippets per feature")
    b.add_argument("--batch-size", type=int, default=None)
    b.add_argument("--data", default=None, help="dataset name or path (default: the run's eval)")
    b.add_argument("--split", default=None)
    b.add_argument(
        "--skip-first",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="leave each sequence's first position and the special tokens out of the "
        "examples and histograms (default: on when every sequence starts with BOS or "
        "the first position's mean activation norm is > 3x the others')",
    )
    b.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="a second run: list each feature's nearest decoder directions in its SAE "
        "at the same position",
    )
    b.add_argument(
        "--compare-browser",
        type=Path,
        default=None,
        help="the --compare run's browser folder, where its features are linked (default: a "
        "folder named after that run next to --out)",
    )
    b.add_argument("--page-size", type=int, default=256, help="features per lazily loaded file")
    b.add_argument(
        "--ablate",
        type=int,
        default=64,
        help="true ablation KL for this many of the most frequent features, over the "
        "first 512 scanned tokens (one forward pass each; 0: none)",
    )
    b.add_argument("--device", default=None)
    b.set_defaults(func=cmd_browse)
