"""What a grid costs beyond its training: fixed cost per cell and scaling.

Runs grids of 1, 4 and 16 tiny 50-step cells (``--repeat N`` of generation x
eager: N fresh processes) and splits each cell's wall time into training
(sum of step times), evaluation, and the fixed rest (process start, imports,
data, tokenizer, model build, result writing).  With ``--launch exec fork``
it also compares plain subprocesses against the fork server.

    python benchmarks/grid_cost.py --sizes 1 4 16 --launch fork exec
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


def run_grid(n: int, launch: str, out: Path, steps: int) -> dict:
    env = dict(os.environ, FTBENCH_LAUNCH=launch)
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation", "--backend", "eager",
           "--steps", str(steps), "--repeat", str(n), "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
    total = time.perf_counter() - t0
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    train = [sum(r["step_times_s"]) for r in recs]
    evals = [r["eval_s"] for r in recs]
    walls = [r["wall_s"] for r in recs]
    fixed = [w - t - e for w, t, e in zip(walls, train, evals)]
    return {"cells": n, "launch": launch, "total_s": total, "train_s": sum(train), "eval_s": sum(evals),
            "fixed_per_cell_s": statistics.median(fixed),
            "fixed_fraction": statistics.median(f / w for f, w in zip(fixed, walls)),
            "driver_s": total - sum(walls)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--launch", nargs="+", default=["fork"], choices=["fork", "exec"])
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Warm the tokenizer cache once so every size sees the same state.
        run_grid(1, args.launch[0], Path(tmp) / "warm", args.steps)
        for n in args.sizes:
            for launch in args.launch:
                row = run_grid(n, launch, Path(tmp) / f"{launch}-{n}", args.steps)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print("| launch | cells | total s | training s | eval s | fixed s/cell (median) | fixed share of cell | "
          "driver s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['launch']} | {r['cells']} | {r['total_s']:.1f} | {r['train_s']:.1f} | {r['eval_s']:.1f} | "
              f"{r['fixed_per_cell_s']:.2f} | {r['fixed_fraction']:.0%} | {r['driver_s']:.1f} |")


if __name__ == "__main__":
    main()
