"""The strict safetensors reader (convert/safetensors_io.py): every file the official
``safetensors.safe_open`` refuses, it refuses too, naming the file and tensor; a valid file
reads the same through both."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open

from dynamax_jax.convert import safetensors_io
from dynamax_jax.convert.errors import CorruptFileError


F32_4 = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes


def _file(path: Path, header, data: bytes, *, raw_header: bytes | None = None, length: int | None = None) -> Path:
    """A safetensors file with exactly this header (dict, or raw bytes) and data section; the
    8-byte length is the header's unless ``length`` is given."""
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(dtype: str, shape, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


HOSTILE = {
    "overlapping offsets": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 8, 24)}, F32_4 + F32_4[:8], {}),
    "same range twice": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 0, 16)}, F32_4, {}),
    "gap between tensors": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 20, 36)}, F32_4 * 3, {}),
    "first tensor not at 0": ({"a": _entry("F32", [4], 4, 20)}, b"\0" * 4 + F32_4, {}),
    "end before begin": ({"a": _entry("F32", [0], 16, 0)}, F32_4, {}),
    "offsets past the end": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 16, 32)}, F32_4, {}),
    "bytes after the last tensor": ({"a": _entry("F32", [4], 0, 16)}, F32_4 + b"\0" * 8, {}),
    "size disagrees with shape": ({"a": _entry("F32", [4], 0, 12)}, F32_4[:12], {}),
    "negative offset": ({"a": _entry("F32", [4], -16, 0)}, F32_4, {}),
    "string in shape": ({"a": _entry("F32", ["4"], 0, 16)}, F32_4, {}),
    "float in shape": ({"a": _entry("F32", [4.0], 0, 16)}, F32_4, {}),
    "negative dimension": ({"a": _entry("F32", [-4], 0, 16)}, F32_4, {}),
    "three offsets": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 16]}}, F32_4, {}),
    "unknown dtype": ({"a": _entry("F31", [4], 0, 16)}, F32_4, {}),
    "missing data_offsets": ({"a": {"dtype": "F32", "shape": [4]}}, F32_4, {}),
    "metadata value not a string": ({"__metadata__": {"format": 1}, "a": _entry("F32", [4], 0, 16)}, F32_4, {}),
    "header is a list": (None, F32_4, {"raw_header": b"[1, 2]"}),
    "header not UTF-8": (None, F32_4, {"raw_header": b'{"\xff": 1}'}),
    "header not JSON": (None, F32_4, {"raw_header": b"{not json"}),
    "header length past the end": ({"a": _entry("F32", [4], 0, 16)}, F32_4, {"length": 10_000}),
    "header length over 100 MB": ({"a": _entry("F32", [4], 0, 16)}, F32_4, {"length": 100_000_001}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_safetensors_refused_like_the_reference(case, tmp_path):
    header, data, overrides = HOSTILE[case]
    path = _file(tmp_path / "model.safetensors", header, data, **overrides)
    with pytest.raises(SafetensorError):  # the reference implementation refuses it ...
        with safe_open(str(path), framework="numpy") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: (corrupt safetensors header|truncated)"):
        safetensors_io.read_header(path)  # ... and so does ours, naming the file
    with pytest.raises(CorruptFileError):
        safetensors_io.CheckpointReader(tmp_path)


def test_short_file_refused_like_the_reference(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\0\0")
    with pytest.raises(SafetensorError):
        safe_open(str(path), framework="numpy")
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: truncated"):
        safetensors_io.read_header(path)


def test_overlap_message_names_the_tensor(tmp_path):
    header, data, _ = HOSTILE["overlapping offsets"]
    path = _file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CorruptFileError, match=r"'b' has invalid data_offsets \[8, 24\]: it overlaps"):
        safetensors_io.read_header(path)


@pytest.mark.parametrize("order", ["offset order", "reversed", "with empty tensor"])
def test_valid_files_read_the_same_as_the_reference(order, tmp_path):
    b = np.arange(6, dtype=np.int64).reshape(2, 3)
    header = {"a": _entry("F32", [4], 0, 16), "b": _entry("I64", [2, 3], 16, 64)}
    if order == "reversed":
        header = dict(reversed(header.items()))
    if order == "with empty tensor":
        header["e"] = _entry("BF16", [0, 5], 64, 64)
    header["__metadata__"] = {"format": "pt"}
    path = _file(tmp_path / "model.safetensors", header, F32_4 + b.tobytes())
    with safe_open(str(path), framework="numpy") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()} if order != "with empty tensor" else None
        ref_keys = set(f.keys())
    with safetensors_io.CheckpointReader(path) as reader:
        assert set(reader.names()) == ref_keys
        ours = {k: reader.read(k) for k in reader.names()}
    np.testing.assert_array_equal(ours["a"], np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(ours["b"], b)
    if ref is not None:  # (safetensors' numpy API has no bfloat16)
        for k in ref:
            np.testing.assert_array_equal(ours[k], ref[k])
            assert ours[k].dtype == ref[k].dtype
