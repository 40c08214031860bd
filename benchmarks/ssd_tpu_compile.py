"""Compile the SSD op for TPU v5e and v4 on this host (no TPU needed) and print, per
topology and direction, XLA:TPU's per-chip memory and the compile time.

    pip install -e ".[tpu]"                      # libtpu, the TPU compiler
    python -m benchmarks.ssd_tpu_compile         # Codestral shapes, bfloat16
    python -m benchmarks.ssd_tpu_compile --small # the test's shape
    python -m benchmarks.ssd_tpu_compile --json ssd-tpu.json  # also the record eval.doc_tables renders

"forward" is ``ops.ssd`` (the Pallas kernel, picked from the inputs' TPU devices);
"backward" returns its outputs and the VJP of all seven inputs through its custom_vjp
(kernel forward, then the XLA reference's VJP). Memory is ``memory_analysis()`` of the
program compiled for one chip; "kernel VMEM" is the smallest scoped-VMEM limit (in
64 KiB steps) under which the forward kernel compiles (``aot.kernel_vmem_floor``).
Compile times are wall and CPU seconds on this host, which vary with its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import time

# Several processes may load libtpu at once on a host without TPU (e.g. this script
# beside the tests); without this libtpu refuses the second one ("multi-process lockfile").
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dynamax_jax.eval.doc_tables import SSD_TPU_HEADER, benchmark_record, finish_benchmark, ssd_tpu_line  # noqa: E402
from dynamax_jax.kernels.ssd import aot  # noqa: E402

MIB = 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="the test's shape, not Codestral's")
    parser.add_argument("--topologies", nargs="+", default=list(aot.TOPOLOGIES), choices=list(aot.TOPOLOGIES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the rows, the command, the date and the load to FILE (for eval.doc_tables)")
    args = parser.parse_args(argv)
    shape = (aot.SsdShape(b=2, l=300, h=4, p=64, g=2, n=128, q=128) if args.small
             else aot.CODESTRAL)
    dtype = jnp.dtype(args.dtype)
    record = benchmark_record("ssd_tpu_compile.py", argv) | {
        "jax": jax.__version__, "libtpu": importlib.metadata.version("libtpu"), "shape": dataclasses.asdict(shape),
        "dtype": dtype.name, "rows": []}
    print(f"ssd compiled for TPU: {shape}, x/B/C {dtype.name}, one chip of each topology "
          f"(host load average {record['load_before']:.1f})")
    print(SSD_TPU_HEADER)
    for topology in args.topologies:
        vmem = aot.kernel_vmem_floor(topology, shape, dtype)
        for direction in aot.DIRECTIONS:
            cpu_start = time.process_time()
            result = aot.compile_ssd(topology, direction, shape, dtype)
            m = result.memory
            record["rows"].append(dict(
                topology=topology, direction=direction, arguments_mib=m.argument_size_in_bytes / MIB,
                outputs_mib=m.output_size_in_bytes / MIB, temporaries_mib=m.temp_size_in_bytes / MIB,
                total_mib=result.total_bytes / MIB, mosaic_kernels=len(result.mosaic_kernels),
                kernel_vmem_kib=None if vmem is None or direction != "forward" else vmem // 2**10,
                lower_s=result.lower_s, compile_s=result.compile_s, compile_cpu_s=time.process_time() - cpu_start))
            print(ssd_tpu_line(record["rows"][-1]), flush=True)
    finish_benchmark(record, "ssd_tpu_compile", args.json)


if __name__ == "__main__":
    main()
