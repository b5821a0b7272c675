"""What checking each line against the record schema costs a reader of result sets.

Reads the same ``results.jsonl`` two ways, interleaved ``--rounds`` times:
plain ``json.loads`` of every line (what readers did before the schema) and
:func:`ftbench.harness.results.store.read_records` (strict parse + schema
check), and prints milliseconds per record of each with the median and range
over rounds.  By default the committed baseline, and a synthetic set of the
same records with ``--steps``-long loss curves and step times (a long run).

    python benchmarks/read_cost.py --rounds 7 --steps 600
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ftbench.harness.results.store import read_records

ROOT = Path(__file__).resolve().parent.parent


def plain(path: Path) -> int:
    with open(path / "results.jsonl", "rb") as f:
        return sum(1 for line in f if line.strip() and json.loads(line))


def checked(path: Path) -> int:
    rr = read_records(path)
    assert not rr.problems, rr.problems
    return len(rr.records)


def long_copy(src: Path, steps: int, dst: Path) -> Path:
    """The records of ``src`` with ``steps``-long curves, as a run of that many steps writes them."""
    dst.mkdir(parents=True, exist_ok=True)
    with open(src / "results.jsonl") as f, open(dst / "results.jsonl", "w") as out:
        for line in f:
            rec = json.loads(line)
            rec["train_loss"] = [4.0 * 0.999 ** i for i in range(steps)]
            rec["step_times_s"] = [0.05 + 1e-5 * (i % 7) for i in range(steps)]
            out.write(json.dumps(rec) + "\n")
    return dst


def per_record_ms(fn, path: Path) -> float:
    t0 = time.perf_counter()
    n = fn(path)
    return 1e3 * (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", type=Path, default=ROOT / "results" / "baseline-cpu")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    sets = {"as committed": args.set,
            f"{args.steps}-step curves": long_copy(args.set, args.steps, Path(tempfile.mkdtemp()) / "long")}
    checked(args.set)  # build the validator once, outside the clock
    for name, path in sets.items():
        times = {"json.loads": [], "read_records": []}
        for _ in range(args.rounds):
            times["json.loads"].append(per_record_ms(plain, path))
            times["read_records"].append(per_record_ms(checked, path))
        for how, ts in times.items():
            print(f"{name:>18} {how:>12}: {statistics.median(ts):7.3f} ms/record "
                  f"(range {min(ts):.3f}-{max(ts):.3f}, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
