"""The Pallas SSD kernel (interpret mode on CPU) against the sequential oracle and the
chunked jnp reference; gradients through its custom_vjp; grid-order independence.

Shape legend: b batch, l length, h heads, p head dim, g groups, n state size.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamax_jax.kernels.ssd import ops, reference
from dynamax_jax.kernels.ssd import pallas as ssd_pallas_lib

F32_TOL = 1e-4  # max abs error in float32 (|y| reaches ~100 with these inputs)


def make_inputs(b, l, h, p, g, n, *, seed, dtype=jnp.float32, with_d=True, with_state=True):
    """Inputs in a Mamba2 layer's ranges (dt = softplus(N - 1), A = -exp(U(0, 2)))."""
    return reference.random_inputs(b, l, h, p, g, n, seed=seed, dtype=dtype, with_d=with_d, with_state=with_state)


# Everything runs under jit: eager dispatch compiles every small op separately, which
# costs more than the kernels themselves on a shared 2-core CPU.
@jax.jit
def oracle(inputs):
    return reference.ssd_sequential(**inputs)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def chunked_reference(inputs, *, chunk_size):
    return reference.ssd_chunked(**inputs, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("chunk_size", "impl"))
def ssd_op(inputs, *, chunk_size, impl):
    return ops.ssd(**inputs, chunk_size=chunk_size, impl=impl)


@functools.partial(jax.jit, static_argnames=("chunk_size", "variant", "block_m", "schedule"))
def kernel(inputs, *, chunk_size, variant="loop", block_m=None, schedule=None):
    return ssd_pallas_lib.ssd_pallas(**inputs, chunk_size=chunk_size, interpret=True,
                                     variant=variant, block_m=block_m, schedule=schedule)


def max_err(a, b):
    return float(jnp.max(jnp.abs(a - b)))


# (b, l, h, p, g, n, chunk, initial state, D): ragged lengths everywhere; n_groups 1 and
# > 1 (including one head per group); state 16 and 128; chunk 64, 128 and 256.
F32_CASES = [
    (1, 150, 2, 64, 1, 16, 64, False, True),
    (1, 200, 4, 64, 2, 128, 128, True, True),
    (2, 300, 2, 64, 2, 16, 256, True, False),
]


@pytest.mark.parametrize("b,l,h,p,g,n,chunk,with_state,with_d", F32_CASES)
def test_forward_matches_oracle_and_reference(b, l, h, p, g, n, chunk, with_state, with_d):
    inputs = make_inputs(b, l, h, p, g, n, seed=l, with_d=with_d, with_state=with_state)
    y, final = ssd_op(inputs, chunk_size=chunk, impl="interpret")
    assert y.shape == (b, l, h, p) and y.dtype == jnp.float32
    assert final.shape == (b, h, p, n) and final.dtype == jnp.float32
    y_seq, final_seq = oracle(inputs)
    y_ref, final_ref = chunked_reference(inputs, chunk_size=chunk)
    assert max_err(y, y_seq) <= F32_TOL
    assert max_err(final, final_seq) <= F32_TOL
    assert max_err(y, y_ref) <= F32_TOL
    assert max_err(final, final_ref) <= F32_TOL


def test_row_sub_blocks_match_whole_chunk():
    """block_m < chunk (the GPU tiling: causal tiles below the diagonal only) gives the
    same result as one block per chunk."""
    inputs = make_inputs(1, 100, 2, 64, 1, 16, seed=3)
    y_seq, final_seq = oracle(inputs)
    y, final = kernel(inputs, chunk_size=64, block_m=16)
    assert max_err(y, y_seq) <= F32_TOL
    assert max_err(final, final_seq) <= F32_TOL


def test_chunk_grid_variant_matches_oracle():
    """The TPU variant (state in scratch across an in-order chunk grid axis)."""
    inputs = make_inputs(1, 150, 4, 64, 2, 16, seed=5)
    y_seq, final_seq = oracle(inputs)
    y, final = kernel(inputs, chunk_size=64, variant="chunk_grid")
    assert max_err(y, y_seq) <= F32_TOL
    assert max_err(final, final_seq) <= F32_TOL


