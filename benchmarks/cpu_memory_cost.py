"""What ``--cpu-memory live`` costs in speed: tokens/s live over resident, interleaved rounds.

Each round runs the same eager cell once per mode, alternating, each a fresh
``ftbench run``; the figure is the ratio of the median tokens/s (live over
resident) with the per-round ratios as the spread, plus each mode's median
peak.

    python benchmarks/cpu_memory_cost.py --rounds 3 [--model DIR] [--steps 25]
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
MODES = ("resident", "live")


def run_once(model: str, mode: str, steps: int, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation", "--backend", "eager",
                    "--model", model, "--steps", str(steps), "--warmup", "5", "--seq-len", "64", "--batch-size", "8",
                    "--eval-examples", "4", "--cpu-memory", mode, "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True)
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    if record["status"] != "ok":
        raise SystemExit(f"{mode} cell ended {record['status']}: {record.get('error')}")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--model", help="a model directory (default: a random-init GPT-2 768 x 8, saved here)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from memory_check import save_model

            model = str(Path(tmp) / "gpt2-768x8")
            save_model(Path(model), 768, 8)
        speed = {m: [] for m in MODES}
        peak = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in MODES:
                rec = run_once(model, mode, args.steps, Path(tmp) / f"{mode}-{r}")
                speed[mode].append(rec["tokens_per_s"])
                peak[mode].append(rec["peak_memory_bytes"] / 2**20)
                print(f"round {r + 1} {mode:8s} {rec['tokens_per_s']:8.1f} tokens/s  peak {peak[mode][-1]:,.0f} MiB",
                      flush=True)
    ratios = [live / res for live, res in zip(speed["live"], speed["resident"])]
    ratio = statistics.median(speed["live"]) / statistics.median(speed["resident"])
    print(f"live / resident tokens/s: {ratio:.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f}, n {len(ratios)}); "
          f"median peak resident {statistics.median(peak['resident']):,.0f} MiB, "
          f"live {statistics.median(peak['live']):,.0f} MiB")


if __name__ == "__main__":
    main()
