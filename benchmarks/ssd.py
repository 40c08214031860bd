"""Benchmark: the Pallas SSD kernel against the XLA reference, measured in one run.

On a GPU or TPU: compiled Pallas (``ops.ssd(impl="pallas")``) vs ``reference.ssd_chunked``
under ``jax.jit``, at Codestral Mamba shapes (128 heads, head_dim 64, 8 groups, state
128, chunk 256), lengths 2k-16k, batch 1-8. On CPU: the interpreted kernel vs the
reference at tiny sizes, only to show the script runs (interpret mode is an emulator,
its times say nothing about the kernel).

    python -m benchmarks.ssd             # full sweep (GPU/TPU)
    python -m benchmarks.ssd --quick     # one size
    python -m benchmarks.ssd --dtype float32

Columns: median wall time of the forward (y and final state), speed-up of the kernel
over the reference, achieved HBM bandwidth (the kernel's minimum traffic: inputs read
once, y and the final state written once, divided by the time), FLOP rate (the dense
chunked-algorithm count ``b*h*c*(2q^2 n + 2q^2 p + 4qpn)``, the same count for both; the
kernel skips the masked upper triangle, so its executed FLOPs are lower) and the max
abs difference between the two outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from dynamax_jax.kernels.ssd import ops, reference

CODESTRAL = dict(h=128, p=64, g=8, n=128, chunk=256)
TINY = dict(h=4, p=16, g=2, n=16, chunk=32)


def make_inputs(b, l, h, p, g, n, dtype, seed=0):
    """Inputs in a Mamba2 layer's ranges, dt somewhat smaller than the tests' (softplus(N - 3))."""
    return reference.random_inputs(b, l, h, p, g, n, seed=seed, dtype=dtype, dt_bias=-3.0, log_a_max=2.5)


def traffic_bytes(b, l, h, p, g, n, itemsize):
    """Minimum HBM traffic of one forward: read x, dt, B, C, initial state; write y
    (float32) and the final state."""
    reads = b * l * h * p * itemsize + b * l * h * 4 + 2 * b * l * g * n * itemsize
    states = 2 * b * h * p * n * 4
    return reads + b * l * h * p * 4 + states


def flops(b, l, h, p, n, q):
    chunks = -(-l // q)
    return b * h * chunks * (2 * q * q * n + 2 * q * q * p + 4 * q * p * n)


def time_fn(fn, inputs, iters):
    out = jax.block_until_ready(fn(inputs))  # compile + warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one size, few iterations")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    on_cpu = backend not in ("gpu", "cuda", "rocm", "tpu")
    dtype = jnp.dtype(args.dtype)
    if on_cpu:
        shapes, impl = TINY, "interpret"
        lengths, batches = ((256,), (1,)) if args.quick else ((256, 512), (1, 2))
        iters = args.iters or 3
        print("CPU: interpreted Pallas kernel vs XLA reference at tiny sizes. This only "
              "checks that the benchmark runs; interpret-mode times are NOT kernel "
              "performance.")
    else:
        shapes, impl = CODESTRAL, "pallas"
        lengths = (2048,) if args.quick else (2048, 4096, 8192, 16384)
        batches = (1,) if args.quick else (1, 2, 4, 8)
        iters = args.iters or (5 if args.quick else 20)
    h, p, g, n, q = (shapes[k] for k in ("h", "p", "g", "n", "chunk"))
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind} ({backend}), "
          f"dtype {dtype.name}, heads {h}, head_dim {p}, groups {g}, state {n}, chunk {q}, "
          f"kernel impl={impl!r}, {iters} timed iterations (median)")

    kernel = jax.jit(lambda i: ops.ssd(**i, chunk_size=q, impl=impl))
    ref = jax.jit(lambda i: reference.ssd_chunked(**i, chunk_size=q))
    header = (f"{'batch':>5} {'length':>6} | {'ref ms':>9} {'kernel ms':>9} {'speed-up':>8} | "
              f"{'kern GB/s':>9} {'ref GB/s':>8} | {'kern TFLOP/s':>12} {'ref TFLOP/s':>11} | "
              f"{'max|dy|':>8}")
    print(header)
    print("-" * len(header))
    for l in lengths:
        for b in batches:
            inputs = make_inputs(b, l, h, p, g, n, dtype)
            moved = traffic_bytes(b, l, h, p, g, n, dtype.itemsize)
            work = flops(b, l, h, p, n, q)
            results = {}
            for name, fn in (("ref", ref), ("kernel", kernel)):
                try:
                    results[name] = time_fn(fn, inputs, iters)
                except Exception as err:  # noqa: BLE001 - report OOM and carry on
                    results[name] = (None, None)
                    print(f"  {name} failed at batch {b}, length {l}: "
                          f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
            (t_ref, out_ref), (t_kern, out_kern) = results["ref"], results["kernel"]
            ms = lambda t: f"{t * 1e3:9.3f}" if t else f"{'-':>9}"  # noqa: E731
            rate = lambda v, t, w: f"{v / t / 1e9:{w}.1f}" if t else f"{'-':>{w}}"  # noqa: E731
            tflops = lambda t, w: f"{work / t / 1e12:{w}.2f}" if t else f"{'-':>{w}}"  # noqa: E731
            speedup = f"{t_ref / t_kern:7.2f}x" if t_ref and t_kern else f"{'-':>8}"
            diff = (f"{float(jnp.max(jnp.abs(out_kern[0] - out_ref[0]))):8.1e}"
                    if out_ref is not None and out_kern is not None else f"{'-':>8}")
            print(f"{b:>5} {l:>6} | {ms(t_ref)} {ms(t_kern)} {speedup} | "
                  f"{rate(moved, t_kern, 9)} {rate(moved, t_ref, 8)} | "
                  f"{tflops(t_kern, 12)} {tflops(t_ref, 11)} | {diff}")
            del inputs, results, out_ref, out_kern


if __name__ == "__main__":
    main()
