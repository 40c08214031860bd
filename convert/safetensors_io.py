"""Reading and writing safetensors checkpoints tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end
of the header), then the raw little-endian bytes. The header is parsed here rather than
through ``safetensors.safe_open`` so that every tensor is read with ``readinto`` into a
fresh buffer: host memory holds only the tensors the caller keeps (a mapped file's
touched pages count as resident until unmapped). Loading onto a mesh needs slices rather
than whole tensors, so ``CheckpointReader.view`` maps one tensor at a time, for the
length of a ``with`` block, and the caller copies out the slice it needs.

``CheckpointReader`` opens ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``; ``write_safetensors`` / ``write_sharded`` write files
atomically (temp file, then ``os.replace``) from a callable that produces one tensor at a
time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from dynamax_jax.convert.errors import CheckpointError, CorruptFileError, MissingTensorError
from dynamax_jax.io import atomic_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Headers beyond this are certainly corrupt (the reference implementation caps at 100 MB).
_MAX_HEADER_BYTES = 100_000_000
# jax on CPU aliases host arrays aligned to 64 bytes instead of copying them.
ALIGNMENT = 64

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Stored dtypes a floating-point weight may be read from (cast to the requested dtype).
FLOAT_DTYPES = frozenset(DTYPES[name] for name in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))


def dtype_name(dtype) -> str:
    """The safetensors name (``"F32"``, ``"BF16"``, ...) of a numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors; "
                              f"supported: {', '.join(str(d) for d in _DTYPE_NAMES)}")
    return _DTYPE_NAMES[dtype]


def aligned_empty(shape: Sequence[int], dtype) -> np.ndarray:
    """An uninitialised array whose data starts on an ``ALIGNMENT``-byte boundary, so that
    ``jax.device_put`` on CPU can use it without a copy."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    __slots__ = ("file", "dtype", "shape", "begin", "end")

    def __init__(self, file: Path, dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int):
        self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end


def _nonneg_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one file's header. Returns ``(tensors, metadata)``.

    At least as strict as the reference implementation (``safetensors.safe_open``):
    the header length must fit the file and the 100 MB cap, the header must be a UTF-8
    JSON object whose ``__metadata__`` maps strings to strings, every entry must have a
    known dtype, a shape of non-negative integers and ``data_offsets`` that match its
    byte size; sorted by offset, the tensors must tile the data section exactly (no
    gap, no overlap, nothing past the end and nothing after the last tensor).

    Raises ``CorruptFileError`` naming the file (and the tensor, where one is at fault):
    "truncated" when the file is shorter than its header says, "corrupt safetensors
    header" otherwise."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES:
            raise CorruptFileError(f"{path}: corrupt safetensors header (claims {header_len} bytes)")
        if 8 + header_len > size:
            raise CorruptFileError(
                f"{path}: truncated safetensors file (header needs {8 + header_len} bytes, file has {size})")
        raw = f.read(header_len)

    def corrupt(why: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: corrupt safetensors header: {why}")

    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptFileError(f"{path}: corrupt safetensors header ({err})") from None

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("__metadata__ must map strings to strings")
    data_start = 8 + header_len
    entries = []  # (begin, end, name, dtype, shape)
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise corrupt(f"entry {name!r} must have the keys dtype, shape and data_offsets")
        dtype_str, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype_str not in DTYPES:
            raise corrupt(f"{name!r} has dtype {dtype_str!r}; supported: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_nonneg_int(s) for s in shape):
            raise corrupt(f"{name!r} has shape {shape!r}; expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_nonneg_int(o) for o in offsets)):
            raise corrupt(f"{name!r} has data_offsets {offsets!r}; expected [begin, end]")
        entries.append((offsets[0], offsets[1], name, DTYPES[dtype_str], tuple(shape)))

    tensors: dict[str, TensorInfo] = {}
    expected_begin = 0  # the reference sorts by offsets and requires each to start where the last ended
    for begin, end, name, dtype, shape in sorted(entries, key=lambda e: (e[0], e[1])):
        if begin != expected_begin or end < begin:
            what = "overlaps the previous tensor" if begin < expected_begin else (
                "leaves a gap before it" if begin > expected_begin else "ends before it begins")
            raise corrupt(f"{name!r} has invalid data_offsets [{begin}, {end}]: it {what} "
                          f"(expected to begin at {expected_begin})")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise corrupt(f"{name!r} has shape {shape} {_DTYPE_NAMES[dtype]} ({nbytes} bytes) "
                          f"but byte range [{begin}, {end})")
        tensors[name] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
        expected_begin = end
    if data_start + expected_begin > size:
        raise CorruptFileError(
            f"{path}: truncated safetensors file (tensors need {data_start + expected_begin} bytes, file has {size})")
    if data_start + expected_begin < size:
        raise corrupt(f"{size - data_start - expected_begin} bytes after the last tensor "
                      f"(the data section should end at byte {data_start + expected_begin})")
    return {name: tensors[name] for name in header}, metadata


class CheckpointReader:
    """Tensor-by-tensor access to a checkpoint directory (``model.safetensors`` or the shards
    of ``model.safetensors.index.json``) or to a single ``.safetensors`` file.

    ``read(name)`` returns a freshly allocated numpy array (bfloat16 as
    ``ml_dtypes.bfloat16``); use as a context manager to close the files."""

    def __init__(self, path, filenames: Iterable[str] | None = None):
        path = Path(path)
        self.path = path
        if path.is_file():
            files = [path]
        elif filenames is not None:
            files = [path / name for name in filenames]
        elif (path / INDEX_FILE).exists():
            files = self._shards_from_index(path / INDEX_FILE)
        elif (path / SINGLE_FILE).exists():
            files = [path / SINGLE_FILE]
        elif (path / "pytorch_model.bin").exists() or (path / "pytorch_model.bin.index.json").exists():
            raise CheckpointError(
                f"{path}: only safetensors weights are supported, found pytorch_model.bin; re-save it with "
                "transformers (model.save_pretrained(dir), which writes safetensors)")
        else:
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{file}: shard file is missing")
            tensors, _ = read_header(file)
            self.tensors.update(tensors)
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _shards_from_index(index_path: Path) -> list[Path]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptFileError(f"{index_path}: corrupt index file ({err!r})") from None
        return [index_path.parent / shard for shard in shards]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise MissingTensorError(f"{self.path}: checkpoint has no tensor '{name}'")
        return self.tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> np.dtype:
        """The stored numpy dtype of tensor ``name``."""
        return self.info(name).dtype

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new numpy array in its stored dtype."""
        info = self.info(name)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open(info.file, "rb")
        out = aligned_empty(info.shape, info.dtype)
        handle.seek(info.begin)
        got = handle.readinto(out.reshape(-1).view(np.uint8)) if out.size else 0
        if got != info.end - info.begin:
            raise CorruptFileError(f"{info.file}: truncated safetensors file (tensor '{name}' is cut short)")
        return out

    @contextlib.contextmanager
    def view(self, name: str) -> Iterator[np.ndarray]:
        """Tensor ``name`` memory-mapped read-only in its stored dtype, for the ``with`` block.
        Slicing it (after any transpose or reshape that numpy can do as a view) touches only
        the pages the slice covers; copy what you keep, as the map is released when the
        last view of it is gone."""
        info = self.info(name)
        if info.end == info.begin:  # nothing to map (an empty tensor)
            yield self.read(name)
            return
        yield np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.begin, shape=info.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


