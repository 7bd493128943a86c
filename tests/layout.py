"""Layout checks of a rendered matplotlib figure, in pixels: what a reader would see as squeezed,
overlapping or cut. `layout_problems(fig)` draws the figure and returns one line per problem."""

from __future__ import annotations

from itertools import combinations
from typing import Any

from matplotlib.figure import Figure
from matplotlib.transforms import Bbox


def _area(b: Bbox) -> float:
    return max(0.0, b.width) * max(0.0, b.height)


def _overlap(a: Bbox, b: Bbox) -> float:
    """Area of the intersection of two boxes (0 if they do not meet)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _texts(items: list[Any], renderer: Any) -> list[tuple[str, Bbox]]:
    return [
        (t.get_text(), t.get_window_extent(renderer))
        for t in items
        if t.get_visible() and t.get_text().strip()
    ]


def layout_problems(
    fig: Figure,
    min_axes_px: tuple[float, float] = (200.0, 130.0),
    max_legend_overlap: float = 0.0,
    tol: float = 1.0,
) -> list[str]:
    """Problems of `fig`'s layout: an axes smaller than `min_axes_px` (width, height), axes that
    overlap, a title that is wrapped or wider than its panel, an axes without x / y label, tick
    labels that overlap each other or another panel, legends that overlap each other, a text or
    more than `max_legend_overlap` of any data area, point labels that overlap each other or
    leave their axes, and anything outside the figure."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    out: list[str] = []
    page = fig.bbox
    axes = [ax for ax in fig.axes if ax.get_visible()]
    areas = [ax.get_window_extent(r) for ax in axes]
    for i, (ax, box) in enumerate(zip(axes, areas, strict=True)):
        name = ax.get_title() or f"axes {i}"
        if box.width < min_axes_px[0] or box.height < min_axes_px[1]:
            out.append(f"{name}: data area {box.width:.0f}x{box.height:.0f} px is squeezed")
        title = ax.title.get_text()
        if "\n" in title:
            out.append(f"{name}: title wrapped")
        if title and ax.title.get_window_extent(r).width > box.width * 1.1 + tol:
            out.append(f"{name}: title wider than its panel")
        if not ax.get_xlabel().strip() or not ax.get_ylabel().strip():
            out.append(f"{name}: an axis has no label")
        for axis in ("x", "y"):
            ticks = _texts(getattr(ax, f"get_{axis}ticklabels")(which="both"), r)
            for (ta, a), (tb, b) in combinations(ticks, 2):
                if _overlap(a, b) > tol:
                    out.append(f"{name}: {axis} tick labels '{ta}' and '{tb}' overlap")
            for t, b in ticks:
                for j, other in enumerate(areas):
                    if j != i and _overlap(b, other) > tol:
                        out.append(f"{name}: tick label '{t}' runs into another panel")
        notes = _texts(list(ax.texts), r)
        for (ta, a), (tb, b) in combinations(notes, 2):
            if _overlap(a, b) > tol:
                out.append(f"{name}: point labels '{ta}' and '{tb}' overlap")
        for t, b in notes:
            if _overlap(b, box) < _area(b) - tol:
                out.append(f"{name}: point label '{t}' leaves its axes")
    for (i, a), (j, b) in combinations(enumerate(areas), 2):
        if _overlap(a, b) > tol:
            out.append(f"axes {i} and {j} overlap")
    legends = [lg for lg in [*fig.legends, *(ax.get_legend() for ax in axes)] if lg is not None]
    boxes = [lg.get_window_extent(r) for lg in legends]
    for (i, a), (j, b) in combinations(enumerate(boxes), 2):
        if _overlap(a, b) > tol:
            out.append(f"legends {i} and {j} overlap")
    labels = []
    for ax in axes:
        labels += _texts([ax.title, ax.xaxis.label, ax.yaxis.label], r)
    for extra in (fig._suptitle, fig._supxlabel, fig._supylabel):  # noqa: SLF001
        if extra is not None:
            labels += _texts([extra], r)
    for i, b in enumerate(boxes):
        for j, area in enumerate(areas):
            if _overlap(b, area) > max_legend_overlap * _area(b) + tol:
                out.append(f"legend {i} covers the data area of axes {j}")
        for t, tb in labels:
            if _overlap(b, tb) > tol:
                out.append(f"legend {i} overlaps the text '{t}'")
    for (ta, a), (tb, b) in combinations(labels, 2):
        if _overlap(a, b) > tol:
            out.append(f"texts '{ta}' and '{tb}' overlap")
    for what, b in [*(("legend", b) for b in boxes), *labels, *(("axes", a) for a in areas)]:
        if (
            b.x0 < page.x0 - tol
            or b.y0 < page.y0 - tol
            or b.x1 > page.x1 + tol
            or (b.y1 > page.y1 + tol)
        ):
            out.append(f"'{what}' is cut off at the figure's edge")
    return out
