"""Backbones. ``module_for(config)`` returns the model module of a config's family."""

from __future__ import annotations


def module_for(config):
    """The module (``mistral`` or ``mamba2``) implementing ``config``'s architecture."""
    from dynamax_jax.config import Mamba2Config, MistralConfig

    if isinstance(config, MistralConfig):
        from dynamax_jax.models import mistral
        return mistral
    if isinstance(config, Mamba2Config):
        from dynamax_jax.models import mamba2
        return mamba2
    raise TypeError(f"no model for config of type {type(config).__name__}")
