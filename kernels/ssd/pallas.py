"""Pallas forward kernel for Mamba2's chunked state-space-dual (SSD) scan.

Shape legend: b batch, l length (padded to a multiple of q), h heads, g groups of heads
sharing B and C, r = h // g heads per group, p head dim, n state size, q chunk size,
m rows of a sub-block of a chunk, c chunks.

Same maths as ``kernels/ssd/reference.py`` (the readable truth); see its docstring for
the recurrence. Decomposition (as in mamba_ssm's Triton kernels):

* In XLA, outside the kernel: pad ``l`` to a multiple of ``q`` (``dt = 0`` in the tail
  leaves the state unchanged), ``dA = dt * A`` and its cumulative sum inside each chunk,
  ``cs [b, h, l]``, kept as a float32 pair ``cs + cs_lo`` (see ``chunk_cumsum_pair``).
  A cumulative sum inside a kernel is not implemented on TPU, and it is a cheap pass
  over ``b * h * l`` floats.
* In the kernel, per chunk and per (batch, head): the diagonal block
  ``y_q += sum_s (C_q . B_s) * exp(cs_q - cs_s) * dt_s * x_s`` (s <= q), the
  off-diagonal block ``y_q += exp(cs_q) * (state @ C_q)`` from the state entering the
  chunk, ``y_q += D * x_q``, and the state update
  ``state = exp(cs_last) * state + sum_s exp(cs_last - cs_s) * dt_s * outer(x_s, B_s)``.

The decay uses ``exp(cs_q - cs_s)`` of the within-chunk cumulative sums (never the
overflowing ``exp(cs_q) * exp(-cs_s)``), masked to ``-inf`` above the diagonal before the
exponential. A plain float32 ``cs`` (as in mamba_ssm) loses ``|cs|`` ulps in the
difference (measured: 1.6e-4 max error in y at n=128 against the sequential oracle,
where the chunked reference has 2.3e-5); differencing the float pair brings the kernel
to 2.3e-5 on the same case (2e-6 from the chunked reference), for two extra vector
loads.

Two variants share the per-chunk maths (``_chunk``); they differ only in how the carried
state crosses chunks, which must happen in order:

``variant="loop"`` (GPU, and the default in interpret mode)
    grid ``(b, h)``; each program owns one (batch, head) pair for the whole sequence and
    walks its chunks with ``lax.fori_loop`` inside the kernel, the state ``[p, n]``
    float32 living in the loop carry (registers / shared memory). Programs are
    independent, so the order in which a GPU runs grid points does not matter: this is
    the only safe choice on GPU, where grid points run concurrently and a carry across
    grid steps would race. Block shapes (refs are windows into HBM; loads happen per
    sub-block): x, y ``(l, p)``, B, C ``(l, n)`` (the group ``hi // r`` is picked by the
    index_map), dt, cs, cs_lo ``(l,)``, D ``(1, p)``, initial/final state ``(p, n)``. Each
    chunk is processed in row sub-blocks of ``m`` (``block_m``) rows: per row block,
    the off-diagonal read-out and the diagonal block against the source blocks at or
    below the diagonal (causal blocks only: ``(q/m)(q/m + 1)/2`` score tiles of
    ``[m, m]`` instead of ``(q/m)^2``).
    On-chip working set per program (bytes, e = input element size):
    ``4pn`` (state) + ``e(2mn + 2mp)`` (C_i, B_j, x_j, x*dt tiles) + ``4m^2`` (scores)
    + ``4mp`` (output accumulator) + ``24m`` (dt, cs, cs_lo vectors).
    At Codestral shapes (p=64, n=128, q=256, m=64) in bfloat16:
    32768 + 49152 + 16384 + 16384 + 1536 = 116,224 B (114 KiB); in float32 165,376 B.
    H100/H200 have 256 KiB of registers and up to 227 KiB of shared memory per SM, so
    this fits at 8 warps (``num_warps=8``, the default here; untuned) with one
    program per SM.

``variant="chunk_grid"`` (TPU)
    grid ``(b, h, c)``, dimension semantics ``("parallel", "parallel", "arbitrary")``:
    Mosaic TPU runs an "arbitrary" axis sequentially on one core, in order, so the state
    can live in a VMEM scratch buffer ``[p, n]`` float32, zeroed from the initial state
    at ``c == 0`` and written to the final-state output at ``c == last``. Inputs are
    transposed in XLA so that every block's last two dims are tiles or full dims
    (Mosaic's layout rule: divisible by 8 and 128, or equal to the array's): x, y
    ``[b, h, l, p]`` blocks ``(q, p)``; B, C ``[b, g, l, n]`` blocks ``(q, n)``; dt, cs,
    cs_lo as rows ``[b, h, 1, l]`` blocks ``(1, q)``, so ``q`` must be a multiple of 128
    (or cover the sequence); D ``(1, p)``; states ``(p, n)``. The kernel reshapes the
    rows into ``(q, 1)`` columns in VMEM: as ``[b, h, l, 1]`` arrays in HBM they would be
    padded to 128 lanes. One program computes one whole chunk (``m = q``). VMEM per
    step (double-buffered blocks, sublane padding of rows to 8, the in-kernel columns
    padded to 128 lanes):
    ``2 * [e(qp + 2qn) + 3*4*8q + 4qp + 2*4pn + 4*8p] + 4pn + 4q^2 + 3*4*128q``;
    at Codestral shapes in bfloat16: 2 * 321,536 + 32,768 + 262,144 + 393,216 =
    1,331,200 B (1.3 MiB), well inside the default 16 MiB scoped VMEM
    (``benchmarks/ssd_tpu_compile.py`` measures what Mosaic needs). Compiled for v5e and
    v4 by XLA:TPU (``tests/test_ssd_tpu_compile.py``), not yet run on TPU hardware. On
    GPU this variant is refused: a carry across grid steps is a race there.

GPU backend: Pallas's Triton backend, selected explicitly with
``jax.experimental.pallas.triton.CompilerParams`` (jax >= 0.11 defaults ``pallas_call``
to Mosaic GPU and deprecates Triton for it; explicit Triton compiler params still select
Triton). Triton is the portable first choice: the kernel is written at block level
(``jnp`` ops on tiles) and Triton handles the thread mapping; Mosaic GPU would need
warpgroup-level programming (explicit WGMMA, TMA and barriers) for the same kernel.
Triton needs power-of-two tile sizes of at least 16 for ``dot``: p, n, q and m are
checked before compiling.

Numerics: dots take their inputs in the input dtype (bfloat16 goes to tensor cores /
the MXU) and accumulate in float32; decays, dt scaling, the state and y are float32.
With float32 inputs pass ``precision=lax.Precision.HIGHEST`` for IEEE float32 dots on
GPU (Triton's default for float32 is TF32) and full-precision MXU passes on TPU.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

VARIANTS = ("loop", "chunk_grid")
SCHEDULES = (None, "reverse", "shuffle")


PLATFORMS = ("cpu", "gpu", "tpu")
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def target_platform(target: str | None = None, x=None) -> str:
    """The platform a kernel is compiled for: "cpu", "gpu" or "tpu".

    ``target`` wins when given. Otherwise the devices of ``x``: a concrete array's own
    devices, or, under ``jit``, the mesh its sharding names (``jit`` over inputs sharded
    on TPU devices traces them with that mesh, even on a host whose default backend is
    CPU, e.g. when compiling ahead of time for a TPU topology); then the mesh set with
    ``jax.set_mesh``; last, ``jax.default_backend()``.
    """
    if target is None:
        target = _platform_of(x)
    platform = _PLATFORM_ALIASES.get(target, target)
    if platform not in PLATFORMS:
        raise ValueError(f"ssd: target must be one of {PLATFORMS} or None, got {target!r}")
    return platform


def _platform_of(x) -> str:
    if x is not None:
        mesh = getattr(jax.typeof(x).sharding, "mesh", None)
        device = getattr(mesh, "abstract_device", None)
        if device is not None:
            return device.platform
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            return next(iter(x.sharding.device_set)).platform
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is not None:
        return device.platform
    return jax.default_backend()


def _group(head, heads_per_group: int):
    """The B/C group of a head in an index_map. ``lax.div`` truncates, which equals the
    floor for grid indices (never negative); ``//`` would lower through ``sign``, whose
    Mosaic rule asks the attached chip for its generation (no chip when compiling ahead
    of time for a TPU topology)."""
    return lax.div(head, heads_per_group)


def _dot(a, b, contract: tuple[int, int], precision):
    """2-D matmul with float32 accumulation. ``contract = (1, 0)`` is ``a @ b``,
    ``(1, 1)`` is ``a @ b.T``, ``(0, 0)`` is ``a.T @ b``."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def _two_sum(a, b):
    """``a + b`` as ``(sum, rounding error)``, exactly (Knuth's two-sum)."""
    total = a + b
    b_part = total - a
    return total, (a - (total - b_part)) + (b - b_part)


