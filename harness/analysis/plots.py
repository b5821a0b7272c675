"""Figure helpers every report plot shares: one layout, one way to write a figure, and the notes
that keep a picture from misleading.

* Axis numbers are plain: no offset (``1e-5+1.25778e2``) and no scientific
  factor, which make equal figures look spread (:func:`save_figure`).
* A panel whose values are all equal gets a range around the value and says
  so (:func:`flat_range`), instead of a range of its rounding noise.
* Curves that lie on one another are named in the panel (:func:`coinciding`).
* Cells that failed are named in the panels they are missing from
  (:func:`failed_cells`).

Notes sit under the panel's x-axis label (:func:`panel_note`), where they
cannot cover a curve or collide with another label.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

#: Values within this relative distance of each other are one value.
SAME = 1e-6
#: Curves closer than this share of the panel's height draw as one line at report size.
OVERLAP = 0.004


def save_figure(plt, fig, title: str, path: Path, fontsize: float | None = None) -> Path:
    """Title, plain axis numbers, lay out, write and close a report figure; its path.

    Every text is shown as written: a name holding ``$`` is not mathtext (which would fail to parse)."""
    from matplotlib.text import Text

    fig.suptitle(title, fontsize=fontsize)
    for ax in fig.axes:
        plain_numbers(ax)
    for text in fig.findobj(Text):
        text.set_parse_math(False)
    fig.tight_layout()
    # "tight" keeps a legend placed below the panels (plotstyle.add_legend) inside the picture.
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path


def literal(text) -> str:
    """A name as a tick label shows it (tick labels are made at drawing time, after save_figure's pass):
    a ``$`` escaped so that it is not mathtext."""
    return str(text).replace("$", r"\$")


def plain_numbers(ax) -> None:
    """Tick labels as the numbers themselves: no offset and no ×1eN factor on either axis."""
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        fmt = axis.get_major_formatter()
        if isinstance(fmt, ScalarFormatter):  # log and category axes have formatters of their own
            fmt.set_useOffset(False)
            fmt.set_scientific(False)


def grid_axes(plt, n: int, width: float = 5.2, height: float = 3.8):
    """A figure of ``n`` panels, three to a row; the unused panels hidden."""
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    # A lone panel gets extra width so that the figure's title fits.
    fig, axes = plt.subplots(rows, cols, figsize=(max(width * cols, 7.5), height * rows + 0.4), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def panel_note(ax, lines: list[str], fontsize: float = 7.5) -> None:
    """Lines of text under the panel's x-axis label (wrapped to the panel's width), or nothing."""
    lines = [line for line in lines if line]
    if not lines:
        return
    inches = ax.get_position().width * ax.figure.get_figwidth()
    width = max(40, int(inches * 72 / (fontsize * 0.52)))  # characters average about half the font size
    # A cell's label ("eager · tiny-gpt2 · ×2") is never broken: its spaces do not break (U+00A0).
    lines = [line.replace(" · ", "\u00a0·\u00a0") for line in lines]
    text = "\n".join(textwrap.fill(line, width, subsequent_indent="  ", break_on_hyphens=False,
                                    break_long_words=False) for line in lines)
    # Anchored to the x-axis label itself, so it follows the tick labels' height whatever they hold.
    ax.annotate(text, xy=(0.5, 0.0), xycoords=ax.xaxis.label, xytext=(0, -4), textcoords="offset points",
                ha="center", va="top", fontsize=fontsize, color="0.25")


def all_same(values) -> float | None:
    """The one value when every value is equal within :data:`SAME` (relative), else None."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    return (lo + hi) / 2 if hi - lo <= SAME * max(abs(lo), abs(hi)) else None


def flat_range(ax, values, what: str, count: int | None = None, axis: str = "y") -> str:
    """When ``values`` are all equal: a range of ±5% around them (±1 around zero) and the note saying so
    (``count`` cells hold them).  Without it the axis spans the rounding noise of one value and draws it
    as a spread."""
    v = all_same(values)
    if v is None:
        return ""
    half = abs(v) * 0.05 or 1.0
    (ax.set_ylim if axis == "y" else ax.set_xlim)(v - half, v + half)
    cells = f"all {count} cells" if count else "all"
    return f"{what}: {cells} equal at {v:.6g} (within {SAME:g} relative)"


def coinciding(curves: dict[str, tuple], span: float) -> list[tuple[list[str], float]]:
    """Groups of curves that draw as one line: each is ``name -> (x, y)``; two curves coincide when they
    have the same x and their y differ by at most :data:`OVERLAP` of the panel's height ``span`` (or
    :data:`SAME` relative).  Returns ``(names, largest difference)`` per group of two or more."""
    import numpy as np

    groups: list[list[str]] = []
    for name, (x, y) in curves.items():
        for g in groups:
            x0, y0 = curves[g[0]]
            if _close(x, y, x0, y0, span):
                g.append(name)
                break
        else:
            groups.append([name])
    out = []
    for g in groups:
        if len(g) > 1:
            ys = [np.asarray(curves[n][1], dtype=float) for n in g]
            worst = max(float(np.nanmax(np.abs(y - ys[0]))) for y in ys[1:]) if ys[0].size else 0.0
            out.append((g, worst))
    return out


def _close(x, y, x0, y0, span: float) -> bool:
    import numpy as np

    x, y, x0, y0 = (np.asarray(a, dtype=float) for a in (x, y, x0, y0))
    if x.shape != x0.shape or not np.allclose(x, x0, rtol=1e-9, atol=0):
        return False
    both = ~(np.isnan(y) | np.isnan(y0))
    if not both.any() or not np.array_equal(np.isnan(y), np.isnan(y0)):
        return False
    diff = float(np.max(np.abs(y[both] - y0[both])))
    scale = float(np.max(np.abs(y0[both])))
    return diff <= max(OVERLAP * span, SAME * scale)


def interleaved(i: int, n: int, dash: float = 5.0):
    """The i-th of n dash patterns that take turns along one line: coinciding curves draw as one line
    of their colours in alternation, so that none hides the others."""
    return (i * dash, (dash, (n - 1) * dash))


def coincide_note(groups: list[tuple[list[str], float]]) -> list[str]:
    """``eager, compile, ddp coincide (max |Δ| 2.1e-07)``, one line per group (each name once)."""
    return [f"{', '.join(dict.fromkeys(names))} " + (f"coincide (max\u00a0|Δ|\u00a0{worst:.1e})" if worst else "are identical")
            for names, worst in groups]


def failed_cells(records: list[dict], labels: dict[str, str], task: str) -> list[str]:
    """The task's cells with a failed run, ``zero3 (oom)``, ``ddp (error in 1 of 3 runs)``."""
    runs: dict[str, list[str]] = {}
    for r in records:
        if r.get("task") == task:
            runs.setdefault(r["cell_id"], []).append(str(r.get("status")))
    out = []
    for cid, statuses in runs.items():
        bad = [s for s in statuses if s != "ok"]
        if not bad:
            continue
        kinds = "/".join(sorted(set(bad)))
        which = f"{kinds} in {len(bad)} of {len(statuses)} runs" if len(bad) < len(statuses) else kinds
        out.append(f"{labels.get(cid, cid)} ({which})")
    return out


def failed_note(records: list[dict], labels: dict[str, str], task: str) -> str:
    cells = failed_cells(records, labels, task)
    return ("failed: " + "; ".join(cells)) if cells else ""
