"""Peak memory of one cell at two run lengths: it must not grow with --steps.

The cell of the report that found the growth (tiny-gpt2, generation,
tiny_shakespeare, batch 32, seq 256, eager): with every micro-batch collated
up front it peaked at 807 MiB for 20 steps and 1.8 GiB for 600; with batches
streamed per step (harness/cell/batches.py StepStream) both peaks should be
within a few percent.

    python benchmarks/memory_vs_steps.py --data ../shared/data/tiny_shakespeare --steps 20 600
    python benchmarks/memory_vs_steps.py --data ../shared/data/tiny_shakespeare --steps 20 600 --cpu-memory live
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def peak(steps: int, args) -> int:
    out = Path(tempfile.mkdtemp(prefix="ftbench-memsteps-")) / "run"
    subprocess.run([sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation", "--backend",
                    args.backend, "--model", args.model, "--data", args.data, "--steps", str(steps), "--warmup", "2",
                    "--batch-size", str(args.batch), "--seq-len", str(args.seq), "--eval-examples", "8",
                    "--cpu-memory", args.cpu_memory, "--out", str(out)], check=True, capture_output=True)
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    return rec["peak_memory_bytes"], rec["memory_kind"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 600])
    ap.add_argument("--cpu-memory", default="resident", choices=("resident", "live"),
                    help="live: count live tensors only (docs/memory.md), to tell growth from glibc's retention")
    args = ap.parse_args()
    peaks = {s: peak(s, args) for s in args.steps}
    base = peaks[args.steps[0]][0]
    for s, (p, kind) in peaks.items():
        print(f"steps {s:>6}: peak {p / 2**20:8.1f} MiB ({kind}), {100 * (p - base) / base:+.1f}% vs {args.steps[0]}")


if __name__ == "__main__":
    main()