def chunk_cumsum_pair(d_a):
    """Cumulative sum along the last axis as a float32 pair ``(hi, lo)``, ``hi + lo``
    accurate to about 2^-44 relative (double-float arithmetic in a parallel scan).

    ``d_a [..., q]`` float32 -> two ``[..., q]`` float32 arrays. The kernel needs
    ``cs_i - cs_j`` for nearby positions deep into a chunk; a plain float32 cumulative
    sum there carries an absolute error of ``|cs|`` ulps (1e-5 at ``|cs| = 150``), which
    the decay passes straight to y. With the pair, ``(hi_i - hi_j) + (lo_i - lo_j)``
    is as accurate as summing the increments between ``j`` and ``i`` directly.
    """
    def combine(left, right):
        total, err = _two_sum(left[0], right[0])
        err = err + (left[1] + right[1])
        hi = total + err
        return hi, err - (hi - total)

    return lax.associative_scan(combine, (d_a, jnp.zeros_like(d_a)), axis=-1)


def _chunk(state, load: Callable, store: Callable, d, *, q: int, m: int, precision):
    """One chunk of the scan for one (batch, head). Shared by both variants.

    ``state [p, n]`` float32 is the state entering the chunk; ``d [1, p]`` float32 is D.
    ``load(kind, offset, size)`` reads ``size`` rows starting ``offset`` rows into the
    chunk: kinds "x" ``[size, p]``, "B", "C" ``[size, n]`` (input dtype), "dt", "cs",
    "cs_lo" ``[size, 1]`` and "cs_row", "cs_lo_row" ``[1, size]`` (float32; the
    within-chunk cumulative sum of dt*A as a float pair ``cs + cs_lo``).
    ``store(offset, y)`` writes ``y [size, p]`` float32. Returns the state leaving the
    chunk ``[p, n]`` float32.
    """
    f32 = jnp.float32

    def log_decay(hi_to, lo_to, offset, size):
        # cs_to - cs_from from the float pairs: the high parts cancel exactly for nearby
        # positions, so the difference keeps the precision of a direct sum.
        return (hi_to - load("cs_row", offset, size)) + (lo_to - load("cs_lo_row", offset, size))

    last_hi, last_lo = load("cs", q - 1, 1), load("cs_lo", q - 1, 1)   # [1, 1]
    new_state = jnp.exp(last_hi + last_lo) * state                     # [p, n]
    for i in range(q // m):
        c_i = load("C", i * m, m)                                      # [m, n]
        x_i = load("x", i * m, m)                                      # [m, p]
        hi_i, lo_i = load("cs", i * m, m), load("cs_lo", i * m, m)     # [m, 1]
        # The state entering the chunk, decayed to each row, read out by C.
        y_i = jnp.exp(hi_i + lo_i) * _dot(c_i, state.astype(c_i.dtype), (1, 1), precision)  # [m, p]
        for j in range(i + 1):
            b_j = load("B", j * m, m)                                  # [m, n]
            x_j = load("x", j * m, m)                                  # [m, p]
            decay_log = log_decay(hi_i, lo_i, j * m, m)                # [m, m]
            if j == i:  # only the diagonal tile holds future sources; mask before exp
                rows = lax.broadcasted_iota(jnp.int32, (m, m), 0)
                cols = lax.broadcasted_iota(jnp.int32, (m, m), 1)
                decay_log = jnp.where(rows >= cols, decay_log, -jnp.inf)
            scores = _dot(c_i, b_j, (1, 1), precision) * jnp.exp(decay_log)   # [m, m]
            x_dt = (x_j.astype(f32) * load("dt", j * m, m)).astype(x_j.dtype)  # [m, p]
            y_i = y_i + _dot(scores.astype(x_j.dtype), x_dt, (1, 0), precision)
        store(i * m, y_i + d * x_i.astype(f32))
    for j in range(q // m):
        # This chunk's own inputs, decayed to the chunk's end, summed into the state:
        # weight_s = exp(cs_last - cs_s) * dt_s, as a column (cs_last is a scalar).
        to_end = ((last_hi - load("cs", j * m, m)) + (last_lo - load("cs_lo", j * m, m)))
        weight = jnp.exp(to_end) * load("dt", j * m, m)                # [m, 1]
        x_j = load("x", j * m, m)
        x_w = (x_j.astype(f32) * weight).astype(x_j.dtype)             # [m, p]
        new_state = new_state + _dot(x_w, load("B", j * m, m), (0, 0), precision)  # [p, n]
    return new_state


def _loop_kernel(x_ref, dt_ref, cs_ref, cs_lo_ref, b_ref, c_ref, d_ref, s0_ref, y_ref,
                 sf_ref, *, grid_ids, q: int, m: int, n_chunks: int, precision):
    """Program for one (batch, head): all chunks in order, state in the loop carry.

    Refs: x, y ``[l, p]``, dt, cs, cs_lo ``[l]``, B, C ``[l, n]``, d ``[1, p]``,
    s0, sf ``[p, n]``.
    """
    del grid_ids  # the index_maps select (batch, head); the kernel needs no grid index
    d = d_ref[...].astype(jnp.float32)

    def chunk_body(chunk, state):
        start = pl.multiple_of(chunk * q, q)

        def load(kind, offset, size):
            rows = pl.ds(start + offset, size)
            if kind == "x":
                return x_ref[rows, :]
            if kind == "B":
                return b_ref[rows, :]
            if kind == "C":
                return c_ref[rows, :]
            vector_ref = {"dt": dt_ref, "cs": cs_ref, "cs_lo": cs_lo_ref,
                          "cs_row": cs_ref, "cs_lo_row": cs_lo_ref}[kind]
            vector = vector_ref[rows]                                  # [size]
            return vector[None, :] if kind.endswith("_row") else vector[:, None]

        def store(offset, y):
            y_ref[pl.ds(start + offset, y.shape[0]), :] = y.astype(y_ref.dtype)

        return _chunk(state, load, store, d, q=q, m=m, precision=precision)

    sf_ref[...] = lax.fori_loop(0, n_chunks, chunk_body, s0_ref[...].astype(jnp.float32))


def _chunk_grid_kernel(x_ref, dt_row_ref, cs_row_ref, cs_lo_row_ref, b_ref, c_ref, d_ref,
                       s0_ref, y_ref, sf_ref, state_ref, *, grid_ids, q: int, n_chunks: int,
                       precision):
    """Program for one (batch, head, chunk); the state crosses chunks in ``state_ref``.

    Refs (one chunk): x, y ``[q, p]``, dt, cs, cs_lo rows ``[1, q]``, B, C ``[q, n]``,
    d ``[1, p]``, s0, sf, state ``[p, n]``. Correct only if the chunk axis runs in order
    (TPU "arbitrary" semantics).
    """
    chunk = grid_ids()[2]

    @pl.when(chunk == 0)
    def _():
        state_ref[...] = s0_ref[...].astype(jnp.float32)

    rows_in = {"dt": dt_row_ref, "cs": cs_row_ref, "cs_lo": cs_lo_row_ref}
    # The per-position vectors arrive as lane rows and are turned into sublane columns
    # here, in VMEM: a [b, h, l, 1] column array in HBM would be padded to 128 lanes
    # (128x its size; 384 MiB for the three at Codestral shapes).
    columns = {kind: ref[...].reshape(q, 1) for kind, ref in rows_in.items()}

    def load(kind, offset, size):
        rows = pl.ds(offset, size)
        if kind == "x":
            return x_ref[rows, :]
        if kind == "B":
            return b_ref[rows, :]
        if kind == "C":
            return c_ref[rows, :]
        if kind.endswith("_row"):
            return rows_in[kind[:-len("_row")]][:, rows]
        return columns[kind][offset:offset + size, :]

    def store(offset, y):
        y_ref[pl.ds(offset, y.shape[0]), :] = y.astype(y_ref.dtype)

    state = _chunk(state_ref[...], load, store, d_ref[...].astype(jnp.float32),
                   q=q, m=q, precision=precision)
    state_ref[...] = state

    @pl.when(chunk == n_chunks - 1)
    def _():
        sf_ref[...] = state


def _schedule_permutation(schedule: str, total: int):
    """Linear grid step -> permuted linear step, as traceable integer arithmetic."""
    if schedule == "reverse":
        return lambda step: total - 1 - step
    # An affine bijection of Z_total with a multiplier far from 1 scatters neighbours.
    mult = next(a for a in range(total // 2 + 1, 2 * total + 2) if math.gcd(a, total) == 1)
    offset = total // 3
    return lambda step: (mult * step + offset) % total


def _pallas_call(kernel, *, grid, in_specs, out_specs, out_shape, scratch_shapes,
                 compiler_params, interpret: bool, schedule, name: str):
    """``pl.pallas_call`` whose kernel gets ``grid_ids()`` (the grid point it runs).

    ``in_specs`` / ``out_specs`` are ``(block_shape, index_map)`` pairs. ``schedule``
    (test-only, interpret mode) flattens the grid to one axis and visits its points in
    reversed or shuffled order, to show which kernels depend on grid order.
    """
    if schedule is None:
        def grid_ids():
            return tuple(pl.program_id(axis) for axis in range(len(grid)))
        wrap = lambda index_map: index_map  # noqa: E731
        call_grid = grid
    else:
        if not interpret:
            raise ValueError("ssd_pallas: schedule is a test option of interpret mode only")
        if schedule not in SCHEDULES:
            raise ValueError(f"ssd_pallas: schedule must be one of {SCHEDULES}, got {schedule!r}")
        total = math.prod(grid)
        permute = _schedule_permutation(schedule, total)

        def unravel(step):
            point, ids = permute(step), []
            for size in reversed(grid):
                ids.append(point % size)
                point = point // size
            return tuple(reversed(ids))

        def grid_ids():
            return unravel(pl.program_id(0))
        wrap = lambda index_map: (lambda step: index_map(*unravel(step)))  # noqa: E731
        call_grid = (total,)
        compiler_params = None  # dimension semantics no longer match the flat grid
    specs = lambda pairs: [pl.BlockSpec(shape, wrap(imap)) for shape, imap in pairs]  # noqa: E731
    return pl.pallas_call(
        functools.partial(kernel, grid_ids=grid_ids),
        grid=call_grid, in_specs=specs(in_specs), out_specs=specs(out_specs),
        out_shape=out_shape, scratch_shapes=scratch_shapes,
        compiler_params=compiler_params, interpret=interpret, name=name)


def _is_pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def _check_triton_tiles(p: int, n: int, q: int, m: int):
    for name, value in (("head_dim p", p), ("state size n", n), ("chunk_size", q), ("block_m", m)):
        if not _is_pow2(value) or value < 16:
            raise ValueError(
                f"ssd_pallas on GPU (Triton): {name} must be a power of two >= 16 for "
                f"tensor-core dots, got {value}; use impl='reference' for this shape")


def _triton_params(num_warps: int | None, num_stages: int | None):
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError as err:  # pragma: no cover - depends on the jax build
        raise RuntimeError(
            "ssd_pallas on GPU needs Pallas's Triton backend "
            "(jax.experimental.pallas.triton), which this jax build lacks; "
            "use impl='reference'") from err
    # Untuned defaults: 8 warps for the ~114 KiB working set, 2 pipeline stages.
    return pltriton.CompilerParams(num_warps=num_warps or 8, num_stages=num_stages or 2)


def _tpu_params(vmem_limit_bytes: int | None):
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                vmem_limit_bytes=vmem_limit_bytes)


def _tpu_vmem(shape):
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.VMEM(shape, jnp.float32)


def _check_settings(platform: str, variant: str | None, block_m: int | None, q: int, l: int, p: int,
                    n: int) -> tuple[str, int]:
    """The kernel variant and row block for ``platform``, refusing what would not compile."""
    if variant is None:
        variant = "chunk_grid" if platform == "tpu" else "loop"
    if variant not in VARIANTS:
        raise ValueError(f"ssd_pallas: variant must be one of {VARIANTS}, got {variant!r}")
    if platform not in ("interpret", "gpu", "tpu"):
        raise ValueError(
            f"ssd_pallas: compiled Pallas needs a GPU or TPU, the target platform is "
            f"{platform!r} (target=None takes it from x's devices, then the mesh, then the "
            f"default backend); pass target='tpu' or 'gpu' with inputs for those devices, "
            f"or pass interpret=True or use impl='reference'")
    if variant == "chunk_grid" and platform not in ("tpu", "interpret"):
        raise ValueError(
            "ssd_pallas: variant 'chunk_grid' carries the state across grid steps, which "
            "only TPU runs in order; use variant='loop' on GPU")
    if variant == "loop" and platform == "tpu":
        raise ValueError(
            "ssd_pallas: variant 'loop' does not compile for TPU: its blocks (None, l, None, p) "
            "end in a squeezed head axis, and Mosaic needs each block's last two dims "
            "divisible by 8 and 128 or equal to the array's; use variant='chunk_grid'")
    if platform == "tpu" and q % 128 and q < l:
        raise ValueError(
            f"ssd_pallas on TPU: chunk_size must be a multiple of 128 (the lane width of the "
            f"(1, chunk) cumulative-sum blocks) or cover the whole sequence, got {q} for "
            f"length {l}; use impl='reference' for this shape")
    if block_m is None:
        block_m = q if platform == "interpret" else min(64, q)
    if variant == "chunk_grid":
        block_m = q
    if q % block_m:
        raise ValueError(f"ssd_pallas: block_m ({block_m}) must divide chunk_size ({q})")
    if platform == "gpu":
        _check_triton_tiles(p, n, q, block_m)
    return variant, block_m


def _prepare(x, dt, A, B, C, D, initial_state, q: int) -> dict:
    """XLA side of the kernel: pad to whole chunks (dt = 0 keeps the state) and take the
    within-chunk cumulative sum of dA (``jnp.cumsum`` is not available inside a TPU kernel)."""
    f32 = jnp.float32
    b, l, h, p = x.shape
    n = B.shape[3]
    pad = (-l) % q
    n_chunks = (l + pad) // q
    lp = l + pad
    pad_seq = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    x_p, b_p, c_p = pad_seq(x), pad_seq(B), pad_seq(C)
    dt_t = jnp.swapaxes(pad_seq(dt.astype(f32)), 1, 2)                  # [b, h, l]
    dA = dt_t * A.astype(f32)[None, :, None]                            # [b, h, l]
    cs, cs_lo = (a.reshape(b, h, lp) for a in chunk_cumsum_pair(dA.reshape(b, h, n_chunks, q)))
    d_rows = jnp.broadcast_to((jnp.zeros((h,), f32) if D is None else D.astype(f32))[:, None, None],
                              (h, 1, p))                                # [h, 1, p]
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    state_shape = jax.ShapeDtypeStruct((b, h, p, n), f32)
    return dict(x=x_p, dt=dt_t, cs=cs, cs_lo=cs_lo, B=b_p, C=c_p, D=d_rows, s0=s0, state_shape=state_shape,
                n_chunks=n_chunks)


def _run_loop(a: dict, *, q: int, r: int, block_m: int, precision, compiler_params, interpret: bool, schedule):
    """The ``loop`` variant on ``_prepare``'s arrays: grid (b, h), the chunks in an in-kernel
    loop. Returns ``y [b, l_padded, h, p]`` and the final state."""
    b, lp, h, p = a["x"].shape
    n = a["B"].shape[3]
    return _pallas_call(
        functools.partial(_loop_kernel, q=q, m=block_m, n_chunks=a["n_chunks"], precision=precision),
        grid=(b, h),
        in_specs=[((None, lp, None, p), lambda bi, hi: (bi, 0, hi, 0)),      # x
                  ((None, None, lp), lambda bi, hi: (bi, hi, 0)),            # dt
                  ((None, None, lp), lambda bi, hi: (bi, hi, 0)),            # cs
                  ((None, None, lp), lambda bi, hi: (bi, hi, 0)),            # cs_lo
                  ((None, lp, None, n), lambda bi, hi: (bi, 0, _group(hi, r), 0)),  # B
                  ((None, lp, None, n), lambda bi, hi: (bi, 0, _group(hi, r), 0)),  # C
                  ((None, 1, p), lambda bi, hi: (hi, 0, 0)),                 # D
                  ((None, None, p, n), lambda bi, hi: (bi, hi, 0, 0))],      # s0
        out_specs=[((None, lp, None, p), lambda bi, hi: (bi, 0, hi, 0)),
                   ((None, None, p, n), lambda bi, hi: (bi, hi, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, lp, h, p), jnp.float32), a["state_shape"]],
        scratch_shapes=(), compiler_params=compiler_params,
        interpret=interpret, schedule=schedule, name="ssd_chunked_loop")(
            a["x"], a["dt"], a["cs"], a["cs_lo"], a["B"], a["C"], a["D"], a["s0"])


def _run_chunk_grid(a: dict, *, q: int, r: int, precision, vmem_limit_bytes, interpret: bool, schedule):
    """The ``chunk_grid`` variant on ``_prepare``'s arrays: grid (b, h, c), the state carried
    across the chunk axis. Returns ``y [b, l_padded, h, p]`` and the final state."""
    b, lp, h, p = a["x"].shape
    n = a["B"].shape[3]
    # Transposed layouts keep each block's last two dims tiles or full dims.
    x_t = jnp.swapaxes(a["x"], 1, 2)                                    # [b, h, l, p]
    b_t, c_t = jnp.swapaxes(a["B"], 1, 2), jnp.swapaxes(a["C"], 1, 2)   # [b, g, l, n]
    row = lambda v: v[:, :, None, :]  # noqa: E731                     # [b, h, 1, l]
    y_t, final = _pallas_call(
        functools.partial(_chunk_grid_kernel, q=q, n_chunks=a["n_chunks"], precision=precision),
        grid=(b, h, a["n_chunks"]),
        in_specs=[((None, None, q, p), lambda bi, hi, ci: (bi, hi, ci, 0)),       # x
                  ((None, None, 1, q), lambda bi, hi, ci: (bi, hi, 0, ci)),       # dt
                  ((None, None, 1, q), lambda bi, hi, ci: (bi, hi, 0, ci)),       # cs
                  ((None, None, 1, q), lambda bi, hi, ci: (bi, hi, 0, ci)),       # cs_lo
                  ((None, None, q, n), lambda bi, hi, ci: (bi, _group(hi, r), ci, 0)),  # B
                  ((None, None, q, n), lambda bi, hi, ci: (bi, _group(hi, r), ci, 0)),  # C
                  ((None, 1, p), lambda bi, hi, ci: (hi, 0, 0)),                  # D
                  ((None, None, p, n), lambda bi, hi, ci: (bi, hi, 0, 0))],       # s0
        out_specs=[((None, None, q, p), lambda bi, hi, ci: (bi, hi, ci, 0)),
                   ((None, None, p, n), lambda bi, hi, ci: (bi, hi, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, h, lp, p), jnp.float32), a["state_shape"]],
        scratch_shapes=[_tpu_vmem((p, n))],
        compiler_params=_tpu_params(vmem_limit_bytes),
        interpret=interpret, schedule=schedule, name="ssd_chunked_grid")(
            x_t, row(a["dt"]), row(a["cs"]), row(a["cs_lo"]), b_t, c_t, a["D"], a["s0"])
    return jnp.swapaxes(y_t, 1, 2), final


def ssd_pallas(x, dt, A, B, C, D=None, *, chunk_size: int, initial_state=None,
               interpret: bool = False, variant: str | None = None,
               block_m: int | None = None, precision=None, num_warps: int | None = None,
               num_stages: int | None = None, schedule: str | None = None,
               target: str | None = None, vmem_limit_bytes: int | None = None):
    """Forward chunked SSD scan with the Pallas kernel.

    Shapes as ``reference.ssd_chunked``: x ``[b, l, h, p]`` (float32 or bfloat16),
    dt ``[b, l, h]`` float32, A ``[h]``, B, C ``[b, l, g, n]`` (same dtype as x or
    float32), D ``[h]`` or None, initial_state ``[b, h, p, n]`` or None. Returns
    ``y [b, l, h, p]`` float32 and ``final_state [b, h, p, n]`` float32. Shapes are
    assumed valid (``kernels.ssd.ops.ssd`` validates them). No gradient: use
    ``kernels.ssd.ops.ssd``.

    ``target``: the platform to compile for, "gpu" or "tpu"; None takes it from x's
    devices (under ``jit``, the mesh of its sharding), then from the mesh set with
    ``jax.set_mesh``, then ``jax.default_backend()`` (see ``target_platform``), so a
    program lowered for a TPU topology from a CPU host gets the TPU kernel. Ignored in
    interpret mode.
    ``variant``: "loop" (GPU, grid (b, h), chunks in an in-kernel loop) or "chunk_grid"
    (TPU, grid (b, h, c) with the chunk axis "arbitrary"); default by target, "loop" in
    interpret mode. On TPU only "chunk_grid" compiles, with ``chunk_size`` a multiple of
    128 or at least the length. ``block_m``: row sub-block of the loop variant (default
    ``min(64, chunk_size)`` compiled, ``chunk_size`` interpreted). ``schedule``: test-only
    grid visiting order in interpret mode (None, "reverse", "shuffle").
    ``vmem_limit_bytes``: Mosaic's scoped VMEM limit for the TPU kernel (None: the
    compiler's default); ``aot.kernel_vmem_floor`` bisects it to measure the kernel's
    VMEM.
    """
    b, l, h, p = x.shape
    q = int(chunk_size)
    platform = "interpret" if interpret else target_platform(target, x)
    variant, block_m = _check_settings(platform, variant, block_m, q, l, p, B.shape[3])
    arrays = _prepare(x, dt, A, B, C, D, initial_state, q)
    common = dict(q=q, r=h // B.shape[2], precision=precision, interpret=interpret, schedule=schedule)
    if variant == "loop":
        compiler_params = None if platform in ("interpret", "tpu") else _triton_params(num_warps, num_stages)
        y, final = _run_loop(arrays, block_m=block_m, compiler_params=compiler_params, **common)
    else:
        y, final = _run_chunk_grid(arrays, vmem_limit_bytes=vmem_limit_bytes, **common)
    return y[:, :l], final
