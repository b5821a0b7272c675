"""Markdown that shows names as written: text from records never becomes markup.

Task, backend and model names, data paths and error messages come from the
user's files; in a Markdown table a ``<script>`` or ``<img onerror=…>`` in
one would be live HTML wherever the Markdown is rendered (a CI summary, a
pull request), and a ``|`` would split the row.  ``report.html`` and
``history.html`` escape them already; the Markdown files do here.

Example::

    md_text("<b>eager</b>|x")           # '&lt;b&gt;eager&lt;/b&gt;\\|x'
    md_table(frame)                     # frame.to_markdown() with every text cell escaped
"""

from __future__ import annotations

import html


def md_text(value) -> str:
    """A string for Markdown prose or a table cell: HTML escaped, pipes and line breaks neutralised."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def md_table(frame) -> str:
    """``frame.to_markdown(index=False)`` with every text cell and header shown as text."""
    safe = frame.rename(columns=lambda c: md_text(c) if isinstance(c, str) else c)
    safe = safe.apply(lambda col: col.map(lambda v: md_text(v) if isinstance(v, str) else v))
    return safe.to_markdown(index=False)
