"""Record sinks: where each finished record goes besides ``results.jsonl``.

A sink receives the result set's environment once, then every record as the
run writes it (after it is safely in ``results.jsonl``), then a close.  The
core owns the order and the failures: a sink that raises never fails a cell
or loses a record; it is reported once and dropped for the rest of the run,
and ``ftbench sink RUNS --to NAME:...`` replays a result set into it later.

A complete sink plugin::

    import json, ftbench

    class JsonLines(ftbench.Sink):
        def start(self, environment):
            self.f = open(self.options.get("path", "records.jsonl"), "a")

        def record(self, record):
            self.f.write(json.dumps(ftbench.sink_metrics(record)) + "\\n")

        def close(self):
            self.f.close()

    @ftbench.hookimpl
    def register_sinks(register):
        register(ftbench.SinkSpec("jsonl", JsonLines, description="metrics as JSON lines",
                                  options={"path": "file to append to"}))
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

#: Record figures every sink logs as metrics (name in the sink: key in the record).
FIGURES = {
    "tokens_per_s": "tokens_per_s", "samples_per_s": "samples_per_s", "step_time_s": "step_time_s",
    "peak_memory_bytes": "peak_memory_bytes", "mfu": "mfu", "eval_loss": "eval_loss", "setup_s": "setup_s",
    "compile_s": "compile_s", "time_to_target_s": "time_to_target_s",
}


class Sink:
    """Receives a run's records as they are written.

    ``options`` are the ``key=value`` pairs of ``--sink NAME:key=value``;
    ``result_dir`` is the result set being written (or replayed).  Override
    :meth:`start`, :meth:`record` and :meth:`close`; raise to report a
    failure (the core catches it).  Example: see the module docstring.
    """

    def __init__(self, options: dict, result_dir: Path):
        self.options = dict(options)
        self.result_dir = Path(result_dir)

    def start(self, environment: dict) -> None:
        """Called once, before the first record, with the result set's environment."""

    def record(self, record: dict) -> None:
        """Called for every record, after it is durably in ``results.jsonl``."""

    def close(self) -> None:
        """Called once at the end of the run (also after an interruption)."""


@dataclass
class SinkSpec:
    """A registered sink: its name, class, the modules it needs and the options it takes.

    Example: ``SinkSpec("mlflow", MlflowSink, requires=("mlflow",),
    options={"uri": "tracking URI (default ./mlruns)"})``.
    """

    name: str
    sink: type
    description: str = ""
    #: Importable modules the sink needs; it is unavailable (with the reason) without them.
    requires: tuple[str, ...] = ()
    #: Option name -> what it means, for ``ftbench list`` and error messages.
    options: dict = field(default_factory=dict)
    install: str = ""

    def unavailable(self) -> str | None:
        """Why the sink cannot run here, or None."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if not missing:
            return None
        hint = f"; install it with {self.install}" if self.install else ""
        return f"needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed{hint}"


def run_name(record: dict) -> str:
    """A readable, unique name for one record: ``generation · eager · tiny-gpt2 · r0 · 3f2c1a9d``."""
    parts = [record.get("task"), record.get("backend"), record.get("model"), f"r{record.get('repeat', 0)}",
             str(record.get("cell_id", ""))[:8]]
    return " · ".join(str(p) for p in parts if p not in (None, ""))


def sink_params(record: dict) -> dict[str, str]:
    """The cell and its recipe as flat string parameters (``recipe.lr``, ``task``, ``nproc``…)."""
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    out = {k: record.get(k) for k in ("cell_id", "task", "backend", "model", "data", "nproc", "repeat",
                                      "recipe_fingerprint", "status")}
    for k, v in (config.get("recipe") or {}).items():
        out[f"recipe.{k}"] = v
    for k, v in config.items():
        if k != "recipe" and not isinstance(v, (dict, list)):
            out.setdefault(f"cell.{k}", v)
    return {k: str(v) for k, v in out.items() if v is not None}


def _finite(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def sink_metrics(record: dict) -> dict[str, float]:
    """The record's figures and quality metrics as finite floats (``quality.perplexity``…)."""
    out = {name: _finite(record.get(key)) for name, key in FIGURES.items()}
    for k, v in (record.get("metrics") or {}).items() if isinstance(record.get("metrics"), dict) else ():
        out[f"quality.{k}"] = _finite(v)
    return {k: v for k, v in out.items() if v is not None}


def sink_curves(record: dict) -> dict[str, list[float]]:
    """Per-step series: ``train_loss`` and ``step_times_s`` (one value per optimizer step, warmup included)."""
    curves = {}
    for name, key in (("train_loss", "train_loss"), ("step_times_s", "step_times_s")):
        values = record.get(key)
        if isinstance(values, list):
            curves[name] = [_finite(v) for v in values]
    return curves
