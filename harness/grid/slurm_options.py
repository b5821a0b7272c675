"""Where and how Slurm jobs run: ``--slurm-*`` flags and a grid file's ``slurm:`` mapping, checked.

Settings only: :mod:`ftbench.harness.running.slurm` submits the jobs.

Example: ``options_from({"partition": "gpu", "time": "30m"}, "grid.yaml").time_s == 1800.0``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.format import parse_duration


@dataclass
class SlurmOptions:
    """Where and how the jobs run; the ``--slurm-*`` flags or a grid file's ``slurm:`` mapping.

    Example: ``SlurmOptions(partition="gpu", time_s=1800, gpus_per_node=8, options={"account": "perf"})``.
    """

    partition: str | None = None
    #: Job time limit; default: the cell's own time limit plus 5 minutes.
    time_s: float | None = None
    gpus_per_node: int | None = None
    nodes: int = 1
    #: Other sbatch options, long names without the dashes: {"account": "perf", "qos": "high"}.
    options: dict = field(default_factory=dict)
    #: Array tasks running at once (sbatch --array=...%N).
    parallelism: int = 256
    #: CPUs per job (sbatch --cpus-per-task); default one per rank. An offload cell's CPU Adam
    #: runs on its rank's share of these (OMP_NUM_THREADS = CPUs / ranks unless set).
    cpus_per_task: int | None = None

    def to_dict(self) -> dict:
        return {"partition": self.partition, "time_s": self.time_s, "gpus_per_node": self.gpus_per_node,
                "nodes": self.nodes, "options": dict(self.options), "parallelism": self.parallelism,
                "cpus_per_task": self.cpus_per_task}


SLURM_KEYS = ("partition", "time", "gpus_per_node", "nodes", "options", "parallelism", "cpus_per_task")


def options_from(mapping: dict, where: str) -> SlurmOptions:
    """A grid file's ``slurm:`` mapping (``time`` as a duration: ``30m``)."""
    if not isinstance(mapping, dict):
        raise FtbenchError(f"{where}: slurm must be a mapping like {{partition: gpu, time: 30m, nodes: 1}}")
    bad = sorted(set(mapping) - set(SLURM_KEYS))
    if bad:
        close = difflib.get_close_matches(bad[0], SLURM_KEYS, n=1)
        raise FtbenchError(f"{where}: unknown key {bad[0]!r} in slurm{f' (did you mean {close[0]!r}?)' if close else ''}"
                           f"; allowed: {', '.join(SLURM_KEYS)} (other sbatch options go under slurm.options)")
    opts = SlurmOptions(partition=mapping.get("partition"), nodes=mapping.get("nodes", 1),
                        gpus_per_node=mapping.get("gpus_per_node"), options=dict(mapping.get("options") or {}),
                        parallelism=mapping.get("parallelism", 256), cpus_per_task=mapping.get("cpus_per_task"))
    if mapping.get("time") is not None:
        opts.time_s = parse_duration(mapping["time"], f"{where}: slurm.time")
    return opts


def parse_option_flags(items) -> dict:
    """``--slurm-option account=perf --slurm-option exclusive`` -> ``{"account": "perf", "exclusive": True}``."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise FtbenchError(f"malformed --slurm-option {item!r}: write NAME=VALUE (an sbatch long option "
                               "without its dashes), e.g. --slurm-option account=perf")
        out[key] = value.strip() if eq else True
    return out
