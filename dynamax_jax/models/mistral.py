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
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax.config import MistralConfig
from dynamax_jax.models import layers
from dynamax_jax.models.attention import causal_attention
# embed and head are part of this module's interface (shared with the Mamba2 model)
from dynamax_jax.models.layers import (apply_rope, attention_mask, declare_head, embed, flatten_scanned_block, head,
                                       nest_scanned_block, rms_norm, rope_angles)

Params = dict[str, Any]
_init = nn.initializers.normal(stddev=0.02)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer: ``k, v [L, B, K, S, H]`` (head-major, so that attention
    reads the cache without transposing it); a one-layer slice is ``[B, K, S, H]``."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def init(cls, config: MistralConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[-2]


def _write(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write ``new [B, T, K, H]`` into ``cache [B, K, S, H]`` at slots ``start[b] + t``."""
    new = jnp.swapaxes(new, 1, 2).astype(cache.dtype)  # [B, K, T, H]
    # One dynamic_update_slice per row (B is static): XLA updates the buffer in place. A vmapped
    # update becomes a scatter, which XLA:CPU lowered to copies of the whole cache.
    zero = jnp.zeros((), start.dtype)
    for row in range(cache.shape[0]):
        cache = jax.lax.dynamic_update_slice(cache, new[row:row + 1], (row, zero, start[row], zero))
    return cache


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. ``q [B, T, N, H]``, ``k, v [B, K, S, H]``, ``mask [B, T, S]``
    -> ``[B, T, N, H]``. Scores and softmax in float32."""
    b, t, n, h = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def decode_attention(q, k_new, v_new, k_cache, v_cache, visible):
    """Attention of one new token: ``q [B, 1, N, H]`` over the cache slots ``visible [B, S]``
    (``k_cache, v_cache [B, K, S, H]``) and its own ``k_new, v_new [B, 1, K, H]``, which are not
    in the cache yet -> ``[B, 1, N, H]``. Equal to ``attention`` after writing them."""
    b, _, n, h = q.shape
    kv_heads = k_cache.shape[1]
    q = q.reshape(b, kv_heads, n // kv_heads, h)
    scale = h ** -0.5
    scores = jnp.einsum("bkgh,bksh->bkgs", q, k_cache, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    own = jnp.einsum("bkgh,bkh->bkg", q, k_new[:, 0], preferred_element_type=jnp.float32) * scale
    top = jnp.maximum(jnp.max(scores, axis=-1), own)  # finite: the token always sees itself
    probs, own_prob = jnp.exp(scores - top[..., None]), jnp.exp(own - top)
    total = jnp.sum(probs, axis=-1) + own_prob
    out = jnp.einsum("bkgs,bksh->bkgh", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    out = (out + own_prob[..., None] * v_new[:, 0, :, None, :].astype(jnp.float32)) / total[..., None]
    return out.reshape(b, 1, n, h).astype(q.dtype)


class MistralBlock(nn.Module):
    """One pre-norm decoder layer: declares its params and calls ``block``.
    ``__call__(x [B,T,D], k_cache, v_cache [B,K,S,H], start [B])`` returns
    ``(x, (k_cache, v_cache))`` with this call's keys/values written at ``start``."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x, k_cache, v_cache, start):
        cfg = self.config
        d, n, kh, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        p = lambda name, shape, init=_init: self.param(name, init, shape)  # noqa: E731
        layer_params = {
            "attn_norm": p("attn_norm", (d,), nn.initializers.ones),
            "wq": p("wq", (d, n, h)), "wk": p("wk", (d, kh, h)), "wv": p("wv", (d, kh, h)), "wo": p("wo", (n, h, d)),
            "mlp_norm": p("mlp_norm", (d,), nn.initializers.ones),
            "w_gate": p("w_gate", (d, f)), "w_up": p("w_up", (d, f)), "w_down": p("w_down", (f, d)),
        }
        x, cache = block(cfg, layer_params, x, KVCache(k_cache, v_cache), start)
        return x, (cache.k, cache.v)


def block(cfg: MistralConfig, p: Params, x: jax.Array, cache: "KVCache", start: jax.Array):
    """One decoder layer as a pure function: ``x [B, T, D]`` at positions ``start[b] + t``,
    ``cache`` one layer's ``KVCache`` (``k, v [B, K, S, H]``) -> ``(x, cache)`` with this call's
    keys and values written, then attended to."""
    positions = start[:, None] + jnp.arange(x.shape[1])[None]  # [B, T]
    q, k, v = _qkv(cfg, p, x, positions)
    k_cache, v_cache = _write(cache.k, k, start), _write(cache.v, v, start)
    out = attention(q, k_cache, v_cache, attention_mask(positions, k_cache.shape[2], cfg.sliding_window))
    return _mlp(cfg, p, _attention_out(p, x, out)), KVCache(k_cache, v_cache)


def fuse_decode_weights(p: Params) -> Params:
    """One layer's params in the decode layout: the projections that read the same input
    as one matrix each, ``w_qkv [D, (N + 2K) H]`` (replacing ``wq``) and ``w_gate_up [D, 2F]``
    (replacing ``w_gate`` and ``w_up``): four matmuls a layer per token instead of seven. At
    batch 1 each matmul is a small matrix-vector product, and XLA:CPU streams a few large
    ones faster than many small ones (``benchmarks/profile_decode.py`` measures it;
    docs/performance.md). ``wk`` and ``wv`` stay for
    ``kv_projection`` (a slice of a weight is a copy on XLA:CPU). Params without ``wq`` (a
    Mamba2 layer, or fused already) are returned as they are, and so are params split over
    several devices (tensor parallelism): the columns of a fused matrix split over devices would
    mix queries, keys and values on each device."""
    if "wq" not in p or not getattr(getattr(p["wq"], "sharding", None), "is_fully_replicated", True):
        return p
    d = p["wq"].shape[0]
    out = {k: v for k, v in p.items() if k not in ("wq", "w_gate", "w_up")}
    out["w_qkv"] = jnp.concatenate([p["wq"].reshape(d, -1), p["wk"].reshape(d, -1), p["wv"].reshape(d, -1)], axis=1)
    out["w_gate_up"] = jnp.concatenate([p["w_gate"], p["w_up"]], axis=1)
    return out


def _qkv(cfg: MistralConfig, p: Params, x: jax.Array, positions: jax.Array):
    """Queries ``[B, T, N, H]``, keys and values ``[B, T, K, H]`` (RoPE applied) of ``x [B, T, D]``
    at ``positions [B, T]``."""
    n, kh, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    y = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps).astype(p["wk"].dtype)  # wk: in both layouts
    if "w_qkv" in p:  # the decode layout (fuse_decode_weights)
        z = y @ p["w_qkv"]
        lead = z.shape[:-1]
        q = z[..., :n * h].reshape(lead + (n, h))
        k = z[..., n * h:(n + kh) * h].reshape(lead + (kh, h))
        v = z[..., (n + kh) * h:].reshape(lead + (kh, h))
    else:
        q = jnp.einsum("btd,dnh->btnh", y, p["wq"])
        k = jnp.einsum("btd,dkh->btkh", y, p["wk"])
        v = jnp.einsum("btd,dkh->btkh", y, p["wv"])
    cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _attention_out(p: Params, x: jax.Array, out: jax.Array) -> jax.Array:
    """The residual plus the output projection of the heads ``out [B, T, N, H]``."""
    b, t, n, h = out.shape
    # one [N*H, D] matmul: a contraction over (n, h) made XLA:CPU transpose wo on every call
    return x + (out.reshape(b, t, n * h) @ p["wo"].reshape(n * h, -1)).astype(x.dtype)


def _mlp(cfg: MistralConfig, p: Params, x: jax.Array) -> jax.Array:
    """The gated MLP sublayer with its residual."""
    y = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps).astype(p["w_down"].dtype)  # w_down: in both layouts
    if "w_gate_up" in p:  # the decode layout (fuse_decode_weights)
        z = y @ p["w_gate_up"]  # [B, T, 2F]
        f = z.shape[-1] // 2
        y = jax.nn.silu(z[..., :f]) * z[..., f:]
    else:
        y = jax.nn.silu(y @ p["w_gate"]) * (y @ p["w_up"])  # [B, T, F]
    return x + (y @ p["w_down"]).astype(x.dtype)


def kv_projection(cfg: MistralConfig, layer_params: Params, x: jax.Array, start: jax.Array):
    """Keys and values a layer would store for hidden states ``x [B, T, D]`` entering it
    (used by CALM-style state propagation for skipped layers). Returns ``k, v [B, T, K, H]``."""
    y = rms_norm(x, layer_params["attn_norm"], cfg.rms_norm_eps).astype(layer_params["wk"].dtype)
    k = jnp.einsum("btd,dkh->btkh", y, layer_params["wk"])
    v = jnp.einsum("btd,dkh->btkh", y, layer_params["wv"])
    positions = start[:, None] + jnp.arange(x.shape[1])[None]
    cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    return apply_rope(k, cos, sin), v


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


# ----------------------------------------------------------------------------- decode protocol
# ``dynamax_jax.models.Backbone``: one layer at a time on per-layer buffers (``dynamax_jax.decoding``).
# A decode step reads the caches and returns each layer's *entry* (here the new token's K/V);
# the engine writes every entry once the layer loop is over. Written inside the loop, each
# cache would be read (attention) and updated in place in one loop body, and XLA:CPU then
# copies the whole cache of every layer on every token.

SKIPPED_LAYER_MODES = ("copy", "propagate", "shift", "recompute")  # the first is the default
LAYER_PARAMS = frozenset(("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"))


def init_cache(config: MistralConfig, batch: int, cache_len: int, dtype=jnp.float32) -> tuple[KVCache, ...]:
    """One empty ``KVCache`` (``k, v [B, K, S, H]``) per layer, ``S = cache_len``."""
    shape = (batch, config.num_kv_heads, cache_len, config.head_dim)
    return tuple(KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


def decode_layout(layer_params: Params) -> Params:
    """The decode layout of one layer: ``fuse_decode_weights``."""
    return fuse_decode_weights(layer_params)


def cache_capacity(caches: tuple[KVCache, ...]) -> int:
    """Positions the caches hold: their slots ``S``."""
    return caches[0].k.shape[-2]


def prefill_layer(config: MistralConfig, layer_params: Params, x, cache: KVCache, lengths):
    """One layer over right-padded prompts ``x [B, T, D]`` from position 0 -> ``(x, cache)``,
    attending causally among the T tokens only (not over the cache's empty slots).
    ``lengths`` is unused: keys past a row's end are overwritten before any query sees them."""
    del lengths
    b, t = x.shape[:2]
    start = jnp.zeros((b,), jnp.int32)
    q, k, v = _qkv(config, layer_params, x, jnp.broadcast_to(jnp.arange(t)[None], (b, t)))
    out = causal_attention(q, k, v, config.sliding_window)
    cache = KVCache(_write(cache.k, k, start), _write(cache.v, v, start))
    return _mlp(config, layer_params, _attention_out(layer_params, x, out)), cache


def decode_layer(config: MistralConfig, layer_params: Params, x, cache: KVCache, positions):
    """One layer on the new tokens ``x [B, 1, D]`` at ``positions [B]``, attending to ``cache``
    (left as it is) -> ``(x, entry)``, ``entry`` the tokens' ``KVCache(k, v [B, K, H])``."""
    q, k, v = _qkv(config, layer_params, x, positions[:, None])
    window = config.sliding_window
    visible = attention_mask(positions[:, None] - 1, cache.k.shape[2], window and window - 1)[:, 0]
    out = decode_attention(q, k, v, cache.k, cache.v, visible)
    x = _mlp(config, layer_params, _attention_out(layer_params, x, out))
    return x, KVCache(k=k[:, 0], v=v[:, 0])


def propagate_layer(config: MistralConfig, layer_params: Params, x, cache: KVCache, positions) -> KVCache:
    """CALM's state propagation for a skipped layer: the entry (K/V) it would store for the
    exit hidden state ``x [B, 1, D]`` at ``positions [B]``."""
    k, v = kv_projection(config, layer_params, x, positions)
    return KVCache(k=k[:, 0], v=v[:, 0])


def read_entry(cache: KVCache, positions) -> KVCache:
    """The entry stored at ``positions [B]``: ``KVCache(k, v [B, K, H])``."""
    rows = jnp.arange(positions.shape[0])
    return KVCache(k=cache.k[rows, :, positions], v=cache.v[rows, :, positions])


def write_entry(cache: KVCache, entry: KVCache, positions, after: jax.Array | None = None) -> KVCache:
    """``cache`` with ``entry`` (``k, v [B, K, H]``) written at ``positions [B]``.

    ``after``: a value computed from every read of ``cache`` (the decode loop passes the
    token's last hidden state). XLA updates the cache in place only if each read is ordered
    before the write; a layer's entry does not depend on its attention over the cache, so
    without an order XLA copied the layer's whole K and V twice per token (on XLA:CPU
    ``lax.optimization_barrier`` does not order them). The entry is made to depend on
    ``after`` by adding ``min(|sum(after)|, 0)``: zero for any value that is not NaN, and
    not folded by XLA."""
    if after is not None:
        zero = jnp.minimum(jnp.abs(jnp.sum(after.astype(jnp.float32))), 0.0)
        entry = jax.tree.map(lambda e: e + zero.astype(e.dtype), entry)
    return KVCache(k=_write(cache.k, entry.k[:, None], positions), v=_write(cache.v, entry.v[:, None], positions))


def forward(config: MistralConfig, params: Params, tokens: jax.Array, return_hidden: bool = False):
    """Full forward without a persistent cache: ``tokens [B, T] -> logits [B, T, V]`` float32
    (and ``hidden [L, B, T, D]`` when ``return_hidden``)."""
    if isinstance(params["layers"], (tuple, list)):  # the decode layout
        return layers.unrolled_forward(sys.modules[__name__], config, params, tokens, return_hidden)
    b, t = tokens.shape
    dtype = params["embed"].dtype
    cache = KVCache.init(config, b, t, dtype)
    logits, _, hidden = apply(config, params, tokens, cache, jnp.zeros((b,), jnp.int32), return_hidden)
    return (logits, hidden) if return_hidden else logits
