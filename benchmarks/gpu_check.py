"""The first GPU run in one call: every CUDA path of ftbench, checked within a short device lease.

    python3 benchmarks/gpu_check.py --out gpu-check                 # on the GPU machine (docs/gpu.md)
    python3 benchmarks/gpu_check.py --out gpu-check2 --only fp16 --only cuda-graphs --only exec   # what is left
    python3 benchmarks/gpu_check.py --device cpu --budget 120 --out DIR   # the same code path on a CPU

Runs from a checkout after the one install line of docs/gpu.md (an editable install: a plain one
would be shadowed by the checkout's own ``ftbench/`` folder).  It never imports ftbench itself:
every step runs the real command line, ``python3 -m ftbench.harness.cli``, as a subprocess, so
that a broken import is a failed step and not a crashed check.

* ``--budget`` seconds in all: no step starts once it is spent, and each step has its own
  ``--step-timeout`` (its whole process group is stopped then), so the check ends within
  budget + one step's timeout.
* Steps run in the order of what is most likely to break on CUDA: bf16 eager and compiled
  cells (with the memory windows and MFU), data-parallel ranks, DeepSpeed, then profiling,
  stored dtypes, fp16, CUDA graphs and the exec launch for comparison.
* Everything is written as it goes to ``--out``: each step's own folder (``NN-step/``: the
  result set ``results.jsonl`` that ftbench appends per cell, ``step.json`` with the checks,
  ``command.log``), and after every step ``summary.md`` / ``summary.json`` and a line in
  ``progress.log``; a check killed midway leaves all of that behind.  ``--bundle FILE.tgz``
  also packs that folder (less the profiler's traces) after every step, for a lease that
  returns only a few small files.
* Verdict: ``passed`` (exit 0) when every step that applies passed; ``failed`` (exit 1) when a
  check failed; ``incomplete`` (exit 3) when a step was skipped for a missing package, was not
  reached within the budget, timed out or was interrupted.  A step that does not apply here
  (CUDA-only on a CPU, two GPUs needed) is ``n/a`` and leaves the verdict alone.

The checks each step makes, and the figures to expect on an H200, are in docs/gpu.md.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable or "python3"
INSTALL_LINE = ("python3 -m pip install --no-index --find-links WHEELS WHEELS/*.whl && "
                "python3 -m pip install --no-build-isolation --no-deps -e .")
#: Step states that make the verdict "incomplete", and those that leave it alone.
INCOMPLETE = ("skipped-missing", "not-run", "timeout", "interrupted")
NOT_APPLICABLE = "n/a"
#: Verdict -> exit status.
EXIT = {"passed": 0, "failed": 1, "incomplete": 3}
_PR_SET_PDEATHSIG = 1


# ------------------------------------------------------------------ running one command


def _die_with_parent() -> None:
    # A check killed outright (SIGKILL) must not leave its ftbench run behind: the run's driver
    # gets SIGTERM, stops its cell and exits, as on Ctrl-C.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Outcome:
    returncode: int | None
    timed_out: bool
    seconds: float


class Runner:
    """Runs one command at a time in its own process group, under a timeout; remembers it so
    that a signal to the check stops it too."""

    def __init__(self):
        self.current: subprocess.Popen | None = None

    def run(self, argv: list[str], log: Path, timeout_s: float, env: dict | None = None) -> Outcome:
        t0 = time.monotonic()
        with open(log, "ab") as out:
            out.write(("$ " + " ".join(map(str, argv)) + "\n").encode())
            out.flush()
            self.current = subprocess.Popen(list(map(str, argv)), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})}, start_new_session=True,
                                            preexec_fn=_die_with_parent)
            try:
                code, timed_out = self.current.wait(timeout_s), False
            except subprocess.TimeoutExpired:
                _stop_group(self.current)
                code, timed_out = self.current.returncode, True
            finally:
                self.current = None
        return Outcome(code, timed_out, time.monotonic() - t0)

    def stop(self) -> None:
        if self.current is not None:
            _stop_group(self.current, grace_s=5.0)


# ------------------------------------------------------------------ steps


@dataclass
class Step:
    name: str
    proves: str
    #: Backends the step runs (their availability decides "skipped-missing").
    backends: tuple[str, ...] = ()
    cuda_only: bool = False
    status: str = "pending"
    checks: list = field(default_factory=list)   # [(ok: bool, text)]
    rows: list = field(default_factory=list)     # one summary row per record
    note: str = ""
    seconds: float = 0.0

    def check(self, ok: bool, text: str) -> bool:
        self.checks.append((bool(ok), text))
        return bool(ok)


class Check:
    """The steps, their folders and the running summary."""

    def __init__(self, args, cuda: bool, gpus: int):
        self.args, self.cuda, self.gpus = args, cuda, gpus
        self.out: Path = args.out
        self.runner = Runner()
        self.t0 = time.monotonic()
        self.steps: list[Step] = []
        self.available: dict[str, str | None] = {}   # backend -> None (available) or why not
        self.models: dict[str, Path] = {}
        self.device_name = "cpu"
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = args.steps or (30 if cuda else 6)
        self.recipe = ["--steps", n, "--warmup", max(2, n // 3), "--batch-size", 16 if cuda else 4,
                       "--seq-len", 256 if cuda else 32, "--eval-examples", 16 if cuda else 8,
                       "--device", "cuda" if cuda else "cpu"]

    # ---- time

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.args.budget - self.elapsed()

    # ---- output

    def folder(self, step: Step) -> Path:
        d = self.out / f"{self.steps.index(step):02d}-{step.name}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def verdict(self) -> str:
        states = [s.status for s in self.steps]
        if "failed" in states:
            return "failed"
        if any(s in INCOMPLETE or s in ("pending", "running") for s in states):
            return "incomplete"
        return "passed"

    def write_summary(self) -> None:
        """summary.json and summary.md, replaced atomically: a reader (or a kill) never sees half."""
        data = {"verdict": self.verdict(), "device": self.device_name, "gpus": self.gpus,
                "elapsed_s": round(self.elapsed(), 1), "budget_s": self.args.budget,
                "step_timeout_s": self.args.step_timeout,
                "steps": [{"step": s.name, "status": s.status, "seconds": round(s.seconds, 1), "note": s.note,
                           "proves": s.proves, "checks": [{"ok": ok, "check": t} for ok, t in s.checks],
                           "cells": s.rows} for s in self.steps]}
        _atomic_write(self.out / "summary.json", json.dumps(data, indent=1, default=str))
        _atomic_write(self.out / "summary.md", summary_markdown(data))
        if self.args.bundle:
            write_bundle(self.out, self.args.bundle)

    def log(self, text: str) -> None:
        line = f"[{self.elapsed():6.0f} s] {text}"
        print(line, flush=True)
        with open(self.out / "progress.log", "a") as f:
            f.write(line + "\n")

    def finish(self, step: Step, status: str | None = None, note: str = "") -> None:
        if status is None:
            status = "passed" if all(ok for ok, _ in step.checks) else "failed"
        step.status, step.note = status, note or step.note
        _atomic_write(self.folder(step) / "step.json",
                      json.dumps({"step": step.name, "status": step.status, "note": step.note,
                                  "seconds": round(step.seconds, 1),
                                  "checks": [{"ok": ok, "check": t} for ok, t in step.checks],
                                  "cells": step.rows}, indent=1, default=str))
        failed = [t for ok, t in step.checks if not ok]
        self.log(f"{step.name}: {step.status}" + (f" ({step.note})" if step.note else "")
                 + (f"; failed: {'; '.join(failed)}" if failed else ""))
        for r in step.rows:
            self.log("    " + row_text(r))
        self.write_summary()

    # ---- running

    def ftbench(self, step: Step, *args, env: dict | None = None, recipe: bool = True) -> list[dict]:
        """One ``ftbench run`` into the step's folder; its records (also those of a run cut short)."""
        folder = self.folder(step)
        out = folder / "runs"
        argv = [PY, "-m", "ftbench.harness.cli", "run", *args, *(self.recipe if recipe else []),
                "--time-limit", int(self.args.step_timeout), "--out", out]
        timeout = self.args.step_timeout
        o = self.runner.run(argv, folder / "command.log", timeout, env=env)
        step.seconds += o.seconds
        recs = read_records(out / "results.jsonl")
        if o.timed_out:
            step.status = "timeout"
        elif o.returncode not in (0, None) and not recs:
            step.check(False, f"ftbench run exited {o.returncode} with no record: {last_line(folder / 'command.log')}")
        for r in recs:
            step.rows.append(summary_row(r))
        return recs

    def python(self, step: Step, code: str, timeout: float | None = None) -> tuple[Outcome, str]:
        folder = self.folder(step)
        log = folder / "command.log"
        o = self.runner.run([PY, "-c", code], log, min(timeout or self.args.step_timeout, self.args.step_timeout))
        step.seconds += o.seconds
        return o, log.read_text(errors="replace")

    def start(self, step: Step) -> bool:
        """Whether the step may run now; else it is finished as n/a, skipped-missing or not-run."""
        self.steps.append(step)
        if self.args.only and step.name not in self.args.only and step.name != "install":
            self.steps.remove(step)
            return False
        if step.cuda_only and not self.cuda:
            self.finish(step, NOT_APPLICABLE, "CUDA-only: run with a GPU")
            return False
        missing = {b: self.available.get(b, "not listed by ftbench list") for b in step.backends
                   if self.available.get(b, "not listed by ftbench list") is not None}
        if missing and self.available:
            b, why = next(iter(missing.items()))
            self.finish(step, "skipped-missing", f"{', '.join(missing)} unavailable: {why}")
            return False
        if self.remaining() <= 0:
            self.finish(step, "not-run", f"budget of {self.args.budget:.0f} s spent; rerun with --only {step.name}")
            return False
        step.status = "running"
        self.log(f"{step.name}: running ({step.proves})")
        self.write_summary()
        _atomic_write(self.folder(step) / "step.json", json.dumps({"step": step.name, "status": "running"}))
        return True

    def done(self, step: Step) -> None:
        if step.status == "timeout":
            self.finish(step, "timeout", f"stopped after the step timeout of {self.args.step_timeout:.0f} s")
        else:
            self.finish(step)


