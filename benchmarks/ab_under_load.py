"""False alarms under a load that comes and goes: ``ftbench ab`` against two separate runs + ``compare``.

Both versions are the same code (``--base HEAD`` against a clean working
tree), so every regression or improvement called is a false alarm.  While
the runs go on, a planted load burns CPU on every core for a spell, rests
for a spell, and so on (seeded, so that both methods meet the same kind of
load).  Spells last 10-40 s by default, as another job on a shared runner
starts and ends: long enough to cover one side of a separate pair of runs
and not the other, which ``ab``'s interleaving is built to survive.
Prints both false-alarm rates side by side.

Run it on an otherwise quiet machine, from a clean checkout (no uncommitted
changes, or ``ab`` compares them too):

    python benchmarks/ab_under_load.py --trials 5 --rounds 4

Each trial is one ``ftbench ab`` and one pair of ``ftbench run --repeat
ROUNDS`` + ``ftbench compare`` over the same cells.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELLS = ["--task", "generation", "--task", "classification", "--backend", "eager", "--steps", "20",
         "--warmup", "3", "--eval-examples", "16"]


def _burn(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x = (x * 31 + 7) % 1000003


def planted_load(stop, seed: int, on=(10.0, 40.0), off=(10.0, 40.0)) -> None:
    """Every core busy for a random spell, then idle for one, until ``stop`` is set."""
    rng = random.Random(seed)
    while not stop.is_set():
        spell = time.time() + rng.uniform(*on)
        workers = [mp.Process(target=_burn, args=(spell,)) for _ in range(os.cpu_count() or 1)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop.wait(rng.uniform(*off))


def _calls(report: str) -> int:
    """Regressions + improvements named in a compare/ab Markdown report (each printed: which
    cell, which figure, by how much)."""
    text = Path(report).read_text() if Path(report).exists() else ""
    lines = [line for line in text.splitlines() if re.search(r"\|\s*(regression|improvement)\s*\|\s*$", line)]
    for line in lines:
        print(f"    false alarm: {line.strip()}", flush=True)
    return len(lines)


def one_ab(work: Path, rounds: int) -> int:
    out = work / "ab"
    subprocess.run([sys.executable, "-m", "ftbench.harness.cli", "ab", "--base", "HEAD", "--rounds", str(rounds),
                    "--out", str(out), "--", *CELLS], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return _calls(str(out / "ab.md"))


def one_pair(work: Path, rounds: int) -> int:
    sets = []
    for side in ("base", "new"):
        out = work / side
        subprocess.run([sys.executable, "-m", "ftbench.harness.cli", "run", *CELLS, "--repeat", str(rounds),
                        "--out", str(out)], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=True)
        sets.append(str(out))
    md = work / "compare.md"
    subprocess.run([sys.executable, "-m", "ftbench.harness.cli", "compare", *sets, "--markdown", str(md)], cwd=work,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return _calls(str(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spell", type=float, nargs=2, default=(10.0, 40.0), metavar=("MIN", "MAX"),
                    help="seconds a load spell (and a rest) lasts, drawn uniformly (default 10 40)")
    ap.add_argument("--keep", type=Path, default=None, help="keep every trial's result sets and reports here")
    args = ap.parse_args()
    results = {"ab": [], "separate": []}
    for trial in range(args.trials):
        for method, fn in (("ab", one_ab), ("separate", one_pair)):
            stop = mp.Event()
            load = mp.Process(target=planted_load, args=(stop, args.seed + trial, tuple(args.spell), tuple(args.spell)))
            load.start()
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    work = Path(tmp) if args.keep is None else args.keep / f"trial{trial + 1}-{method}"
                    work.mkdir(parents=True, exist_ok=True)
                    t0 = time.time()
                    calls = fn(work, args.rounds)
            finally:
                stop.set()
                load.join()
            results[method].append(calls)
            print(f"trial {trial + 1}: {method:8s} {calls} false alarm(s) ({time.time() - t0:.0f} s)", flush=True)
    print()
    print("| method | trials with a false alarm | false alarms in all |")
    print("| --- | ---: | ---: |")
    for method, calls in results.items():
        print(f"| {method} | {sum(c > 0 for c in calls)} of {len(calls)} | {sum(calls)} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
