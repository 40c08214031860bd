"""Mistral / Llama decoder as pure-functional ``flax.linen``.

Shape legend: B batch, T tokens in this call, S cache slots, D hidden, N query heads,
K key/value heads, G = N // K, H head dim, F MLP width, V vocabulary, L layers.

Parameters (plain nested dict; layer params stacked on a leading ``[L]`` axis)::

    embed [V, D]
    layers/attn_norm [L, D]   layers/wq [L, D, N, H]   layers/wk [L, D, K, H]
    layers/wv [L, D, K, H]    layers/wo [L, N, H, D]   layers/mlp_norm [L, D]
    layers/w_gate [L, D, F]   layers/w_up [L, D, F]    layers/w_down [L, F, D]
    final_norm [D]            lm_head [D, V]   (absent when embeddings are tied)

Every call goes through the KV cache: a full forward is a prefill into a fresh cache
of T slots. ``start [B]`` is the number of tokens already in the cache for each row,
so rows of one batch may sit at different positions (right-padded prompts).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax.config import MistralConfig
# embed and head are part of this module's interface (shared with the Mamba2 model)
from dynamax_jax.models.layers import (apply_rope, attention_mask, declare_head, embed, flatten_scanned_block, head,
                                       nest_scanned_block, rms_norm, rope_angles)

Params = dict[str, Any]
_init = nn.initializers.normal(stddev=0.02)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer: ``k, v [L, B, S, K, H]``."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def init(cls, config: MistralConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def _write(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write ``new [B, T, K, H]`` into ``cache [B, S, K, H]`` at slots ``start[b] + t``."""
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0))(
        cache, new.astype(cache.dtype), start)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. ``q [B, T, N, H]``, ``k, v [B, S, K, H]``, ``mask [B, T, S]``
    -> ``[B, T, N, H]``. Scores and softmax in float32."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


