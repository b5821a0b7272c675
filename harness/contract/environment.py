"""The ``environment`` of a result record: versions, machine and project commit.

Versions are read from package metadata, not by importing the packages, so
collecting them costs milliseconds.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "tokenizers", "deepspeed", "pluggy", "sacrebleu", "rouge-score",
            "datasets", "numpy", "ftbench")


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None; reads metadata, imports nothing.

    Example: ``if package_version("deepspeed") is None: raise Unavailable("pip install deepspeed")``.
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_tuple(version: str | None) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; unknown -> ``()``."""
    out = []
    for part in (version or "").split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The project's commit (``-dirty`` with uncommitted changes); ``$FTBENCH_GIT_COMMIT`` when set, for a
    tree extracted from git without its history (``ftbench ab``'s versions)."""
    if os.environ.get("FTBENCH_GIT_COMMIT"):
        return os.environ["FTBENCH_GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def collect(pm=None) -> dict:
    """Facts about the software and machine; plugins add theirs via ``collect_environment``."""
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": _affinity(),
        # Thread count changes step times a lot on a shared CPU (oversubscribed threads spin).
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": {p: package_version(p) for p in PACKAGES},
        "git_commit": git_commit(),
        "hostname": platform.node(),
    }
    if pm is not None:
        pm.hook.collect_environment(env=env)
    return env


def _affinity() -> int | None:
    """CPUs this process may run on (taskset/cgroup pinning slows a run without changing cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


#: Facts of a record's ``device`` that say how its cell was launched, not what machine ran it: a
#: one-process cell computes on every core's thread, each rank of a multi-rank cell on one (torchrun's
#: rule).  The same cell is launched the same way on both sides of a comparison, so they stay out of
#: the machine's identity (else one grid of both kinds "mixes 2 environments").
LAUNCH_FACTS = ("torch_threads",)


def comparable_view(env: dict) -> dict:
    """The parts of an environment that change measured figures (for compare and merge); the
    same for every record of one machine and software, whatever the cell's launch.

    Example: ``comparable_view({"cpu": "X", "device": {"type": "cpu", "torch_threads": 2}})["device"]``
    is ``{"type": "cpu"}``.
    """
    device = env.get("device")
    return {
        "cpu": env.get("cpu"),
        "cpu_count": env.get("cpu_count"),
        "cpu_affinity": env.get("cpu_affinity"),
        "omp_num_threads": env.get("omp_num_threads"),
        "device": {k: v for k, v in device.items() if k not in LAUNCH_FACTS} if isinstance(device, dict) else device,
        "versions": {k: v for k, v in (env.get("versions") or {}).items() if k in ("torch", "transformers",
                                                                               "deepspeed")},
    }
