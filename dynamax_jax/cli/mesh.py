"""The device-mesh and multi-host flags that every command line shares, and their set-up.

    parser = argparse.ArgumentParser(...)
    add_mesh_arguments(parser)               # --mesh, --distributed, --coordinator-address, ...
    args = parser.parse_args(argv)
    mesh = setup_mesh(parser, args, PROG, batch_size=args.batch_size)   # None: one device
    config, params = dx.load_pretrained(path, dtype, mesh=mesh)

``--mesh DATAxMODEL`` names a ``sharding.make_mesh`` mesh: the model's heads, MLP width,
Mamba inner width and vocabulary are split over ``MODEL`` devices, batch rows over ``DATA``.
``--distributed`` joins the processes of a multi-host run first (``join_cluster``); the mesh
then spans every host's devices. On such a run every process computes, and only process 0
(``is_main_process``) writes files or prints results: a command's output directory and its
lock belong to process 0, and every process must see the same file system there (process 0's
files are what the others read back, e.g. runs already done).

A mesh larger than the devices, a malformed ``--mesh`` or a batch that the data axis does not
divide fails here with a ``ShardingError`` naming the flags, before any work.
"""

from __future__ import annotations

import argparse
import os
import sys

from dynamax_jax.errors import ShardingError

CLUSTER_FLAGS = ("--coordinator-address", "--num-processes", "--process-id")

MESH_HELP = ("run on a DATAxMODEL device mesh, e.g. 1x8 or 2x4: the model's attention heads, MLP width, Mamba "
             "inner width and vocabulary are split over MODEL devices, batch rows over DATA (on CPU, simulate "
             "devices with XLA_FLAGS=--xla_force_host_platform_device_count=N)")


def add_mesh_arguments(parser: argparse.ArgumentParser, default: str | None = None, mesh_note: str = "",
                       distributed_note: str = "") -> argparse.ArgumentParser:
    """Declare ``--mesh`` (``default``: None is one device) and the multi-host flags
    ``--distributed``, ``--coordinator-address``, ``--num-processes``, ``--process-id`` and
    ``--distributed-timeout``. ``mesh_note`` ends ``--mesh``'s help, ``distributed_note``
    ``--distributed``'s: what a process of this command reads and writes."""
    parser.add_argument("--mesh", default=default, metavar="DATAxMODEL",
                        help=MESH_HELP + ("" if default is not None else "; default: one device")
                        + (f". {mesh_note}" if mesh_note else ""))
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host: call jax.distributed.initialize() first, one process per host (on TPU "
                             "VMs, SLURM and Open MPI it finds the coordinator itself; elsewhere give the three "
                             "flags below)" + (f". {distributed_note}" if distributed_note else ""))
    parser.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                        help="with --distributed: address of process 0's coordinator (or JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int, default=None, help="with --distributed: how many processes")
    parser.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
    parser.add_argument("--distributed-timeout", type=int, default=300, metavar="SECONDS",
                        help="with --distributed: how long a process waits for the others to join before it gives "
                             "up with one error line and exit status 2")
    return parser


def _cluster(args) -> dict:
    return {"coordinator_address": args.coordinator_address, "num_processes": args.num_processes,
            "process_id": args.process_id}


def start_distributed(parser: argparse.ArgumentParser, args, prog: str) -> None:
    """Check the multi-host flags (``parser.error`` on a bad combination) and, with
    ``--distributed``, join the other processes (``join_cluster``). Call before any other
    use of jax's devices."""
    if not args.distributed and any(v is not None for v in _cluster(args).values()):
        parser.error(f"{', '.join(CLUSTER_FLAGS[:-1])} and {CLUSTER_FLAGS[-1]} need --distributed")
    if args.distributed_timeout < 1:
        parser.error(f"--distributed-timeout must be >= 1, got {args.distributed_timeout}")
    if args.distributed:
        join_cluster(_cluster(args), args.distributed_timeout, prog)


def join_cluster(cluster: dict, timeout: int, prog: str) -> None:
    """``jax.distributed.initialize`` (``sharding.initialize_distributed``), saying first that
    this process waits for the others, at which address and for how long. jax aborts the
    process (SIGABRT, a C++ stack trace) when its own timeout passes, so a watchdog ends it
    first: one error line, exit status 2."""
    import threading

    from dynamax_jax import sharding as S

    address = (cluster.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
               or "the address the cluster environment gives")
    who = (f"process {cluster['process_id']} of {cluster['num_processes']}"
           if cluster.get("process_id") is not None and cluster.get("num_processes") is not None else "this process")
    print(f"{prog}: {who} waits up to {timeout} s for the others at coordinator {address} "
          "(--distributed-timeout)", file=sys.stderr, flush=True)

    def give_up():
        print(f"{prog}: error: the other processes did not join {who} at coordinator {address} within {timeout} s; "
              "start every process with the same --coordinator-address and --num-processes, or raise "
              "--distributed-timeout", file=sys.stderr, flush=True)
        os._exit(2)  # the main thread is blocked inside jax's C++ client: nothing else ends it

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        S.initialize_distributed(initialization_timeout=timeout + 60,
                                 **{k: v for k, v in cluster.items() if v is not None})
    finally:
        watchdog.cancel()


def setup_mesh(parser: argparse.ArgumentParser, args, prog: str, batch_size: int | None = None,
               batch_flag: str = "--batch-size"):
    """The mesh of ``--mesh`` (``None`` without it: one device), after ``start_distributed``.
    ``batch_size``: the rows of each batch the command runs, which the data axis must divide
    (``ShardingError`` naming ``batch_flag`` and ``--mesh``)."""
    from dynamax_jax import sharding as S

    if args.distributed and args.mesh is None:
        parser.error("--distributed needs --mesh: the mesh is what spans the processes' devices")
    start_distributed(parser, args, prog)
    if args.mesh is None:
        return None
    mesh = S.make_mesh(args.mesh)
    data, model = mesh.shape[S.DATA], mesh.shape[S.MODEL]
    if batch_size is not None and batch_size % data:
        raise ShardingError(f"{batch_flag} {batch_size} is not divisible by the data axis of --mesh {args.mesh} "
                            f"({data} devices): each of them takes an equal share of a batch's rows; give a "
                            f"{batch_flag} that is a multiple of {data}, or --mesh 1x{data * model}")
    return mesh


def is_main_process() -> bool:
    """Whether this process writes the command's files and prints its results: process 0 of
    a multi-host run, and the only process otherwise."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


__all__ = ["CLUSTER_FLAGS", "MESH_HELP", "add_mesh_arguments", "barrier", "is_main_process", "join_cluster",
           "setup_mesh", "start_distributed"]
