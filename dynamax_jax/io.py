"""Files: atomic writes, JSON-lines reading and dtype names, shared by every package.

Writers never leave half-written output where a reader could find it: a file or directory
is built under a temporary name beside its target and renamed into place when complete
(``os.replace``, atomic on one file system); after a failure the temporary is removed and
the target is as it was.

    with atomic_directory(out) as tmp:   # write into tmp; tmp becomes out on success
        (tmp / "config.json").write_text(...)
    write_json_atomic(out / "summary.json", {"loss": 0.4})
    for line, row in read_jsonl("data.jsonl"):   # 1-based line numbers, blank lines skipped
        ...
    dtype = parse_dtype("bfloat16")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax.numpy as jnp

# The weight dtypes a command line may name (``choices=DTYPES``).
DTYPES = ("float32", "bfloat16", "float16")


class DataError(ValueError):
    """Input data cannot be used: unparsable, missing a field, empty or out of range. The
    message names the file (and line or row) at fault."""


def parse_dtype(name: str):
    """The dtype called ``name`` (one of ``DTYPES``); ``ValueError`` lists the choices."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return jnp.dtype(name)


def _make_public(path: Path) -> None:
    """``mkstemp``/``mkdtemp`` make private entries; give the result the umask's permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(dst, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``dst``; on success it replaces ``dst`` (an
    existing one is removed only after the new one is complete, and only when
    ``overwrite``); on failure it is deleted and ``dst`` is left untouched."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    _make_public(tmp)
    try:
        yield tmp
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "dir")
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old / "dir", dst)  # put the previous directory back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so that writers which pick the
    format from the name, such as ``savefig``, still do); on success it replaces ``path``,
    on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _make_public(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path, obj: Any, *, indent: int | None = 2, default=None) -> None:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically; ``default`` as in
    ``json.dumps``."""
    write_text_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


def read_jsonl(path) -> Iterator[tuple[int, Any]]:
    """``(line_number, value)`` for every non-blank line of the JSON-lines file ``path``,
    line numbers counted from 1. A line that is not valid JSON raises ``DataError`` naming
    the file and the line."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {line_number}: not valid JSON ({err.msg})") from None
            yield line_number, value


__all__ = ["DTYPES", "DataError", "atomic_directory", "atomic_file", "parse_dtype", "read_jsonl",
           "write_json_atomic", "write_text_atomic"]
