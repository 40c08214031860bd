"""Causal self-attention of a prompt's tokens among themselves (prefill), one implementation per
backend behind ``causal_attention``.

Shape legend: B batch, T tokens, N query heads, K key/value heads, G = N // K, H head dim,
M = b * G rows of a query block of b tokens (its G query heads per key/value head side by side).

- ``blocked`` (CPU, the default): flash-style online softmax over query blocks x key blocks,
  grouped-query heads sharing their key/value block without repeating it. No T x T scores
  exist; a block's scores (``[B, K, M, b]``) stay in the core's cache between the dot, the
  softmax and the second dot, and key blocks no query of the block can see are never read.
- ``cudnn`` / ``xla`` (GPU): ``jax.nn.dot_product_attention``; cuDNN's fused kernel takes
  16-bit inputs only, so float32 goes to the XLA implementation.
- ``splash`` (TPU): the Pallas splash-attention kernel of ``jax.experimental.pallas.ops.tpu``,
  with the causal or local mask as a static block-sparse mask.

All return ``[B, T, N, H]`` in ``q``'s dtype and compute scores and softmax in float32.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax.errors import ConfigError
from dynamax_jax.kernels.ssd.pallas import target_platform

# the query and key block of ``blocked``: the fastest of 128/256/512 (and of mixed query and key
# sizes) for long prompts on XLA:CPU
PREFILL_BLOCK = 256
IMPLEMENTATIONS = ("blocked", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # the splash kernel's default block; the prompt is padded to a multiple


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sliding_window: int | None,
                     implementation: str | None = None) -> jax.Array:
    """Causal attention of T tokens among themselves: ``q [B, T, N, H]``, ``k, v [B, T, K, H]``
    -> ``[B, T, N, H]``. Token ``t`` sees tokens ``s`` with ``t - W < s <= t`` (``W`` the
    ``sliding_window``; no lower bound when None). ``implementation``: one of
    ``IMPLEMENTATIONS``, default ``default_implementation`` of the platform ``q`` is placed on
    (under ``jit``, its sharding's mesh, so compiling ahead of time for TPU devices from a CPU
    host picks the TPU kernel), else ``jax.default_backend()``; on TPU, inputs spread over
    several devices take ``xla``, which XLA partitions (the splash kernel would need a
    ``shard_map``)."""
    impl = implementation
    if impl is None:
        impl = default_implementation(target_platform(None, q))
        if impl == "splash" and _on_several_devices(q):  # Mosaic kernels are not partitioned by XLA
            impl = "xla"
    if impl == "blocked":
        return _differentiable_blocked(q, k, v, sliding_window)
    if impl in ("xla", "cudnn"):
        return dot_product_causal_attention(q, k, v, sliding_window, impl)
    if impl == "splash":
        return splash_causal_attention(q, k, v, sliding_window)
    raise ConfigError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")


def default_implementation(platform: str | None = None) -> str:
    """The attention for ``platform`` ("cpu", "gpu", "tpu"; default ``jax.default_backend()``):
    ``cudnn`` on GPU, ``splash`` on TPU, ``blocked`` elsewhere."""
    return {"gpu": "cudnn", "tpu": "splash"}.get(target_platform(platform), "blocked")


def _on_several_devices(x) -> bool:
    """Whether ``x`` is laid out over more than one device: under ``jit``, the mesh of its
    sharding or the one set with ``jax.set_mesh``; a concrete array, its own devices."""
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
    if getattr(mesh, "size", 0) > 1:
        return True
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return len(x.sharding.device_set) > 1
    ambient = jax.sharding.get_abstract_mesh()
    return not ambient.empty and ambient.size > 1


# ----------------------------------------------------------------------------- CPU: blocked


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _differentiable_blocked(q, k, v, sliding_window):
    """``blocked_causal_attention`` with the gradient of the same function computed by
    ``dot_product_causal_attention``: the blocked loops have data-dependent bounds, which
    reverse-mode differentiation cannot go through (training runs prefill layers)."""
    return blocked_causal_attention(q, k, v, sliding_window)


def _blocked_forward(q, k, v, sliding_window):
    return blocked_causal_attention(q, k, v, sliding_window), (q, k, v)


def _blocked_backward(sliding_window, residuals, grad):
    _, vjp = jax.vjp(lambda *qkv: dot_product_causal_attention(*qkv, sliding_window, "xla"), *residuals)
    return vjp(grad.astype(residuals[0].dtype))


_differentiable_blocked.defvjp(_blocked_forward, _blocked_backward)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sliding_window: int | None,
                             block: int = PREFILL_BLOCK, chains: int | None = None) -> jax.Array:
    """``causal_attention`` in blocks of ``block`` tokens (a shorter prompt is one block).

    Each query block starts with its diagonal key block (masked; it holds the query's own key,
    so every row's running max is finite from the first step), then runs a loop over the
    earlier key blocks it can see, unmasked unless a sliding window cuts them. XLA:CPU runs a
    loop's body on one thread, so the query blocks are dealt into ``chains`` independent loops
    of about equal work (default: the CPUs this process may use, at most 8) that run side by
    side; the result does not depend on ``chains``."""
    b, t, n, h = q.shape
    block = min(block, t)
    qb, kb, vb = _to_blocks(q, k, v, block)  # [B, K, nb, M, H], [B, K, nb, H, b], [B, K, nb, b, H]
    nb = qb.shape[2]
    chains = max(1, min(nb, chains or _cpu_count()))
    run = functools.partial(_query_block, qb, kb, vb, block=block, window=sliding_window, scale=h ** -0.5)
    outs = [None] * nb
    for group in _deal(nb, chains):
        index = jnp.asarray(group, jnp.int32)

        def body(i, out, index=index):
            return jax.lax.dynamic_update_index_in_dim(out, run(index[i]), i, 2)

        done = jax.lax.fori_loop(0, len(group), body, jnp.zeros(qb.shape[:2] + (len(group),) + qb.shape[3:],
                                                                 jnp.float32))
        for i, block_index in enumerate(group):
            outs[block_index] = done[:, :, i]
    out = jnp.stack(outs, axis=2)  # [B, K, nb, M, H]
    kv = k.shape[2]
    out = out.reshape(b, kv, nb * block, n // kv, h).transpose(0, 2, 1, 3, 4).reshape(b, nb * block, n, h)
    return out[:, :t].astype(q.dtype)


def _to_blocks(q, k, v, block: int):
    """Zero-pad T to a multiple of ``block`` and lay the blocks out for the two dots:
    ``q [B, K, nb, M, H]`` (rows token-major, then the G heads sharing a key/value head),
    keys transposed ``[B, K, nb, H, b]`` and values ``[B, K, nb, b, H]``. Padded keys come
    after every real query, so the causal mask hides them; padded queries are cut off."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    nb = -(-t // block)
    pad = [(0, 0), (0, nb * block - t), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
    q = q.reshape(b, nb, block, kv, n // kv, h).transpose(0, 3, 1, 2, 4, 5).reshape(b, kv, nb, block * n // kv, h)
    k = k.reshape(b, nb, block, kv, h).transpose(0, 3, 1, 4, 2)
    v = v.reshape(b, nb, block, kv, h).transpose(0, 3, 1, 2, 4)
    return q, k, v


def _query_block(qb, kb, vb, i, *, block: int, window: int | None, scale: float):
    """Attention of query block ``i`` (traced) -> ``[B, K, M, H]`` float32."""
    q = jax.lax.dynamic_index_in_dim(qb, i, 2, keepdims=False)  # [B, K, M, H]
    groups = qb.shape[3] // block

    def step(j, state):
        mask = None if window is None else _block_mask(i, j, block, groups, window)
        return _online_softmax_step(q, kb, vb, j, mask, scale, state)

    state = _online_softmax_step(q, kb, vb, i, _block_mask(i, i, block, groups, window), scale, None)
    first = 0
    if window is not None:  # the earliest key block a query of this block can see
        first = jnp.maximum(0, i - ((window - 2) // block + 1))
    _, total, acc = jax.lax.fori_loop(first, i, step, state)
    return acc / total


def _block_mask(i, j, block: int, groups: int, window: int | None) -> jax.Array:
    """``[M, b]``: which keys of block ``j`` the rows of query block ``i`` see."""
    q_pos = i * block + jnp.arange(block)[:, None]
    k_pos = j * block + jnp.arange(block)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return jnp.repeat(mask, groups, axis=0)


def _online_softmax_step(q, kb, vb, j, mask, scale: float, state):
    """Fold key block ``j`` into the running ``(max, sum, acc)`` of a query block (None: the
    first block). The max is over raw scores and the scale is applied inside ``exp`` (the same
    softmax, as the scale is positive), in the one pass over the scores that ``exp`` makes."""
    k = jax.lax.dynamic_index_in_dim(kb, j, 2, keepdims=False)  # [B, K, H, b]
    v = jax.lax.dynamic_index_in_dim(vb, j, 2, keepdims=False)  # [B, K, b, H]
    s = jnp.einsum("bkmh,bkhs->bkms", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    top = jnp.max(s, axis=-1, keepdims=True)
    if state is not None:
        top = jnp.maximum(state[0], top)
    p = jnp.exp((s - top) * scale)
    total = jnp.sum(p, axis=-1, keepdims=True)
    acc = jnp.einsum("bkms,bksh->bkmh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    if state is not None:
        alpha = jnp.exp((state[0] - top) * scale)
        total, acc = alpha * state[1] + total, alpha * state[2] + acc
    return top, total, acc


def _deal(count: int, chains: int) -> list[list[int]]:
    """Blocks ``0..count-1`` dealt into ``chains`` lists in snake order (0, 1, 1, 0, 0, 1, ...):
    block ``i`` costs about ``i + 1`` key blocks, so each list gets early and late blocks alike."""
    groups = [[] for _ in range(chains)]
    for start in range(0, count, chains):
        row = list(range(start, min(start + chains, count)))
        for g, block_index in zip(range(chains) if (start // chains) % 2 == 0 else reversed(range(chains)), row):
            groups[g].append(block_index)
    return [g for g in groups if g]


def _cpu_count() -> int:
    """CPUs this process may run on (XLA:CPU sizes its thread pool the same way), at most 8."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(count, 8)


# ----------------------------------------------------------------------------- GPU and TPU


def dot_product_causal_attention(q, k, v, sliding_window: int | None, implementation: str = "cudnn") -> jax.Array:
    """``causal_attention`` by ``jax.nn.dot_product_attention`` (GQA without repeating K/V).
    ``cudnn`` needs 16-bit inputs: other dtypes use ``xla``."""
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        implementation = "xla"
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                        implementation=implementation).astype(q.dtype)


def splash_causal_attention(q, k, v, sliding_window: int | None, interpret: bool = False) -> jax.Array:
    """``causal_attention`` by the Pallas splash-attention kernel (TPU; ``interpret`` runs it
    anywhere, slowly). T is zero-padded to a multiple of ``SPLASH_BLOCK``: padded keys come
    after every real query, so the mask hides them."""
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention as splash
    except ImportError:  # a jax without the kernel
        return dot_product_causal_attention(q, k, v, sliding_window, "xla")

    b, t, n, h = q.shape
    tp = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    if sliding_window is None:
        mask = splash.CausalMask((tp, tp))
    else:
        mask = splash.LocalMask((tp, tp), (sliding_window - 1, 0), 0)
    kernel = splash.make_splash_mha(splash.MultiHeadMask([mask] * n), head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    pad = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
    # head-major [B, heads, T, H]; the kernel does not scale the scores
    qs, ks, vs = (jnp.swapaxes(jnp.pad(a, pad), 1, 2) for a in ((q * np.float32(h ** -0.5)).astype(q.dtype), k, v))
    out = jax.vmap(kernel)(qs, ks, vs)
    return jnp.swapaxes(out, 1, 2)[:, :t].astype(q.dtype)