# ------------------------------------------------------------------ the steps themselves


def step_install(c: Check) -> bool:
    step = Step("install", "ftbench imports from this checkout and lists its backends")
    c.start(step)
    o, text = c.python(step, "import json, ftbench.harness.cli, subprocess, sys\n"
                             "out = subprocess.run([sys.executable, '-m', 'ftbench.harness.cli', 'list', '--json'],"
                             " capture_output=True, text=True, check=True).stdout\n"
                             "print('LIST ' + json.dumps(json.loads(out)['backends']))", timeout=120)
    listed = next((ln[5:] for ln in text.splitlines() if ln.startswith("LIST ")), None)
    if not step.check(o.returncode == 0 and listed, "python3 -m ftbench.harness.cli imports and lists backends"):
        step.note = f"install first: {INSTALL_LINE} (docs/gpu.md); {last_line(c.folder(step) / 'command.log')}"
        c.done(step)
        return False
    for b in json.loads(listed):
        c.available[b["name"]] = None if b["available"] else (b.get("unavailable_because") or "unavailable")
    _atomic_write(c.out / "backends.json", json.dumps(c.available, indent=1))
    down = sorted(b for b, why in c.available.items() if why)
    step.note = f"{len(c.available)} backends" + (f"; unavailable: {', '.join(down)}" if down else "")
    c.done(step)
    return True


