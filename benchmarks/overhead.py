"""Does ftbench slow down what it measures?  ftbench vs a bare loop, interleaved.

For each mode, runs A (an ftbench cell through the real CLI) and B
(``bare_loop.py``, the minimal hand-written loop) alternately, each in a
fresh process, ``--rounds`` times, and prints the ratio of steady-state
padded tokens/s (ftbench / bare) per round with its median and range.  Same
model config, batch shape, optimizer, schedule, steps and warmup on both
sides.  Interleaving spreads machine noise over both sides alike.

    python benchmarks/overhead.py --modes eager compile zero2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND = {"eager": "eager", "compile": "compile", "zero2": "zero2"}


def ftbench_cell(mode: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation", "--backend", BACKEND[mode],
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch),
           "--seq-len", str(args.seq), "--eval-examples", "8", "--out", str(out), "--force"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    rec = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()][-1]
    if rec["status"] != "ok":
        raise SystemExit(f"ftbench {mode} cell failed: {rec['error']}")
    return rec


def bare(mode: str, args, vocab: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bare_loop.py"), "--mode", mode, "--vocab", str(vocab),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--seq", str(args.seq)]
    proc = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, n {len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["eager", "compile", "zero2"], choices=list(BACKEND))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--json", help="Write the raw figures here.")
    args = ap.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            rows = []
            for r in range(args.rounds):
                rec = ftbench_cell(mode, args, Path(tmp) / f"{mode}-{r}")
                ref = bare(mode, args, rec["vocab_size"])
                row = {"ftbench": rec["padded_tokens_per_s"], "bare": ref["padded_tokens_per_s"],
                       "ratio": rec["padded_tokens_per_s"] / ref["padded_tokens_per_s"]}
                if mode == "compile":
                    row["compile_ratio"] = rec["compile_s"] / ref["compile_s"]
                rows.append(row)
                print(f"{mode} round {r + 1}: ftbench {row['ftbench']:.0f} tok/s, bare {row['bare']:.0f} tok/s, "
                      f"ratio {row['ratio']:.3f}" + (f", compile-time ratio {row['compile_ratio']:.2f}"
                                                     if "compile_ratio" in row else ""), flush=True)
            results[mode] = rows
    print()
    for mode, rows in results.items():
        print(f"{mode:8s} tokens/s ratio ftbench/bare: {summarise([r['ratio'] for r in rows])}")
        if mode == "compile":
            print(f"{'':8s} compile-time ratio ftbench/bare: {summarise([r['compile_ratio'] for r in rows])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
