"""A/A check of ``ftbench compare``: the same grid run twice in a row, several times.

Nothing changes between the two runs of a pair, so every regression or
improvement compare reports is a false alarm.  A last pair runs the second
set with autograd anomaly detection switched on in every cell process (a
2.5-4x slowdown of every step that computes the same thing), which compare
must call a regression.

    OMP_NUM_THREADS=1 python benchmarks/aa_check.py --pairs 5 --repeat 3 --out runs/aa

Prints one Markdown row per pair and cell (speed change, interval, verdict)
and a summary line; exits 1 when an A/A pair raised an alarm or the
slowdown was missed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

GRID = ["--task", "generation", "--backend", "eager", "--model", "tiny-gpt2", "--model", "tiny-llama",
        "--steps", "30", "--warmup", "5", "--batch-size", "8", "--seq-len", "64", "--eval-examples", "32"]
SLOWDOWN = "import torch\ntorch.autograd.set_detect_anomaly(True, check_nan=True)\n"


def run(out: Path, repeat: int, order: str, slow: Path | None = None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if slow:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(slow), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", *GRID, "--repeat", str(repeat), "--order", order,
           "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def rows(name: str, base: Path, new: Path):
    from ftbench.harness.analysis.compare import compare_sets

    cmp = compare_sets(base, new)
    for r in cmp.rows:
        if r.figure == "speed":
            ci = f"{r.interval[0]:+.1%}..{r.interval[1]:+.1%}" if r.interval else "-"
            print(f"| {name} | {r.cell} | {r.change:+.1%} | {ci} | {r.evidence.split(',')[0]} | {r.verdict} |",
                  flush=True)
    c = cmp.counts()
    return c["regression"], c["improvement"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--order", default="interleaved", choices=["interleaved", "sequential"])
    ap.add_argument("--out", default="runs/aa")
    ap.add_argument("--no-slowdown", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("| pair | cell | speed change | 95% CI | evidence | verdict |\n|---|---|---:|---|---|---|", flush=True)
    alarms = 0
    for i in range(1, args.pairs + 1):
        a, b = out / f"{i}-a", out / f"{i}-b"
        run(a, args.repeat, args.order)
        run(b, args.repeat, args.order)
        reg, imp = rows(f"A/A {i}", a, b)
        alarms += reg + imp
    caught = True
    if not args.no_slowdown:
        hook = out / "slowdown"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(SLOWDOWN)
        slow = out / "slow"
        run(slow, args.repeat, args.order, slow=hook)
        reg, _ = rows("slowed", out / "1-a", slow)
        caught = reg >= 2  # both cells
    print(f"\nA/A pairs: {args.pairs}, false alarms (regressions + improvements): {alarms}; "
          f"anomaly-detection slowdown flagged: {caught}")
    return 0 if alarms == 0 and caught else 1


if __name__ == "__main__":
    sys.exit(main())
