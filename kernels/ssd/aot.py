"""The SSD op compiled ahead of time for a TPU chip, on a host with no TPU.

Shape legend: b batch, l length, h heads, p head dim, g groups of heads sharing B and C,
n state size, q chunk size.

libtpu's compiler (``pip install -e ".[tpu]"``) runs on any host: a TPU topology from
``jax.experimental.topologies`` gives device descriptions, ``jax.jit(...).lower`` on
abstract arrays placed on one of them traces the op for TPU (``ops.ssd`` takes its
target from the inputs' devices), and ``.compile()`` goes through XLA:TPU and Mosaic,
so what Mosaic refuses (block shapes, ops without a TPU lowering, VMEM) fails here as
it would on the chip. ``memory_analysis()`` is XLA:TPU's per-chip account of HBM.
Used by ``tests/test_ssd_tpu_compile.py`` and ``benchmarks/ssd_tpu_compile.py``.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dynamax_jax import aot as shared_aot
from dynamax_jax.kernels.ssd import ops
from dynamax_jax.kernels.ssd import pallas as ssd_pallas_lib

# One chip of each TPU generation the kernel is checked on (dynamax_jax.aot holds the slices).
TOPOLOGIES = {name: shared_aot.TOPOLOGIES[name] for name in ("v5e", "v4")}
tpu_device = shared_aot.tpu_device
DIRECTIONS = ("forward", "backward")


@dataclasses.dataclass(frozen=True)
class SsdShape:
    b: int
    l: int
    h: int
    p: int
    g: int
    n: int
    q: int


CODESTRAL = SsdShape(b=1, l=2048, h=128, p=64, g=8, n=128, q=256)


def abstract_inputs(device, shape: SsdShape, dtype=jnp.bfloat16):
    """``ops.ssd``'s array arguments as ``ShapeDtypeStruct``s on ``device``: x, dt, A,
    B, C, D, initial_state (x, B, C in ``dtype``, the rest float32)."""
    one_chip = NamedSharding(Mesh(np.array([device]), ("chip",)), PartitionSpec())
    s = shape

    def array(dims, array_dtype=jnp.float32):
        return jax.ShapeDtypeStruct(dims, array_dtype, sharding=one_chip)

    return (array((s.b, s.l, s.h, s.p), dtype), array((s.b, s.l, s.h)), array((s.h,)),
            array((s.b, s.l, s.g, s.n), dtype), array((s.b, s.l, s.g, s.n), dtype),
            array((s.h,)), array((s.b, s.h, s.p, s.n)))


def _program(direction: str, shape: SsdShape):
    def forward(x, dt, A, B, C, D, initial_state):
        return ops.ssd(x, dt, A, B, C, D, chunk_size=shape.q, initial_state=initial_state)

    if direction == "forward":
        return forward
    if direction != "backward":
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

    def forward_and_backward(x, dt, A, B, C, D, initial_state, cotangent_y, cotangent_state):
        # A training step's use: the outputs and, through the custom_vjp, every input's
        # gradient (the outputs keep the kernel's forward in the program).
        outputs, pullback = jax.vjp(forward, x, dt, A, B, C, D, initial_state)
        return outputs, pullback((cotangent_y, cotangent_state))

    return forward_and_backward


@dataclasses.dataclass(frozen=True)
class CompiledSsd:
    compiled: jax.stages.Compiled
    lower_s: float
    compile_s: float

    @property
    def memory(self):
        """XLA:TPU's ``CompiledMemoryStats`` for one chip."""
        return self.compiled.memory_analysis()

    @property
    def total_bytes(self) -> int:
        m = self.memory
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)

    @property
    def mosaic_kernels(self) -> list[str]:
        """Names of the Mosaic kernels (``tpu_custom_call``s) in the compiled program."""
        return re.findall(r"%(\S+) = .*custom_call_target=\"tpu_custom_call\"",
                          self.compiled.as_text())


def compile_ssd(topology: str, direction: str, shape: SsdShape, dtype=jnp.bfloat16) -> CompiledSsd:
    """``ops.ssd`` (impl "auto") lowered and compiled for one chip of ``topology``.
    "forward" is the op; "backward" returns the op's outputs and the VJP of all seven
    inputs (its ``custom_vjp``: kernel forward, reference VJP backward)."""
    args = abstract_inputs(tpu_device(topology), shape, dtype)
    if direction == "backward":
        y, state = args[0], args[6]
        args = args + (jax.ShapeDtypeStruct(y.shape, jnp.float32, sharding=y.sharding), state)
    start = time.perf_counter()
    lowered = jax.jit(_program(direction, shape)).lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return CompiledSsd(compiled, lowered_at - start, time.perf_counter() - lowered_at)


def kernel_vmem_floor(topology: str, shape: SsdShape, dtype=jnp.bfloat16, *,
                      step: int = 64 * 2**10, high: int = 16 * 2**20) -> int | None:
    """The smallest scoped-VMEM limit (a multiple of ``step`` bytes, at most ``high``)
    under which the forward kernel compiles for ``topology``, or None if none does.

    XLA:TPU does not report a Mosaic kernel's VMEM for a compile that succeeds, and the
    size its out-of-VMEM error quotes grows with the limit (Mosaic's internal scratch),
    so this bisects the limit (``pltpu.CompilerParams(vmem_limit_bytes=...)``): about
    eight compiles.
    """
    args = abstract_inputs(tpu_device(topology), shape, dtype)

    def compiles(limit: int) -> bool:
        def kernel(x, dt, A, B, C, D, initial_state):
            return ssd_pallas_lib.ssd_pallas(x, dt, A, B, C, D, chunk_size=shape.q,
                                             initial_state=initial_state, vmem_limit_bytes=limit)
        try:
            jax.jit(kernel).lower(*args).compile()
        except Exception as err:  # XlaRuntimeError RESOURCE_EXHAUSTED: CompileTimeScopedVmemOom
            if "vmem" not in str(err).lower():
                raise
            return False
        return True

    low_steps, high_steps = 0, high // step    # compiles(low) is False, compiles(high) True
    if not compiles(high_steps * step):
        return None
    while high_steps - low_steps > 1:
        middle = (low_steps + high_steps) // 2
        if compiles(middle * step):
            high_steps = middle
        else:
            low_steps = middle
    return high_steps * step
