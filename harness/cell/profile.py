"""``--profile``: a :mod:`torch.profiler` trace of a few extra steps, after everything measured.

The cell's measured steps, memory peak and evaluation are over before this
runs, so a profiled cell reports the same figures as an unprofiled one; the
extra steps only cost time at the end.  One un-profiled step first (the
profiler's own start-up lands outside the trace), then ``profile_steps``
steps under the profiler, each wrapped in ``ftbench::step``, its
forward-backward in ``ftbench::forward_backward`` and its optimizer step in
``ftbench::optimizer``.

Each rank writes a Chrome/Perfetto trace (``traces/<cell>-r<repeat>-rank<R>.json``
in the result set) and a per-phase breakdown of the profiled steps' wall
time, exclusive, in this priority:

* ``communication``: collectives (c10d, gloo, NCCL, all_reduce, all_gather,
  reduce_scatter, broadcast; any thread);
* ``backward``: from the first to the last of autograd's ``evaluate_function``
  nodes inside a forward-backward (any thread; the engine's gaps between
  nodes are backward work too);
* ``optimizer``: the rest of ``ftbench::optimizer`` (clipping, AdamW, schedule);
* ``forward``: the rest of ``ftbench::forward_backward``;
* ``other``: the rest of the step (data movement, synchronisation).

The phases cover each step's span in the trace, so they add up to the
trace's step time; ``step_s`` is the same steps timed by the runner's clock,
and ``coverage`` is their ratio (both are means over the profiled steps).

On CUDA the host's spans only time kernel *launches*: the GPU runs them
later, so the GPU's work would fall into ``other`` (the host waiting in the
final synchronisation).  There the phases are **device time**
(:func:`device_breakdown`, ``phases_clock: "device"``): each kernel belongs
to the phase its launch fell in on the host (the profiler links the two by
correlation id; a kernel named like a collective is ``communication``), a
phase's time is the union of its kernels' spans on the device, and
``other`` is the rest of the step: the time the device sat idle.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from types import SimpleNamespace
from ftbench.harness.cell.measure import now, synchronize

COMM_MARKERS = ("c10d", "gloo", "nccl", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter",
                "broadcast", "record_param_comms", "ProcessGroup", "all_to_all")
BACKWARD_MARKER = "autograd::engine::evaluate_function"
PHASES = ("forward", "backward", "optimizer", "communication", "other")


def profile_after_training(spec, engine, steps_data, device, rank: int) -> dict:
    """Profile ``spec.profile_steps`` extra steps; ``{}`` (and no work) when profiling is off.

    Example (the worker's hook, after evaluation)::

        out.update(profile_after_training(spec, engine, steps, device, rank))
    """
    n = int(getattr(spec, "profile_steps", 0) or 0)
    if n <= 0 or not spec.profile_dir:
        return {}
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function


    engine.eval_model().train()
    # A stream (collated on demand) or a list of pre-collated steps; both give (micro_batches, counts).
    step_at = steps_data.step if hasattr(steps_data, "step") else steps_data.__getitem__
    batches = [step_at(i % len(steps_data))[0] for i in range(n + 1)]
    _one_step(engine, batches[0], device, synchronize)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    clock = []
    with profile(activities=activities) as prof:
        for micro in batches[1:]:
            with record_function("ftbench::step"):
                t0 = now()
                _one_step(engine, micro, device, synchronize, record_function)
                clock.append(now() - t0)
    out_dir = Path(spec.profile_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{spec.cell_id}-r{spec.repeat}-rank{rank}.json"
    prof.export_chrome_trace(str(out_dir / name))
    events = prof.events()
    if device.type == "cuda":
        phases = device_breakdown([e for e in events if _on_host(e)] + device_events(prof.profiler.kineto_results))
    else:
        phases = breakdown(events)
    step_s = sum(clock) / n  # the mean, like the phases: both are totals over the same steps
    traced = sum(phases.values()) / n
    return {"profile": {"steps": n, "trace": name, "step_s": step_s, "step_s_median": statistics.median(clock),
                        "step_s_traced": traced,
                        "phases_s": {k: v / n for k, v in phases.items()},
                        "phases_clock": "device" if device.type == "cuda" else "host",
                        "coverage": traced / step_s if step_s else None}}


def _one_step(engine, micro, device, synchronize, record_function=None) -> None:
    import contextlib

    label = record_function or (lambda _name: contextlib.nullcontext())
    with label("ftbench::forward_backward"):
        for i, mb in enumerate(micro):
            engine.forward_backward(mb, boundary=i == len(micro) - 1)
    with label("ftbench::optimizer"):
        engine.step()
    synchronize(device)


# ------------------------------------------------------------------ intervals


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _clip(spans, within) -> list[tuple[float, float]]:
    out = []
    for a, b in spans:
        for c, d in within:
            lo, hi = max(a, c), min(b, d)
            if hi > lo:
                out.append((lo, hi))
    return _union(out)


def _minus(spans, holes) -> list[tuple[float, float]]:
    out = []
    for a, b in spans:
        cur = a
        for c, d in holes:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


def _length(spans) -> float:
    return sum(b - a for a, b in spans)


def _host_phase_spans(events) -> tuple[list, dict]:
    """(step spans, {phase: spans}) on the host timeline, exclusive, ``other`` left out."""
    def spans(pred):
        return _union([(e.time_range.start, e.time_range.end) for e in events
                       if _on_host(e) and pred(e.name)])

    steps = spans(lambda n: n == "ftbench::step")
    comm = _clip(spans(lambda n: any(m.lower() in n.lower() for m in COMM_MARKERS)), steps)
    nodes = spans(lambda n: n.startswith(BACKWARD_MARKER))
    envelopes = []
    for a, b in spans(lambda n: n == "ftbench::forward_backward"):
        inside = [(c, d) for c, d in nodes if c >= a and d <= b]
        if inside:
            envelopes.append((min(c for c, _ in inside), max(d for _, d in inside)))
    bwd = _minus(_clip(_union(envelopes), steps), comm)
    opt = _minus(_minus(_clip(spans(lambda n: n == "ftbench::optimizer"), steps), comm), bwd)
    fwd = _minus(_minus(_clip(spans(lambda n: n == "ftbench::forward_backward"), steps), comm), bwd)
    return steps, {"communication": comm, "backward": bwd, "optimizer": opt, "forward": fwd}


def _on_host(event) -> bool:
    kind = getattr(event, "device_type", None)
    kind = kind() if callable(kind) else kind  # a raw Kineto event's is a method
    return kind is None or getattr(kind, "name", str(kind)).upper().endswith("CPU")


def breakdown(events) -> dict[str, float]:
    """Seconds per phase over all profiled steps, from the profiler's events (microsecond spans)."""
    steps, phases = _host_phase_spans(events)
    parts = {k: _length(v) for k, v in phases.items()}
    parts["other"] = max(0.0, _length(steps) - sum(parts.values()))
    return {k: parts[k] / 1e6 for k in PHASES}


def _phase_at(t: float, phases: dict) -> str | None:
    for name in ("communication", "backward", "optimizer", "forward"):
        if any(a <= t <= b for a, b in phases[name]):
            return name
    return None


def device_events(results) -> list:
    """The device's events of a profile's raw Kineto ``results``, each with the correlation id of
    the host event that launched it, on the same microsecond clock as ``prof.events()``.

    Read from the raw results because torch 2.11's ``FunctionEvent`` has no
    ``linked_correlation_id`` (2.13's has): read from those, every kernel looked unlaunched, and
    the first GPU run's phases were all ``other``.

    Example::

        device_events(prof.profiler.kineto_results)[0].name   # 'ampere_bf16_s16816gemm...'
    """
    start = results.trace_start_ns()
    out = []
    for k in results.events():
        if _on_host(k):
            continue
        out.append(SimpleNamespace(name=k.name(), id=k.correlation_id(), device_type=k.device_type(),
                                   linked_correlation_id=k.linked_correlation_id(),
                                   time_range=SimpleNamespace(start=(k.start_ns() - start) / 1e3,
                                                              end=(k.end_ns() - start) / 1e3)))
    return out


def device_breakdown(events) -> dict[str, float]:
    """Seconds per phase of *device* time over all profiled steps (see the module docstring).

    A kernel is an event off the host whose ``linked_correlation_id`` names the host event that
    launched it; kernels launched outside the profiled steps are left out.
    """
    steps, phases = _host_phase_spans(events)
    launchers = {e.id: e for e in events if _on_host(e)}
    kernels: dict[str, list] = {name: [] for name in phases}
    for e in events:
        if _on_host(e):
            continue
        launcher = launchers.get(getattr(e, "linked_correlation_id", 0))
        if launcher is None or not any(a <= launcher.time_range.start <= b for a, b in steps):
            continue
        if any(m.lower() in e.name.lower() for m in COMM_MARKERS):
            phase = "communication"
        else:
            phase = _phase_at(launcher.time_range.start, phases) or "other"
        kernels.setdefault(phase, []).append((e.time_range.start, e.time_range.end))
    parts = {}
    busy: list = []
    for name in ("communication", "backward", "optimizer", "forward"):
        spans = _minus(_union(kernels.get(name, [])), busy)  # overlapping streams counted once
        parts[name] = _length(spans)
        busy = _union(busy + spans)
    # The step's time on the host clock (the runner synchronises at each step's end), less the
    # device's busy time: idle device, and kernels of no phase.
    parts["other"] = max(0.0, _length(steps) - sum(parts.values()))
    return {k: parts[k] / 1e6 for k in PHASES}
