"""What a grid costs beyond its training: fixed cost per cell and scaling.

Runs grids of 1, 4 and 16 tiny 50-step cells (``--repeat N`` of generation x
eager: N fresh processes) and splits each cell's wall time into training
(sum of step times), evaluation, and the fixed rest (process start, imports,
data, tokenizer, model build, engine set-up, result writing).  With
``--launch exec fork`` it also compares plain subprocesses against the fork
server.

``--ranks ddp fsdp zero2`` does the same for 2-rank cells of those backends
(``--nproc 2``): ``fork`` forks the ranks from the fork server (the default),
``torchrun`` starts them as before (``FTBENCH_LAUNCH=torchrun``).  The
grid's one-off preparation (DeepSpeed's CPU ops) is reported apart.

    python benchmarks/grid_cost.py --sizes 1 4 16 --launch fork exec
    python benchmarks/grid_cost.py --ranks ddp fsdp zero2 --sizes 4 --launch fork torchrun
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_grid(n: int, launch: str, out: Path, steps: int, backend: str = "eager", nproc: int = 1) -> dict:
    env = dict(os.environ, FTBENCH_LAUNCH=launch)
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation", "--backend", backend,
           "--nproc", str(nproc), "--steps", str(steps), "--repeat", str(n), "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
    total = time.perf_counter() - t0
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    bad = [r["error"] for r in recs if r["status"] != "ok"]
    if bad:
        raise SystemExit(f"{backend} x{nproc} ({launch}): a cell failed: {bad[0]}")
    train = [sum(r["step_times_s"]) for r in recs]
    evals = [r["eval_s"] for r in recs]
    walls = [r["wall_s"] for r in recs]
    fixed = [w - t - e for w, t, e in zip(walls, train, evals)]
    prepared = json.loads((out / "environment.json").read_text()).get("prepared") or []
    return {"backend": backend, "nproc": nproc, "cells": n, "launch": launch, "total_s": total,
            "train_s": sum(train), "eval_s": sum(evals),
            "fixed_per_cell_s": statistics.median(fixed),
            "fixed_fraction": statistics.median(f / w for f, w in zip(fixed, walls)),
            "engine_s": statistics.median(r["setup_phases"]["engine_s"] for r in recs),
            "engine_s_first": recs[0]["setup_phases"]["engine_s"],
            "prepare_s": sum(p["seconds"] for p in prepared),
            "driver_s": total - sum(walls)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--launch", nargs="+", default=["fork"], choices=["fork", "exec", "torchrun"])
    ap.add_argument("--ranks", nargs="*", default=[], metavar="BACKEND",
                    help="2-rank cells of these data-parallel backends instead of 1-process eager cells")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    grids = [(b, 2) for b in args.ranks] or [("eager", 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, nproc in grids:
            # Warm the tokenizer and encoded-data caches (and build any native op) once, so
            # every size and launch sees the same state.
            run_grid(1, args.launch[0], Path(tmp) / f"warm-{backend}", args.steps, backend, nproc)
            for n in args.sizes:
                for launch in args.launch:  # interleaved, so load on a shared machine hits both alike
                    row = run_grid(n, launch, Path(tmp) / f"{backend}-{launch}-{n}", args.steps, backend, nproc)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print()
    print("| backend | launch | cells | total s | training s | eval s | fixed s/cell (median) | fixed share of cell | "
          "engine s (median) | prepare s | driver s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} ×{r['nproc']} | {r['launch']} | {r['cells']} | {r['total_s']:.1f} | "
              f"{r['train_s']:.1f} | {r['eval_s']:.1f} | {r['fixed_per_cell_s']:.2f} | {r['fixed_fraction']:.0%} | "
              f"{r['engine_s']:.2f} | {r['prepare_s']:.1f} | {r['driver_s']:.1f} |")


if __name__ == "__main__":
    main()
