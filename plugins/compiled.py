"""``compile``: the recipe's eager step with the model under ``torch.compile``.

Only the model's forward (and so its backward) is compiled; the loss, the
optimizer, clipping and the schedule are the shared ``StandardEngine`` code,
so a compiled cell computes exactly what an eager one does.  Compilation
happens in the first steps, which the runner reports as ``compile_s``
(their time minus the steady-state median); recompilations and graph breaks
are counted from dynamo's own bookkeeping into ``backend_stats``.
"""

from __future__ import annotations

from ftbench import hookimpl, BackendSpec, FtbenchError, StandardEngine, Unavailable

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledEngine(StandardEngine):
    """``torch.compile(model, mode=..., fullgraph=..., dynamic=...)``.

    Options: ``mode`` (default, reduce-overhead, max-autotune,
    max-autotune-no-cudagraphs), ``fullgraph`` (fail on a graph break),
    ``dynamic`` (true, false, or unset for automatic), ``backend``
    (``inductor``; ``aot_eager`` or ``eager`` to bisect a problem).

    Example: ``ftbench run --backend compile:mode=max-autotune,fullgraph=true``.
    """

    compiles = True

    @classmethod
    def check_available(cls, options: dict) -> None:
        # Package metadata, not an import: 'ftbench list' checks every backend and
        # importing torch alone costs seconds. A platform dynamo rejects still
        # fails the cell with dynamo's own message.
        from ftbench import package_version, version_tuple

        version = package_version("torch")
        if version_tuple(version) < (2, 0):
            raise Unavailable(f"needs torch>=2.0 with torch.compile (installed: {version}); pip install -U torch")

    @classmethod
    def validate_options(cls, options: dict) -> dict:
        known = {"mode", "fullgraph", "dynamic", "backend"}
        unknown = set(options) - known
        if unknown:
            raise FtbenchError(f"unknown compile option(s) {sorted(unknown)}; allowed: {sorted(known)} "
                               "(e.g. compile:mode=max-autotune,fullgraph=true)")
        opts = dict(options)
        if opts.get("mode", "default") not in MODES:
            raise FtbenchError(f"invalid compile mode={opts['mode']!r}; choose one of {', '.join(MODES)}")
        for key in ("fullgraph", "dynamic"):
            if key in opts and opts[key] is not None and not isinstance(opts[key], bool):
                raise FtbenchError(f"invalid compile {key}={opts[key]!r}; write {key}=true or {key}=false")
        if not isinstance(opts.get("backend", "inductor"), str):
            raise FtbenchError(f"invalid compile backend={opts['backend']!r}; e.g. backend=inductor")
        return opts

    def wrap(self, model):
        import torch
        import torch._dynamo.utils as dutils

        # The default history of 64 compilations would undercount recompiles of a long run.
        if hasattr(dutils, "set_compilation_metrics_limit"):
            dutils.set_compilation_metrics_limit(4096)
        mode = self.options.get("mode", "default")
        return torch.compile(model, mode=None if mode == "default" else mode,
                             fullgraph=bool(self.options.get("fullgraph", False)),
                             dynamic=self.options.get("dynamic"),
                             backend=self.options.get("backend", "inductor"))

    def stats(self) -> dict:
        return dynamo_stats()


def dynamo_stats() -> dict:
    """Graph breaks, recompilations and graph counts from dynamo's counters.

    These are private torch APIs, so each figure is read defensively: a
    missing one is left out rather than failing a finished cell.
    """
    out: dict = {}
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return out
    breaks = counters.get("graph_break", {})
    out["graph_breaks"] = int(sum(breaks.values()))
    if breaks:
        top = sorted(breaks.items(), key=lambda kv: -kv[1])[:10]
        out["graph_break_reasons"] = {str(k)[:300]: int(v) for k, v in top}
    stats = counters.get("stats", {})
    out["unique_graphs"] = int(stats.get("unique_graphs", 0))
    frames = counters.get("frames", {})
    out["frames_compiled"] = int(frames.get("ok", 0))
    try:
        from torch._dynamo.utils import get_compilation_metrics

        reasons = [m.recompile_reason for m in get_compilation_metrics()
                   if getattr(m, "recompile_reason", None)]
        out["recompiles"] = len(reasons)
        if reasons:
            out["recompile_reasons"] = sorted({str(r)[:300] for r in reasons})[:10]
    except Exception:  # noqa: BLE001
        pass
    return out


@hookimpl
def register_backends(register):
    # Inductor's import (seconds) is not compilation: warm it in the fork server so compile_s
    # measures the compile itself, whatever else the grid holds (DeepSpeed imports inductor too).
    register(BackendSpec("compile", engine=CompiledEngine, defaults={"mode": "default"},
                         preload=("torch._inductor.compile_fx",),
                         description="torch.compile of the model (options: mode, fullgraph, dynamic, backend)"))
