"""Handing each written record to the run's sinks, so that none of them can cost a record.

The record is in ``results.jsonl`` before any sink sees it.  A sink that
raises (its server is down, its disk is full) is reported once, with its
reason and the command that replays the result set into it later, and gets
nothing more in this run; the cell, the grid's exit status and every other
sink carry on.

Example::

    hub = open_sinks(registry, ["mlflow:uri=http://127.0.0.1:5000"], out, warn=print)
    hub.start(environment)
    hub.record(record)      # once the record is durably in results.jsonl
    hub.close()
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.specs import Spec
from ftbench.harness.contract.sinks import Sink
from ftbench.harness.results.store import read_records
from ftbench.harness.results.writer import read_environment


class SinkHub:
    """The run's sinks, each isolated from the others and from the run."""

    def __init__(self, sinks: list[tuple[str, Sink]], result_dir: Path, warn: Callable[[str], None]):
        self.sinks = list(sinks)
        self.result_dir = Path(result_dir)
        self.warn = warn
        #: spec -> the failure that dropped it
        self.failed: dict[str, str] = {}
        self.delivered: dict[str, int] = {spec: 0 for spec, _ in self.sinks}

    def _call(self, method: str, *args) -> None:
        for spec, sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
                if method == "record":
                    self.delivered[spec] += 1
            except Exception as e:  # noqa: BLE001 - a sink's failure is reported, never raised into the run
                self._drop(spec, sink, method, e)

    def _drop(self, spec: str, sink: Sink, method: str, error: Exception) -> None:
        self.sinks = [(s, k) for s, k in self.sinks if s != spec]
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        self.failed[spec] = reason
        self.warn(f"sink {spec} failed in {method} ({reason[:300]}); it gets no more records in this run. "
                  f"Every record is in {self.result_dir / 'results.jsonl'}; replay them later with: "
                  f"ftbench sink {self.result_dir} --to {spec}")
        if method != "close":
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - already reported; closing is best effort
                pass

    def start(self, environment: dict) -> None:
        self._call("start", environment)

    def record(self, record: dict) -> None:
        self._call("record", record)

    def close(self) -> None:
        self._call("close")


def check_sink_specs(registry, specs: list[str]) -> list[tuple[str, object, dict]]:
    """``(spec, SinkSpec, options)`` per ``--sink``; unknown names, bad options and missing packages refused."""
    out = []
    for text in specs:
        parsed = Spec.parse(text, "sink")
        name, options = parsed.name, dict(parsed.options)
        spec = registry.sink(name)
        why = spec.unavailable()
        if why:
            raise FtbenchError(f"--sink {text}: the {name} sink {why}")
        unknown = sorted(set(options) - set(spec.options))
        if unknown:
            allowed = ", ".join(f"{k} ({v})" for k, v in spec.options.items()) or "none"
            raise FtbenchError(f"--sink {text}: unknown option {unknown[0]!r} for the {name} sink; it takes {allowed}")
        out.append((text, spec, options))
    return out


def open_sinks(registry, specs: list[str], result_dir, warn: Callable[[str], None]) -> SinkHub:
    """Build the sinks ``--sink`` names for writing (or replaying) ``result_dir``."""
    result_dir = Path(result_dir)
    built = [(text, spec.sink(options, result_dir)) for text, spec, options in check_sink_specs(registry, specs)]
    return SinkHub(built, result_dir, warn)


def replay(registry, specs: list[str], result_dir, warn: Callable[[str], None]) -> tuple[SinkHub, int]:
    """Every record of ``result_dir`` into the sinks ``specs`` name (``ftbench sink``); the hub and
    how many records there were."""
    hub = open_sinks(registry, specs, result_dir, warn)
    records = read_records(result_dir).records
    hub.start(read_environment(result_dir))
    for rec in records:
        hub.record(rec)
    hub.close()
    return hub, len(records)
