"""The folder feature browser in a real headless Chromium: the page's own self-test (run when the
URL has ?test=1) sorts by every sortable column in both directions, searches by id and by token,
opens a feature (loading its data/page_<n>.js through a script tag from file://) and reports what
it finds in <pre id=selftest>, which --dump-dom hands back.

Needs Debian's `chromium` (apt-get install chromium); skipped when it is absent."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import make_config_dict

from e2e_sae.analysis.browser import write_browser
from e2e_sae.config import Config, load_config
from e2e_sae.lm.splice import SAETransformer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=5000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_browser_page_works_in_headless_chromium(token_data: Path, tmp_path: Path) -> None:
    cfg = load_config(make_config_dict(token_data, tmp_path / "runs"))
    assert isinstance(cfg, Config)
    model = SAETransformer.from_config(cfg, device="cpu")
    model.run_config = cfg  # type: ignore[attr-defined]
    with torch.no_grad():  # latent 5 never fires: a dead feature, whose URL must say so
        model.sae("blocks.1.hook_resid_pre").encoder[0].bias[5] = -1e4
    page = write_browser(model, tmp_path / "browser", n_tokens=256, page_size=8)
    assert len(list((tmp_path / "browser" / "data").glob("page_*.js"))) > 1  # really paged
    res = _chromium(tmp_path, "--dump-dom", page.as_uri() + "?test=1")
    m = re.search(r'<pre id="selftest">(.*?)</pre>', res.stdout, re.S)
    assert m is not None, f"no self-test result; stderr: {res.stderr[-2000:]}"
    r = json.loads(
        m.group(1)
        .replace("&quot;", '"')
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
    )
    assert r["errors"] == []
    assert r["sorted"] and all(r["sorted"].values()), r["sorted"]
    assert {"freq_desc", "max_desc", "mean_desc", "effect_desc", "ids_asc"} <= set(r["sorted"])
    assert r["search_id"] and r["search_token"]
    assert r["heading"] == f"feature {r['opened']}"
    assert r["histogram_bars"] > 0 and r["snippets"] > 0
    # the activation histogram has labelled axes and its y axis in % of the feature's activations
    labels = r["histogram_axis_labels"]
    assert "activation (log scale)" in labels and "% of its activations" in labels
    assert "0%" in labels and any(x.endswith("%") and x != "0%" for x in labels)
    assert r["logit_histograms"] == 1
    assert r["quantile_labels"] == ["10%", "30%", "50%", "70%", "90%"]  # always five, named
    assert r["promoted"] == 10 and r["suppressed"] == 10
    assert len(r["promoted_values"]) == 10 and all(v[0] in "+-" for v in r["promoted_values"])
    assert r["search_context"], r["search_context_word"]  # search finds context text
    assert r["neighbour_rows"] == ["decoder cosine", "activation r"]
    assert r["neighbour_links"] and all(h.startswith("#f") for h in r["neighbour_links"])
    assert r["stats"].startswith("density ") and "% (fires on " in r["stats"]
    assert r["token_cells_without_raw_spaces"]
    # the dead feature's URL shows that it is dead, and no other feature
    assert r["dead_heading"] == "feature 5" and "is dead" in r["dead_text"]
    assert r["dead_current"] is None
