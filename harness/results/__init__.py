"""See harness/__init__.py and docs/architecture.md."""
