"""Files: atomic writes, JSON-lines reading and dtype names, shared by every package.

Writers never leave half-written output where a reader could find it: a file or directory
is built under a temporary name beside its target and renamed into place when complete
(``os.replace``, atomic on one file system); after a failure the temporary is removed and
the target is as it was. A directory writer names the entries it owns and never deletes
anything else (``atomic_directory``). Temporaries are named ``.NAME.tmp-PID@HOST-*`` so
that the next write to the same target removes those of a killed writer.

    with atomic_directory(out, owned=("config.json",)) as tmp:   # tmp becomes out on success
        (tmp / "config.json").write_text(...)
    write_json_atomic(out / "summary.json", {"loss": 0.4})
    for line, row in read_jsonl("data.jsonl"):   # 1-based line numbers, blank lines skipped
        ...
    dtype = parse_dtype("bfloat16")

A run that writes into a directory for a while holds it alone (``output_lock``), and what a
cache, checkpoint or run was computed from is named by content (``fingerprint``):

    with output_lock(out, command="python -m train.cached"):   # a second writer is refused
        digest = fingerprint(model_dir, exclude=(out,))
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax.numpy as jnp
from dynamax_jax.errors import DataError, OutputLockedError  # noqa: F401  (importable from here too)

# The weight dtypes a command line may name (``choices=DTYPES``).
DTYPES = ("float32", "bfloat16", "float16")
# The lock file ``output_lock`` keeps inside a directory it guards; writers never move it.
LOCK_NAME = ".dynamax.lock"


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


def _temp_prefix(dst: Path, kind: str) -> str:
    """``.NAME.KIND-PID@HOST-``: a temporary beside ``dst`` that names its writer, so that a
    later write can tell one left by a dead process from one still being written."""
    return f".{dst.name}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(dst) -> list[Path]:
    """Delete the temporaries (``.NAME.tmp-*``, ``.NAME.old-*``) that an atomic write to
    ``dst`` left behind when it was killed: only those whose name says they were made on
    this host by a process that no longer runs. Returns what was removed."""
    dst = Path(dst).absolute()
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(?:tmp|old)-(\d+)@(.+)-[^-]+")
    removed = []
    if not dst.parent.is_dir():
        return removed
    host = socket.gethostname()
    for entry in dst.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or match.group(2) != host or _process_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _owned_test(owned) -> Callable[[str], bool]:
    if callable(owned):
        return owned
    patterns = (owned,) if isinstance(owned, str) else tuple(owned)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_destination(dst, owned: Iterable[str] | Callable[[str], bool] = (), overwrite: bool = False) -> list[str]:
    """The entries of directory ``dst`` that ``owned`` (as in ``atomic_directory``) does not
    cover; raises ``FileExistsError`` when there are any and not ``overwrite``, or when
    ``dst`` is a file. Lets a command refuse a destination before doing the work."""
    dst = Path(dst).absolute()
    if not (dst.exists() or dst.is_symlink()):
        return []
    if not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")
    is_owned = _owned_test(owned)
    foreign = sorted(p.name for p in dst.iterdir() if p.name != LOCK_NAME and not is_owned(p.name))
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{dst} already exists and holds files this writer did not make ({shown}); choose another "
            "directory, or pass overwrite=True (--overwrite) to write into it, keeping those files")
    return foreign


@contextlib.contextmanager
def atomic_directory(dst, owned: Iterable[str] | Callable[[str], bool] = (), overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``dst`` to write into; on success its
    entries become ``dst``'s, on failure it is deleted and ``dst`` is left as it was.

    ``owned``: the names (``fnmatch`` patterns, or a predicate) of the entries this writer
    produces, e.g. ``("config.json", "model*.safetensors")``. An existing ``dst`` that holds
    nothing else (a previous write of the same kind) is replaced whole, atomically. One
    that holds anything else is refused (``FileExistsError`` naming a few entries) unless
    ``overwrite``; then only owned entries are replaced or, when the new write lacks them,
    removed, one by one, and the rest is kept. A ``dst`` that is a file is always refused.

    Temporaries left beside ``dst`` by a killed write (``remove_stale_temporaries``) are
    deleted first."""
    dst = Path(dst).absolute()
    is_owned = _owned_test(owned)
    foreign = check_destination(dst, is_owned, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dst)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst, "tmp"), dir=dst.parent))
    _make_public(tmp)
    try:
        yield tmp
        if not dst.exists():
            os.replace(tmp, dst)
            return
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst, "old"), dir=dst.parent))
        try:
            if not foreign and not (dst / LOCK_NAME).exists():  # all of it is ours: swap the whole directory
                os.replace(dst, old / "dir")
                try:
                    os.replace(tmp, dst)
                except BaseException:
                    os.replace(old / "dir", dst)  # put the previous directory back
                    raise
            else:
                _merge(tmp, dst, old, is_owned)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _merge(tmp: Path, dst: Path, old: Path, is_owned: Callable[[str], bool]) -> None:
    """Move ``tmp``'s entries into ``dst`` and drop ``dst``'s owned entries that ``tmp`` lacks,
    parking each replaced entry in ``old``; on failure put back what was moved."""
    new = {p.name for p in tmp.iterdir()}
    moved: list[str] = []  # names parked in old
    placed: list[str] = []  # names moved from tmp into dst
    try:
        for entry in sorted(dst.iterdir()):
            if entry.name != LOCK_NAME and (entry.name in new or is_owned(entry.name)):
                os.replace(entry, old / entry.name)
                moved.append(entry.name)
        for name in sorted(new):
            os.replace(tmp / name, dst / name)
            placed.append(name)
    except BaseException:
        for name in placed:
            os.replace(dst / name, tmp / name)
        for name in moved:
            os.replace(old / name, dst / name)
        raise
    tmp.rmdir()


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so that writers which pick the
    format from the name, such as ``savefig``, still do); on success it replaces ``path``,
    on failure it is removed (and one left by a killed write is removed by the next)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), suffix=path.suffix, dir=path.parent)
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


