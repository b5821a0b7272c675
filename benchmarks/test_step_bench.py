"""pytest-benchmark suite: the training step of each backend, timed by ftbench's own runner.

    pytest benchmarks --benchmark-autosave                 # store a run under .benchmarks/
    pytest benchmarks --benchmark-compare                  # compare with the last stored run
    pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:10%
    FTBENCH_BENCH_BACKENDS=eager,compile pytest benchmarks   # choose backends

Each benchmark runs one real cell through :func:`ftbench.harness.running.cellproc.run_cell_process`
(a fresh process, the runner's loop, its device synchronisation and its
clock: exactly what ``ftbench run`` measures) and hands the runner's
per-step times of the measured (post-warmup) steps to pytest-benchmark,
one round per step.  A second loop written here would time something
other than what ftbench reports, so the benchmark's timer *replays* the
runner's clock instead of reading its own (pytest-benchmark's documented
``timer=`` option).  Throughput, peak memory, setup and compile time go to
``benchmark.extra_info`` and so into the saved JSON.
"""

from __future__ import annotations

import os
import time

import pytest

from ftbench.harness.running.cellproc import run_cell_process
from ftbench.harness.contract.config import CellSpec, Recipe
from ftbench.harness.contract.environment import collect
from ftbench.harness.results.record import build_record
from ftbench.harness.contract.registry import Registry

RECIPE = Recipe(steps=int(os.environ.get("FTBENCH_BENCH_STEPS", "25")), warmup=5, batch_size=8, seq_len=64)


class ReplayClock:
    """A timer for pytest-benchmark whose readings are the runner's step times.

    ``load(times)`` queues measured step durations; every call of ``step``
    (the benchmarked function) advances the clock by the next one, so the
    interval pytest-benchmark reads around it is that step's duration.
    """

    __name__ = "ReplayClock"

    def __init__(self):
        self.now = 0.0
        self.queue: list[float] = []

    def __call__(self) -> float:
        return self.now

    def load(self, times: list[float]) -> None:
        self.queue = list(times)

    def step(self) -> None:
        self.now += self.queue.pop(0)


CLOCK = ReplayClock()


def _backends() -> list[str]:
    wanted = os.environ.get("FTBENCH_BENCH_BACKENDS")
    if wanted:
        return [b.strip() for b in wanted.split(",") if b.strip()]
    reg = Registry.load()
    # presets (zero2, ...) are options of another backend; time the backends themselves by default
    return [e.name for e in reg.backends.values() if not e.obj.preset_of]


@pytest.mark.benchmark(group="train-step", timer=CLOCK, disable_gc=False, warmup=False)
@pytest.mark.parametrize("backend", _backends())
def test_train_step(benchmark, backend):
    reg = Registry.load()
    spec_obj = reg.backend(backend.split(":")[0])
    spec = CellSpec(task="generation", backend=backend, model="tiny-gpt2", recipe=RECIPE,
                    nproc=int(os.environ.get("FTBENCH_BENCH_NPROC", "2")) if spec_obj.data_parallel else 1,
                    eval_examples=16, time_limit_s=900)
    started = time.time()
    record = build_record(spec, run_cell_process(spec), collect(reg.pm), started)
    if record["status"] == "skipped":
        pytest.skip(record["error"])
    assert record["status"] == "ok", f"{record['status']}: {record['error']}\n{record.get('stderr_tail', '')}"
    measured = record["step_times_s"][RECIPE.warmup:]
    CLOCK.load(measured)
    benchmark.extra_info.update({
        "tokens_per_s": record["tokens_per_s"], "samples_per_s": record["samples_per_s"],
        "peak_memory_bytes": record["peak_memory_bytes"], "memory_kind": record["memory_kind"],
        "setup_s": record["setup_s"], "compile_s": record["compile_s"], "nproc": spec.nproc,
        "cell_id": record["cell_id"], "recipe_fingerprint": record["recipe_fingerprint"],
        "step_time_median_s": record["step_time_s"],
    })
    benchmark.pedantic(CLOCK.step, rounds=len(measured), iterations=1, warmup_rounds=0)
    assert not CLOCK.queue
