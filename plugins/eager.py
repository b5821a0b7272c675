"""``eager``: the recipe's step in plain PyTorch, the reference every backend is compared to."""

from harness import hookimpl
from harness.api import BackendSpec
from harness.engine import StandardEngine


class EagerEngine(StandardEngine):
    """Plain PyTorch eager mode (no wrapping); it takes no options."""

    OPTIONS = ()


@hookimpl
def register_backends(register):
    register(BackendSpec("eager", engine=EagerEngine, description="plain PyTorch, eager mode (the reference)",
                         reference=True))
