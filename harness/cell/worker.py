"""One cell, inside its own fresh process (one per rank under torchrun).

Run as ``python -m ftbench.harness.cell.worker SPEC.json RESULT_DIR``.  Each rank writes
``RESULT_DIR/rank<R>.json``; the driver (``ftbench.harness.running.cellproc``) turns those
files into one result record.  This module owns the training loop and every
clock: the backend's engine only runs the steps it is handed.
"""

from __future__ import annotations

import time

# Wall-clock time the cell was launched: the driver passes it (so process
# start-up counts as setup); a bare ``python -m ftbench.harness.cell.worker`` uses the
# moment this module was imported, before the heavy imports.
_T_IMPORTED = time.time()

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402


from ftbench.harness.cell.machineload import LoadProbe  # noqa: E402
from ftbench.harness.cell.provenance import cuda_stack, digest_model, digest_rows, digest_tokenizer  # noqa: E402
from ftbench.harness.cell.training import Diverged  # noqa: E402  (re-exported: main() catches it)
from ftbench.harness.contract.environment import cpu_model
from ftbench.harness.cell.reaper import watch_driver
from ftbench.harness.cell.timing import PhaseClock
from ftbench.harness.contract.api import Unavailable
from ftbench.harness.contract.config import CellSpec, DOCUMENTS
from ftbench.harness.contract.resolve import check_seq_len, resolve_cell
from ftbench.harness.contract.registry import Registry
from ftbench.harness.cell.optimizing import apply_to_model, describe, unavailable, within_step_contexts, wrap_loss
from ftbench.harness.cell.memwindows import MemoryWindows
from ftbench.harness.cell.hostalloc import apply_cpu_memory
from ftbench.harness.cell.rowsource import load_run_data, sample_texts
from ftbench.harness.cell.modeling import build_model, choose_kind, collate, count_params, decoder_start_id, encode_example, load_tokenizer, make_loss_fn, max_positions, param_bytes, resolve_model
from ftbench.harness.contract.optimization import check_combination
from ftbench.harness.cell.measure import current_rss_bytes, memory_snapshot, now, synchronize
from ftbench.harness.cell.tuning import tune
from ftbench.harness.cell.weights import weight_dtypes
from ftbench.harness.cell.batches import StepStream, batch_plan, pad_fraction, step_flops
from ftbench.harness.cell.mfu import device_peak, flop_model
from ftbench.harness.cell.prepcache import cached_encode, data_identity
from ftbench.harness.cell.packing import check_can_pack, pack
from ftbench.harness.contract.engine import EngineContext
from ftbench.harness.cell.training import summarize, train
from ftbench.harness.cell.quality import QualityTracker, evaluation_interval
from ftbench.harness.cell.evaluation import HeldOut, evaluate
from ftbench.harness.cell.packing_probe import contamination_probe
from ftbench.harness.cell.profile import profile_after_training


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _pick_device(spec_device: str, local_rank: int):
    import torch

    if spec_device == "auto":
        spec_device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec_device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(spec_device)


