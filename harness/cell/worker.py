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
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402


class Diverged(Exception):
    """A non-finite loss; ``partial`` keeps what the cell measured until then."""

    def __init__(self, step: int, value: float, partial: dict):
        super().__init__(f"loss became {value} at step {step}")
        self.step = step
        self.partial = partial


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


def batch_plan(n_train: int, recipe, world_size: int, rank: int, seed: int):
    """For each optimizer step: the example indices of the global batch and of
    this rank's micro-batches.  Identical for every backend and world size."""
    import numpy as np

    g = recipe.batch_size
    micro = g // (world_size * recipe.grad_accum)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    plan = []
    for _ in range(recipe.steps):
        while len(order) < g:
            order.extend(rng.permutation(n_train).tolist())
        global_idx, order = order[:g], order[g:]
        mine = global_idx[rank * g // world_size:(rank + 1) * g // world_size]
        plan.append((global_idx, [mine[i * micro:(i + 1) * micro] for i in range(recipe.grad_accum)]))
    return plan


def run_cell(spec_dict: dict, result_dir: Path, t_launch: float | None = None) -> dict:
    t_launch = t_launch or _T_IMPORTED
    import torch

    from ftbench.harness.api import EvalContext, FtbenchError, Unavailable
    from ftbench.harness.grid.config import CellSpec, parse_tuning
    from ftbench.harness.cell.data import load_splits
    from ftbench.harness.engine import EngineContext, autocast_for
    from ftbench.harness.cell.measure import current_rss_bytes, memory_snapshot, now, step_stats, synchronize, throughput
    from ftbench.harness.cell.mfu import device_peak, flop_model
    from ftbench.harness.cell.modeling import (apply_tuning, build_model, choose_kind, class_probabilities, collate, count_params,
                           decoder_start_id, encode_example, greedy_generate, load_tokenizer, make_loss_fn,
                           max_positions, param_bytes, resolve_model)
    from ftbench.harness.cell.prepcache import cached_encode, data_identity
    from ftbench.harness.cell.profile import profile_after_training
    from ftbench.harness.registry import Registry

    t_imports = time.time()
    spec = CellSpec.from_dict(spec_dict)
    recipe = spec.recipe.validate()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    out: dict = {"rank": rank, "world_size": world, "pid": os.getpid()}
    phases: dict = {"start_and_imports_s": t_imports - t_launch}

    reg = Registry.load()
    task_name, task_opts = spec.task_name_and_options()
    backend_name, backend_opts = spec.backend_name_and_options()
    task = reg.task(task_name)
    bspec = reg.backend(backend_name)
    options = {**dict(task.defaults), **task_opts}
    bopts = bspec.engine.validate_options({**dict(bspec.defaults), **backend_opts})
    try:
        bspec.engine.check_available(bopts)
    except Unavailable as e:
        return {**out, "status": "skipped", "error": f"backend {backend_name!r} is unavailable: {e}"}
    if world > 1 and not bspec.data_parallel:
        raise FtbenchError(f"backend {backend_name!r} runs in one process; use --nproc 1 "
                           "(or a data-parallel backend such as ddp, fsdp or deepspeed)")
    if recipe.batch_size % (world * recipe.grad_accum):
        raise FtbenchError(f"global batch {recipe.batch_size} is not divisible by nproc {world} x grad_accum "
                           f"{recipe.grad_accum}; pick a batch size that is")

    device = _pick_device(spec.device, local_rank)
    out["device"] = _describe(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if recipe.precision != "fp32" and device.type != "cuda":
        print(f"ftbench: warning: {recipe.precision} on CPU is very slow; fp32 is the CPU default",
              file=sys.stderr)
    _seed_all(recipe.seed)

    t = now()
    splits = load_splits(task, spec.data, options, recipe.seed, dict(spec.columns))
    options.update(task.prepare(splits, options) or {})
    phases["data_s"] = now() - t

    t = now()
    source = resolve_model(spec.model, reg, task)
    kind = choose_kind(source, task)
    tokenizer = load_tokenizer(source, (x for ex in splits["train"] for x in task.texts(ex, options)))
    phases["tokenizer_s"] = now() - t

    t = now()
    # Everything resident before the model exists is the harness's own
    # footprint plus libraries and data: the baseline the model's share sits on.
    out["rss_before_model_bytes"] = current_rss_bytes()
    torch.manual_seed(recipe.seed)
    model = build_model(source, tokenizer, task.head, options.get("num_labels"), kind)
    limit = max_positions(model)
    if limit is not None and recipe.seq_len > limit:
        raise FtbenchError(f"seq_len {recipe.seq_len} exceeds the model's {limit} positions; pass "
                           f"--seq-len {limit} or less")
    mode, n_frozen = parse_tuning(recipe.tuning)
    apply_tuning(model, mode, n_frozen)
    if recipe.grad_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    trainable, total = count_params(model)
    # Weights + gradients + two AdamW moments, in fp32: what theory says the
    # training state needs before activations.
    out["state_bytes_theory"] = 4 * (total + 3 * trainable)
    out.update(trainable_params=trainable, total_params=total, param_bytes=param_bytes(model), model_kind=kind,
               vocab_size=len(tokenizer))
    phases["model_s"] = now() - t

    t = now()
    cache_key = {"v": 1, "task": task_name, "options": options, "data": data_identity(spec.data, splits),
                 "seed": recipe.seed, "columns": list(spec.columns), "kind": kind, "seq_len": recipe.seq_len,
                 "tokenizer": getattr(tokenizer, "ftbench_identity", None) or
                 [getattr(tokenizer, "name_or_path", None), len(tokenizer)]}
    enc = cached_encode(cache_key, lambda: {
        s: [encode_example(task, ex, tokenizer, kind, recipe.seq_len, options) for ex in rows]
        for s, rows in splits.items() if s in ("train", "validation")})
    out["truncated_examples"] = {s: sum(1 for e in v if e.truncated) for s, v in enc.items()}
    out["truncated_tokens"] = {s: sum(e.truncated for e in v) for s, v in enc.items()}
    pad_id = tokenizer.pad_token_id
    dstart = decoder_start_id(model)

    def make_batch(indices, rows):
        return collate([rows[i] for i in indices], kind, task.head, pad_id, recipe.seq_len, recipe.padding, dstart)

    plan = batch_plan(len(enc["train"]), recipe, world, rank, recipe.seed)
    # Pre-collate every micro-batch so the timed loop does no host-side data work.
    steps_data = []
    for global_idx, micro_idx in plan:
        micro = [make_batch(ix, enc["train"]) for ix in micro_idx]
        global_counts = make_batch(global_idx, enc["train"])["counts"] if world > 1 else _sum_counts(micro)
        for mb in micro:
            mb["loss_scale"] = 1.0 / max(1, global_counts["loss"])
            mb.pop("counts")
        steps_data.append((micro, global_counts))
    if device.type == "cuda":
        # Page-locked batches let the per-step host-to-device copies run
        # asynchronously instead of staging through pageable memory.
        for micro, _ in steps_data:
            for mb in micro:
                for k, v in mb.items():
                    if torch.is_tensor(v):
                        mb[k] = v.pin_memory()
    phases["encode_s"] = now() - t

    flops_of = flop_model(model, kind)
    # FLOPs of this rank's micro-batches per step, from shapes known on the host.
    step_flops = [sum(flops_of((mb["input_ids"].shape[0], mb["input_ids"].shape[1],
                                mb["labels"].shape[1] if "decoder_input_ids" in mb else 0)) for mb in micro)
                  for micro, _ in steps_data]

    t = now()
    ctx = EngineContext(recipe=recipe, device=device, loss_fn=make_loss_fn(kind, task.head), rank=rank,
                        world_size=world, local_rank=local_rank)
    engine = bspec.engine(bopts, ctx)
    engine.setup(model)
    synchronize(device)
    phases["engine_s"] = now() - t
    setup_s = time.time() - t_launch

    # ------------------------------------------------------------- training
    times: list[float] = []
    losses = []  # device tensors; read back in chunks so the loop adds no host copies
    check_every = int(os.environ.get("FTBENCH_CHECK_EVERY", "10"))
    history: list[float] = []
    for step, (micro, _) in enumerate(steps_data):
        t0 = now()
        step_loss = None
        for mb in micro:
            loss = engine.forward_backward(mb)
            step_loss = loss if step_loss is None else step_loss + loss
        engine.step()
        synchronize(device)
        times.append(now() - t0)
        losses.append(step_loss)
        if (step + 1) % check_every == 0 or step + 1 == len(steps_data):
            checked = len(history)
            history.extend(_global_losses(losses[checked:], world))
            bad = next((i for i in range(checked, len(history)) if not math.isfinite(history[i])), None)
            if bad is not None:
                raise Diverged(bad, history[bad], {**out, "train_loss": history[: bad + 1],
                                                   "step_times_s": times, "setup_s": setup_s})

    warm = recipe.warmup
    measured, counts = times[warm:], [c for _, c in steps_data[warm:]]
    stats = step_stats(measured)
    out.update(
        train_loss=history,
        step_times_s=times,
        step_time=stats,
        tokens_per_s=throughput(counts, measured, "nonpad"),
        padded_tokens_per_s=throughput(counts, measured, "padded"),
        loss_tokens_per_s=throughput(counts, measured, "loss"),
        samples_per_s=throughput(counts, measured, "samples"),
        tokens={k: sum(c[k] for c in counts) for k in ("padded", "nonpad", "loss", "samples")},
        setup_s=setup_s,
        setup_phases=phases,
        compile_s=(sum(times[:warm]) - warm * stats["median"]) if engine.compiles and warm else None,
    )
    out["memory"] = memory_snapshot(device)
    out["flops_per_s"] = sum(step_flops[warm:]) / sum(measured) if measured else None
    out["peak_flops"], out["peak_flops_source"] = device_peak(device, recipe.precision)

    # ------------------------------------------------------------ evaluation
    t = now()
    eval_model = engine.eval_model()
    eval_model.eval()
    val_rows = splits["validation"][: spec.eval_examples]
    val_enc = enc["validation"][: spec.eval_examples]
    eval_loss = _eval_loss(eval_model, ctx.loss_fn, [make_batch(list(range(i, min(i + 16, len(val_enc)))), val_enc)
                                                     for i in range(0, len(val_enc), 16)], device, recipe)

    def generate(prompts: list[str]) -> list[str]:
        with autocast_for(recipe, device):
            return greedy_generate(eval_model, tokenizer, kind, prompts, device, recipe.seq_len,
                                   options.get("max_new_tokens", 32))

    def classify(rows: list[dict]) -> list[list[float]]:
        encoded = [encode_example(task, ex, tokenizer, kind, recipe.seq_len, options) for ex in rows]
        with autocast_for(recipe, device):
            return class_probabilities(eval_model, [make_batch(list(range(i, min(i + 16, len(encoded)))), encoded)
                                                    for i in range(0, len(encoded), 16)], device)

    ectx = EvalContext(model=eval_model, tokenizer=tokenizer, model_kind=kind, device=device, examples=val_rows,
                       eval_loss=eval_loss, options=options, generate=generate,
                       max_new_tokens=options.get("max_new_tokens", 32),
                       classify=classify if task.head == "classification" else None)
    metrics = task.evaluate(ectx)
    metrics.setdefault("eval_loss", eval_loss)
    out.update(eval_loss=eval_loss, metrics=metrics, metric=task.metric, metric_value=metrics.get(task.metric),
               higher_is_better=task.higher_is_better, eval_s=now() - t, eval_examples=len(val_rows),
               backend_stats=engine.stats(), status="ok", error=None)
    out["memory_after_eval"] = memory_snapshot(device)
    out.update(profile_after_training(spec, engine, steps_data, device, rank))  # after everything measured
    return out


def _describe(device) -> dict:
    import torch

    from ftbench.harness.results.environment import cpu_model

    info = {"type": device.type, "torch_threads": torch.get_num_threads(), "cpu": cpu_model()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, total_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, count=torch.cuda.device_count())
    else:
        info["name"] = info["cpu"]
    return info


def _sum_counts(micro: list[dict]) -> dict:
    keys = ("padded", "nonpad", "loss", "samples")
    return {k: sum(mb["counts"][k] for mb in micro) for k in keys}


def _global_losses(chunk, world: int) -> list[float]:
    """Per-step global losses: this rank's contributions summed over ranks."""
    import torch

    if not chunk:
        return []
    stacked = torch.stack([c.float() for c in chunk])
    if world > 1:
        if stacked.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
            stacked = stacked.cuda()
        torch.distributed.all_reduce(stacked)
    return [float(v) for v in stacked.cpu().tolist()]


def _eval_loss(model, loss_fn, batches, device, recipe) -> float:
    import torch

    from ftbench.harness.engine import autocast_for, move

    total = torch.zeros((), device=device)
    units = 0
    with torch.no_grad():
        for b in batches:
            units += b["counts"]["loss"]
            b = move({k: v for k, v in b.items() if k != "counts"}, device)
            with autocast_for(recipe, device):
                total += loss_fn(model, b).float()
    return float(total) / max(1, units)


def _classify(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError) or "out of memory" in text.lower() or "OutOfMemoryError" in text:
        return "oom"
    return "error"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import faulthandler

    faulthandler.enable()  # a segfault's Python stack goes to the cell's log, hence into the record
    from ftbench.harness.running.reaper import watch_driver

    watch_driver()
    spec_path, result_dir = Path(argv[0]), Path(argv[1])
    t_launch = float(argv[2]) if len(argv) > 2 else None
    rank = int(os.environ.get("RANK", 0))
    result_path = result_dir / f"rank{rank}.json"
    try:
        out = run_cell(json.loads(spec_path.read_text()), result_dir, t_launch)
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
