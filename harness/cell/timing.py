"""Timing the phases of a cell, one way for all of them.

Example::

    clock = PhaseClock()
    with clock.phase("data"):
        data = load_run_data(...)
    clock.seconds  # {"data_s": 0.12}
"""

from __future__ import annotations

import contextlib

from ftbench.harness.cell.measure import now


class PhaseClock:
    """Seconds spent in each named phase, keyed ``NAME_s`` as the record's ``setup_phases``."""

    def __init__(self, **already: float):
        self.seconds: dict[str, float] = {f"{k}_s": v for k, v in already.items()}

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = now()
        try:
            yield
        finally:
            self.seconds[f"{name}_s"] = now() - t0
