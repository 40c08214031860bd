"""Readable jnp reference of Mamba2's state-space-dual (SSD) scan.

Shape legend: b batch, l sequence length, h heads, p head dim, g groups of heads sharing
B and C (h % g == 0, head i uses group i // (h // g)), r = h // g heads per group,
n state size, c chunks, q positions in a chunk (query side), s positions in a chunk
(source side).

The recurrence, per head and with ``dA_t = exp(dt_t * A)``::

    state_t = dA_t * state_{t-1} + dt_t * outer(x_t, B_t)     # [p, n]
    y_t     = state_t @ C_t + D * x_t                          # [p]

``ssd_chunked`` computes it in chunks of ``chunk_size``: inside a chunk the output is
the masked quadratic form ``(C_q . B_s) * decay(q <- s) * dt_s * x_s`` (the "diagonal
block"); each chunk also summarises its inputs as one state, states are carried across
chunks by a short sequential scan, and the carried state entering a chunk adds its
contribution to every position of that chunk (the "off-diagonal block").
``ssd_sequential`` runs the recurrence one step at a time and is a test oracle only.

Inputs: ``x [b, l, h, p]`` (any float dtype), ``dt [b, l, h]`` float32 (already
softplus'd, biased and clamped), ``A [h]`` float32 (negative), ``B, C [b, l, g, n]``,
``D [h]`` or None, ``initial_state [b, h, p, n]`` float32 or None.
Both return ``y [b, l, h, p]`` float32 and ``final_state [b, h, p, n]`` float32.
All accumulation is in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def random_inputs(b, l, h, p, g, n, *, seed: int = 0, dtype=jnp.float32, with_d: bool = True,
                  with_state: bool = True, dt_bias: float = -1.0, log_a_max: float = 2.0) -> dict:
    """Random ``ssd`` inputs in the ranges a Mamba2 layer sees, for tests and benchmarks:
    dt = softplus(N(0, 1) + dt_bias), A = -exp(U(0, log_a_max)), so decays span from ~1 to
    underflow within a chunk. numpy draws them: no per-shape compilation."""
    import numpy as np

    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    return dict(
        x=jnp.asarray(normal(b, l, h, p), dtype),
        dt=jnp.asarray(np.logaddexp(0.0, normal(b, l, h) + dt_bias), jnp.float32),
        A=jnp.asarray(-np.exp(rng.uniform(0.0, log_a_max, h)), jnp.float32),
        B=jnp.asarray(normal(b, l, g, n), dtype),
        C=jnp.asarray(normal(b, l, g, n), dtype),
        D=jnp.asarray(normal(h)) if with_d else None,
        initial_state=jnp.asarray(normal(b, h, p, n)) if with_state else None)


def segment_sum(a: jax.Array) -> jax.Array:
    """``a [..., t] -> [..., t, t]`` with ``out[..., i, j] = sum(a[..., j+1 : i+1])`` for
    ``i >= j`` and ``-inf`` above the diagonal, so that ``exp(out)`` is the decay from
    position ``j`` to position ``i`` (1 on the diagonal, 0 for the future).

    Sums the masked increments directly instead of differencing a cumulative sum:
    ``cs_i - cs_j`` loses precision, and factoring ``exp(cs_i) * exp(-cs_j)`` overflows.
    """
    t = a.shape[-1]
    by_row = jnp.broadcast_to(a[..., :, None], a.shape + (t,))  # [..., i, j] = a[i]
    strictly_lower = jnp.tril(jnp.ones((t, t), dtype=bool), k=-1)
    # Column j keeps a[i] for i > j; its cumulative sum down the rows is a[j+1] + ... + a[i].
    sums = jnp.cumsum(jnp.where(strictly_lower, by_row, 0.0), axis=-2)
    lower = jnp.tril(jnp.ones((t, t), dtype=bool), k=0)
    return jnp.where(lower, sums, -jnp.inf)


def _check_shapes(x, dt, A, B, C, D, initial_state):
    if x.ndim != 4:
        raise ValueError(f"x must be [b, l, h, p], found shape {x.shape}")
    b, l, h, p = x.shape
    if B.ndim != 4 or C.ndim != 4:
        raise ValueError(f"B and C must be [b, l, g, n], found {B.shape} and {C.shape}")
    g, n = B.shape[2], B.shape[3]
    expected = {"dt": ((b, l, h), dt.shape), "A": ((h,), A.shape), "B": ((b, l, g, n), B.shape),
                "C": ((b, l, g, n), C.shape)}
    if D is not None:
        expected["D"] = ((h,), D.shape)
    if initial_state is not None:
        expected["initial_state"] = ((b, h, p, n), initial_state.shape)
    for name, (want, found) in expected.items():
        if tuple(found) != want:
            raise ValueError(f"ssd: {name} has shape {tuple(found)}, expected {want}")
    if h % g:
        raise ValueError(f"ssd: heads ({h}) must be a multiple of groups ({g})")
    return b, l, h, p, g, n


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def ssd_chunked(x, dt, A, B, C, D=None, *, chunk_size: int, initial_state=None):
    """The chunked SSD scan (see the module docstring for shapes). ``l`` need not be a
    multiple of ``chunk_size``: the tail is padded with ``dt = 0``, which leaves the state
    unchanged, so ``final_state`` is the state after the last real position."""
    b, l, h, p, g, n = _check_shapes(x, dt, A, B, C, D, initial_state)
    r = h // g
    pad = (-l) % chunk_size
    c = (l + pad) // chunk_size

    x32 = x.astype(jnp.float32)
    dt = dt.astype(jnp.float32)

    def chunked(a, fill_dims):
        a = jnp.pad(a.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * fill_dims)
        return a.reshape((b, c, chunk_size) + a.shape[2:])

    xc = chunked(x32, 2).reshape(b, c, chunk_size, g, r, p)    # [b, c, s, g, r, p]
    dtc = chunked(dt, 1).reshape(b, c, chunk_size, g, r)       # [b, c, s, g, r]
    Bc, Cc = chunked(B, 2), chunked(C, 2)                      # [b, c, s, g, n]
    a_dt = dtc * A.astype(jnp.float32).reshape(g, r)           # [b, c, s, g, r], log decay per step
    a_dt = jnp.moveaxis(a_dt, 2, -1)                           # [b, c, g, r, s]
    a_cumsum = jnp.cumsum(a_dt, axis=-1)                       # [b, c, g, r, s]
    x_dt = xc * dtc[..., None]                                 # [b, c, s, g, r, p]

    # Diagonal blocks: outputs from inputs of the same chunk.
    decay = jnp.exp(segment_sum(a_dt))                         # [b, c, g, r, q, s]
    scores = jnp.einsum("bcqgn,bcsgn->bcgqs", Cc, Bc)          # [b, c, g, q, s]
    y_diag = jnp.einsum("bcgqs,bcgrqs,bcsgrp->bcqgrp", scores, decay, x_dt)

    # Each chunk's own contribution to the state at its end.
    decay_to_end = jnp.exp(a_cumsum[..., -1:] - a_cumsum)      # [b, c, g, r, s]
    chunk_states = jnp.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", Bc, decay_to_end, x_dt)

    # Carry states across chunks; emit the state entering each chunk.
    chunk_decay = jnp.exp(a_cumsum[..., -1])                   # [b, c, g, r]
    if initial_state is None:
        state0 = jnp.zeros((b, g, r, p, n), jnp.float32)
    else:
        state0 = initial_state.astype(jnp.float32).reshape(b, g, r, p, n)

    def carry(state, inputs):
        decay_c, new_c = inputs
        return decay_c[..., None, None] * state + new_c, state

    final, entering = jax.lax.scan(
        carry, state0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)                    # [b, c, g, r, p, n]

    # Off-diagonal blocks: the entering state, decayed to each position, read out by C.
    decay_from_start = jnp.exp(a_cumsum)                       # [b, c, g, r, q]
    y_off = jnp.einsum("bcqgn,bcgrpn,bcgrq->bcqgrp", Cc, entering, decay_from_start)

    y = (y_diag + y_off).reshape(b, c * chunk_size, h, p)[:, :l]
    if D is not None:
        y = y + x32 * D.astype(jnp.float32)[:, None]
    return y, final.reshape(b, h, p, n)


@jax.jit
def ssd_sequential(x, dt, A, B, C, D=None, *, initial_state=None):
    """The SSD recurrence one time step at a time (a ``lax.scan`` over ``l``). Test oracle."""
    b, l, h, p, g, n = _check_shapes(x, dt, A, B, C, D, initial_state)
    r = h // g
    x32 = x.astype(jnp.float32)
    head_B = jnp.repeat(B.astype(jnp.float32), r, axis=2)      # [b, l, h, n]
    head_C = jnp.repeat(C.astype(jnp.float32), r, axis=2)      # [b, l, h, n]
    dt = dt.astype(jnp.float32)
    state0 = (jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))

    def step(state, inputs):
        x_t, dt_t, B_t, C_t = inputs                           # [b,h,p], [b,h], [b,h,n], [b,h,n]
        dA = jnp.exp(dt_t * A.astype(jnp.float32))             # [b, h]
        state = dA[..., None, None] * state + jnp.einsum("bh,bhp,bhn->bhpn", dt_t, x_t, B_t)
        return state, jnp.einsum("bhpn,bhn->bhp", state, C_t)

    seq_first = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
    final, y = jax.lax.scan(step, state0, (seq_first(x32), seq_first(dt), seq_first(head_B), seq_first(head_C)))
    y = jnp.moveaxis(y, 0, 1)
    if D is not None:
        y = y + x32 * D.astype(jnp.float32)[:, None]
    return y, final
