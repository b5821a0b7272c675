"""Synthetic but realistic result records, for the pure-logic tests of
report, compare and merge (real runs are used where the figures must be real)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

from ftbench.harness.contract.config import CellSpec, Recipe
from ftbench.harness.results.store import append_record

ENV = {"cpu": "Test CPU", "cpu_count": 2, "cpu_affinity": 2, "device": {"type": "cpu"},
       "versions": {"torch": "2.13.0+cpu", "transformers": "5.0"}, "git_commit": "abc", "python": "3.11"}

METRICS = {"generation": ("perplexity", False, 60.0), "classification": ("accuracy", True, 0.8)}


def make_record(task="generation", backend="eager", model="tiny-gpt2", repeat=0, step_s=0.02, mem=400 * 2**20,
                metric_value=None, steps=12, warmup=2, seed=0, recipe=None, status="ok", env=None, jitter=0.05,
                lr=3e-3):
    """One record shaped like :func:`ftbench.harness.results.record.build_record`'s, with noisy step times."""
    recipe = recipe or Recipe(steps=steps, warmup=warmup, seq_len=32, batch_size=4, lr=lr)
    spec = CellSpec(task=task, backend=backend, model=model, recipe=recipe, repeat=repeat)
    rng = random.Random(f"{task}/{backend}/{model}/{repeat}/{seed}/{step_s}")  # str seeds are not salted
    times = [step_s * (3 if i < warmup else 1) * (1 + rng.uniform(-jitter, jitter)) for i in range(steps)]
    measured = sorted(times[warmup:])
    median = measured[len(measured) // 2]
    metric, hib, default = METRICS.get(task, ("perplexity", False, 60.0))
    value = default if metric_value is None else metric_value
    tokens = 100
    ok = status == "ok"
    return {
        "cell_id": spec.cell_id, "recipe_fingerprint": spec.fingerprint(), "task": task, "backend": backend,
        "model": model, "data": "builtin", "nproc": 1, "repeat": repeat, "status": status,
        "error": None if ok else "RuntimeError: boom",
        "tokens_per_s": tokens * len(measured) / sum(measured) if ok else None,
        "samples_per_s": 4 / median if ok else None,
        "step_time_s": median if ok else None,
        "step_time": {"median": median, "iqr": 0.001, "n": len(measured)} if ok else None,
        "step_times_s": times if ok else None,
        "peak_memory_bytes": mem if ok else None, "memory_kind": "cpu_peak_rss",
        "setup_s": 5.0 + rng.random(), "compile_s": 12.0 if backend.startswith("compile") and ok else None,
        "train_loss": [5.0 * 0.93 ** i + rng.uniform(0, 0.05) for i in range(steps)] if ok else [],
        "eval_loss": 4.1, "metric": metric, "metric_value": value if ok else None, "higher_is_better": hib,
        "metrics": {metric: value}, "parity": None, "config": spec.to_dict(), "environment": dict(env or ENV),
        "started_at": "2025-01-01T00:00:00+00:00", "wall_s": 8.0,
    }


def write_set(path, records) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for r in records:
        append_record(path, r)
    return path


def grid_records(tasks=("generation", "classification"), backends=("eager", "compile"), repeats=3, **kw):
    out = []
    for t in tasks:
        for i, b in enumerate(backends):
            for r in range(repeats):
                out.append(make_record(task=t, backend=b, repeat=r, step_s=0.02 * (1 + 0.5 * i),
                                       mem=(400 + 150 * i) * 2**20, **kw))
    return out


def modified(records, **changes):
    """Deep copies of ``records`` with top-level keys replaced (values may be callables of the record)."""
    out = []
    for r in records:
        r = copy.deepcopy(r)
        for k, v in changes.items():
            r[k] = v(r) if callable(v) else v
        out.append(r)
    return out


def read(path):
    return [json.loads(line) for line in (Path(path) / "results.jsonl").read_text().splitlines() if line.strip()]
