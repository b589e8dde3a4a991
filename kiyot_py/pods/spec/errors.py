"""The one error of spec building, in a module of its own so every part can raise it."""

from __future__ import annotations


class SpecError(ValueError):
    """The CRI input cannot be turned into a runnable OCI spec (for this cell)."""
