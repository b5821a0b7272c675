"""ftbench: full-parameter fine-tuning benchmarks across tasks and training backends.

Plugin authors need only::

    from harness import hookimpl
    from harness.api import Task, BackendSpec, ModelPreset
"""

from .hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
