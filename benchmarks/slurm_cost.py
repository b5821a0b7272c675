"""What going through Slurm costs per cell: the same tiny grid, local and ``--launcher slurm``.

Runs, alternately and into fresh result sets, a grid of N tiny eager cells
with the local launcher and with ``--launcher slurm`` (needs a cluster:
``.ci/start-slurm.sh`` starts a single-node one), and prints per launcher
the total wall time, the cells' own wall time (``wall_s``: process start
to result) and the rest per cell::

    python benchmarks/slurm_cost.py --cells 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def run(launcher: str, n: int, out: Path) -> dict:

    grid = out.with_suffix(".yaml")
    grid.write_text(json.dumps({"task": ["generation"], "backend": ["eager"], "sweep": {"seed": list(range(n))},
                                "settings": {"steps": 6, "warmup": 2, "batch_size": 4, "seq_len": 32,
                                             "eval_examples": 8}}))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ftbench.harness.cli", "run", "--grid", str(grid), "--launcher", launcher,
                    "--out", str(out)], check=True, capture_output=True)
    total = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    assert len(recs) == n and all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    return {"total": total, "cell_wall": sum(r["wall_s"] for r in recs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    res: dict = {"local": [], "slurm": []}
    with tempfile.TemporaryDirectory(prefix="ftbench-slurm-cost-") as tmp:
        for r in range(a.rounds):
            for launcher in res:
                res[launcher].append(run(launcher, a.cells, Path(tmp) / f"{launcher}-{r}"))
                x = res[launcher][-1]
                print(f"round {r + 1} {launcher}: total {x['total']:.1f} s, cells' own wall {x['cell_wall']:.1f} s",
                      flush=True)
    print(f"\n| launcher | total s for {a.cells} cells, median (range) | per cell s | cells' own wall s |")
    print("| --- | --- | --- | --- |")
    for launcher, xs in res.items():
        tot = [x["total"] for x in xs]
        print(f"| {launcher} | {statistics.median(tot):.1f} ({min(tot):.1f}–{max(tot):.1f}) | "
              f"{statistics.median(tot) / a.cells:.1f} | {statistics.median(x['cell_wall'] for x in xs):.1f} |")


if __name__ == "__main__":
    main()
