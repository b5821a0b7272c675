"""Placeholder: the classification task arrives with issue 3."""
