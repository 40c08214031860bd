"""Pure functions shared by the backbones: norms, RoPE, attention masks.

Shape legend: B batch, T query length, S cache length, D hidden, N query heads,
K key/value heads, G = N // K query heads per key/value head, H head dim, F MLP width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32; returns float32 (callers cast)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32 * scale.astype(jnp.float32)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin for rotary embeddings, ``positions [B, T] -> [B, T, H/2]`` (float32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout): ``x [B, T, heads, H]``, cos/sin ``[B, T, H/2]``."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(q_positions: jax.Array, kv_len: int, sliding_window: int | None) -> jax.Array:
    """Boolean ``[B, T, S]``: key slot ``s`` is visible to query at position ``q`` iff
    ``q - W < s <= q`` (no lower bound when ``sliding_window`` is None)."""
    kv = jnp.arange(kv_len)[None, None, :]
    q = q_positions[:, :, None]
    mask = kv <= q
    if sliding_window is not None:
        mask &= kv > q - sliding_window
    return mask


# Shared by both backbones (their configs both carry ``tie_word_embeddings`` and ``rms_norm_eps``).

def embed(config, params, tokens: jax.Array) -> jax.Array:
    """``tokens [B, T] -> [B, T, D]`` in the embedding dtype."""
    return jnp.take(params["embed"], tokens, axis=0)


def head(config, params, x: jax.Array) -> jax.Array:
    """Final norm and LM head: ``[..., D] -> [..., V]`` float32 logits."""
    if config.tie_word_embeddings:  # contract with embed [V, D] as stored: ``embed.T`` was a copy
        w = params["embed"]
        y = rms_norm(x, params["final_norm"], config.rms_norm_eps).astype(w.dtype)
        return jnp.einsum("...d,vd->...v", y, w, preferred_element_type=jnp.float32)
    w = params["lm_head"]
    y = rms_norm(x, params["final_norm"], config.rms_norm_eps).astype(w.dtype)
    return jnp.matmul(y, w, preferred_element_type=jnp.float32)


def flatten_scanned_block(tree):
    """linen nests the scanned block as ``layers/block/...``; expose ``layers/...``."""
    return {**tree, "layers": tree["layers"]["block"]} if "block" in tree.get("layers", {}) else tree


def nest_scanned_block(params):
    """The inverse of ``flatten_scanned_block``, for ``module.apply``."""
    return {**params, "layers": {"block": params["layers"]}}


def declare_head(module, config, embedding: jax.Array, x: jax.Array, init) -> jax.Array:
    """Inside a compact linen ``module``: declare ``final_norm`` (and ``lm_head`` when untied)
    and return ``head`` of ``x``. Both backbones end this way."""
    params = {"embed": embedding,
              "final_norm": module.param("final_norm", jax.nn.initializers.ones, (config.hidden_size,))}
    if not config.tie_word_embeddings:
        params["lm_head"] = module.param("lm_head", init, (config.hidden_size, config.vocab_size))
    return head(config, params, x)


# Pytrees stacked on a leading axis (layers ``[L, ...]``, exits ``[E, ...]``).

def stack_index(tree, index):
    """Slice ``index`` (traced ok) out of every leaf of a pytree stacked on axis 0."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, axis=0, keepdims=False), tree)


def stack_update(tree, new, index):
    """Write ``new`` (leaves without the leading axis) at ``index`` of a stacked pytree."""
    return jax.tree.map(lambda a, n: jax.lax.dynamic_update_index_in_dim(a, n.astype(a.dtype), index, axis=0),
                        tree, new)


def unstack(tree, donate: bool = False) -> tuple:
    """A stacked pytree as a tuple of its slices along axis 0, one buffer each. With
    ``donate`` every stacked leaf is deleted as soon as it is split, so that the two layouts
    are never both alive in full (the caller must not use ``tree`` afterwards)."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = []
    for leaf in leaves:
        parts.append(jnp.unstack(leaf))
        if donate and isinstance(leaf, jax.Array):
            leaf.delete()
    return tuple(jax.tree.unflatten(treedef, list(slices)) for slices in zip(*parts))


def unrolled_forward(model, config, params, tokens: jax.Array, return_hidden: bool = False):
    """Full forward of ``model`` (a backbone module) with params in the decode layout
    (``params["layers"]`` a tuple of per-layer dicts): layers unrolled, one buffer each.
    ``tokens [B, T] -> logits [B, T, V]`` float32 (and ``hidden [L, B, T, D]``)."""
    b, t = tokens.shape
    x = model.embed(config, params, tokens)
    hidden = []
    for layer_params, cache in zip(params["layers"], model.init_cache(config, b, t, params["embed"].dtype)):
        x, _ = model.prefill_layer(config, layer_params, x, cache, None)
        hidden.append(x)
    logits = model.head(config, params, x)
    return (logits, jnp.stack(hidden)) if return_hidden else logits
