"""dynamax_jax.io: atomic writes leave the target old or new, never half-written; JSON-lines
errors name the 1-based line; dtype names."""

import json
import os
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

import dynamax_jax as dx
from dynamax_jax import io
from tests.conftest import file_tree


def _entries(directory):
    return sorted(p.name for p in directory.iterdir())


def test_atomic_directory_replaces_or_keeps_the_old_one(tmp_path):
    out = tmp_path / "out"
    with io.atomic_directory(out, owned=("*.txt",)) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "a.txt").write_text("one")
        assert not out.exists()  # nothing visible before the block ends
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_directory(out, owned=("*.txt",)) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "one"
    with io.atomic_directory(out, owned=("*.txt",)) as tmp:
        (tmp / "b.txt").write_text("three")
    assert _entries(out) == ["b.txt"]
    assert _entries(tmp_path) == ["out"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private mode
    with pytest.raises(FileExistsError):  # b.txt is not what this writer makes
        with io.atomic_directory(out, owned=("*.json",)):
            pass


def test_atomic_files(tmp_path):
    path = tmp_path / "sub" / "x.json"
    io.write_json_atomic(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and path.read_text().endswith("\n")
    with pytest.raises(TypeError):
        io.write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    io.write_json_atomic(path, {"a": object()}, default=lambda _: "x")
    assert json.loads(path.read_text()) == {"a": "x"}
    with io.atomic_file(tmp_path / "plot.png") as tmp:
        assert tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    io.write_text_atomic(tmp_path / "t.md", "é\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "é\n"
    assert _entries(tmp_path) == ["plot.png", "sub", "t.md"] and _entries(tmp_path / "sub") == ["x.json"]


def test_read_jsonl_numbers_lines_from_one(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n  \n[2]\n')
    assert list(io.read_jsonl(path)) == [(1, {"a": 1}), (4, [2])]
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(io.DataError, match=r"rows.jsonl, line 3: not valid JSON"):
        list(io.read_jsonl(path))
    assert issubclass(io.DataError, ValueError)


def test_parse_dtype():
    assert io.parse_dtype("bfloat16") == jnp.bfloat16
    assert [io.parse_dtype(n) for n in io.DTYPES] == [jnp.float32, jnp.bfloat16, jnp.float16]
    with pytest.raises(ValueError, match="unknown dtype 'int8'; choose one of float32, bfloat16, float16"):
        io.parse_dtype("int8")


_HOLD_LOCK = """
import sys, time
from dynamax_jax.io import output_lock
with output_lock(sys.argv[1], command="holder"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_output_lock_refuses_a_second_writer_with_the_holders_pid(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "out")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(io.OutputLockedError, match=rf"in use by PID {holder.pid} on .* \(holder\)"):
            with io.output_lock(tmp_path / "out"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with io.output_lock(tmp_path / "out", command="second"):  # the kernel released the dead holder's lock
        with io.atomic_directory(tmp_path / "out", owned=("a.txt",)) as tmp:  # writers leave the lock in place
            (tmp / "a.txt").write_text("a")
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [io.LOCK_NAME, "a.txt"]
        with pytest.raises(io.OutputLockedError):
            with io.output_lock(tmp_path / "out"):  # one process, two holders: refused as well
                pass


def test_fingerprint_names_the_content(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(bytes(1000))
    (model / "config.json").write_text("{}")
    first = io.fingerprint(model)
    (model / ".hidden").write_text("ignored")
    (model / "out").mkdir()
    (model / "out" / "run.json").write_text("{}")
    assert io.fingerprint(model, exclude=[model / "out"]) == first != io.fingerprint(model)
    (model / "weights.bin").write_bytes(bytes(999) + b"\1")
    assert io.fingerprint(model, exclude=[model / "out"]) != first
    # Above the whole-file size, sampled bytes plus size and mtime: a change between samples
    # is still seen through the modification time.
    monkeypatch.setattr(io, "_WHOLE_FILE_BYTES", 100)
    monkeypatch.setattr(io, "_SAMPLE_BYTES", 10)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(10_000))
    before = io.fingerprint(big)
    data = bytearray(10_000)
    data[5_003] = 1  # between the samples at 4,662 and 5,328
    big.write_bytes(bytes(data))
    os.utime(big, ns=(1, 1))
    assert io.fingerprint(big) != before


def test_overwrite_replaces_only_the_writers_own_files(tmp_path):
    from dynamax_jax import io

    out = tmp_path / "out"
    out.mkdir()
    for name in ("notes.txt", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "config.json"):
        (out / name).write_text("old " + name)
    owned = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
    with pytest.raises(RuntimeError):  # a failed write changes nothing
        with io.atomic_directory(out, owned=owned, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError
    assert len(list(out.iterdir())) == 5 and (out / "config.json").read_text() == "old config.json"
    with io.atomic_directory(out, owned=owned, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").write_text("new")
    # the stale shards of the previous checkpoint went with it; the notes stayed
    assert file_tree(out) == {"config.json": b"new", "model.safetensors": b"new", "notes.txt": b"old notes.txt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path, exits_dir):
    import socket
    import subprocess

    # a write killed mid-way (os._exit skips every cleanup, as SIGKILL would)
    code = ("import os, sys; from dynamax_jax import io\n"
            "with io.atomic_directory(sys.argv[1], owned=('*',)) as tmp:\n"
            "    (tmp / 'big.bin').write_bytes(b'x' * 1000)\n"
            "    os._exit(9)\n")
    area = tmp_path / "area"
    area.mkdir()
    out = area / "exits"
    assert subprocess.run([sys.executable, "-c", code, str(out)], cwd=Path(__file__).parents[1]).returncode == 9
    [left] = [p.name for p in area.iterdir() if p.name.startswith(".exits.tmp-")]
    host, dead = socket.gethostname(), _dead_pid()
    keep = [f".exits.tmp-{os.getpid()}@{host}-live0000",  # a write in progress (this process)
            f".exits.tmp-{dead}@another-host-x1234567",  # another host's (shared file system)
            ".exits.tmp-abcdefgh",  # no writer named: cannot be proven ours
            f".other.tmp-{dead}@{host}-x1234567"]  # another destination's
    stale = [f".exits.old-{dead}@{host}-y1234567", f".exits.json.tmp-{dead}@{host}-z1234567.json"]
    for name in keep + stale:
        (area / name).mkdir()
        (area / name / "f").write_text("x")
    exit_config, exit_params = dx.load_exits(exits_dir)
    dx.save_exits(exit_config, exit_params, out)
    names = {p.name for p in area.iterdir()}
    assert left not in names and not names & set(stale[:1]) and set(keep) <= names
    from dynamax_jax import io

    io.write_text_atomic(area / "exits.json", "{}")  # a file's temporaries, likewise
    assert stale[1] not in {p.name for p in area.iterdir()}
