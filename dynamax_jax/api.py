"""The public entry points: ``load_pretrained``, ``forward``, ``save_pretrained``, ``init_params``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dynamax_jax.models import module_for


def init_params(config, key: jax.Array, dtype=jnp.float32):
    """Random parameters for ``config`` (a ``MistralConfig`` or ``Mamba2Config``)."""
    return module_for(config).init_params(config, key, dtype)


@functools.partial(jax.jit, static_argnums=(0,))
def forward(config, params, tokens: jax.Array) -> jax.Array:
    """Full-depth forward: ``tokens [B, T] int32 -> logits [B, T, V] float32``."""
    return module_for(config).forward(config, params, tokens)


def load_pretrained(path, dtype=jnp.float32):
    """Load ``(config, params)`` from a Hugging Face checkpoint directory (model_type
    mistral, llama or mamba2), a Codestral Mamba directory (params.json +
    consolidated.safetensors) or a ``.gguf`` file."""
    from dynamax_jax.convert.checkpoint import load_checkpoint
    return load_checkpoint(path, dtype=dtype)


def save_pretrained(config, params, out_dir, overwrite: bool = False) -> None:
    """Write ``config`` and ``params`` in Hugging Face format (config.json + model.safetensors).
    An existing ``out_dir`` holding other files (a tokenizer, exit heads, ...) is refused
    unless ``overwrite``, which replaces the weights and config and keeps those files."""
    from dynamax_jax.convert.checkpoint import save_hf
    save_hf(config, params, out_dir, overwrite=overwrite)


def load_tokenizer(path):
    """The tokenizer that goes with a checkpoint (directory or ``.gguf`` file)."""
    from dynamax_jax.convert.checkpoint import load_tokenizer as _load
    return _load(path)
