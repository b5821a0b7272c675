"""Predicted against measured peak memory, GPT-2 widths x backends, 2 ranks on CPU.

Builds random-init GPT-2 models of growing width (saved as local model
directories, so the real ``--model DIR`` path runs), trains each for a few
steps on eager (1 rank) and on every sharding backend at 2 ranks, and
prints per cell: the memory model's prediction per rank
(``memory_predicted_bytes``), the measured peak (max over ranks, VmHWM),
and the part that grows with the model: ``peak - rss_before_model`` against
the prediction less the harness's own footprint.  Cells run with
``--cpu-memory live`` (the peak of live tensors, what the model predicts) and
``resident`` (glibc's defaults, for the ratio between the two).

    FTBENCH_WIDTHS=256x4,768x8 python benchmarks/memory_model_check.py [OUT_DIR]
    FTBENCH_CPU_MEMORY=live python benchmarks/memory_model_check.py     # only the live mode (half the time)
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


#: Memory modes to measure (--cpu-memory): live is what the model predicts; resident is glibc's default.
MODES = tuple(os.environ.get("FTBENCH_CPU_MEMORY", "live,resident").split(","))


def run(model_dir: Path, out: Path, modes=MODES) -> None:
    """One result set per mode: ``out/live``, ``out/resident``."""
    for mode in modes:
        args = [sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation", "--model", str(model_dir),
                "--steps", "3", "--warmup", "1", "--seq-len", "32", "--batch-size", "4", "--eval-examples", "4",
                "--nproc", "2", "--out", str(out / mode), "--cpu-memory", mode]
        for b in BACKENDS:
            args += ["--backend", b]
        subprocess.run(args, check=True, cwd=ROOT)


def _predicted(r: dict, models: Path | None):
    """The current memory model's prediction for a record's cell (its model moved to ``models``)."""
    from ftbench.harness.contract.config import CellSpec
    from ftbench.harness.grid.memplan import predict_cell
    from ftbench.harness.contract.registry import Registry

    config = dict(r["config"])
    if models is not None:
        config["model"] = str(models / Path(config["model"]).name)
    return predict_cell(Registry.load(), CellSpec.from_dict(config))


def _fixed(pred) -> int:
    """The prediction's part that does not grow with the model: the harness and the backend's runtime."""
    return pred.breakdown.get("harness", 0) + pred.breakdown.get("backend runtime", 0)


def table(out_dirs, models: Path | None = None) -> str:
    """Predicted against measured per (model, backend): the live peak, the growth over the harness, and
    the resident peak under glibc's defaults where that mode ran too."""
    lines = ["| model | params | backend | predicted per rank | peak (live) | predicted / live "
             "| predicted growth | measured growth | growth ratio | peak (resident) | resident / live | peak in |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, out in out_dirs:
        cells: dict = {}
        records = [line for f in sorted(out.glob("**/results.jsonl")) for line in f.read_text().splitlines()]
        for line in records:
            r = json.loads(line)
            mode = r["config"].get("cpu_memory", "resident")
            cells.setdefault(r["backend"] + (f" ×{r['nproc']}" if r["nproc"] > 1 else ""), {})[mode] = r
        for backend, by_mode in cells.items():
            live, resident = by_mode.get("live"), by_mode.get("resident")
            res = f"{resident['peak_memory_bytes'] / MiB:,.0f} MiB" if resident and resident["status"] == "ok" \
                else (resident or {}).get("status", "")
            if not live or live["status"] != "ok":
                lines.append(f"| {name} | | {backend} | | {(live or {}).get('status', '-')} | | | | | {res} | | |")
                continue
            pred = _predicted(live, models)
            peak, before = live["peak_memory_bytes"], live["rss_before_model_bytes"]
            grown_pred, grown = pred.device_bytes - _fixed(pred), peak - before
            ratio = f"{resident['peak_memory_bytes'] / peak:.2f}" if resident and resident["status"] == "ok" else ""
            lines.append(f"| {name} | {live['total_params'] / 1e6:.1f} M | {backend} | {pred.device_bytes / MiB:,.0f} MiB "
                         f"| {peak / MiB:,.0f} MiB | {pred.device_bytes / peak:.2f} | {grown_pred / MiB:,.0f} MiB "
                         f"| {grown / MiB:,.0f} MiB | {grown_pred / grown:.2f} | {res} | {ratio} | {pred.peak_phase} |")
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