def test_bfloat16_inputs_within_rounding_bound():
    inputs = make_inputs(1, 100, 2, 64, 1, 128, seed=7, dtype=jnp.bfloat16)
    y, final = ssd_op(inputs, chunk_size=64, impl="interpret")
    # The reference upcasts the same bf16 inputs, so it is exact up to float32 sums.
    y_ref, final_ref = chunked_reference(inputs, chunk_size=64)
    # The kernel feeds bf16 to its dots: it rounds scores, x*dt, x*decay*dt and the
    # carried state to bf16 (relative error <= 2^-9 each); any one term of y passes
    # through at most two such roundings, so |error| <= ~2 * 2^-9 * sum(|terms|). The
    # sum of absolute terms is the same scan on absolute values (all decays and dt are
    # positive). 3 * 2^-9 leaves room for float32 accumulation; 1e-4 for exact zeros.
    abs_inputs = {k: (None if v is None else (v if k in ("dt", "A") else jnp.abs(v)))
                  for k, v in inputs.items()}
    y_abs, final_abs = chunked_reference(abs_inputs, chunk_size=64)
    bound = 3 * 2.0**-9
    assert bool(jnp.all(jnp.abs(y - y_ref) <= bound * y_abs + F32_TOL))
    assert bool(jnp.all(jnp.abs(final - final_ref) <= bound * final_abs + F32_TOL))
    # Not vacuous: the bound is far tighter than the outputs themselves.
    assert float(jnp.max(bound * y_abs)) < 0.05 * float(jnp.max(jnp.abs(y_ref)))
    assert max_err(y, y_ref) > 0  # bf16 dots do round


def test_gradients_match_reference():
    inputs = make_inputs(1, 40, 2, 16, 1, 16, seed=11)
    names = tuple(inputs)
    rng = np.random.default_rng(1)
    cotangent_y = jnp.asarray(rng.standard_normal((1, 40, 2, 16), dtype=np.float32))
    cotangent_s = jnp.asarray(rng.standard_normal((1, 2, 16, 16), dtype=np.float32))

    def loss(impl):
        def f(*args):
            y, final = ops.ssd(**dict(zip(names, args)), chunk_size=16, impl=impl)
            return jnp.sum(y * cotangent_y) + jnp.sum(final * cotangent_s)
        return f

    argnums = tuple(range(len(names)))
    grads = jax.jit(jax.grad(loss("interpret"), argnums))(*inputs.values())
    grads_ref = jax.jit(jax.grad(loss("reference"), argnums))(*inputs.values())
    for name, got, want in zip(names, grads, grads_ref):
        assert got.shape == inputs[name].shape, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        assert float(jnp.max(jnp.abs(want))) > 0, name


def test_schedule_is_a_permutation():
    for total in (1, 6, 12, 35):
        for schedule in ("reverse", "shuffle"):
            permute = ssd_pallas_lib._schedule_permutation(schedule, total)
            order = [int(permute(jnp.int32(step))) for step in range(total)]
            assert sorted(order) == list(range(total))
            if total > 2:
                assert order != list(range(total))


@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_grid_order_does_not_change_the_gpu_kernel(schedule):
    """A GPU runs grid points concurrently in any order. Interpret mode runs them in
    order, so visit them reversed / shuffled: the loop variant (each program carries the
    state through its own chunks) must give bit-identical results. The chunk-grid
    variant, which carries the state across grid steps (correct only under TPU's
    in-order "arbitrary" axis), is the bug this test exists to catch: it must fail."""
    inputs = make_inputs(2, 150, 2, 64, 1, 16, seed=13)
    y_seq, final_seq = oracle(inputs)
    y, final = kernel(inputs, chunk_size=64)
    y_perm, final_perm = kernel(inputs, chunk_size=64, schedule=schedule)
    np.testing.assert_array_equal(y_perm, y)
    np.testing.assert_array_equal(final_perm, final)
    assert max_err(y_perm, y_seq) <= F32_TOL

    y_bad, _ = kernel(inputs, chunk_size=64, variant="chunk_grid", schedule=schedule)
    wrong = ~jnp.isclose(y_bad, y_seq, atol=1e-2) | ~jnp.isfinite(y_bad)
    assert bool(jnp.any(wrong)), "a cross-grid-step carry went undetected"


