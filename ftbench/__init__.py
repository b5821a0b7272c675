"""ftbench: full-parameter fine-tuning benchmarks across tasks and training backends.

This module is the **public plugin API**: everything a task or backend plugin
may use is importable from ``ftbench`` itself and listed in ``__all__``, as
``import pytest`` is for pytest plugins.  These names are stable: they change
only with a note in the changelog and a major version.  Everything under
``ftbench.harness`` is internal and may change in any release.

A complete backend plugin::

    import ftbench

    class MyEngine(ftbench.StandardEngine):
        pass  # override wrap(model) to change how the step runs

    @ftbench.hookimpl
    def register_backends(register):
        register(ftbench.BackendSpec("mine", engine=MyEngine,
                                     description="my way of running a step"))

Install it with an entry point in the ``ftbench`` group
(``[project.entry-points.ftbench] mine = "my_package"``); see the README.
"""

from ftbench.harness.contract.api import (
    DECODER,
    ENCODER,
    ENCODER_DECODER,
    IGNORE_INDEX,
    MODEL_KINDS,
    BackendSpec,
    DataError,
    Encoded,
    Engine,
    EvalContext,
    FtbenchError,
    ModelPreset,
    StepClock,
    Task,
    Unavailable,
)
from ftbench.harness.contract.engine import (
    GLOBAL_MEAN,
    EngineContext,
    StandardEngine,
    autocast_for,
    build_optimizer,
    build_scheduler,
    model_inputs,
    move,
    optimizer_name,
    precision_policy,
    rows_fingerprint,
    weight_decay_scope,
)
from ftbench.harness.cell.data import where
from ftbench.harness.contract.config import Recipe
from ftbench.harness.contract.memory_model import MemoryPlan
from ftbench.harness.contract.sinks import Sink, SinkSpec, run_name, sink_curves, sink_metrics, sink_params
from ftbench.harness.contract.optimization import EXACT, NUMERICS, TOLERANCE, MemoryEffects, Optimization
from ftbench.harness.contract.hookspecs import hookimpl
from ftbench.harness.contract.environment import package_version, version_tuple


def block_stacks(model):
    """The model's stacks of transformer blocks, outermost only (e.g. GPT-2's ``h``).

    For backends that shard or wrap per block.  Example::

        for stack in ftbench.block_stacks(model):
            for block in stack:
                fully_shard(block)
    """
    # Imported here: the modelling module imports torch, which 'ftbench list' must not pay for.
    from ftbench.harness.cell.modeling import block_stacks as _block_stacks

    return _block_stacks(model)


__all__ = [
    # the hook marker
    "hookimpl",
    # what plugins implement or construct
    "Task",
    "EvalContext",
    "Encoded",
    "ModelPreset",
    "BackendSpec",
    "Engine",
    "StandardEngine",
    "EngineContext",
    "Recipe",
    # record sinks (MLflow, TensorBoard, ...) and what they log of a record
    "Sink",
    "SinkSpec",
    "run_name",
    "sink_params",
    "sink_metrics",
    "sink_curves",
    # optimizations users choose between (--opt), and how they change the memory prediction
    "Optimization",
    "MemoryEffects",
    "EXACT",
    "TOLERANCE",
    "NUMERICS",
    # how a backend shards the training state (Engine.memory_plan)
    "MemoryPlan",
    # helpers for engines that build their own step (e.g. DeepSpeed's)
    "build_optimizer",
    "build_scheduler",
    "autocast_for",
    "move",
    "model_inputs",
    "block_stacks",
    # what an engine reports of what it computed (Engine.facts), and the clock of Engine.run_loop
    "GLOBAL_MEAN",
    "precision_policy",
    "optimizer_name",
    "rows_fingerprint",
    "weight_decay_scope",
    "StepClock",
    # availability checks without importing the library; data error locations
    "package_version",
    "version_tuple",
    "where",
    # errors
    "FtbenchError",
    "DataError",
    "Unavailable",
    # model kinds and the label of positions that carry no loss
    "DECODER",
    "ENCODER_DECODER",
    "ENCODER",
    "MODEL_KINDS",
    "IGNORE_INDEX",
]
__version__ = "0.1.0"
