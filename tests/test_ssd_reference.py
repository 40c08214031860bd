"""The chunked SSD reference equals the per-timestep recurrence (float32, <= 1e-4)."""

import jax.numpy as jnp
import numpy as np
import pytest

from dynamax_jax.kernels.ssd.reference import segment_sum, ssd_chunked, ssd_sequential


def _inputs(seed, b, l, h, p, g, n, with_state, with_d, x_dtype=jnp.float32):
    # numpy draws: eager jax.random would compile per shape, which dominates runtime here.
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    x = normal(b, l, h, p).astype(x_dtype)
    # dt as the model produces it: softplus of a biased projection, positive.
    dt = jnp.asarray(np.logaddexp(0.0, rng.standard_normal((b, l, h)) - 1.0), jnp.float32)
    A = jnp.asarray(-np.exp(rng.uniform(-1.0, 1.5, (h,))), jnp.float32)
    B, C = normal(b, l, g, n), normal(b, l, g, n)
    D = normal(h) if with_d else None
    state = normal(b, h, p, n) if with_state else None
    return x, dt, A, B, C, D, state


# Lengths below, equal to and not a multiple of the chunk (16); one or two groups of heads.
@pytest.mark.parametrize("l,g,with_state,with_d", [
    (1, 1, False, False), (16, 2, True, True), (37, 1, True, False), (37, 2, False, True), (48, 2, True, True)])
def test_chunked_equals_sequential(l, g, with_state, with_d):
    x, dt, A, B, C, D, state = _inputs(l * 10 + g, 2, l, 4, 8, g, 6, with_state, with_d)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, D, initial_state=state)
    y, s = ssd_chunked(x, dt, A, B, C, D, chunk_size=16, initial_state=state)
    assert y.shape == (2, l, 4, 8) and y.dtype == jnp.float32
    assert s.shape == (2, 4, 8, 6) and s.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(s, s_ref, atol=1e-4, rtol=1e-4)


def test_split_sequence_continues_from_state():
    """Two calls carrying the final state equal one call over the whole sequence."""
    x, dt, A, B, C, D, _ = _inputs(3, 1, 45, 4, 8, 2, 6, False, True)
    y_all, s_all = ssd_chunked(x, dt, A, B, C, D, chunk_size=16)
    y1, s1 = ssd_chunked(x[:, :19], dt[:, :19], A, B[:, :19], C[:, :19], D, chunk_size=16)
    y2, s2 = ssd_chunked(x[:, 19:], dt[:, 19:], A, B[:, 19:], C[:, 19:], D, chunk_size=16, initial_state=s1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y_all, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(s2, s_all, atol=1e-4, rtol=1e-4)


def test_bfloat16_x_accumulates_in_float32():
    x, dt, A, B, C, D, state = _inputs(5, 1, 20, 4, 8, 1, 6, True, True, x_dtype=jnp.bfloat16)
    y, s = ssd_chunked(x, dt, A, B, C, D, chunk_size=8, initial_state=state)
    y_ref, s_ref = ssd_sequential(x.astype(jnp.float32), dt, A, B, C, D, initial_state=state)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(s, s_ref, atol=1e-4, rtol=1e-4)


def test_zero_dt_leaves_state_unchanged():
    x, dt, A, B, C, D, state = _inputs(7, 1, 10, 4, 8, 1, 6, True, False)
    _, s = ssd_chunked(x, jnp.zeros_like(dt), A, B, C, chunk_size=4, initial_state=state)
    np.testing.assert_array_equal(s, state)


def test_large_decay_does_not_overflow():
    """Strong decay over a long chunk: exp(cs_i) * exp(-cs_j) would overflow to inf * 0."""
    x, dt, A, B, C, D, _ = _inputs(9, 1, 64, 2, 4, 1, 4, False, False)
    dt = jnp.full_like(dt, 5.0)
    A = jnp.full((2,), -8.0)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size=64)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C)
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(s, s_ref, atol=1e-4, rtol=1e-4)


def test_segment_sum():
    a = jnp.array([1.0, 2.0, 3.0, 4.0])
    out = segment_sum(a)
    expected = np.full((4, 4), -np.inf, np.float32)
    for i in range(4):
        for j in range(i + 1):
            expected[i, j] = float(a[j + 1:i + 1].sum())
    np.testing.assert_array_equal(out, expected)


def test_bad_shape_is_named():
    x, dt, A, B, C, D, _ = _inputs(1, 1, 8, 4, 8, 1, 6, False, True)
    with pytest.raises(ValueError, match=r"dt has shape \(1, 8, 3\), expected \(1, 8, 4\)"):
        ssd_chunked(x, dt[..., :3], A, B, C, D, chunk_size=4)
