"""The multi-host path of ``train.distill --distributed``, on this machine: two processes
joined by ``jax.distributed`` (a local coordinator, gloo CPU collectives), 4 simulated
CPU devices each, one ``--mesh 8x1`` over the 8.

With P processes each one reads every P-th document (``train/data.py``), so a run's
batches depend on P. The single-process reference therefore runs on 8 devices with the
same global batches (the two processes' shares side by side, as ``global_batch`` lays
them out); the test checks that the losses of every step and the saved heads agree, and
that killing one process mid-run and restarting both resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dynamax_jax import exits as ex
from dynamax_jax import sharding as S
from tests.test_distill import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
# 16 rows per process and step: from step 17 on, the rows come from the second window of
# train/data.py's row shuffle (256 rows), whose state differs from process to process
STEPS, SAVE_EVERY, KILL_AFTER = 30, 5, 21
FLAGS = ("--exit-kind", "calm", "--exit-layers", "2,3", "--batch-size", "32", "--seq-len", "16", "--lr", "3e-3",
         "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--log-every", "1", "--mesh", "8x1",
         "--no-progress")

# The reference: one process, 8 devices, fed the global batches a 2-process run sees.
REFERENCE = textwrap.dedent("""
    import sys
    import numpy as np
    from dynamax_jax.api import load_tokenizer
    from dynamax_jax.train import data as D, distill as T

    model, out = sys.argv[1:3]
    settings = T.settings_from_args(T.build_parser().parse_args(["--model", model, "--out", out, *sys.argv[3:]]))
    run = T.Run(settings).prepare()
    encode, eos_id = D.encoder_from_tokenizer(load_tokenizer(model))
    shares = [D.make_dataset(settings.data, encode=encode, eos_id=eos_id, row_len=settings.seq_len,
                             batch_size=settings.batch_size // 2, seed=settings.seed, process_index=p,
                             process_count=2, text_field=settings.text_field) for p in range(2)]

    class SideBySide:  # process 0's rows, then process 1's
        def __init__(self, iterators):
            self.iterators = iterators
        def __next__(self):
            batches = [next(it) for it in self.iterators]
            return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        def get_state(self):
            return [it.get_state() for it in self.iterators]

    run.dataset = type("Shares", (), {"__iter__": lambda self: SideBySide([iter(d) for d in shares])})()
    run.train()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache: Path) -> dict[str, str]:
    # the restart compiles what the first launch compiled: share a compilation cache
    return {**S.xla_cpu_devices_flag(devices), "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _launch(model: Path, out: Path, flags) -> list[subprocess.Popen]:
    """Both processes of one 2-process run (stdout and stderr in out/../<name>-<p>.log)."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for p in range(2):
        log = open(out.parent / f"{out.name}-{p}.log", "a")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dynamax_jax.train.distill", "--model", str(model), "--out", str(out), *flags,
             "--distributed", "--coordinator-address", address, "--num-processes", "2", "--process-id", str(p)],
            cwd=ROOT, env=_env(4, out.parent / "jax-cache"), stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _logs(out: Path) -> str:
    return "\n".join((out.parent / f"{out.name}-{p}.log").read_text()[-3000:] for p in range(2))


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_after_one_is_killed(tmp_path):
    model = write_tiny_model(tmp_path / "tiny")
    # documents of very different lengths: the processes' data iterators drift apart, so a
    # resume that gave process 1 the state of process 0 would feed it other rows
    words = "the quick brown fox jumps over the lazy dog".split()
    rng = np.random.default_rng(0)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(1, 60))))}) + "\n")
    flags = (*FLAGS, "--data", str(tmp_path / "docs.jsonl"))
    reference, run = tmp_path / "reference", tmp_path / "two"

    procs = _launch(model, run, flags)  # started first: the reference runs while it starts up
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and all(p.poll() is None for p in procs):
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        step = json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0
        if step >= KILL_AFTER:
            break
        time.sleep(0.02)
    assert all(p.poll() is None for p in procs), "a process ended before the kill:\n" + _logs(run)
    os.kill(procs[1].pid, signal.SIGKILL)  # one host dies; the other one is stuck in a collective
    procs[1].wait()
    time.sleep(0.5)
    if procs[0].poll() is None:
        os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].wait()
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert KILL_AFTER <= step < STEPS and saved and saved[-1] < STEPS and not (run / "exits").exists()

    ref = subprocess.run([sys.executable, "-c", REFERENCE, str(model), str(reference), *flags], cwd=ROOT,
                         env=_env(8, tmp_path / "jax-cache"), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    procs = _launch(model, run, flags)  # both restart
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], _logs(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == saved[-1] >= 20, summary

    ref_losses, losses = _losses(reference), _losses(run)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(ref_losses, 4))) > STEPS // 2  # the batches differ from step to step
    (_, a), (_, b) = ex.load_exits(reference / "exits"), ex.load_exits(run / "exits")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(np.asarray(b[name]), np.asarray(a[name]), rtol=1e-4, atol=1e-5, err_msg=name)
