"""Fails to import: a dependency that is not installed."""

import ftbench_dependency_that_is_not_installed  # noqa: F401
