"""Placeholder: the dialogue task arrives with issue 3."""
