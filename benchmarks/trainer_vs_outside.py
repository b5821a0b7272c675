"""The ``trainer`` backend's step time against the same ``Trainer`` run outside ftbench.

Same model (the cell's preset, same seed), same rows in the same order, same
``TrainingArguments``; side by side in one run, rounds interleaved, each run in
a fresh process:

* **ftbench**: ``ftbench run --backend trainer`` (plus ``eager``, for the
  Trainer-to-eager ratio), the record's median steady-state step;
* **outside**: a plain script — ``Trainer(model, args, train_dataset=rows,
  data_collator=default_data_collator)`` and a callback that synchronises the
  device and reads ``time.perf_counter()`` at each ``on_step_end`` — nothing of
  ftbench in the loop.

The target is a ratio within 5%.  Figures need a quiet machine::

    python benchmarks/trainer_vs_outside.py --rounds 3 --steps 60 --model tiny-gpt2
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


def ftbench_run(args, out: Path) -> dict[str, dict]:
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", "--task", args.task, "--model", args.model,
           "--backend", "eager", "--backend", "trainer", "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--eval-examples", "4",
           "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return {r["backend"]: r for r in recs}


def outside(config_path: str, warmup: int) -> None:
    """Child process: the cell's model and rows, then the plain Trainer with the same arguments."""
    # Imported here: the parent process only launches runs and must stay light.
    import torch
    from transformers import Trainer, TrainerCallback, default_data_collator

    from ftbench.harness.cell.worker import Cell
    from ftbench.plugins.hf_trainer import TrainerEngine
    from ftbench.harness.contract.engine import EngineContext

    spec = json.loads(Path(config_path).read_text())
    cell = Cell(spec, time.time())
    cell.resolve()
    cell.load_data()
    cell.load_tokenizer()
    cell.build_model()
    cell.encode_and_plan()
    rows = [{k: v[i] for k, v in mb.items() if k != "loss_scale"}
            for micro, _ in cell.steps for mb in micro for i in range(len(mb["input_ids"]))]
    ctx = EngineContext(recipe=cell.recipe, device=cell.device, loss_fn=None)
    tmp = tempfile.mkdtemp()
    targs = TrainerEngine({}, ctx).training_arguments(tmp)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cell.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            times.append(t - self.t)
            self.t = t

    Trainer(model=cell.model, args=targs, train_dataset=rows, data_collator=default_data_collator,
            callbacks=[Timer()]).train()
    print(json.dumps({"median_step_s": statistics.median(times[warmup:]), "steps": len(times)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="generation")
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--outside-config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.outside_config:
        return outside(args.outside_config, args.warmup)
    rows = []
    for rnd in range(args.rounds):
        out = Path(tempfile.mkdtemp(prefix="ftbench-tvo-")) / "run"
        recs = ftbench_run(args, out)
        config = out.parent / "config.json"
        config.write_text(json.dumps(recs["trainer"]["config"]))
        child = subprocess.run([sys.executable, __file__, "--outside-config", str(config),
                                "--warmup", str(args.warmup)], check=True, capture_output=True, text=True)
        plain = json.loads(child.stdout.strip().splitlines()[-1])["median_step_s"]
        inside, eager = recs["trainer"]["step_time_s"], recs["eager"]["step_time_s"]
        rows.append((inside, plain, eager))
        print(f"round {rnd + 1}: trainer backend {inside * 1e3:.2f} ms, Trainer outside {plain * 1e3:.2f} ms "
              f"(ratio {inside / plain:.3f}), eager {eager * 1e3:.2f} ms (Trainer/eager {inside / eager:.3f})")
    ratio = statistics.median(i / p for i, p, _ in rows)
    vs_eager = statistics.median(i / e for i, _, e in rows)
    print(f"median over {args.rounds} rounds: trainer backend / Trainer outside = {ratio:.3f} "
          f"({'within' if abs(ratio - 1) <= 0.05 else 'OUTSIDE'} the 5% target); trainer / eager = {vs_eager:.3f}")


if __name__ == "__main__":
    main()
