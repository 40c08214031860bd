"""Next-token selection: repetition penalty and temperature / top-k / top-p sampling, as pure
functions of ``logits [B, V]``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """CTRL-style penalty: logits of seen tokens are divided by ``penalty`` when positive and
    multiplied when negative. ``logits [B, V]``, ``seen [B, V]`` bool."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def sample_token(logits: jax.Array, key: jax.Array, temperature, top_k: int, top_p, use_top_p: bool):
    """One token per row from ``logits [B, V]`` at ``temperature`` (traced, > 0), keeping the
    ``top_k`` (static; 0 = all) most likely tokens and the smallest set whose probability
    reaches ``top_p``. Returns ``[B]`` int32."""
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, neg, logits)
    if use_top_p:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        sorted_logits = jnp.where(before < top_p, sorted_logits, neg)  # the top token always stays
        logits = jnp.full_like(logits, neg).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
