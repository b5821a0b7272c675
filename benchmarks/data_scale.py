"""Setup time and peak memory of a short cell against the size of its dataset.

Generates local generation datasets of N lines (about 290 bytes of JSON per
line, like a real corpus of sentences), runs one 20-step cell on each
(generation x eager x tiny-gpt2, batch 8, seq 64) with an empty
``$FTBENCH_CACHE`` so that the tokenizer, the line index and the encoding
are all paid for, and prints ``setup_s`` and the cell's peak RSS from its
record.  ``--tree DIR`` runs another checkout of ftbench (e.g. a worktree of
the commit before a change) in the same session, for before/after tables.

    python benchmarks/data_scale.py --lines 1000 3000 10000 100000 300000 1000000
    mkdir /tmp/before && git archive 6b3b35c | tar -x -C /tmp/before
    python benchmarks/data_scale.py --tree /tmp/before --lines 1000 3000 300000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches near "
         "old harbour towns and every morning bright sparrows sing about rivers mountains bread").split()


def make_dataset(root: Path, lines: int) -> Path:
    d = root / f"gen-{lines}"
    if (d / "train.jsonl").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(lines)
    with open(d / "train.jsonl", "w") as f:
        for i in range(lines):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=48)) + f" ({i})."}) + "\n")
    with open(d / "validation.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=48)) + "."}) + "\n")
    return d


def shim(tree: Path, where: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes ``import ftbench`` load ``tree``."""
    pkg = where / "ftbench"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("harness", "plugins", "tasks"):
        (pkg / name).symlink_to(tree / name)
    (pkg / "__init__.py").symlink_to(tree / "ftbench" / "__init__.py")
    return where


def run_cell(data: Path, steps: int, tree: Path | None, tmp: Path) -> dict:
    env = dict(os.environ, FTBENCH_CACHE=str(tempfile.mkdtemp(dir=tmp, prefix="cache-")))
    if tree is not None:
        env["PYTHONPATH"] = str(shim(tree.resolve(), Path(tempfile.mkdtemp(dir=tmp, prefix="shim-"))))
    out = Path(tempfile.mkdtemp(dir=tmp, prefix="out-"))
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation", "--backend", "eager",
           "--data", str(data), "--steps", str(steps), "--warmup", "2", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        raise SystemExit(f"ftbench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    if rec["status"] != "ok":
        raise SystemExit(f"cell {rec['status']}: {rec['error']}")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, nargs="+", default=[1000, 3000, 10000, 100000, 300000, 1000000])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tree", type=Path, default=None, help="another ftbench checkout to measure (default: this one)")
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "ftbench-data-scale")
    args = ap.parse_args()
    label = str(args.tree) if args.tree else "this checkout"
    print(f"| lines | file MB | setup s | peak RSS MiB | rows read | data / tokenizer / encode s | ({label}, {args.steps} steps)")
    print("|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="ftbench-scale-") as tmp:
        for n in args.lines:
            data = make_dataset(args.data_dir, n)
            rec = run_cell(data, args.steps, args.tree, Path(tmp))
            mb = (data / "train.jsonl").stat().st_size / 1e6
            rows = (rec.get("rows_read") or {}).get("train", "all")
            ph = rec.get("setup_phases") or {}
            phases = " / ".join(f"{ph.get(k, float('nan')):.2f}" for k in ("data_s", "tokenizer_s", "encode_s"))
            print(f"| {n:,} | {mb:.1f} | {rec['setup_s']:.2f} | {rec['peak_memory_bytes'] / 2**20:.0f} | {rows} "
                  f"| {phases} |", flush=True)


if __name__ == "__main__":
    main()