def step_matmul(c: Check) -> None:
    step = Step("matmul", "the device's attainable dense matmul rate, the yardstick for MFU")
    if not c.start(step):
        return
    n, dtype = (8192, "bfloat16") if c.cuda else (512, "float32")
    code = f"""
import time, torch
dev = "{'cuda' if c.cuda else 'cpu'}"
a = torch.randn({n}, {n}, device=dev, dtype=torch.{dtype}); b = torch.randn_like(a)
def sync():
    if dev == "cuda": torch.cuda.synchronize()
for _ in range(5): a @ b
sync(); times = []
for _ in range(20):
    t = time.perf_counter(); a @ b; sync(); times.append(time.perf_counter() - t)
times.sort(); med = times[len(times) // 2]
name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
print(f"MATMUL {{2 * {n}**3 / med / 1e12:.4g}} {{name}}")
"""
    o, text = c.python(step, code, timeout=120)
    line = next((ln.split(" ", 2) for ln in text.splitlines() if ln.startswith("MATMUL ")), None)
    if step.check(o.returncode == 0 and line, f"a {n}^3 {dtype} matmul runs on {'cuda' if c.cuda else 'cpu'}"):
        tflops, c.device_name = float(line[1]), line[2].strip()
        step.rows.append({"cell": f"{n}^3 {dtype} matmul (median of 20)", "status": "ok", "TFLOP/s": tflops})
        step.note = f"{tflops:.4g} TFLOP/s on {c.device_name}"
        if c.cuda and "H200" in c.device_name:
            step.note += " (H200: a well-run 8192^3 bf16 matmul reaches ~770-890; datasheet peak 989)"
    c.done(step)