def test_auto_is_reference_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU dispatch only")
    assert ops.resolve_impl("auto") == "reference"
    inputs = make_inputs(1, 20, 2, 16, 1, 16, seed=17)
    y, final = ssd_op(inputs, chunk_size=8, impl="auto")
    y_ref, final_ref = chunked_reference(inputs, chunk_size=8)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(final, final_ref)


def test_compiled_pallas_refuses_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU only")
    inputs = make_inputs(1, 16, 2, 16, 1, 16, seed=19)
    with pytest.raises(ValueError, match="interpret=True or use impl='reference'"):
        ops.ssd(**inputs, chunk_size=16, impl="pallas")


@pytest.mark.parametrize("name,bad,pattern", [
    ("dt", jnp.zeros((1, 20, 3)),
     r"dt has shape \(1, 20, 3\), expected \[b, l, h\] = \(1, 20, 2\)"),
    ("B", jnp.zeros((1, 20, 1, 8)),  # B sets n; C disagrees
     r"C has shape \(1, 20, 1, 16\), expected \[b, l, g, n\] = \(1, 20, 1, 8\)"),
    ("A", jnp.zeros((3,)), r"A has shape \(3,\), expected \[h\] = \(2,\)"),
    ("D", jnp.zeros((1,)), r"D has shape \(1,\), expected \[h\] = \(2,\)"),
    ("initial_state", jnp.zeros((1, 2, 16, 8)),
     r"initial_state has shape \(1, 2, 16, 8\), expected \[b, h, p, n\] = \(1, 2, 16, 16\)"),
    ("x", jnp.zeros((20, 2, 16)), r"x must be \[b, l, h, p\], found shape \(20, 2, 16\)"),
])
def test_shape_errors_name_the_argument(name, bad, pattern):
    inputs = make_inputs(1, 20, 2, 16, 1, 16, seed=23)
    inputs[name] = bad
    with pytest.raises(ValueError, match=pattern):
        ops.ssd(**inputs, chunk_size=8, impl="interpret")


def test_bad_options():
    inputs = make_inputs(1, 20, 2, 16, 1, 16, seed=29)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.ssd(**inputs, chunk_size=8, impl="triton")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ops.ssd(**inputs, chunk_size=0)
    with pytest.raises(ValueError, match="heads h=2 must be a multiple of groups g=3"):
        bad = make_inputs(1, 20, 2, 16, 3, 16, seed=29)
        ops.ssd(**bad, chunk_size=8)


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"), reason="needs a GPU or TPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernel_matches_reference(dtype):
    inputs = make_inputs(2, 1000, 8, 64, 2, 128, seed=31, dtype=dtype)
    y, final = jax.jit(lambda i: ops.ssd(**i, chunk_size=256, impl="pallas"))(inputs)
    with jax.default_matmul_precision("highest"):  # XLA's GPU default for float32 is TF32
        y_ref, final_ref = jax.jit(lambda i: reference.ssd_chunked(**i, chunk_size=256))(inputs)
    if dtype == jnp.float32:
        assert max_err(y, y_ref) <= F32_TOL and max_err(final, final_ref) <= F32_TOL
    else:  # same rounding bound as the interpret-mode bf16 test
        abs_inputs = {k: (None if v is None else (v if k in ("dt", "A") else jnp.abs(v)))
                      for k, v in inputs.items()}
        y_abs, final_abs = reference.ssd_chunked(**abs_inputs, chunk_size=256)
        assert bool(jnp.all(jnp.abs(y - y_ref) <= 3 * 2.0**-9 * y_abs + F32_TOL))
        assert bool(jnp.all(jnp.abs(final - final_ref) <= 3 * 2.0**-9 * final_abs + F32_TOL))


def test_benchmark_runs_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU smoke run of the benchmark")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ssd.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--iters", "1", "--dtype", "float32"],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "NOT kernel performance" in out
    row = out.strip().splitlines()[-1].split("|")
    assert row[0].split() == ["1", "256"]
    assert float(row[-1]) <= F32_TOL  # kernel and reference agree in the benchmark too
