"""A cell's setup (time and peak resident memory) at very different run lengths and batch sizes.

Setup is everything before the first training step: data, tokenizer, model,
encoding and the batch plan, the engine.  None of it may grow with
``--steps``: the batch plan is computed step by step as training reads it
(harness/cell/batches.py BatchPlan), so a run of two million steps sets up
like one of twenty.  Each setting runs in a fresh process, which goes
through the cell's own setup phases (harness/cell/worker.py Cell) and stops
before training; the figure is that process's peak resident set
(``ru_maxrss``) and its setup seconds.

    python benchmarks/setup_vs_steps.py                       # steps 20 and 2,000,000, batch 8
    python benchmarks/setup_vs_steps.py --steps 20 2000000 --batch 8 4096

Before the plan was lazy, ``--steps 2000000`` raised a 2-step cell's setup
peak from 306 to 1,546 MiB and its setup from 0.09 s to 26.6 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
from ftbench.harness.cell.worker import Cell
from ftbench.harness.contract.config import CellSpec, Recipe

steps, batch, model, data = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
spec = CellSpec(task="generation", backend="eager", model=model, data=data,
                recipe=Recipe(steps=steps, warmup=1, batch_size=batch, seq_len=64), device="cpu")
t0 = time.time()
cell = Cell(spec.to_dict(), t0)
assert cell.resolve()
cell.load_data(); cell.load_tokenizer(); cell.build_model(); cell.encode_and_plan(); cell.setup_engine()
first = cell.steps.step(0)  # the first step is collated as training would
print(json.dumps({"setup_s": time.time() - t0, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "steps_planned": len(cell.steps)}))
"""


def measure(steps: int, batch: int, args) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(batch), args.model, args.data],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 2_000_000])
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--data", default="builtin")
    args = ap.parse_args()
    base = None
    for batch in args.batch:
        for steps in args.steps:
            m = measure(steps, batch, args)
            base = base or m
            print(f"batch {batch:>6} steps {steps:>9,}: setup {m['setup_s']:6.2f} s, peak RSS "
                  f"{m['peak_rss_bytes'] / 2**20:7.1f} MiB ({100 * (m['peak_rss_bytes'] / base['peak_rss_bytes'] - 1):+.1f}% "
                  f"vs the first)")


if __name__ == "__main__":
    main()
