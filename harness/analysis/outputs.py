"""Where analysis commands may write: never over a result set's own files.

``compare --markdown FILE``, ``compare --calibrate -o FILE`` and the
``--out`` of ``report`` and ``history`` are paths a user types; one slip
(``--markdown runs/a/results.jsonl``) would replace the records of a run
that took hours.  A path whose name, or whose target through symlinks, is a
result set's record or environment file is refused (exit 2) before anything
is read or written.

Example::

    refuse_record_files("runs/a/results.jsonl", "--markdown", "Markdown")  # raises FtbenchError
"""

from __future__ import annotations

from pathlib import Path

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.format import shorten
from ftbench.harness.results.store import RESULTS_FILE

#: A result set's own files, which only ``ftbench run`` and ``ftbench merge`` write.
RECORD_FILES = (RESULTS_FILE, "environment.json")
SUGGESTED = {"Markdown": "comparison.md", "calibration": "thresholds.json", "report": "report"}


def refuse_record_files(path, flag: str, what: str) -> None:
    """Raise when writing ``what`` to ``path`` (given as ``flag``) would overwrite a result set's files."""
    if path is None:
        return
    p = Path(path)
    names = {p.name}
    try:
        names.add(p.resolve().name)  # a symlink named summary.md may point at results.jsonl
    except (OSError, RuntimeError):
        pass
    hit = sorted(names & set(RECORD_FILES))
    if hit:
        raise FtbenchError(f"{flag} {shorten(str(path))} would overwrite a result set's {hit[0]}, which only "
                           f"'ftbench run' and 'ftbench merge' write; write the {what} elsewhere, e.g. "
                           f"{flag} {p.parent / SUGGESTED.get(what, 'report')}")
