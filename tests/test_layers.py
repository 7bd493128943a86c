"""The package layers (pyproject's import-linter contract) and no import cycles.

`make check` runs `lint-imports`; this test checks the same contract inside the suite, that it
ignores no import, and that no chain of imports, function-level ones included, leads from a module
back to itself."""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("e2e_sae", cache_dir=None)


def _contract() -> dict:
    (contract,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
    return contract


def test_layers_point_down(graph: grimp.ImportGraph) -> None:
    layers = [[p.strip() for p in layer.split("|")] for layer in _contract()["layers"]]
    bad = []
    for i, upper in enumerate(layers):
        for lower in layers[i + 1 :]:
            for low in lower:
                for up in upper:
                    if graph.chain_exists(importer=low, imported=up, as_packages=True):
                        bad.append(f"{low} -> {up}")
        for a in upper:  # siblings on one layer are independent
            for b in upper:
                if a != b and graph.chain_exists(importer=a, imported=b, as_packages=True):
                    bad.append(f"{a} -> {b}")
    assert not bad, bad


def test_no_import_cycles(graph: grimp.ImportGraph) -> None:
    cycles = []
    for m in sorted(graph.modules):
        for n in graph.find_modules_directly_imported_by(m):
            if graph.chain_exists(importer=n, imported=m):
                cycles.append(f"{m} -> {n} -> ... -> {m}")
    assert not cycles, cycles[:5]


def test_the_contract_ignores_no_import() -> None:
    """No import is exempt from the layers (`test_layers_point_down` then shows nothing breaks
    them)."""
    assert not _contract().get("ignore_imports")
