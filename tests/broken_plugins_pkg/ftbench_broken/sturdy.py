"""A working backend beside the broken plugins of the same package: the standard eager step."""

from ftbench import BackendSpec, StandardEngine, hookimpl


@hookimpl
def register_backends(register):
    register(BackendSpec("sturdy", engine=StandardEngine, description="eager, from a package with broken plugins"))
