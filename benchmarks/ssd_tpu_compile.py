"""Compile the SSD op for TPU v5e and v4 on this host (no TPU needed) and print, per
topology and direction, XLA:TPU's per-chip memory and the compile time.

    pip install -e ".[tpu]"                      # libtpu, the TPU compiler
    python -m benchmarks.ssd_tpu_compile         # Codestral shapes, bfloat16
    python -m benchmarks.ssd_tpu_compile --small # the test's shape

"forward" is ``ops.ssd`` (the Pallas kernel, picked from the inputs' TPU devices);
"backward" returns its outputs and the VJP of all seven inputs through its custom_vjp
(kernel forward, then the XLA reference's VJP). Memory is ``memory_analysis()`` of the
program compiled for one chip; "kernel VMEM" is the smallest scoped-VMEM limit (in
64 KiB steps) under which the forward kernel compiles (``aot.kernel_vmem_floor``).
Compile times are wall and CPU seconds on this host, which vary with its load.
"""

from __future__ import annotations

import argparse
import os
import time

# Several processes may load libtpu at once on a host without TPU (e.g. this script
# beside the tests); without this libtpu refuses the second one ("multi-process lockfile").
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax.numpy as jnp  # noqa: E402

from dynamax_jax.kernels.ssd import aot  # noqa: E402

MIB = 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="the test's shape, not Codestral's")
    parser.add_argument("--topologies", nargs="+", default=list(aot.TOPOLOGIES), choices=list(aot.TOPOLOGIES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    shape = (aot.SsdShape(b=2, l=300, h=4, p=64, g=2, n=128, q=128) if args.small
             else aot.CODESTRAL)
    dtype = jnp.dtype(args.dtype)
    print(f"ssd compiled for TPU: {shape}, x/B/C {dtype.name}, one chip of each topology "
          f"(host load average {os.getloadavg()[0]:.1f})")
    print("| topology | direction | arguments MiB | outputs MiB | temporaries MiB | total MiB "
          "| kernel VMEM | Mosaic kernels | lower s | compile s (wall / CPU) |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for topology in args.topologies:
        vmem = aot.kernel_vmem_floor(topology, shape, dtype)
        for direction in aot.DIRECTIONS:
            cpu_start = time.process_time()
            result = aot.compile_ssd(topology, direction, shape, dtype)
            cpu_s = time.process_time() - cpu_start
            m = result.memory
            vmem_text = "n/a" if vmem is None or direction != "forward" else f"{vmem // 2**10} KiB"
            print(f"| {topology} | {direction} | {m.argument_size_in_bytes / MIB:.1f} "
                  f"| {m.output_size_in_bytes / MIB:.1f} | {m.temp_size_in_bytes / MIB:.1f} "
                  f"| {result.total_bytes / MIB:.1f} | {vmem_text} | {len(result.mosaic_kernels)} "
                  f"| {result.lower_s:.1f} | {result.compile_s:.1f} / {cpu_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
