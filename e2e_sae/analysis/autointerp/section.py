"""The autointerp section of `paper-figures`: when runs have autointerp results
(`<run>/autointerp/results.json`, written by `e2e-sae autointerp RUN` without `--out`), the
comparison table and the scores figure of those runs, in the order the runs were given.

`register()` adds it to `e2e_sae.analysis.paper.SECTIONS` (once); the `paper-figures` command
and experiments/paper_analyses call it. It computes nothing new: autointerp needs a language
model and minutes per feature, so it stays its own command.
"""

from __future__ import annotations

from e2e_sae.analysis import paper
from e2e_sae.analysis.autointerp.report import autointerp_figures, load_run_results
from e2e_sae.analysis.paper import Artifact, PaperContext

TITLE = "Automated interpretability"
CAPTIONS = {
    "autointerp_scores": "Autointerp per feature: simulation score and detection AUC per run "
    "(mean and bootstrap 95% interval), simulation score against firing frequency",
    "autointerp_comparison": "Autointerp table: mean scores with 95% intervals, differences "
    "from the first run with results",
}


def autointerp_section(ctx: PaperContext) -> list[Artifact]:
    """The comparison of the runs that have autointerp results (none: a note, no files)."""
    results, missing = load_run_results([r.run_dir for r in ctx.runs])
    if not results:
        ctx.notes.append(
            "Automated interpretability: no run has results (`e2e-sae autointerp RUN` writes "
            "them into RUN/autointerp)."
        )
        return []
    if missing:
        ctx.notes.append(f"Automated interpretability: no results for {', '.join(missing)}.")
    models = {(str(r.get("explainer")), str(r.get("scorer"))) for r in results}
    if len(models) > 1:
        ctx.notes.append(
            "Automated interpretability: the runs were explained or scored by different models; "
            "their scores are not comparable (see each run's results.json)."
        )
    paths = autointerp_figures(results, ctx.out, seed=ctx.seed)
    return [Artifact(p, CAPTIONS[p.stem]) for p in paths if p.suffix in (".png", ".md")]


def register() -> None:
    """Add the section to every later `paper_figures` call (a second call does nothing)."""
    if all(title != TITLE for title, _ in paper.SECTIONS):
        paper.register_section(TITLE, autointerp_section)
