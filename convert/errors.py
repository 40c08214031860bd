"""Errors raised by every converter (safetensors, Codestral consolidated, GGUF).

All are ``ValueError`` subclasses, so callers can catch either. Messages name the file
or tensor at fault and, for shapes, say expected vs found.
"""

from __future__ import annotations

from dynamax_jax.config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match its configuration."""


class MissingTensorError(CheckpointError):
    """A tensor the configuration requires is absent from the checkpoint."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape differs from the shape its configuration implies."""


class CorruptFileError(CheckpointError):
    """A checkpoint file is truncated or its header cannot be parsed."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's model type (or file format) has no converter."""


class HubCheckpointError(CheckpointError):
    """A Hugging Face hub id could not be resolved to local files: not in the local cache
    with the hub out of reach (offline), or refused by the hub (no such repository or
    revision, gated)."""


__all__ = ["CheckpointError", "ConfigError", "CorruptFileError", "HubCheckpointError", "MissingTensorError",
           "ShapeMismatchError", "UnsupportedModelError"]
