"""dynamax_jax.io: atomic writes leave the target old or new, never half-written; JSON-lines
errors name the 1-based line; dtype names."""

import json
import os

import jax.numpy as jnp
import pytest

from dynamax_jax import io


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
