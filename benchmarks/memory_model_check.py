"""Predicted against measured peak memory, GPT-2 widths x backends, 2 ranks on CPU.

Builds random-init GPT-2 models of growing width (saved as local model
directories, so the real ``--model DIR`` path runs), trains each for a few
steps on eager (1 rank) and on every sharding backend at 2 ranks, and
prints per cell: the memory model's prediction per rank
(``memory_predicted_bytes``), the measured peak (max over ranks, VmHWM),
and the part that grows with the model: ``peak - rss_before_model`` against
the prediction less the harness's own footprint.

    FTBENCH_WIDTHS=256x4,768x8 python benchmarks/memory_model_check.py [OUT_DIR]
    python benchmarks/memory_model_check.py save DIR 256x4     # just save such a model
    python benchmarks/memory_model_check.py table MODELS_DIR OUT_DIR...   # recompute predictions
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: width x layers; FTBENCH_WIDTHS=768x8,1024x12 picks others.
WIDTHS = tuple(tuple(map(int, w.split("x"))) for w in os.environ.get("FTBENCH_WIDTHS", "256x4,768x8").split(","))
BACKENDS = ("eager", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload", "fsdp", "ddp")
MiB = 2**20


def save_model(path: Path, width: int, layers: int) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory_check import save_model as save

    save(path, width, layers)


def run(model_dir: Path, out: Path) -> None:
    args = [sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation", "--model", str(model_dir),
            "--steps", "3", "--warmup", "1", "--seq-len", "32", "--batch-size", "4", "--eval-examples", "4",
            "--nproc", "2", "--out", str(out)]
    for b in BACKENDS:
        args += ["--backend", b]
    subprocess.run(args, check=True, cwd=ROOT)


def _predicted(r: dict, models: Path | None) -> int:
    """The current memory model's prediction for a record's cell (its model moved to ``models``)."""
    from ftbench.harness.grid.config import CellSpec
    from ftbench.harness.grid.memplan import predict_cell
    from ftbench.harness.registry import Registry

    config = dict(r["config"])
    if models is not None:
        config["model"] = str(models / Path(config["model"]).name)
    return predict_cell(Registry.load(), CellSpec.from_dict(config)).device_bytes


def table(out_dirs, models: Path | None = None) -> str:
    from ftbench.harness.memory_model import HARNESS_CPU_BYTES

    lines = ["| model | params | backend | predicted per rank | measured peak | predicted / measured "
             "| predicted growth | measured growth | growth ratio |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for name, out in out_dirs:
        for line in (out / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            ranks = f" ×{r['nproc']}" if r["nproc"] > 1 else ""
            if r["status"] != "ok":
                lines.append(f"| {name} | | {r['backend']}{ranks} | | {r['status']} | | | | |")
                continue
            pred, peak, before = _predicted(r, models), r["peak_memory_bytes"], r["rss_before_model_bytes"]
            grown_pred = pred - HARNESS_CPU_BYTES
            grown = peak - before
            lines.append(f"| {name} | {r['total_params'] / 1e6:.1f} M | {r['backend']}{ranks} | {pred / MiB:,.0f} MiB "
                         f"| {peak / MiB:,.0f} MiB | {pred / peak:.2f} | {grown_pred / MiB:,.0f} MiB "
                         f"| {grown / MiB:,.0f} MiB | {grown_pred / grown:.2f} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["table"]:
        # table MODELS_DIR OUT_DIR...: recompute the predictions of finished runs with the current model.
        outs = [(Path(o).name.removeprefix("out-"), Path(o)) for o in sys.argv[3:]]
        print(table(outs, Path(sys.argv[2])))
        return
    if sys.argv[1:2] == ["save"]:
        width, layers = map(int, sys.argv[3].split("x"))
        save_model(Path(sys.argv[2]), width, layers)
        return
    keep = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory() as tmp:
        base = keep or Path(tmp)
        outs = []
        for width, layers in WIDTHS:
            name = f"gpt2 {width}x{layers}"
            model_dir = Path(tmp) / f"gpt2-{width}x{layers}"
            save_model(model_dir, width, layers)
            out = base / f"out-{width}x{layers}"
            run(model_dir, out)
            outs.append((name, out))
        print(table(outs))


if __name__ == "__main__":
    main()
