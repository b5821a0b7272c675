"""One look per cell across every plot of a report: a colour per backend, a marker per model.

The mapping is built from a whole result set (every record, failed ones
included) and never per panel, so that a backend keeps its colour from the
GPT-2 panel to the T5 panel and from the report to the quality, ladder and
history plots: backends and models are numbered in sorted order.  Cells that
share a backend and a model but differ in another setting (a learning rate,
a seed, ``--opt``) keep the colour and marker and differ in line style and
marker fill.

Example::

    styles = styles_for(rs.records, variant_labels(rs.records))
    ax.plot(x, y, **styles.line(cell_id))
    add_legend(fig, styles, drawn_cell_ids)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Markers that stay apart at 6-8 points, in the order models get them.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")
#: Line styles and marker fills for the cells of one backend and model, in the order their labels sort.
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
FILLS = ("full", "none", "left", "bottom", "right", "top")
UNKNOWN = "?"


def palette(n: int) -> list:
    """``n`` distinguishable colours: tab10's ten, then tab20's lighter shades, then again."""
    import matplotlib  # only drawing needs it, and it is slow to import

    dark = list(matplotlib.colormaps["tab10"].colors)
    light = list(matplotlib.colormaps["tab20"].colors)[1::2]
    both = dark + light
    return [both[i % len(both)] for i in range(n)]


@dataclass(frozen=True)
class CellStyle:
    backend: str
    model: str
    label: str
    colour: tuple
    marker: str
    linestyle: object = "-"
    fill: str = "full"


@dataclass
class Styles:
    """Colours by backend, markers by model, and each cell's look (by cell id)."""

    colour: dict[str, tuple] = field(default_factory=dict)
    marker: dict[str, str] = field(default_factory=dict)
    cells: dict[str, CellStyle] = field(default_factory=dict)

    def of(self, cell_id: str) -> CellStyle:
        return self.cells[cell_id]

    @property
    def labels(self) -> dict[str, str]:
        """Each cell id's label (what its legend entry and notes call it)."""
        return {c: s.label for c, s in self.cells.items()}

    def line(self, cell_id: str, **extra) -> dict:
        """Keyword arguments of ``Axes.plot`` for the cell's line (its markers thinned by ``markevery``);
        the artist's ``gid`` is the cell id (an SVG's element id, and what tests find it by)."""
        s = self.cells[cell_id]
        return {"gid": cell_id, "color": s.colour, "linestyle": s.linestyle, "marker": s.marker, "fillstyle": s.fill,
                "markersize": 5, **extra}

    def point(self, cell_id: str, **extra) -> dict:
        """Keyword arguments of ``Axes.errorbar``/``plot`` for the cell's marker alone (``gid``: the cell id)."""
        s = self.cells[cell_id]
        return {"gid": cell_id, "color": s.colour, "marker": s.marker, "fillstyle": s.fill, "linestyle": "none",
                "markersize": 8, **extra}

    def shared(self, cell_ids) -> list[str]:
        """Those of these cells that share a backend and a model with another (colour and marker do not
        name them: line style and fill do)."""
        seen: dict[tuple, set] = {}
        for c in cell_ids:
            s = self.cells[c]
            seen.setdefault((s.backend, s.model), set()).add(s.label)
        return [c for c in cell_ids if len(seen[(self.cells[c].backend, self.cells[c].model)]) > 1]


def styles_for(records: list[dict], labels: dict[str, str]) -> Styles:
    """The looks of a result set's cells: ``labels`` names each cell id (``variant_labels``)."""
    backends = sorted({str(r.get("backend") or UNKNOWN) for r in records})
    models = sorted({str(_model(r)) for r in records})
    st = Styles(colour=dict(zip(backends, palette(len(backends)))),
                marker={m: MARKERS[i % len(MARKERS)] for i, m in enumerate(models)})
    groups: dict[tuple, list[str]] = {}
    first: dict[str, dict] = {}
    for r in records:
        first.setdefault(r["cell_id"], r)
    for cid, r in first.items():
        key = (str(r.get("backend") or UNKNOWN), str(_model(r)))
        label = labels.get(cid, cid)
        if label not in groups.setdefault(key, []):
            groups[key].append(label)
    for key in groups:
        groups[key].sort()
    for cid, r in first.items():
        backend, model = str(r.get("backend") or UNKNOWN), str(_model(r))
        label = labels.get(cid, cid)
        i = groups[(backend, model)].index(label)
        st.cells[cid] = CellStyle(backend, model, label, st.colour[backend], st.marker[model],
                                  LINESTYLES[i % len(LINESTYLES)], FILLS[i % len(FILLS)])
    return st


def _model(r: dict):
    return r.get("model") or (r.get("config") or {}).get("model") or UNKNOWN


def legend_entries(styles: Styles, cell_ids, line: bool = False) -> tuple[list, list[str], str]:
    """Handles, texts and title of a legend for the cells drawn: every backend (colour), every model
    (marker) when there are several, and the cells that share both by their full label (line and fill)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    drawn = [c for c in dict.fromkeys(cell_ids) if c in styles.cells]
    backends = sorted({styles.cells[c].backend for c in drawn})
    models = sorted({styles.cells[c].model for c in drawn})
    handles: list = [Patch(facecolor=styles.colour[b], edgecolor="none") for b in backends]
    texts = list(backends)
    title = "colour: backend"
    if len(models) > 1:
        handles += [Line2D([], [], color="0.3", marker=styles.marker[m], linestyle="none", markersize=7)
                    for m in models]
        texts += models
        title += " · marker: model"
    shared = styles.shared(drawn)
    if shared:
        shown = {}
        for c in shared:
            s = styles.cells[c]
            shown.setdefault(s.label, s)
        for label, s in sorted(shown.items()):
            handles.append(Line2D([], [], color=s.colour, marker=s.marker, fillstyle=s.fill,
                                  linestyle=s.linestyle if line else "none", markersize=7))
            texts.append(label)
        title += " · " + ("line and fill" if line else "fill") + ": setting"
    return handles, texts, title


def add_legend(fig, styles: Styles, cell_ids, line: bool = False, extra: tuple[list, list[str]] = ((), ())):
    """One legend for the whole figure, below its panels (never over a curve or a point).
    ``extra`` adds handles and texts of the figure's own (a target line, the end of warmup)."""
    handles, texts, title = legend_entries(styles, cell_ids, line)
    handles, texts = handles + list(extra[0]), texts + list(extra[1])
    if not handles:
        return None
    most = max(1, int(fig.get_figwidth() // 1.9))
    ncol = math.ceil(len(handles) / math.ceil(len(handles) / most))  # rows as even as they can be
    return fig.legend(handles, texts, title=title, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol,
                      fontsize=8, title_fontsize=8, frameon=False)
