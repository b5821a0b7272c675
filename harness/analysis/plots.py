"""Figure helpers every report plot shares: one layout, one palette, one way to write a figure."""

from __future__ import annotations

import math
from pathlib import Path


def save_figure(plt, fig, title: str, path: Path, fontsize: float | None = None) -> Path:
    """Title, lay out, write and close a report figure; its path."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def colours(labels):
    """One colour per label, in order (tab10)."""
    import matplotlib  # optional in spirit: only drawing needs it, and it is slow to import

    cmap = matplotlib.colormaps["tab10"]
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}
