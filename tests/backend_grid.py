"""One shared end-to-end run of every built-in backend, for test_backends and test_parity.

Running the cells once per test session (not once per module) keeps the
default suite within its time budget on a 2-core machine: a DeepSpeed rank
spends ~5-10 s importing, a compiled cell ~20 s compiling.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from conftest import ftbench, records

#: Every backend the backends issue names, data-parallel ones on 2 ranks.
BACKENDS = ("eager", "compile", "zero0", "zero1", "zero2", "zero3", "zero2-offload", "ddp", "fsdp")
#: Tiny fp32 recipe: dropout is off in the presets, so backends can agree to ~1e-7.
RECIPE = ["--steps", "8", "--warmup", "2", "--batch-size", "4", "--seq-len", "32", "--eval-examples", "8"]
#: Wide enough that rich never abbreviates a parity reason in the summary table.
WIDE = {"COLUMNS": "300"}


@functools.cache
def all_backends_run() -> tuple[Path, str, list[dict]]:
    """(out dir, stdout of ``ftbench run``, records) of the shared run."""
    out = Path(tempfile.mkdtemp(prefix="ftbench-backends-")) / "run"
    args = ["run", "--task", "generation"]
    for b in BACKENDS:
        args += ["--backend", b]
    proc = ftbench(*args, "--nproc", "2", *RECIPE, "--out", out, env=WIDE, timeout=900, check=True)
    (out.parent / "stderr.log").write_text(proc.stderr)  # what the user saw last (tests check for warnings)
    return out, proc.stdout, records(out)


def by_backend(recs: list[dict]) -> dict[str, dict]:
    return {r["backend"]: r for r in recs}
