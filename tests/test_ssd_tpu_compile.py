"""The Pallas SSD kernel compiled by XLA:TPU and Mosaic for TPU v5e and v4, on a host
with no TPU (libtpu's compiler runs anywhere), and the kernel's choice of target.

Interpret mode cannot catch what Mosaic refuses (block shapes, ops whose TPU lowering
needs the attached chip, VMEM); these compiles do. They need libtpu
(``pip install -e ".[tpu]"``) and are skipped without it; the target tests run everywhere.

Shape legend: b batch, l length, h heads, p head dim, g groups, n state size, q chunk.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamax_jax.kernels.ssd import ops
from dynamax_jax.kernels.ssd import pallas as ssd_pallas_lib

# libtpu takes a host-wide lock when it loads; another process holding it (a benchmark,
# a second test run) would fail the compile. With no TPU attached there is nothing to guard.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'), so there is no TPU compiler")

# Small but TPU-legal: chunk 128 (the lane width), a ragged length (300 -> 3 chunks), two
# groups of two heads, batch 2, bfloat16 as in the models.
SMALL = dict(b=2, l=300, h=4, p=64, g=2, n=128, q=128)


def small_inputs(seed=0):
    b, l, h, p, g, n = (SMALL[k] for k in "blhpgn")
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
    return dict(x=normal(b, l, h, p), dt=jnp.abs(normal(b, l, h)), A=-jnp.abs(normal(h)),
                B=normal(b, l, g, n), C=normal(b, l, g, n), D=normal(h),
                initial_state=normal(b, h, p, n))


def test_target_platform_names():
    assert ssd_pallas_lib.target_platform("tpu") == "tpu"
    assert ssd_pallas_lib.target_platform("cuda") == "gpu"
    assert ssd_pallas_lib.target_platform("rocm") == "gpu"
    # No target, no mesh: the default backend, as before targets existed.
    assert ssd_pallas_lib.target_platform() == jax.default_backend()
    assert ssd_pallas_lib.target_platform(None, jnp.zeros(3)) == jax.default_backend()
    with pytest.raises(ValueError, match="target must be one of"):
        ssd_pallas_lib.target_platform("metal")


def test_auto_follows_the_target():
    assert ops.resolve_impl("auto", "tpu") == "pallas"
    assert ops.resolve_impl("auto", "gpu") == "pallas"
    assert ops.resolve_impl("auto", "cpu") == "reference"


def test_tpu_target_refuses_what_mosaic_refuses():
    """Checked before lowering, so these fail the same with or without libtpu."""
    inputs = small_inputs()
    with pytest.raises(ValueError, match="variant 'loop' does not compile for TPU"):
        ssd_pallas_lib.ssd_pallas(**inputs, chunk_size=128, target="tpu", variant="loop")
    with pytest.raises(ValueError, match="chunk_size must be a multiple of 128"):
        ssd_pallas_lib.ssd_pallas(**inputs, chunk_size=64, target="tpu")
    with pytest.raises(ValueError, match="pass target='tpu' or 'gpu'"):
        ops.ssd(**inputs, chunk_size=128, impl="pallas", target="cpu")


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e", "v4"])
@pytest.mark.parametrize("direction", [
    "forward",
    # XLA:TPU compiles the reference VJP (the custom_vjp's backward) slowly: ~30 s or more.
    pytest.param("backward", marks=pytest.mark.slow)])
def test_ssd_compiles_for_tpu(topology, direction):
    """``ops.ssd`` with the default impl, lowered on abstract inputs placed on one chip of
    a v5e-8 / v4-8, picks the TPU kernel from the inputs' devices and compiles through
    Mosaic; XLA:TPU's memory analysis accounts for every input and output."""
    from dynamax_jax.kernels.ssd import aot

    shape = aot.SsdShape(**SMALL)
    result = aot.compile_ssd(topology, direction, shape, jnp.bfloat16)
    assert result.mosaic_kernels, "no Mosaic kernel in the program: ops.ssd fell back to XLA"
    assert all("ssd_chunked_grid" in name for name in result.mosaic_kernels)

    args = aot.abstract_inputs(aot.tpu_device(topology), shape, jnp.bfloat16)
    s = shape
    primal_bytes = sum(a.size * a.dtype.itemsize for a in args)
    input_bytes, output_bytes = primal_bytes, 4 * (s.b * s.l * s.h * s.p + s.b * s.h * s.p * s.n)
    if direction == "backward":  # cotangents of (y, final state) in; a gradient per input out
        input_bytes, output_bytes = input_bytes + output_bytes, output_bytes + primal_bytes
    memory = result.memory
    # Per-chip bytes: at least the logical sizes (TPU layouts pad to (8, 128) tiles).
    assert memory.argument_size_in_bytes >= input_bytes
    assert memory.output_size_in_bytes >= output_bytes
    assert memory.temp_size_in_bytes >= 0
    assert result.total_bytes < 2 * 2**20 + 4 * (input_bytes + output_bytes)
