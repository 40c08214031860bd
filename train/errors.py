"""The errors of ``dynamax_jax.train``: a user's mistake is a ``ValueError`` subclass (printed
as one line with exit status 2 by the command lines). Bad data files raise
``dynamax_jax.errors.DataError``."""

from __future__ import annotations


class DistillError(ValueError):
    """A bad distillation setting, found before any work."""
