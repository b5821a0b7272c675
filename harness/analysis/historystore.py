"""The history as an SQLite database a user can query (schema in docs/comparisons.md).

``ftbench history`` rewrites ``history.sqlite`` from the result sets it was
given, in one transaction, so the file always matches the last report::

    sqlite3 history/history.sqlite \\
      "SELECT s.name, s.git_commit, p.median FROM series p JOIN sets s USING (set_id)
       WHERE p.figure = 'speed' AND p.cell LIKE 'eager%' ORDER BY s.position"
"""

from __future__ import annotations

import json
import os
import sqlite3

from ftbench.harness.analysis.history import History

SCHEMA = """
CREATE TABLE sets (
  set_id INTEGER PRIMARY KEY, name TEXT NOT NULL, path TEXT NOT NULL, started_at TEXT, git_commit TEXT,
  position INTEGER, included INTEGER NOT NULL, machine TEXT);
CREATE TABLE records (
  set_id INTEGER NOT NULL REFERENCES sets(set_id), cell_id TEXT NOT NULL, task TEXT, backend TEXT, model TEXT,
  nproc INTEGER, repeat INTEGER, status TEXT, started_at TEXT, tokens_per_s REAL, step_time_s REAL,
  peak_memory_bytes REAL, metric TEXT, metric_value REAL);
CREATE TABLE series (
  cell_id TEXT NOT NULL, cell TEXT, task TEXT, figure TEXT NOT NULL, set_id INTEGER NOT NULL REFERENCES sets(set_id),
  position INTEGER, median REAL, n INTEGER, vals TEXT);
CREATE TABLE changes (
  cell_id TEXT NOT NULL, cell TEXT, figure TEXT NOT NULL, set_id INTEGER NOT NULL REFERENCES sets(set_id),
  kind TEXT, change REAL, verdict TEXT, commit_before TEXT, commit_after TEXT, newest_regression INTEGER);
CREATE INDEX series_cell ON series(cell_id, figure, position);
"""


def write_db(history: History, path: str | os.PathLike) -> None:
    """Replace ``path`` with the database of ``history``."""
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    con = sqlite3.connect(tmp)
    try:
        with con:
            con.executescript(SCHEMA)
            ids = {}
            for i, s in enumerate(history.sets, start=1):
                ids[s.name] = i
                con.execute("INSERT INTO sets VALUES (?,?,?,?,?,?,?,?)",
                            (i, s.name, str(s.path), s.started_at, s.commit, s.position if s.included else None,
                             int(s.included), json.dumps(s.machine, sort_keys=True)))
                con.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [
                    (i, r["cell_id"], r.get("task"), r.get("backend"), r.get("model"), r.get("nproc"),
                     r.get("repeat"), r.get("status"), r.get("started_at"), r.get("tokens_per_s"),
                     r.get("step_time_s"), r.get("peak_memory_bytes"), r.get("metric"), r.get("metric_value"))
                    for r in s.records])
            by_pos = {s.position: ids[s.name] for s in history.included}
            for sr in history.series:
                con.executemany("INSERT INTO series VALUES (?,?,?,?,?,?,?,?,?)", [
                    (sr.cell_id, sr.cell, sr.task, sr.figure, by_pos[p.position], p.position, p.median,
                     len(p.values), json.dumps(p.values)) for p in sr.points])
                newest = sr.newest_regression
                con.executemany("INSERT INTO changes VALUES (?,?,?,?,?,?,?,?,?,?)", [
                    (sr.cell_id, sr.cell, sr.figure, by_pos[e.position], e.kind, e.change, e.verdict,
                     e.commit_before, e.commit_after, int(e is newest)) for e in sr.events])
    finally:
        con.close()
    os.replace(tmp, path)