class Cell:
    """One cell's run in the phases a reader can follow.

    ``run()`` goes: resolve -> load data -> build the model -> encode and
    plan batches -> set up the engine -> train -> evaluate.  Each phase adds
    its figures to ``self.out`` (this rank's part of the record); setup
    phases are timed by one :class:`PhaseClock`.  Every key written there is
    defined in :mod:`ftbench.harness.contract.schema`, which also decides how
    it reaches the record.
    """

    def __init__(self, spec_dict: dict, t_launch: float):
        self.spec_dict = spec_dict
        self.t_launch = t_launch
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.out: dict = {"rank": self.rank, "world_size": self.world, "pid": os.getpid()}
        self.clock = PhaseClock(start_and_imports=time.time() - t_launch)

    def run(self) -> dict:
        if not self.resolve():
            return self.out
        with self.clock.phase("data"):
            self.load_data()
        with self.clock.phase("tokenizer"):
            self.load_tokenizer()
        with self.clock.phase("model"):
            self.build_model()
        with self.clock.phase("digests"):
            self.take_provenance()
        with self.clock.phase("encode"):
            self.encode_and_plan()
        with self.clock.phase("engine"):
            self.setup_engine()
        self.out["setup_s"] = time.time() - self.t_launch
        self.evaluate_before()
        # The training window starts here: an evaluation copy of the model (FSDP, ZeRO-3) is not a training peak.
        self.memory.end_setup()
        self.train()
        self.evaluate()
        self.profile()
        return self.out

    # ------------------------------------------------------------------ phases

    def resolve(self) -> bool:
        """Plugins, options and device; False when the backend cannot run here (a skipped cell)."""
        import torch

        self.spec = CellSpec.from_dict(self.spec_dict)
        self.reg = Registry.load()
        self.cell = resolve_cell(self.reg, self.spec, self.world)
        self.recipe, self.task = self.cell.recipe, self.cell.task
        self.options = dict(self.cell.task_options)
        try:
            self.cell.backend.engine.check_available(self.cell.backend_options)
        except Unavailable as e:
            self.out.update(status="skipped", error=f"backend {self.cell.backend_name!r} is unavailable: {e}")
            return False
        self.device = _pick_device(self.spec.device, self.local_rank)
        self.out["device"] = _describe(self.device)

        self.out["optimizations"] = describe(self.cell.opts)
        why = unavailable(self.cell.opts, self.device.type)
        if why:
            self.out.update(status="skipped", error=why)
            return False
        if self.device.type == "cpu":
            # Before the model exists, so every tensor of the cell is allocated under the chosen policy.
            why_not = apply_cpu_memory(self.spec.cpu_memory)
            self.out["cpu_memory"] = "resident" if why_not else self.spec.cpu_memory
            if why_not:
                self.out["cpu_memory_note"] = why_not

        self.memory = MemoryWindows(self.device)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if self.recipe.precision != "fp32" and self.device.type != "cuda":
            print(f"ftbench: warning: {self.recipe.precision} on CPU is very slow; fp32 is the CPU default",
                  file=sys.stderr)
        _seed_all(self.recipe.seed)
        return True

    def load_data(self) -> None:
        # Only the rows this run uses (its batches, the tokenizer sample, the evaluation examples).
        self.data = load_run_data(self.task, self.spec.data, self.options, self.recipe, self.spec.eval_examples,
                                  self.world, dict(self.spec.columns))
        self.splits = self.data.splits
        self.out["rows_read"] = self.data.rows_read
        self.options.update(self.task.prepare(self.splits, self.options) or {})

    def load_tokenizer(self) -> None:
        self.source = resolve_model(self.spec.model, self.reg, self.task, self.spec.trust_remote_code)
        self.kind = choose_kind(self.source, self.task)

        self.tokenizer = load_tokenizer(self.source, sample_texts(self.data, self.task, self.options))

        check_combination(self.cell.opts, backend_name=self.cell.backend_name,
                          engine_hooks=self.cell.backend.engine.optimization_hooks, kind=self.kind,
                          head=self.task.head, recipe=self.recipe, opt_text=self.spec.opt)

    def build_model(self) -> None:
        import torch

        recipe = self.recipe
        # Everything resident before the model exists is the harness's own
        # footprint plus libraries and data: the baseline the model's share sits on.
        self.out["rss_before_model_bytes"] = current_rss_bytes()
        torch.manual_seed(recipe.seed)
        model = build_model(self.source, self.tokenizer, self.task.head, self.options.get("num_labels"), self.kind)
        check_seq_len(recipe.seq_len, max_positions(model), self.spec.model)

        model = apply_to_model(self.cell.opts, model)
        model = tune(model, recipe.tuning, self.task.head, self.kind)
        if recipe.grad_checkpointing:
            model.gradient_checkpointing_enable()
            if hasattr(model.config, "use_cache"):
                model.config.use_cache = False
        trainable, total = count_params(model)
        # Weights + gradients + two AdamW moments, in fp32: what theory says the
        # training state needs before activations.
        self.out.update(state_bytes_theory=4 * (total + 3 * trainable), trainable_params=trainable,
                        total_params=total, param_bytes=param_bytes(model), model_kind=self.kind,
                        vocab_size=len(self.tokenizer), **weight_dtypes(self.source, model, recipe, self.device))
        self.model = model

    def take_provenance(self) -> None:
        """Digests of the model, the rows read and the tokenizer (docs/tracking.md)."""
        import torch

        self.out["provenance"] = {"model_digest": digest_model(self.source, self.model),
                                  "data_digest": digest_rows(self.splits["train"], self.splits["validation"]),
                                  "tokenizer_digest": digest_tokenizer(self.tokenizer)}
        if self.device.type == "cuda":
            self.out["provenance"]["software"] = cuda_stack(torch)

    def encode_and_plan(self) -> None:
        recipe, tok = self.recipe, self.tokenizer
        key = {"v": 1, "task": self.cell.task_name, "options": self.options,
               "data": data_identity(self.spec.data, self.splits), "seed": recipe.seed,
               "rows": self.data.rows_key(),
               "columns": list(self.spec.columns), "kind": self.kind, "seq_len": recipe.seq_len,
               "tokenizer": getattr(tok, "ftbench_identity", None) or [getattr(tok, "name_or_path", None), len(tok)]}
        used = self.data.plan_indices
        self.enc = cached_encode(key, lambda: {"train": [self.encode(self.data.train_row(i)) for i in used],
                                               "validation": [self.encode(ex) for ex in self.splits["validation"]]})
        self.out["truncated_examples"] = {s: sum(1 for e in v if e.truncated) for s, v in self.enc.items()}
        self.out["truncated_tokens"] = {s: sum(e.truncated for e in v) for s, v in self.enc.items()}
        pad_id, dstart = tok.pad_token_id, decoder_start_id(self.model)

        def make_batch(indices, rows):
            return collate([rows[i] for i in indices], self.kind, self.task.head, pad_id, recipe.seq_len,
                           recipe.padding, dstart)

        self.make_batch = make_batch
        train_rows = dict(zip(used, self.enc["train"]))  # split index -> encoded row
        n_rows = self.data.n_train
        if recipe.packing:
            check_can_pack(self.task.head, self.kind, self.cell.task_name, self.spec.model)
            self.unpacked = [train_rows[i] for i in sorted(train_rows)]
            packed = pack(self.unpacked, recipe.seq_len, documents=recipe.packing == DOCUMENTS)
            train_rows, n_rows = dict(enumerate(packed)), len(packed)
            self.out["packed_rows"] = n_rows
        plan = batch_plan(n_rows, recipe, self.world, self.rank, recipe.seed)
        # Indices only: each step is collated when the loop reaches it.
        self.steps = StepStream(plan, lambda ix: make_batch(ix, train_rows), self.world,
                                pin=self.device.type == "cuda")
        self.flops_of = flop_model(self.model, self.kind)

    def encode(self, example: dict):
        return encode_example(self.task, example, self.tokenizer, self.kind, self.recipe.seq_len, self.options)

    def setup_engine(self) -> None:
        opts = self.cell.opts
        self.ctx = EngineContext(recipe=self.recipe, device=self.device,
                                 loss_fn=wrap_loss(opts, make_loss_fn(self.kind, self.task.head), self.model),
                                 rank=self.rank, world_size=self.world, local_rank=self.local_rank,
                                 optimizations=tuple(opts))
        self.engine = self.cell.backend.engine(self.cell.backend_options, self.ctx)
        self.engine.setup(self.model)
        within_step_contexts(opts, self.engine)
        synchronize(self.device)

    def train(self) -> None:
        self.out["setup_phases"] = self.clock.seconds
        self.quality = self.quality_tracker()
        probe = LoadProbe.start()
        run = train(self.engine, self.steps, self.device, self.world, partial=self.out,
                    after_step=self.quality.after_step if self.quality else None)
        self.out["machine_load_reading"] = probe.stop()
        self.run_times = run.times
        warm = self.recipe.warmup
        self.out.update(summarize(run, self.steps.counts, warm, self.engine.compiles))
        self.out["pad_fraction"] = pad_fraction(self.steps.counts)
        self.record_as_run(run)
        self.out["memory"] = self.memory.end_training()
        measured = sum(run.times[warm:])
        flops = step_flops(self.steps.shapes, self.flops_of)
        self.out["flops_per_s"] = sum(flops[warm:len(run.times)]) / measured if measured else None
        self.out["peak_flops"], self.out["peak_flops_source"] = device_peak(self.device, self.out["matmul_dtype"])

    def record_as_run(self, run) -> None:
        """What this cell actually computed, for the fairness check (``ftbench explain``): the
        engine's own account, the attention kernel, the tokens of each optimizer step and the
        order of the rows handed out."""
        facts = dict(self.engine.facts() or {})
        config = getattr(self.model, "config", None)
        facts.setdefault("attention", getattr(config, "_attn_implementation", None))
        rows = facts.pop("data_order_rows", None)
        facts["data_order_rows_rank"] = (rows if rows is not None else run.row_sums)[:len(run.times)]
        self.out["as_run"] = facts
        counts = self.steps.counts[:len(run.times)]
        self.out["step_tokens"] = {k: [c[k] for c in counts] for k in ("padded", "nonpad", "loss")}

    def quality_tracker(self):
        """Evaluation during training and the target, when the cell asks for either."""
        every = evaluation_interval(self.spec.eval_every, self.spec.target, self.recipe.steps)
        if not every and not self.spec.target:
            return None

        def evaluate_and_resume():
            model = self.engine.eval_model()  # one copy per evaluation where the backend must build one
            metrics = self.held_out_metrics(model)
            model.train()  # back to training mode (dropout, batch statistics)
            return metrics

        return QualityTracker(every, self.spec.target, self.task.metric_directions(), evaluate_and_resume,
                              stop_at_target=self.spec.stop_at_target, warmup=self.recipe.warmup,
                              agree=self.rank0_decides)

    def rank0_decides(self, decision: bool) -> bool:
        """Every rank ends training together, on rank 0's word."""
        if self.world == 1:
            return decision
        import torch

        flag = torch.tensor([1 if decision else 0], device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    def evaluate_before(self) -> None:
        """A pretrained model's quality before tuning (``metrics_before``); outside every step clock."""
        if self.source.preset is not None:
            return  # a random-init preset: its "before" is chance level
        t0 = now()
        model = self.engine.eval_model()
        was_training = model.training
        self.out["metrics_before"] = self.held_out_metrics(model)
        model.train(was_training)
        self.out["eval_before_s"] = now() - t0

    def held_out_metrics(self, model=None) -> dict:
        n = self.spec.eval_examples
        model = model if model is not None else self.engine.eval_model()
        return evaluate(model, HeldOut(self.task, self.tokenizer, self.kind, self.device, self.recipe, self.options,
                                       self.splits["validation"][:n], self.enc["validation"][:n], self.ctx.loss_fn,
                                       self.make_batch, self.encode))

    def evaluate(self) -> None:
        t0 = now()
        steps_run = len(self.run_times)
        last = self.quality.curve[-1] if self.quality and self.quality.curve else None
        # The last step was just evaluated during training: the same model on the same rows.
        metrics = last["metrics"] if last and last["step"] == steps_run else self.held_out_metrics()
        eval_s = now() - t0
        if self.quality:
            self.quality.final(steps_run, self.run_times, metrics)
            self.out.update(self.quality.figures(), stopped_at_target=steps_run < len(self.steps))
        self.out.update(eval_loss=metrics["eval_loss"], metrics=metrics, metric=self.task.metric,
                        metric_value=metrics.get(self.task.metric), higher_is_better=self.task.higher_is_better,
                        eval_s=eval_s, eval_examples=min(self.spec.eval_examples, len(self.splits["validation"])),
                        backend_stats=self.engine.stats(), status="ok", error=None)
        self.out["memory_after_eval"] = memory_snapshot(self.device)
        if self.recipe.packing:
            self.out["packing_probe"] = contamination_probe(self.engine.eval_model(), self.unpacked, self.recipe.seq_len,
                                                            self.recipe.packing == DOCUMENTS, self.device)

    def profile(self) -> None:
        """``--profile``: a traced run of extra steps, after everything measured (no-op otherwise)."""
        self.out.update(profile_after_training(self.spec, self.engine, self.steps, self.device, self.rank))


def run_cell(spec_dict: dict, t_launch: float | None = None) -> dict:
    """Run one cell in this process (this rank of it); this rank's part of the record."""
    return Cell(spec_dict, t_launch or _T_IMPORTED).run()


def _describe(device) -> dict:
    import torch


    info = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu": cpu_model()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, count=torch.cuda.device_count())
    else:
        info["name"] = info["cpu"]
    return info


def _classify(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or "out of memory" in text.lower() or "OutOfMemoryError" in text:
        return "oom"
    return "error"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import faulthandler

    faulthandler.enable()  # a segfault's Python stack goes to the cell's log, hence into the record

    watch_driver()
    spec_path, result_dir = Path(argv[0]), Path(argv[1])
    t_launch = float(argv[2]) if len(argv) > 2 else None
    rank = int(os.environ.get("RANK", 0))
    result_path = result_dir / f"rank{rank}.json"
    try:
        out = run_cell(json.loads(spec_path.read_text()), t_launch)
        code = 0
    except Diverged as e:
        out = {**e.partial, "rank": rank, "status": "diverged", "error": str(e), "diverged_at_step": e.step}
        code = 0
    except BaseException as e:  # noqa: BLE001 - every failure becomes a record
        out = {"rank": rank, "status": _classify(e), "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=20)}
        if out["status"] == "oom":
            out["error"] += (" (the cell ran out of memory: shrink --batch-size or --seq-len, or use a backend "
                             "that shards or offloads)")
        code = 1
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, default=str))
    os.replace(tmp, result_path)
    try:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if code == 0:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown must never mask the result
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