TensorSpec = tuple[tuple[int, ...], np.dtype]


def _header_bytes(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path, specs: Mapping[str, TensorSpec], get_tensor: Callable[[str], np.ndarray],
                      metadata: Mapping[str, str] | None = None, on_tensor: Callable[[str], None] | None = None):
    """Write one safetensors file holding the tensors named in ``specs`` (name -> (shape,
    dtype)), asking ``get_tensor(name)`` for each in turn, so only one tensor need exist at
    a time. Written atomically (``dynamax_jax.io.atomic_file``)."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(_header_bytes(specs, metadata))
            for name, (shape, dtype) in specs.items():
                array = np.asarray(get_tensor(name))
                if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                    raise CheckpointError(f"tensor '{name}' to write has shape {array.shape} {array.dtype}, "
                                          f"header promised {tuple(shape)} {np.dtype(dtype)}")
                # (every platform jax supports is little-endian, as the format is)
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
                if on_tensor is not None:
                    on_tensor(name)


def save_file(tensors: Mapping[str, np.ndarray], path, metadata: Mapping[str, str] | None = None) -> None:
    """Write a dict of numpy arrays as one safetensors file (atomically)."""
    specs = {name: (tuple(t.shape), np.asarray(t).dtype) for name, t in tensors.items()}
    write_safetensors(path, specs, lambda name: tensors[name], metadata)


def write_sharded(directory, specs: Mapping[str, TensorSpec], get_tensor: Callable[[str], np.ndarray],
                  max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None,
                  on_tensor: Callable[[str], None] | None = None) -> list[str]:
    """Write ``specs`` into ``directory`` as ``model.safetensors`` when it fits in one shard,
    else as ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``
    (the Hugging Face layout). Tensors are grouped in order; returns the file names."""
    directory = Path(directory)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[dict[str, TensorSpec]] = [{}]
    shard_bytes = 0
    total = 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = (shape, dtype)
        shard_bytes += nbytes
        total += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        write_safetensors(directory / SINGLE_FILE, shards[0], get_tensor, meta, on_tensor)
        return [SINGLE_FILE]
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        write_safetensors(directory / file_name, shard, get_tensor, meta, on_tensor)
        weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = directory / f".{INDEX_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, directory / INDEX_FILE)
    return names + [INDEX_FILE]