def read_json_object(path, error: type[Exception] = DataError, what: str = "a JSON object", hint: str = "") -> dict:
    """The JSON object in file ``path``. When it is not UTF-8 JSON, or not an object, raises
    ``error`` naming the file, saying what was expected (``what``) and adding ``hint`` (the
    flag that starts over, say)."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err}){tail}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected {what}, found {type(value).__name__}{tail}")
    return value


def read_jsonl(path) -> Iterator[tuple[int, Any]]:
    """``(line_number, value)`` for every non-blank line of the JSON-lines file ``path``,
    line numbers counted from 1. A line that is not UTF-8 or not valid JSON raises
    ``DataError`` naming the file and the line."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}, line {line_number}: not valid UTF-8 (byte {raw[err.start:err.start + 1]!r} "
                                f"at byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {line_number}: not valid JSON ({err.msg})") from None
            yield line_number, value


@contextlib.contextmanager
def output_lock(directory, command: str = "") -> Iterator[Path]:
    """Hold ``directory`` (created if absent) alone for the length of the ``with`` block: an
    exclusive ``flock`` on ``directory/.dynamax.lock``, which the kernel releases when the
    process ends however it ends. A second writer is refused at once with
    ``OutputLockedError`` naming the holder's PID, host and command. Yields the directory."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            try:
                info = json.loads(holder)
                who = (f"PID {info['pid']} on {info['host']}" + (f" ({info['command']})" if info.get("command") else "")
                       + f", since {info['since']}")
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise OutputLockedError(f"{directory} is in use by {who}; wait for it to finish or choose another "
                                    "output directory") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield directory
    finally:
        os.close(fd)  # releases the lock


# Files up to this size are hashed whole; larger ones (model weights) are sampled.
_WHOLE_FILE_BYTES = 64 * 2**20
_SAMPLE_BYTES = 2**20
_SAMPLES = 16


def fingerprint(path, exclude: Iterable = ()) -> str:
    """A sha256 naming the content of a file, or of a directory's files (names and bytes;
    hidden entries and anything under ``exclude`` left out). Files up to 64 MiB are hashed
    whole. A larger file (model weights) is named by its size, its modification time and 16
    evenly spaced 1 MiB samples: rewriting it in place changes the name even where the
    samples miss the change, and reading gigabytes is avoided."""
    path = Path(path).absolute()
    excluded = tuple(Path(e).absolute() for e in exclude)
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and not any(p == e or e in p.parents for e in excluded))
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0{stat.st_size}\0".encode())
        with open(file, "rb") as f:
            if stat.st_size <= _WHOLE_FILE_BYTES:
                for block in iter(lambda: f.read(2**20), b""):
                    digest.update(block)
                continue
            digest.update(f"{stat.st_mtime_ns}\0".encode())
            step = (stat.st_size - _SAMPLE_BYTES) / (_SAMPLES - 1)
            for i in range(_SAMPLES):
                f.seek(int(i * step))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


__all__ = ["DTYPES", "DataError", "LOCK_NAME", "OutputLockedError", "atomic_directory", "atomic_file",
           "check_destination", "fingerprint", "output_lock", "parse_dtype", "read_json_object", "read_jsonl", "remove_stale_temporaries",
           "write_json_atomic", "write_text_atomic"]
