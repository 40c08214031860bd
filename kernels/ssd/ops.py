"""The SSD scan as one op: dispatch between the jnp reference and the Pallas kernel.

Shape legend: b batch, l length, h heads, p head dim, g groups of heads sharing B and C,
n state size.

``ssd`` is what models call. ``impl``: "reference" (``reference.ssd_chunked``, XLA),
"pallas" (the compiled Pallas kernel: GPU via Triton, TPU via Mosaic), "interpret" (the
same kernel with ``interpret=True``, for CPU tests) or "auto" (compiled Pallas when the
program is compiled for GPU or TPU, the reference otherwise). The target platform comes
from the inputs' devices or an explicit ``target`` (see ``ssd``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from dynamax_jax.kernels.ssd import pallas as ssd_pallas_lib
from dynamax_jax.kernels.ssd import reference
from dynamax_jax.sharding import DATA, MODEL

IMPLS = ("auto", "reference", "pallas", "interpret")


def _shape_error(name: str, found, expected_letters: str, expected) -> ValueError:
    return ValueError(f"ssd: {name} has shape {tuple(found)}, expected {expected_letters} = "
                      f"{tuple(expected)}")


def validate(x, dt, A, B, C, D, initial_state, chunk_size) -> None:
    """Raise a ValueError naming the first argument whose shape or dtype is wrong."""
    for name, value in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if value is None:
            raise ValueError(f"ssd: {name} is required, got None")
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"ssd: {name} must be a float array, found dtype {value.dtype}")
    if x.ndim != 4:
        raise ValueError(f"ssd: x must be [b, l, h, p], found shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.ndim != 4:
        raise ValueError(f"ssd: B must be [b, l, g, n], found shape {tuple(B.shape)}")
    g, n = B.shape[2], B.shape[3]
    expected = [("dt", dt, "[b, l, h]", (b, l, h)), ("A", A, "[h]", (h,)),
                ("B", B, "[b, l, g, n]", (b, l, g, n)), ("C", C, "[b, l, g, n]", (b, l, g, n))]
    if D is not None:
        expected.append(("D", D, "[h]", (h,)))
    if initial_state is not None:
        expected.append(("initial_state", initial_state, "[b, h, p, n]", (b, h, p, n)))
    for name, value, letters, shape in expected:
        if tuple(value.shape) != shape:
            raise _shape_error(name, value.shape, letters, shape)
    if g == 0 or h % g:
        raise ValueError(f"ssd: heads h={h} must be a multiple of groups g={g} (B.shape[2])")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _ssd_kernel(x, dt, A, B, C, D, initial_state, chunk_size, platform):
    # platform: "gpu", "tpu" or "interpret". Float32 inputs get IEEE float32 dots
    # (Triton's default would be TF32).
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    interpret = platform == "interpret"
    return ssd_pallas_lib.ssd_pallas(x, dt, A, B, C, D, chunk_size=chunk_size,
                                     initial_state=initial_state, interpret=interpret,
                                     precision=precision, target=None if interpret else platform)


def _ssd_kernel_fwd(x, dt, A, B, C, D, initial_state, chunk_size, platform):
    out = _ssd_kernel(x, dt, A, B, C, D, initial_state, chunk_size, platform)
    return out, (x, dt, A, B, C, D, initial_state)


def _ssd_kernel_bwd(chunk_size, platform, residuals, cotangents):
    # Backward through the XLA reference: recomputes its forward, then its VJP.
    del platform

    def chunked(x, dt, A, B, C, D, initial_state):
        return reference.ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size,
                                     initial_state=initial_state)

    _, vjp = jax.vjp(chunked, *residuals)
    return vjp(cotangents)


_ssd_kernel.defvjp(_ssd_kernel_fwd, _ssd_kernel_bwd)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """"auto" -> "pallas" when compiling for GPU or TPU, else "reference". ``platform``
    ("cpu", "gpu" or "tpu") defaults to ``ssd_pallas_lib.target_platform()`` (the mesh
    set with ``jax.set_mesh``, else the default backend)."""
    if impl not in IMPLS:
        raise ValueError(f"ssd: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        platform = ssd_pallas_lib.target_platform(platform)
        return "pallas" if platform in ("gpu", "tpu") else "reference"
    return impl


def ssd(x, dt, A, B, C, D=None, *, chunk_size: int, initial_state=None, impl: str = "auto",
        target: str | None = None):
    """Mamba2's chunked SSD scan.

    x ``[b, l, h, p]`` (float32 or bfloat16), dt ``[b, l, h]`` float32 (already
    softplus'd and clamped), A ``[h]`` float32 (negative), B, C ``[b, l, g, n]`` (head i
    uses group ``i // (h // g)``), D ``[h]`` or None, initial_state ``[b, h, p, n]`` or
    None. ``l`` need not be a multiple of ``chunk_size``. Returns ``y [b, l, h, p]``
    float32 and ``final_state [b, h, p, n]`` float32.

    ``target`` ("cpu", "gpu", "tpu" or None) is the platform the program is compiled
    for. None takes it from x's devices: under ``jit``, the mesh of x's sharding, so a
    program lowered for TPU devices (e.g. a TPU topology, ahead of time, from a CPU
    host) gets the TPU kernel; then the mesh set with ``jax.set_mesh``; then
    ``jax.default_backend()``. ``impl="auto"`` is the kernel on GPU and TPU targets and
    the reference elsewhere.

    Differentiable in every array argument. The Pallas paths are a ``jax.custom_vjp``
    (``pallas_call`` has no transpose rule) whose backward is, for now, the VJP of the
    XLA reference ``reference.ssd_chunked`` (it recomputes the forward in XLA): the
    Pallas kernel speeds up the forward only.
    """
    validate(x, dt, A, B, C, D, initial_state, chunk_size)
    platform = ssd_pallas_lib.target_platform(target, x)
    impl = resolve_impl(impl, platform)
    if impl == "reference":
        return reference.ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size,
                                     initial_state=initial_state)
    kernel = functools.partial(_ssd_kernel, chunk_size=chunk_size,
                               platform="interpret" if impl == "interpret" else platform)
    return _per_device(kernel, x, dt, A, B, C, D, initial_state)


def _per_device(kernel, x, dt, A, B, C, D, initial_state):
    """``kernel`` on each device's block when x is traced on a mesh of several devices (XLA
    does not partition a Pallas kernel): rows over the mesh's ``data`` axis and heads, with
    their groups, over ``model`` (``dynamax_jax.sharding``), each where the axis divides them.
    The scan is independent per row and per head, so the blocks' results are the op's."""
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
    if mesh is None or mesh.empty or mesh.size == 1:
        return kernel(x, dt, A, B, C, D, initial_state)

    def axis(name, size):
        return name if name in mesh.axis_names and size % mesh.shape[name] == 0 else None

    rows, heads = axis(DATA, x.shape[0]), axis(MODEL, B.shape[2])  # heads split with their groups
    sequence, per_step, per_head = P(rows, None, heads, None), P(rows, None, heads), P(heads)  # x, B, C, y; dt; A, D
    state = P(rows, heads, None, None)
    args = (x, dt, A, B, C, D, initial_state)
    specs = (sequence, per_step, per_head, sequence, sequence, per_head, state)
    in_specs = tuple(None if a is None else spec for a, spec in zip(args, specs))
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=(sequence, state), check_vma=False)(*args)
