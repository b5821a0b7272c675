"""Placeholder: the summarization task arrives with issue 3."""
