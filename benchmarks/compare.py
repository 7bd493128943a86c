"""Before/after table from `bench_train.py` result files: tokens/s per step kind and variant.

    .venv/bin/python benchmarks/compare.py BEFORE.json [BEFORE2.json ...] -- AFTER.json [...]

Several files per side (runs alternated before, after, before, after on a quiet machine) are
combined by the median of each row's tokens/s; the ratio after / before is printed per row, and
rows more than 3% slower are flagged.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows(files: list[str]) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for f in files:
        for r in json.loads(Path(f).read_text())["rows"]:
            if r.get("tokens_per_s"):
                out.setdefault((r["mode"], r["variant"]), []).append(float(r["tokens_per_s"]))
    return out


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__)
        return 2
    cut = argv.index("--")
    before, after = rows(argv[:cut]), rows(argv[cut + 1 :])
    print("| step kind | variant | before tokens/s | after tokens/s | after / before |")
    print("|---|---|---|---|---|")
    for key in sorted(before.keys() & after.keys()):
        b, a = statistics.median(before[key]), statistics.median(after[key])
        flag = " (slower by > 3%)" if a < 0.97 * b else ""
        runs = f" ({len(before[key])} / {len(after[key])} runs)"
        print(f"| {key[0]} | {key[1]} | {b:.0f} | {a:.0f} | {a / b:.3f}{flag}{runs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