class MistralBlock(nn.Module):
    """One pre-norm decoder layer. ``__call__(x [B,T,D], k_cache, v_cache [B,S,K,H], start [B])``
    returns ``(x, (k_cache, v_cache))`` with this call's keys/values written at ``start``."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x, k_cache, v_cache, start):
        cfg = self.config
        d, n, kh, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        p = lambda name, shape, init=_init: self.param(name, init, shape)  # noqa: E731
        attn_norm = p("attn_norm", (d,), nn.initializers.ones)
        wq, wk, wv, wo = p("wq", (d, n, h)), p("wk", (d, kh, h)), p("wv", (d, kh, h)), p("wo", (n, h, d))
        mlp_norm = p("mlp_norm", (d,), nn.initializers.ones)
        w_gate, w_up, w_down = p("w_gate", (d, f)), p("w_up", (d, f)), p("w_down", (f, d))

        x, k, v = attention_sublayer(cfg, (attn_norm, wq, wk, wv, wo), x, k_cache, v_cache, start)
        y = rms_norm(x, mlp_norm, cfg.rms_norm_eps).astype(w_up.dtype)
        y = jax.nn.silu(y @ w_gate) * (y @ w_up)  # [B, T, F]
        x = x + (y @ w_down).astype(x.dtype)
        return x, (k, v)


def kv_projection(cfg: MistralConfig, layer_params: Params, x: jax.Array, start: jax.Array):
    """Keys and values a layer would store for hidden states ``x [B, T, D]`` entering it
    (used by CALM-style state propagation for skipped layers). Returns ``k, v [B, T, K, H]``."""
    y = rms_norm(x, layer_params["attn_norm"], cfg.rms_norm_eps).astype(layer_params["wk"].dtype)
    k = jnp.einsum("btd,dkh->btkh", y, layer_params["wk"])
    v = jnp.einsum("btd,dkh->btkh", y, layer_params["wv"])
    positions = start[:, None] + jnp.arange(x.shape[1])[None]
    cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    return apply_rope(k, cos, sin), v


def attention_sublayer(cfg, weights, x, k_cache, v_cache, start):
    attn_norm, wq, wk, wv, wo = weights
    t = x.shape[1]
    positions = start[:, None] + jnp.arange(t)[None]  # [B, T]
    y = rms_norm(x, attn_norm, cfg.rms_norm_eps).astype(wq.dtype)
    q = jnp.einsum("btd,dnh->btnh", y, wq)
    k = jnp.einsum("btd,dkh->btkh", y, wk)
    v = jnp.einsum("btd,dkh->btkh", y, wv)
    cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache, v_cache = _write(k_cache, k, start), _write(v_cache, v, start)
    mask = attention_mask(positions, k_cache.shape[1], cfg.sliding_window)
    out = attention(q, k_cache, v_cache, mask)
    x = x + jnp.einsum("btnh,nhd->btd", out, wo).astype(x.dtype)
    return x, k_cache, v_cache


class _ScannedBlock(nn.Module):
    """Adapter for ``nn.scan``: carry ``x``, per-layer ``(k, v)`` in and out, ``start`` broadcast."""

    config: MistralConfig
    return_hidden: bool = False

    @nn.compact
    def __call__(self, x, kv, start):
        x, kv = MistralBlock(self.config, name="block")(x, kv[0], kv[1], start)
        return x, (kv, x if self.return_hidden else None)


class Mistral(nn.Module):
    """Full-depth decoder. ``__call__(tokens [B,T], cache, start [B], return_hidden)`` returns
    ``(logits [B,T,V] float32, cache, hidden [L,B,T,D] or None)``; ``hidden[i]`` is the output
    of layer ``i + 1`` before the final norm."""

    config: MistralConfig

    @nn.compact
    def __call__(self, tokens, cache: KVCache, start, return_hidden: bool = False):
        cfg = self.config
        emb = self.param("embed", _init, (cfg.vocab_size, cfg.hidden_size))
        layers = nn.scan(_ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast), length=cfg.num_layers)
        x = jnp.take(emb, tokens, axis=0)
        x, ((k, v), hidden) = layers(cfg, return_hidden, name="layers")(x, (cache.k, cache.v), start)
        logits = declare_head(self, cfg, emb, x, _init)
        return logits, KVCache(k, v), hidden


def init_params(config: MistralConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters: normal with std 0.02, norms at one, in ``dtype``."""
    return _init_params(config, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(config: MistralConfig, key: jax.Array, dtype) -> Params:
    # Shapes from an abstract linen init; values drawn leaf by leaf. Running linen's init
    # itself would trace and run the whole model, which costs seconds even when tiny.
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(Mistral(config).init, key, tokens, KVCache.init(config, 1, 1),
                            jnp.zeros((1,), jnp.int32))["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [s.size for _, s in leaves]
    # One draw for all leaves: a single RNG op compiles far faster than one per leaf.
    flat = 0.02 * jax.random.normal(key, (sum(sizes),), jnp.float32)
    parts = jnp.split(flat, np.cumsum(sizes)[:-1])
    values = [jnp.ones(s.shape, dtype) if path[-1].key.endswith("norm") else part.reshape(s.shape).astype(dtype)
              for (path, s), part in zip(leaves, parts)]
    return flatten_scanned_block(jax.tree.unflatten(treedef, values))


def apply(config: MistralConfig, params: Params, tokens, cache: KVCache, start, return_hidden=False):
    """Run the full stack over ``tokens [B, T]`` starting at ``start [B]`` in ``cache``."""
    return Mistral(config).apply({"params": nest_scanned_block(params)}, tokens, cache, start, return_hidden)


def apply_layer(config: MistralConfig, layer_params: Params, x, k_cache, v_cache, start):
    """One layer, for early-exit decoding with params sliced from ``params['layers']``."""
    return MistralBlock(config).apply({"params": layer_params}, x, k_cache, v_cache, start)


def forward(config: MistralConfig, params: Params, tokens: jax.Array, return_hidden: bool = False):
    """Full forward without a persistent cache: ``tokens [B, T] -> logits [B, T, V]`` float32
    (and ``hidden [L, B, T, D]`` when ``return_hidden``)."""
    b, t = tokens.shape
    dtype = params["embed"].dtype
    cache = KVCache.init(config, b, t, dtype)
    logits, _, hidden = apply(config, params, tokens, cache, jnp.zeros((b,), jnp.int32), return_hidden)
    return (logits, hidden) if return_hidden else logits
