"""Implements a hook that does not exist (register_task for register_tasks)."""

from ftbench import hookimpl


@hookimpl
def register_task(register):
    raise AssertionError("never called: pluggy's validation rejects the plugin first")
