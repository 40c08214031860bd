"""Peak host memory of loading a ~1 GB checkpoint onto a mesh: load then place, against
creating every param already sharded (``load_pretrained(..., mesh=...)``).

Builds the synthetic float32 Llama checkpoint of ``benchmarks/convert_memory.py`` (~267M
params, hidden 1024, 12 layers, vocabulary 32000, 4 shards + index; written one tensor at a
time), then runs each case in fresh processes, one after the other:

(a) ``load_pretrained(path)`` then ``jax.device_put`` onto a 1x8 mesh (model=8) of 8
    simulated CPU devices in one process: the whole model on the host, then its shards;
(b) ``load_pretrained(path, mesh=1x8)`` in one process with the same 8 devices. The
    devices are host memory here, so the sharded params still add up to the param bytes:
    what (b) saves is the whole-model copy that (a) makes first;
(c) ``load_pretrained(path, mesh=1x8)`` in 4 processes of 2 CPU devices each, joined by
    ``jax.distributed.initialize`` on localhost: a pod's hosts, each reading only the
    blocks its devices hold, so each should stay well under the param bytes.

Each process reports its RSS before loading (``/proc/self/status`` VmRSS, after importing
jax and the library and making the mesh) and its peak (``getrusage(RUSAGE_SELF).ru_maxrss``
after the arrays are ready); the table gives both and the increase. Linux carries the
launching process's peak RSS into a child's ``ru_maxrss`` across ``exec`` (``subprocess``
spawns with ``vfork``), so the process that launches the cases stays small: it imports
neither numpy nor jax, and the checkpoint is written by a process of its own.

    python benchmarks/load_memory.py [--layers 12] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {
    "a": "(a) load, then device_put (model=8)",
    "b": "(b) load_pretrained(mesh=1x8)",
    "c": "(c) load_pretrained(mesh=1x8), 4 processes x 2",
}


def rss_now() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def child(case: str, model: str, cluster: list[str]) -> None:
    """One measured process: prints a JSON line with its RSS before loading and its peak."""
    import jax

    if cluster:
        address, processes, pid = cluster
        jax.distributed.initialize(coordinator_address=address, num_processes=int(processes),
                                   process_id=int(pid), initialization_timeout=300)
    import dynamax_jax as dx
    from dynamax_jax import sharding as S

    mesh = S.make_mesh("1x8")
    before = rss_now()
    start = time.perf_counter()
    if case == "a":
        config, params = dx.load_pretrained(model)
        params = jax.device_put(params, S.shardings_for(mesh, S.param_specs(config), params))
    else:
        config, params = dx.load_pretrained(model, mesh=mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    local = sum(shard.data.nbytes for leaf in jax.tree.leaves(params) for shard in leaf.addressable_shards)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"process": jax.process_index(), "before": before, "peak": peak, "seconds": seconds,
                      "local_device_bytes": local}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: str, model: Path) -> list[dict]:
    """Launch case ``case``'s processes and collect their reports."""
    processes, devices = (4, 2) if case == "c" else (1, 8)
    # (dynamax_jax.sharding.xla_cpu_devices_flag would import jax into this process)
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count="))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in range(processes):
        cluster = [address, str(processes), str(pid)] if processes > 1 else []
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", case, "--model", str(model), *cluster],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, text=True))
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"case {case} failed (exit status {proc.returncode})")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def print_table(param_bytes: int, results: dict[str, list[dict]]) -> None:
    mb = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    print(f"\nparam bytes: {param_bytes:,} ({mb(param_bytes)} MiB)")
    head = (f"{'case':48} {'proc':>4} {'RSS before':>11} {'peak RSS':>9} {'increase':>9} "
            f"{'incr/params':>11} {'on devices':>10} {'s':>6}")
    print(head + "\n" + "-" * len(head))
    for case, reports in results.items():
        for r in reports:
            increase = r["peak"] - r["before"]
            print(f"{CASES[case]:48} {r['process']:>4} {mb(r['before']):>11} {mb(r['peak']):>9} {mb(increase):>9} "
                  f"{increase / param_bytes:>11.2f} {mb(r['local_device_bytes']):>10} {r['seconds']:>6.1f}")
    print("(MiB; 'on devices' is the bytes of the process's own shards)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (12 gives ~267M params)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="build the checkpoint here and keep it (reused when it is already there)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("cluster", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model, args.cluster)

    if args.build:
        from benchmarks.convert_memory import build_checkpoint, synthetic_config

        args.build.mkdir(parents=True, exist_ok=True)
        return build_checkpoint(args.build, synthetic_config(args.layers))

    with tempfile.TemporaryDirectory(prefix="load_memory_") as tmp:
        model = (args.keep or Path(tmp)) / f"llama-{args.layers}-layers"
        index = model / "model.safetensors.index.json"  # written last
        if index.exists():
            print(f"reusing {model}")
        else:
            start = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--build", str(model), "--layers", str(args.layers)],
                           cwd=REPO, check=True)
            print(f"checkpoint written in {time.perf_counter() - start:.1f}s: {model}")
        param_bytes = json.loads(index.read_text())["metadata"]["total_size"]
        results = {case: run_case(case, model) for case in CASES}
    print_table(param_bytes, results)


if __name__ == "__main__":
    main()
