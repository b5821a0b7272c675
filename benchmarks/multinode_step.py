"""Step time of a data-parallel cell: 1 node x 2 ranks against 2 nodes x 1 rank on loopback.

Runs, alternately and each in fresh processes, the same ddp cell as

* ``1x2``: one ``ftbench run --nproc 2`` (torchrun gives each rank one thread);
* ``2x1``: two ``ftbench run --nnodes 2`` node processes on 127.0.0.1 (ftbench
  sees that the nodes share this machine and splits its cores between them);
* ``2x1-all-cores`` (before the fix): the same two nodes with
  ``OMP_NUM_THREADS`` set to every core, which is what each rank got before:
  torchrun only sets one thread per rank when one node runs several.

and prints the median steady-state step time of each with its range, and its
ratio to ``1x2`` per round::

    python benchmarks/multinode_step.py --rounds 3 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _cmd(args, out):
    return [sys.executable, "-m", "ftbench.harness.cli", "run", *args, "--out", str(out)]


def _step(out: Path) -> float:
    (rec,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    assert rec["status"] == "ok", rec["error"]
    return rec["step_time_s"]


def run_mode(mode: str, recipe: list[str], tmp: Path, env: dict) -> float:
    out = tmp / f"{mode}-{os.urandom(4).hex()}"
    if mode == "1x2":
        subprocess.run(_cmd(["--backend", "ddp", "--nproc", "2", *recipe], out), env=env, check=True,
                       capture_output=True)
        return _step(out)
    node_env = dict(env)
    if mode == "2x1-all-cores":
        node_env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    port = _port()
    nodes = [subprocess.Popen(_cmd(["--backend", "ddp", "--nproc", "1", "--nnodes", "2", "--node-rank", str(r),
                                    "--master-addr", "127.0.0.1", "--master-port", str(port), *recipe],
                                   out if r == 0 else tmp / "follower"), env=node_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in (0, 1)]
    for p in nodes:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"{mode}: a node exited {p.returncode}: {err.decode()[-2000:]}")
    return _step(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--modes", nargs="+", default=["1x2", "2x1", "2x1-all-cores"])
    a = ap.parse_args()
    recipe = ["--task", "generation", "--steps", str(a.steps), "--warmup", "10", "--batch-size", "8",
              "--seq-len", "64", "--eval-examples", "8"]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    times: dict = {m: [] for m in a.modes}
    with tempfile.TemporaryDirectory(prefix="ftbench-multinode-") as tmp:
        for r in range(a.rounds):
            for m in a.modes:
                times[m].append(run_mode(m, recipe, Path(tmp), env))
            print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1] * 1e3:.1f} ms" for m in a.modes), flush=True)
    print("\n| layout | step ms, median (range) | ratio to 1x2, median (range) |\n| --- | --- | --- |")
    for m in a.modes:
        ratios = [t / b for t, b in zip(times[m], times.get("1x2", times[m]))]
        print(f"| {m} | {statistics.median(times[m]) * 1e3:.1f} ({min(times[m]) * 1e3:.1f}–{max(times[m]) * 1e3:.1f}) "
              f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
