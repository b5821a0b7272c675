"""Does evaluating during training change the measured step times?

Runs the same cell with and without ``--eval-every`` alternately, each in a
fresh process, ``--rounds`` times, and prints the ratio of step-time medians
(with evaluation / without) per round, with its median and range.  The
evaluation runs between steps, outside the step clock, so the ratio should
be 1 within the machine's noise; interleaving spreads that noise over both
sides alike.

    python benchmarks/eval_overhead.py --rounds 5 --eval-every 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cell(args, out: Path, eval_every: int) -> dict:
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", "--task", args.task, "--backend", args.backend,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch),
           "--seq-len", str(args.seq), "--eval-examples", str(args.eval_examples), "--out", str(out), "--force"]
    if eval_every:
        cmd += ["--eval-every", str(eval_every)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    rec = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()][-1]
    if rec["status"] != "ok":
        raise SystemExit(f"cell failed: {rec['error']}")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="generation")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--eval-examples", type=int, default=32)
    args = ap.parse_args()
    ratios, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            plain = cell(args, Path(tmp) / f"plain{i}", 0)
            with_eval = cell(args, Path(tmp) / f"eval{i}", args.eval_every)
            r = with_eval["step_time_s"] / plain["step_time_s"]
            ratios.append(r)
            rows.append((i + 1, plain["step_time_s"] * 1e3, with_eval["step_time_s"] * 1e3, r,
                         with_eval["eval_during_training_s"]))
    print("| round | step ms, no eval | step ms, eval every "
          f"{args.eval_every} | ratio | eval s during training |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row[0]} | {row[1]:.1f} | {row[2]:.1f} | {row[3]:.3f} | {row[4]:.2f} |")
    print(f"\nratio (with / without): median {statistics.median(ratios):.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}, n {len(ratios)}")
    print(json.dumps({"ratios": ratios}))


if __name__ == "__main__":
    main()
