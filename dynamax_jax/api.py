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


def load_pretrained(path, dtype=jnp.float32, mesh=None):
    """Load ``(config, params)`` from a Hugging Face checkpoint directory (model_type
    mistral, llama or mamba2), a Codestral Mamba directory (params.json +
    consolidated.safetensors), a ``.gguf`` file, or a Hugging Face hub id
    (``owner/name[@revision]``, when no such local path exists).

    A hub id is looked up in the local hub cache first and downloaded (weights, config
    and tokenizer only) when it is missing and the hub can be reached; with
    ``HF_HUB_OFFLINE=1`` or no network and nothing cached, ``HubCheckpointError`` names
    the id and how to fetch it.

    ``mesh``: a ``jax.sharding.Mesh`` with axes ``data`` and ``model``
    (``dynamax_jax.sharding.make_mesh``). Every param is then created already sharded as
    ``sharding.param_specs(config)`` says (dimensions an axis does not divide are
    replicated), each block read straight from the checkpoint by the process whose
    devices hold it, so no process holds the whole model in host memory. Values equal
    the unsharded load's.

    A ``train.ee_tune`` delta directory (``delta.json`` + ``delta.safetensors``) loads as
    its tuned model: the base model it records, checked and merged
    (``dynamax_jax.delta.load_tuned``)."""
    from dynamax_jax import delta
    from dynamax_jax.convert.checkpoint import load_checkpoint
    if delta.is_delta_dir(path):
        return delta.load_tuned(None, path, dtype=dtype, mesh=mesh)
    return load_checkpoint(path, dtype=dtype, mesh=mesh)


def save_pretrained(config, params, out_dir, overwrite: bool = False) -> None:
    """Write ``config`` and ``params`` in Hugging Face format (config.json + model.safetensors).
    An existing ``out_dir`` holding other files (a tokenizer, exit heads, ...) is refused
    unless ``overwrite``, which replaces the weights and config and keeps those files."""
    from dynamax_jax.convert.checkpoint import save_hf
    save_hf(config, params, out_dir, overwrite=overwrite)


def load_tokenizer(path):
    """The tokenizer that goes with a checkpoint (directory, ``.gguf`` file or hub id, as
    ``load_pretrained`` takes; a delta directory: its base model's)."""
    from dynamax_jax import delta
    from dynamax_jax.convert.checkpoint import load_tokenizer as _load
    return _load(delta.base_tokenizer_path(path) if delta.is_delta_dir(path) else path)
