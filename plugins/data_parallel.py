"""Placeholder: the compile backend arrives with issue 4."""
