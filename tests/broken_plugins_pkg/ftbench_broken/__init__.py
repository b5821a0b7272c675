"""Plugins that fail to import, validate or register; ``sturdy`` works (tests/test_hostile.py)."""
