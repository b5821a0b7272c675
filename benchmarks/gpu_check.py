"""The prepared GPU check: every CUDA path of ftbench, end to end, in under 10 minutes on one GPU.

    bash benchmarks/gpu_check.sh                 # on a GPU machine (auto picks cuda)
    bash benchmarks/gpu_check.sh --device cpu    # the same steps on CPU; CUDA-only steps say why they skip

Steps (each runs the real CLI, ``python -m ftbench.harness.cli run``, into its own folder):

1. ``dtypes``: a GPT-2 checkpoint stored in bf16 and its fp32 copy (same values), eager fp32:
   both must train fp32 weights, with the same losses, step time and MFU.
2. ``mfu-fp32``: eager and compile in fp32 on a GPT-2-small-shaped model: MFU against the
   fp32 (or TF32) peak of the exact GPU model.
3. ``precisions`` (CUDA): every backend in bf16 and in fp16 (data-parallel ones on one rank):
   status, speed, both memory windows, parity with eager.
4. ``launch``: the same eager cell forked from the fork server and as a plain subprocess (on
   CUDA this proves the fork server never initialised CUDA).
5. ``cuda-graphs`` (CUDA): ``compile:mode=reduce-overhead`` (CUDA graphs) against eager, bf16.
   (``max-autotune`` also captures graphs but autotunes for minutes: run it apart.)
6. ``zero-fp16`` (CUDA): ZeRO-1/2/3 in fp16 against eager fp16 (from step 3), same recipe: parity
   of the losses (a clip of loss-scaled gradients shows as a loss curve that leaves eager's).
7. ``nccl`` (>= 2 GPUs): ddp, fsdp and ZeRO-2 on 2 ranks over NCCL.

Prints one Markdown table of the figures worth keeping and writes ``OUT/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALL_BACKENDS = ("eager", "compile", "zero0", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload", "ddp",
                "fsdp")


class Check:
    """Runs the steps and collects one table row per cell (or per skipped step)."""

    def __init__(self, device: str, out: Path, steps: int, seq_len: int, batch: int, budget_s: float):
        self.device, self.out, self.rows = device, out, []
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.recipe = ["--steps", str(steps), "--warmup", str(max(1, steps // 5)), "--batch-size", str(batch),
                       "--seq-len", str(seq_len), "--eval-examples", "8", "--device", device]

    def over_budget(self, step: str) -> bool:
        """True (and the step recorded as skipped) once the time budget is spent: the table still prints."""
        spent = time.perf_counter() - self.t0
        if spent > self.budget_s:
            self.skip(step, f"time budget spent ({spent:.0f} s of {self.budget_s:.0f} s); rerun with a larger --budget")
            return True
        return False

    def skip(self, step: str, why: str) -> None:
        self.rows.append({"step": step, "cell": "-", "status": "skipped", "note": why})

    def run(self, step: str, *args, env: dict | None = None, label=None, time_limit: int = 300) -> list[dict]:
        """One ``ftbench run``; a table row per record."""
        if self.over_budget(step):
            return []
        out = self.out / step / str(len(self.rows))
        full_env = {**os.environ, **(env or {})}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ftbench.harness.cli", "run", *map(str, args), *self.recipe,
                               "--time-limit", str(time_limit), "--out", str(out)],
                              cwd=ROOT, env=full_env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        path = out / "results.jsonl"
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        if not recs:
            self.rows.append({"step": step, "cell": " ".join(map(str, args)), "status": f"exit {proc.returncode}",
                              "note": " ".join((proc.stderr or proc.stdout).strip().splitlines()[-1:])[:200]})
        for r in recs:
            self.rows.append(row(step, r, label(r) if label else None, wall))
        return recs


def row(step: str, r: dict, label: str | None, wall: float) -> dict:
    mib = lambda v: f"{v / 2**20:.0f}" if v else "-"  # noqa: E731
    parity = r.get("parity") or {}
    note = r.get("error") or r.get("mfu_note") or ""
    if r.get("backend_stats", {}).get("graph_breaks"):
        note += f" graph breaks {r['backend_stats']['graph_breaks']}"
    return {"step": step, "cell": label or f"{r['backend']}{' x' + str(r['nproc']) if r.get('nproc', 1) > 1 else ''} "
                                           f"{r['config']['recipe']['precision']}",
            "status": r["status"], "tok/s": f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-",
            "step ms": f"{r['step_time_s'] * 1e3:.1f}" if r.get("step_time_s") else "-",
            "MFU": f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-",
            "matmul": r.get("matmul_dtype") or "-", "weights": f"{r.get('weights_stored_dtype') or 'init'}"
                                                               f"->{r.get('weights_dtype') or '-'}",
            "setup MiB": mib(r.get("setup_peak_memory_bytes")), "train MiB": mib(r.get("train_peak_memory_bytes")),
            # The memory model's prediction beside the measured peak (docs/memory.md: not yet checked on a GPU).
            "predicted MiB": mib(r.get("memory_predicted_bytes")),
            "reserved MiB": mib(r.get("peak_reserved_bytes")), "driver MiB": mib(r.get("driver_used_bytes")),
            "parity": ("ok" if parity.get("passed") else "FAIL" if parity.get("passed") is False else "-")
            + (f" {parity['window_max_rel_dev']:.1e}" if parity.get("window_max_rel_dev") is not None else ""),
            "wall s": f"{wall:.0f}", "note": str(note)[:90]}


def save_gpt2(path: Path, width: int, layers: int, heads: int, dtype: str) -> None:
    """A random GPT-2 of the given shape as a local model directory (no download)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ftbench.harness.cell.tokenization import train_tokenizer
    from ftbench.harness.contract.registry import Registry

    task = Registry.load().task("generation")
    rows = task.builtin_data(0, {})["train"]
    tok = train_tokenizer((t for ex in rows for t in task.texts(ex, {})), 2000)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=width, n_layer=layers, n_head=heads, n_positions=1024,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).to(torch.bfloat16)  # both copies hold bf16-representable values
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tok.save_pretrained(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--steps", type=int, default=None, help="steps per cell (default 30 on CUDA, 10 on CPU)")
    p.add_argument("--budget", type=float, default=540, help="seconds after which remaining steps are skipped")
    args = p.parse_args(argv)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    out = args.out or Path(tempfile.mkdtemp(prefix="ftbench-gpu-check-"))
    steps = args.steps or (30 if cuda else 10)
    check = Check(device, out, steps, seq_len=128 if cuda else 32, batch=8 if cuda else 4, budget_s=args.budget)
    t0 = time.perf_counter()
    steps_of(check, cuda, gpus, out)
    print_table(check.rows, device, gpus, time.perf_counter() - t0)
    (out / "gpu_check.json").write_text(json.dumps(check.rows, indent=1))
    print(f"\nruns and gpu_check.json in {out}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in check.rows) else 1


def steps_of(check: Check, cuda: bool, gpus: int, out: Path) -> None:
    cuda_only = "CUDA-only path (run with --device cuda on a GPU machine)"
    models = out / "models"
    # 1. stored dtype vs trained dtype
    small = (768, 12, 12) if cuda else (128, 2, 4)
    for dtype in ("bfloat16", "float32"):
        save_gpt2(models / f"gpt2-{dtype}", *small, dtype)
    check.run("dtypes", "--task", "generation", "--backend", "eager", "--model", models / "gpt2-bfloat16",
              "--model", models / "gpt2-float32", label=lambda r: f"eager fp32, stored {Path(r['model']).name[5:]}")
    # 2. fp32 MFU (eager and compiled; the fp32 copy is the GPT-2-small shape on CUDA)
    if cuda:
        check.run("mfu-fp32", "--task", "generation", "--backend", "eager", "--backend", "compile",
                  "--model", models / "gpt2-float32")
    else:
        check.skip("mfu-fp32", "compile on CPU is covered by the test suite; the dtypes step gives the CPU fp32 MFU")
    # 3. every backend in bf16 and fp16
    for precision in ("bf16", "fp16"):
        if not cuda:
            check.skip(f"precisions {precision}", cuda_only)
            continue
        args = ["--task", "generation", "--precision", precision]
        for b in ALL_BACKENDS:
            args += ["--backend", b]
        check.run(f"precisions {precision}", *args, time_limit=240)
    # 4. fork server against a plain subprocess, same cell
    for launch in ("fork", "exec"):
        check.run("launch", "--task", "generation", "--backend", "eager", env={"FTBENCH_LAUNCH": launch},
                  label=lambda r, launch=launch: f"eager fp32, {launch}")
    # 5. CUDA graphs through torch.compile's modes
    if cuda:
        check.run("cuda-graphs", "--task", "generation", "--precision", "bf16",
                  "--backend", "eager", "--backend", "compile:mode=reduce-overhead",
                  label=lambda r: f"{r['backend']} bf16", time_limit=400)
    else:
        check.skip("cuda-graphs", cuda_only)
    # 6. ZeRO fp16: the loss scaler and clipping against eager's GradScaler. The precisions fp16 run
    #    already compared zero1-3 with eager fp16 step by step; their parity rows are repeated here.
    zero = [dict(r, step="zero-fp16") for r in check.rows
            if r["step"] == "precisions fp16" and str(r.get("cell", "")).startswith("zero")]
    if zero:
        check.rows.extend(zero)
    else:
        check.skip("zero-fp16", "no ZeRO fp16 cell ran" if cuda else cuda_only)
    # 7. multi-rank NCCL
    if gpus >= 2:
        check.run("nccl", "--task", "generation", "--precision", "bf16", "--backend", "eager", "--backend", "ddp",
                  "--backend", "fsdp", "--backend", "zero2", "--nproc", "2")
    else:
        check.skip("nccl", f"needs 2 GPUs, found {gpus}")


def print_table(rows: list[dict], device: str, gpus: int, seconds: float) -> None:
    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"\n## ftbench GPU check: {name} ({gpus} GPU(s)), torch {torch.__version__}, {seconds:.0f} s\n")
    cols = ["step", "cell", "status", "tok/s", "step ms", "MFU", "matmul", "weights", "setup MiB", "train MiB", "predicted MiB",
            "reserved MiB", "driver MiB", "parity", "wall s", "note"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
