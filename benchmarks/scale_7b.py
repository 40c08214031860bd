"""The 7B models compiled for TPU slices on this host (no TPU, no weights): per-chip memory
from XLA:TPU's ``memory_analysis()`` and the lower and compile times of every program, and the
XLA:CPU compile time of the decode step at 32 and 64 layers.

    pip install -e ".[tpu]"                                     # libtpu, the TPU compiler
    python -m benchmarks.scale_7b --json scale_7b.json          # the whole table (long)
    python -m benchmarks.scale_7b --models mistral --topologies v5e --meshes 1x8 --programs decode-b1
    python -m benchmarks.scale_7b --cpu-depth --models codestral # XLA:CPU compile at 32 and 64 layers

Models (``dynamax_jax.aot.PRESETS``): Mistral-7B-v0.1 and Codestral Mamba 7B, weights in
bfloat16, exits (``--exit-kind``, default ``ffn``) at the default layers, four over the latter
half. Programs, each lowered on abstract arrays placed on a ``data`` x ``model`` mesh of the
slice's devices by the sharding table:

- ``decode-b1`` / ``decode-b8``: ``decode_chunk`` of ``--decode-steps`` tokens at batch 1 / 8
  from a ``--cache-len`` cache (4,096 slots), exits on, the state donated;
- ``prefill``: ``prefill`` of one ``--prompt-len`` prompt (2,048 tokens) into that cache;
- ``distill``: one ``train.distill`` step (``jit_train_step``) at its default batch, 8 rows of
  256 tokens, float32 exit params and AdamW state;
- ``cached``: ``train.cached``'s backbone pass over the same batch.

Memory is per chip: arguments (weights, caches, batch), outputs, temporaries and the total
(arguments + outputs - outputs aliased to donated arguments + temporaries + code), next to
the chip's HBM (v5e 16 GiB, v4 32 GiB). A program XLA:TPU cannot fit is refused at compile time
("does not fit", with what it asked for). Times are wall seconds on this host, which is shared:
read them as the order of magnitude.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

# Several processes may load libtpu at once on a host without TPU (e.g. this script beside the
# tests); without this libtpu refuses the second one ("multi-process lockfile").
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dynamax_jax import aot  # noqa: E402
from dynamax_jax import sharding as S  # noqa: E402
from dynamax_jax.eval.doc_tables import TPU_HEADER, benchmark_record, finish_benchmark, tpu_line  # noqa: E402
from dynamax_jax.exits import ExitConfig  # noqa: E402
from dynamax_jax.io import write_text_atomic  # noqa: E402

GIB = 2**30
MODELS = {"mistral": "mistralai/Mistral-7B-v0.1", "codestral": "mistralai/Mamba-Codestral-7B-v0.1"}
PROGRAMS = ("decode-b1", "decode-b8", "prefill", "distill", "cached")
MESHES = {"v5e": ("1x8", "2x4", "8x1"), "v4": ("1x4", "4x1"), "v5e-32": ("4x8",)}
DEPTHS = (32, 64)


@dataclasses.dataclass
class Row:
    model: str
    topology: str
    mesh: str
    program: str
    arguments: float | None = None
    outputs: float | None = None
    temporaries: float | None = None
    total: float | None = None
    hbm: float | None = None
    lower_s: float | None = None
    compile_s: float | None = None
    error: str | None = None

    @property
    def fits(self) -> str:
        if self.error:
            return "does not fit" if _out_of_memory(self.error) else "fails"
        return "fits" if self.total <= self.hbm else "does not fit"


def _out_of_memory(message: str) -> bool:
    return "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()


def lower_program(program: str, config, mesh, args):
    """The ``jax.stages.Lowered`` of one program (``PROGRAMS``) on ``mesh``."""
    ec = ExitConfig(kind=args.exit_kind)
    dtype = jnp.dtype(args.dtype)
    if program.startswith("decode-b"):
        return aot.lower_decode(config, mesh, batch=int(program[len("decode-b"):]), cache_len=args.cache_len,
                                num_steps=args.decode_steps, exit_config=ec, dtype=dtype)
    if program == "prefill":
        return aot.lower_prefill(config, mesh, batch=1, prompt_len=args.prompt_len, cache_len=args.cache_len,
                                 exit_config=ec, dtype=dtype)
    if program == "distill":
        return aot.lower_distill_step(config, mesh, exit_config=ec, dtype=dtype)
    return aot.lower_cached_pass(config, mesh, exit_config=ec, dtype=dtype)


def measure(model: str, topology: str, mesh_spec: str, program: str, args) -> Row:
    """One program compiled for one mesh of ``topology``: its row of the table."""
    devices = aot.topology_devices(topology)
    row = Row(model, topology, mesh_spec, program, hbm=aot.device_hbm(devices[0]) / GIB)
    mesh = S.make_mesh(mesh_spec, devices=devices)
    start = time.perf_counter()
    try:
        result = aot.compile_timed(lambda: lower_program(program, aot.PRESETS[MODELS[model]], mesh, args))
    except Exception as err:  # XlaRuntimeError RESOURCE_EXHAUSTED when it does not fit; any other refusal
        row.error = " ".join(str(err).split())[:400]
        row.compile_s = time.perf_counter() - start
        return row
    m = result.memory
    row.arguments, row.outputs, row.temporaries = m.arguments / GIB, m.outputs / GIB, m.temporaries / GIB
    row.total, row.lower_s, row.compile_s = m.total / GIB, result.lower_s, result.compile_s
    return row


def depth_row(model: str, layers: int, args) -> dict:
    """XLA:CPU seconds to lower and compile the batch-1 decode step (exits on) of ``model``'s
    shape at ``layers`` layers, for this host's CPU device."""
    config = dataclasses.replace(aot.PRESETS[MODELS[model]], num_layers=layers)
    ec = ExitConfig(kind=args.exit_kind)
    result = aot.compile_timed(lambda: aot.lower_decode(
        config, None, batch=1, cache_len=args.cache_len, num_steps=args.decode_steps, exit_config=ec,
        dtype=jnp.dtype(args.cpu_dtype)))
    return dict(model=model, layers=layers, exits=list(ec.resolve(config).layers), lower_s=result.lower_s,
                compile_s=result.compile_s)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                   help="model configs to compile (Mistral-7B-v0.1, Codestral Mamba 7B; default both)")
    p.add_argument("--topologies", nargs="+", default=list(MESHES), choices=list(aot.TOPOLOGIES),
                   help="TPU slices: v5e (v5e-8), v4 (v4-8, megacore), v5e-32 (8 hosts) (default: all)")
    p.add_argument("--meshes", nargs="+", default=None,
                   help="DATAxMODEL meshes to compile for (default: 1x8 2x4 8x1 on a v5e-8, 1x4 4x1 on a v4-8's "
                        "4 devices, 4x8 on a v5e-32)")
    p.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS,
                   help="decode-b1/-b8: a decode_chunk call at batch 1/8; prefill: one prompt; distill: one "
                        "train.distill step at its default batch; cached: one train.cached pass (default: all)")
    p.add_argument("--exit-kind", default="ffn", choices=("calm", "ffn", "mamba"),
                   help="classifier of the exits (default: ffn)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="backbone weights on TPU")
    p.add_argument("--cache-len", type=int, default=4096, help="KV cache slots of the decode programs")
    p.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens of the prefill program")
    p.add_argument("--decode-steps", type=int, default=4, help="tokens per decode_chunk call")
    p.add_argument("--cpu-depth", action="store_true",
                   help="only the XLA:CPU compile time of the decode step at 32 and 64 layers")
    p.add_argument("--cpu-dtype", default="float32", choices=("bfloat16", "float32"),
                   help="weights of the XLA:CPU compile (float32: what runs fast on a CPU)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the rows, the command, the date and the load to FILE, after every row "
                        "(for eval.doc_tables)")
    return p.parse_args(argv)


def _write(path: str | None, record: dict) -> None:
    """The record so far, written after every row: a long run killed midway keeps its rows."""
    if path:
        write_text_atomic(Path(path), json.dumps({"scale_7b": [record]}, indent=1) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    weights = args.cpu_dtype if args.cpu_depth else args.dtype
    record = benchmark_record("scale_7b.py", argv) | {"jax": jax.__version__, "settings": vars(args)}
    print(f"jax {jax.__version__}; host load average {record['load_before']:.1f}; exits {args.exit_kind}; "
          f"weights {weights}; cache {args.cache_len}, prompt {args.prompt_len}, "
          f"{args.decode_steps} tokens per decode call\n", flush=True)
    if args.cpu_depth:
        print("| model shape | layers | exits at | lower s | XLA:CPU compile s |\n|---|---:|---|---:|---:|")
        record["cpu_depth"] = []
        for model in args.models:
            for layers in DEPTHS:
                r = depth_row(model, layers, args)
                record["cpu_depth"].append(r)
                _write(args.json, record)
                print(f"| {model} | {layers} | {','.join(map(str, r['exits']))} | {r['lower_s']:.1f} "
                      f"| {r['compile_s']:.1f} |", flush=True)
    else:
        record["tpu"] = []
        print(TPU_HEADER, flush=True)
        for topology in args.topologies:
            for mesh in args.meshes or MESHES[topology]:
                for model in args.models:
                    for program in args.programs:
                        row = measure(model, topology, mesh, program, args)
                        record["tpu"].append(dataclasses.asdict(row) | {"fits": row.fits})
                        print(tpu_line(record["tpu"][-1]), flush=True)
                        _write(args.json, record)
    finish_benchmark(record, "scale_7b", args.json)


if __name__ == "__main__":
    main()
