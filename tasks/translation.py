"""Placeholder: the translation task arrives with issue 3."""
