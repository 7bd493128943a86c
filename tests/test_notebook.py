"""demos/quickstart.ipynb runs from top to bottom (with a few training samples) and does its job."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from e2e_sae.lm.load import builtin_model_dir

NOTEBOOK = Path(__file__).resolve().parent.parent / "demos" / "quickstart.ipynb"


@pytest.mark.skipif(builtin_model_dir("shakespeare-lm") is None, reason="shakespeare-lm missing")
def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this environment: a tiny run, into tmp_path, on 2 plays of the corpus.
    monkeypatch.setenv("E2E_SAE_QUICKSTART_SAMPLES", "32")
    monkeypatch.setenv("E2E_SAE_QUICKSTART_DOCUMENTS", "2")
    monkeypatch.setenv("E2E_SAE_QUICKSTART_OUT", str(tmp_path / "runs"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "\n".join(
        out.get("text", "") or "".join(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert "CE with SAE" in text and "KL(clean || SAE)" in text
    assert "ce_loss_score" in text and "features that fired" in text
    run_dir = tmp_path / "runs" / "demo"
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["n_tokens"] == 8 * 128 and "blocks.2.hook_resid_pre" in ev["per_sae"]
    assert (run_dir / "features" / "index.html").is_file()
    index = (run_dir / "features" / "data" / "index.js").read_text()
    shown = json.loads(index[len("registerIndex(") : -3])["ids"]
    assert shown and max(shown) < 64  # the notebook asks for the first 64 features
    # public API only: everything it imports comes from the package itself
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    imports = re.findall(r"^\s*(?:from|import) (\S+)", sources, re.M)
    assert {m for m in imports if m.startswith("e2e_sae")} == {"e2e_sae"}
