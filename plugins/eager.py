"""``eager``: the recipe's step in plain PyTorch, the reference every backend is compared to."""

from ftbench import hookimpl, BackendSpec, StandardEngine


class EagerEngine(StandardEngine):
    """Plain PyTorch eager mode (no wrapping); it takes no options."""

    OPTIONS = ()


@hookimpl
def register_backends(register):
    register(BackendSpec("eager", engine=EagerEngine, description="plain PyTorch, eager mode (the reference)",
                         reference=True))
