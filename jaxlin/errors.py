"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class JaxlinError(Exception):
    """Base of every error caused by bad input (config, checkpoint, text)."""