def make_models(c: Check, step: Step) -> bool:
    """The same random GPT-2 stored in bf16 and in fp32 (bf16-representable values), made once."""
    if c.models:
        return True
    width, layers, heads = (768, 12, 12) if c.cuda else (128, 2, 4)
    # Outside --out: on CUDA they are 750 MB, which made the first GPU run's folder too big to bring back.
    root = Path(tempfile.mkdtemp(prefix="ftbench-gpu-check-models-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    code = f"""
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from ftbench.harness.cell.tokenization import train_tokenizer
from ftbench.harness.contract.registry import Registry
task = Registry.load().task("generation")
rows = task.builtin_data(0, {{}})["train"]
tok = train_tokenizer((t for ex in rows for t in task.texts(ex, {{}})), 2000)
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=len(tok), n_embd={width}, n_layer={layers}, n_head={heads}, n_positions=1024,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
model = GPT2LMHeadModel(cfg).to(torch.bfloat16)
for dtype in ("bfloat16", "float32"):
    model.to(getattr(torch, dtype)).save_pretrained("{root}/gpt2-" + dtype)
    tok.save_pretrained("{root}/gpt2-" + dtype)
print("MODELS")
"""
    o, text = c.python(step, code, timeout=300)
    if not step.check(o.returncode == 0 and "MODELS" in text, f"a random GPT-2 {width}x{layers} saved in bf16 and fp32"):
        return False
    c.models = {d: root / f"gpt2-{d}" for d in ("bfloat16", "float32")}
    return True


def cell_checks(c: Check, step: Step, recs: list[dict], expect: int, parity: bool = True) -> None:
    """What every cell of a step must show: ok, forked from a CUDA-clean server, honest figures."""
    step.check(len(recs) == expect, f"{expect} record(s) written (got {len(recs)})")
    for r in recs:
        label = cell_label(r)
        step.check(r.get("status") == "ok", f"{label}: status ok (got {r.get('status')}: {str(r.get('error'))[:160]})")
        if r.get("status") != "ok":
            continue
        if c.cuda:
            # A CUDA cell forked from the fork server ran only if the server never touched CUDA
            # (a forked cell of a poisoned server refuses to start).
            step.check((r.get("launch") or {}).get("mode") == "fork", f"{label}: forked from a CUDA-clean fork server (launch "
                                                  f"{r.get('launch')})")
            step.check(set(r.get("memory_figures") or ()) >= {"cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes",
                                                              "cuda_driver_used_bytes"},
                       f"{label}: the record says what each CUDA memory figure is")
            step.check("empty_cache" in str(r.get("memory_window_reset")),
                       f"{label}: the cache was freed before the training window's peaks were reset")
            step.check(all(r.get(k) for k in ("train_peak_memory_bytes", "peak_reserved_bytes", "driver_used_bytes")),
                       f"{label}: allocated, reserved and driver-used peaks recorded")
            step.check(r.get("mfu") is not None and 0 < r["mfu"] <= 1,
                       f"{label}: MFU in (0, 1] ({r.get('mfu')}; {r.get('mfu_note') or r.get('peak_flops_source')})")
        elif r.get("mfu") is not None:
            step.check(0 < r["mfu"] <= 1, f"{label}: MFU in (0, 1] ({r['mfu']})")
        p = r.get("parity") or {}
        if parity and p.get("status") == "compared":
            step.check(p.get("passed") is True, f"{label}: loss parity with {p.get('reference')} "
                                                f"({p.get('window_max_rel_dev')})")


def step_bf16(c: Check) -> None:
    precision = "bf16" if c.cuda else "fp32"  # bf16 matmuls on a CPU are ~500x slower than fp32
    step = Step(precision, f"eager and torch.compile in {precision}: the step, MFU, memory windows, fork launch",
                backends=("eager", "compile"))
    if not c.start(step):
        return
    model = ["--model", "tiny-gpt2"]
    if c.cuda:
        if not make_models(c, step):
            return c.done(step)
        model = ["--model", c.models["float32"]]
    recs = c.ftbench(step, "--task", "generation", "--backend", "eager", "--backend", "compile",
                     "--precision", precision, *model)
    cell_checks(c, step, recs, 2)
    for r in recs:
        if c.cuda and r.get("status") == "ok":
            step.check(r.get("matmul_dtype") == "bf16", f"{cell_label(r)}: matmuls counted as bf16")
    c.done(step)


def step_ranks(c: Check) -> None:
    nproc = 2 if (not c.cuda or c.gpus >= 2) else 1
    step = Step("ranks", f"ddp and fsdp on {nproc} rank(s) ({'NCCL' if c.cuda else 'gloo'}), forked ranks",
                backends=("ddp", "fsdp"))
    if not c.start(step):
        return
    precision = "bf16" if c.cuda else "fp32"
    recs = c.ftbench(step, "--task", "generation", "--model", "tiny-gpt2", "--backend", "eager", "--backend", "ddp",
                     "--backend", "fsdp", "--precision", precision, "--nproc", nproc)
    cell_checks(c, step, recs, 3)
    for r in recs:
        if r.get("backend") in ("ddp", "fsdp") and r.get("status") == "ok":
            step.check(r.get("nproc") == nproc, f"{cell_label(r)}: ran on {nproc} rank(s)")
    if c.cuda and c.gpus < 2:
        step.note = "one GPU: one rank each (NCCL refuses two ranks on one device)"
    c.done(step)


def step_deepspeed(c: Check) -> None:
    step = Step("deepspeed", "ZeRO-1/2/3 and ZeRO-2 with CPU-Adam offload: setup peaks, offload threads, "
                             "the one-off CPU-Adam build outside the cells", backends=("zero1", "zero2", "zero3",
                                                                                       "zero2-offload"))
    if not c.start(step):
        return
    precision = "bf16" if c.cuda else "fp32"
    backends = ("zero1", "zero2", "zero3", "zero2-offload", "zero3-offload") if c.cuda else ("zero2", "zero2-offload")
    args = ["--task", "generation", "--model", "tiny-gpt2", "--precision", precision, "--backend", "eager"]
    for b in backends:
        args += ["--backend", b]
    recs = c.ftbench(step, *args)
    cell_checks(c, step, recs, 1 + len(backends))
    env = read_json(c.folder(step) / "runs" / "environment.json") or {}
    prepared = env.get("prepared") or []
    step.check(any("zero2-offload" in p.get("backends", ()) and p.get("status") == "ok" for p in prepared),
               f"the CPU-Adam build ran once before the cells, outside their clocks ({prepared})")
    for r in recs:
        if r.get("status") != "ok":
            continue
        threads = ((r.get("environment") or {}).get("device") or {}).get("torch_threads")
        if r["backend"].endswith("-offload") and "OMP_NUM_THREADS" not in os.environ:
            nproc = r.get("nproc") or 1
            if nproc > 1:  # ftbench sets the ranks' threads
                step.check(threads == c.cores // nproc, f"{r['backend']}: CPU Adam runs on {threads} thread(s) "
                                                        f"per rank (cores / ranks = {c.cores // nproc})")
            elif c.cores >= 4:  # one process keeps torch's default, one per physical core
                step.check((threads or 0) > 1, f"{r['backend']}: CPU Adam runs on {threads} threads, not one")
        if c.cuda and r["backend"] in ("zero1", "zero2"):
            # DeepSpeed ZeRO-1/2 reset CUDA's peak statistics during their setup; the setup peak
            # must keep what came before, and say who reset.
            step.check(any("deepspeed" in m for m in r.get("setup_peak_reset_by") or ()),
                       f"{r['backend']}: the setup window names DeepSpeed's own peak reset "
                       f"({r.get('setup_peak_reset_by')})")
    c.done(step)


def step_profile(c: Check) -> None:
    step = Step("profile", "--profile phases from the device's clock on CUDA", backends=("eager",))
    if not c.start(step):
        return
    recs = c.ftbench(step, "--task", "generation", "--model", "tiny-gpt2", "--backend", "eager", "--profile",
                     "--precision", "bf16" if c.cuda else "fp32")
    cell_checks(c, step, recs, 1)
    for r in recs:
        prof = r.get("profile") or {}
        phases = prof.get("phases_s") or {}
        step.check(prof.get("phases_clock") == ("device" if c.cuda else "host"),
                   f"profile phases timed on the {'device' if c.cuda else 'host'} clock ({prof.get('phases_clock')})")
        step.check(phases.get("forward", 0) > 0 and phases.get("backward", 0) > 0,
                   f"forward and backward have time of their own ({phases})")
    c.done(step)


def step_dtypes(c: Check) -> None:
    step = Step("dtypes", "a checkpoint stored in bf16 trains fp32 weights, like its fp32 copy", backends=("eager",))
    if not c.start(step):
        return
    if not make_models(c, step):
        return c.done(step)
    recs = c.ftbench(step, "--task", "generation", "--backend", "eager", "--model", c.models["bfloat16"],
                     "--model", c.models["float32"])
    cell_checks(c, step, recs, 2)
    ok = [r for r in recs if r.get("status") == "ok"]
    step.check(sorted((r.get("weights_stored_dtype"), r.get("weights_dtype")) for r in ok)
               == [("bf16", "fp32"), ("fp32", "fp32")], "stored bf16 and fp32, both trained as fp32")
    if len(ok) == 2:
        a, b = ok[0]["train_loss"], ok[1]["train_loss"]
        dev = max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=None)
        # CUDA's embedding backward accumulates with atomics (order varies run to run): not bit-equal there.
        tol = 1e-4 if c.cuda else 1e-5
        step.check(dev is not None and dev < tol, f"the two train the same losses (max rel. dev. {dev} < {tol})")
    c.done(step)


def step_fp16(c: Check) -> None:
    step = Step("fp16", "fp16 autocast with the loss scaler: eager, compile and ZeRO-1/2/3 (parity reported, not "
                        "judged: see docs/gpu.md on ZeRO with fp16)", cuda_only=True,
                backends=("eager", "compile"))
    if not c.start(step):
        return
    args = ["--task", "generation", "--model", "tiny-gpt2", "--precision", "fp16"]
    for b in ("eager", "compile", "zero1", "zero2", "zero3"):
        if c.available.get(b, "missing") is None:
            args += ["--backend", b]
    recs = c.ftbench(step, *args)
    cell_checks(c, step, [r for r in recs if not r["backend"].startswith("zero")], 2)
    for r in recs:
        if r["backend"].startswith("zero"):
            step.check(r.get("status") == "ok", f"{cell_label(r)}: status ok ({r.get('error')})")
    c.done(step)


def step_cuda_graphs(c: Check) -> None:
    step = Step("cuda-graphs", "compile:mode=reduce-overhead (CUDA graphs) against eager, bf16", cuda_only=True,
                backends=("eager", "compile"))
    if not c.start(step):
        return
    recs = c.ftbench(step, "--task", "generation", "--model", "tiny-gpt2", "--precision", "bf16",
                     "--backend", "eager", "--backend", "compile:mode=reduce-overhead")
    cell_checks(c, step, recs, 2)
    c.done(step)


def step_exec(c: Check) -> None:
    step = Step("exec", "the same eager cell started as a plain process (launch exec), beside the forked one",
                backends=("eager",))
    if not c.start(step):
        return
    recs = c.ftbench(step, "--task", "generation", "--model", "tiny-gpt2", "--backend", "eager",
                     "--precision", "bf16" if c.cuda else "fp32", env={"FTBENCH_LAUNCH": "exec"})
    step.check(len(recs) == 1 and recs[0].get("status") == "ok" and (recs[0].get("launch") or {}).get("mode") == "exec",
               f"an exec'd cell runs and says so ({[(r.get('status'), r.get('launch')) for r in recs]})")
    c.done(step)


STEPS = (step_matmul, step_bf16, step_ranks, step_deepspeed, step_profile, step_dtypes, step_fp16,
         step_cuda_graphs, step_exec)
STEP_NAMES = ("install", "matmul", "bf16", "fp32", "ranks", "deepspeed", "profile", "dtypes", "fp16",
              "cuda-graphs", "exec")


# ------------------------------------------------------------------ records and text


def read_records(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for ln in lines:
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue  # a line cut by a kill: the rest still count
    return out


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def cell_label(r: dict) -> str:
    nproc = r.get("nproc") or 1
    precision = ((r.get("config") or {}).get("recipe") or {}).get("precision", "?")
    model = Path(str(r.get("model"))).name
    return f"{r.get('backend')}{f' x{nproc}' if nproc > 1 else ''} {precision} {model}"


def summary_row(r: dict) -> dict:
    mib = lambda v: round(v / 2**20) if v else None  # noqa: E731
    p = r.get("parity") or {}
    return {"cell": cell_label(r), "status": r.get("status"), "launch": (r.get("launch") or {}).get("mode"),
            "tokens_per_s": round(r["tokens_per_s"]) if r.get("tokens_per_s") else None,
            "step_ms": round(r["step_time_s"] * 1e3, 2) if r.get("step_time_s") else None,
            "mfu": round(r["mfu"], 4) if r.get("mfu") is not None else None, "matmul": r.get("matmul_dtype"),
            "setup_MiB": mib(r.get("setup_peak_memory_bytes")), "train_MiB": mib(r.get("train_peak_memory_bytes")),
            "reserved_MiB": mib(r.get("peak_reserved_bytes")), "driver_MiB": mib(r.get("driver_used_bytes")),
            "setup_reset_by": r.get("setup_peak_reset_by"),
            "setup_s": round(r["setup_s"], 2) if r.get("setup_s") is not None else None,
            "parity": (None if p.get("status") != "compared" else
                       f"{'ok' if p.get('passed') else 'FAIL'} {p.get('window_max_rel_dev') or 0:.1e}"),
            "error": (str(r.get("error"))[:200] if r.get("error") else None)}


def row_text(r: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in r.items() if v not in (None, ""))


COLUMNS = ("cell", "status", "launch", "tokens_per_s", "step_ms", "mfu", "matmul", "setup_MiB", "train_MiB",
           "reserved_MiB", "driver_MiB", "setup_s", "parity", "error")


def summary_markdown(data: dict) -> str:
    lines = [f"# ftbench GPU check: {data['verdict']}", "",
             f"{data['device']} ({data['gpus']} GPU(s)); {data['elapsed_s']} s of a {data['budget_s']:.0f} s budget, "
             f"{data['step_timeout_s']:.0f} s per step", "", "| step | status | s | note |", "|---|---|---:|---|"]
    for s in data["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {str(s['note']).replace('|', '/')} |")
    failed = [(s["step"], ch["check"]) for s in data["steps"] for ch in s["checks"] if not ch["ok"]]
    if failed:
        lines += ["", "## Failed checks", ""] + [f"* {step}: {text}" for step, text in failed]
    lines += ["", "## Cells", "", "| step | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for s in data["steps"]:
        for r in s["cells"]:
            lines.append(f"| {s['step']} | " + " | ".join(str(r.get(k, "")).replace("|", "/") if r.get(k) is not None
                                                         else "-" for k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


#: Left out of the bundle: the profiler's traces are tens of MB on CUDA, and a bundle must come back whole.
BUNDLE_SKIPS = ("traces", "command.log.tmp")


def write_bundle(out: Path, bundle: Path) -> None:
    """``bundle``: a gzipped tar of ``out`` without the profiler's traces, replaced atomically, so
    that a device lease's few small files bring back every step's records and logs."""
    tmp = bundle.with_name(bundle.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name,
                filter=lambda info: None if any(part in BUNDLE_SKIPS for part in Path(info.name).parts) else info)
    os.replace(tmp, bundle)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------ main


def cuda_devices(device: str) -> tuple[bool, int]:
    """(use CUDA, GPU count), asked of a subprocess: this process stays free of CUDA and of ftbench."""
    if device == "cpu":
        return False, 0
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        n = int(subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip() or 0)
    except (OSError, ValueError, subprocess.SubprocessError):
        n = 0
    if device == "cuda" and n == 0:
        raise SystemExit("--device cuda: torch sees no GPU here")
    return n > 0, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--out", type=Path, required=True, help="folder for every step's records and the summary")
    # Defaults fit one 10-minute device command: budget + one step's timeout + its stop < 600 s.
    p.add_argument("--budget", type=float, default=360, help="seconds in all; no step starts after (default 360)")
    p.add_argument("--step-timeout", type=float, default=None,
                   help="seconds one step may take before it is stopped (default 200 on CUDA, 90 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per cell (default 30 on CUDA, 6 on CPU)")
    p.add_argument("--only", action="append", choices=STEP_NAMES, help="run only this step (repeatable)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="also write OUT as this .tgz after every step, traces left out (e.g. $OUT/gpu-check.tgz on "
                        "a device lease, whose returned files are few and small)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cuda, gpus = cuda_devices(args.device)
    if args.step_timeout is None:
        args.step_timeout = 200.0 if cuda else 90.0
    c = Check(args, cuda, gpus)
    c.device_name = "cuda" if cuda else "cpu"

    def stop(signum, _frame):
        c.runner.stop()
        for s in c.steps:
            if s.status == "running":
                c.finish(s, "interrupted", f"the check got signal {signum}")
        c.write_summary()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    c.log(f"ftbench GPU check on {c.device_name} ({gpus} GPU(s)); budget {args.budget:.0f} s, "
          f"{args.step_timeout:.0f} s per step; writing to {args.out}")
    if step_install(c):
        for fn in STEPS:
            fn(c)
    c.write_summary()
    verdict = c.verdict()
    c.log(f"verdict: {verdict} (summary in {args.out / 'summary.md'})")
    return EXIT[verdict]


if __name__ == "__main__":
    sys.exit(main())
