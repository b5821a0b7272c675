"""Raises in its registration hook, after registering one backend (which must not survive)."""

from ftbench import BackendSpec, StandardEngine, hookimpl


@hookimpl
def register_backends(register):
    register(BackendSpec("half-registered", engine=StandardEngine))
    raise RuntimeError("the plugin's own bug while registering")
