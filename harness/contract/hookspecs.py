"""The hooks a plugin may implement.

A plugin is any module or object with functions decorated ``@hookimpl``.
Each hook receives a ``register`` callback owned by the core; the plugin calls
it once per thing it contributes.  The core rejects a name registered twice
and names both plugins in the error.

Example plugin module (a complete, installable backend)::

    from ftbench import BackendSpec, StandardEngine, hookimpl

    class MyEngine(StandardEngine):
        pass

    @hookimpl
    def register_backends(register):
        register(BackendSpec(name="mine", engine=MyEngine,
                             description="my way of running a step"))
"""

from __future__ import annotations

import pluggy

PROJECT = "ftbench"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_tasks(register):
    """Register task plugins by calling ``register(task)`` for each.

    ``task`` is a :class:`ftbench.Task` instance.  Example::

        @hookimpl
        def register_tasks(register):
            register(MyTask())
    """


@hookspec
def register_backends(register):
    """Register training backends by calling ``register(spec)`` for each.

    ``spec`` is a :class:`ftbench.BackendSpec`.  A preset is simply a
    second spec that reuses an engine with other default options::

        @hookimpl
        def register_backends(register):
            register(BackendSpec("deepspeed", engine=DeepSpeedEngine,
                                 defaults={"stage": 0}))
            register(BackendSpec("zero2", engine=DeepSpeedEngine,
                                 defaults={"stage": 2}, preset_of="deepspeed"))
    """


@hookspec
def register_models(register):
    """Register model presets by calling ``register(preset)`` for each.

    ``preset`` is a :class:`ftbench.ModelPreset`; it builds a randomly
    initialised model for a tokenizer, so it needs no download::

        @hookimpl
        def register_models(register):
            register(ModelPreset("tiny-gpt2", kind="decoder", build=build_gpt2))
    """


@hookspec
def register_sinks(register):
    """Register record sinks by calling ``register(spec)`` for each.

    ``spec`` is a :class:`ftbench.SinkSpec`; its sink receives every record
    as the run writes it (``--sink NAME:key=value``), and replays a result
    set with ``ftbench sink RUNS --to NAME``::

        @hookimpl
        def register_sinks(register):
            register(SinkSpec("mlflow", MlflowSink, requires=("mlflow",),
                              options={"uri": "tracking URI"}))
    """


@hookspec
def register_optimizations(register):
    """Register optimizations by calling ``register(opt)`` for each.

    ``opt`` is an :class:`ftbench.Optimization`: what it changes, whether it
    keeps the math, where it works, and the hooks that apply it.  A cell asks
    for it with ``--opt NAME[:key=value]``::

        @hookimpl
        def register_optimizations(register):
            register(ChunkedCrossEntropy())     # --opt chunked-ce:chunks=8
    """


@hookspec
def collect_environment(env):
    """Add facts to a result record's ``environment`` dict, in place.

    Use it for the versions of the libraries a plugin depends on::

        @hookimpl
        def collect_environment(env):
            env["versions"]["deepspeed"] = deepspeed_version_or_none()
    """
