"""Every corpus of the training commands, built from files every machine has without a network.

- The pretraining corpus (``build_corpus``, ``python -m train.corpus``): the English prose
  that ships with the Python standard library (module/class/function docstrings, blocks of
  ``#`` comments and the language-reference topics of ``pydoc_data.topics``), optionally
  plus local files, split into train and held-out sets. Documents are split by a hash of
  their *unit* (the module path for standard-library text, the topic name for reference
  topics, the file and paragraph or line for local files), so the split never changes when
  other files come and go and held-out modules are never seen in training. The same Python
  version gives the same corpus byte for byte.
- The embedded distillation corpus (``DEFAULT_CORPUS``, ``default_corpus/
  stdlib_docstrings.jsonl``): one document per module or class of a fixed list of
  standard-library modules. The shipped file is the corpus; ``--rebuild-embedded`` rewrites it.
- Local files (``file_documents``, ``read_documents``): ``.jsonl``/``.json`` (one document
  per line, from a text field), ``.parquet`` (one per row of a text column) and ``.txt``.
  A ``.txt`` file is one document per blank-line separated paragraph for pretraining (a
  fine-grained held-out split of a long book) and one document for distillation (its rows
  are packed across documents, so a book keeps its context).

    python -m train.corpus                     # print sizes of the pretraining corpus
    python -m train.corpus --out runs/corpus   # also write train.txt / heldout.txt
    python -m train.corpus --rebuild-embedded  # rewrite default_corpus/stdlib_docstrings.jsonl
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from dynamax_jax.io import DataError, read_jsonl, write_text_atomic

DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_corpus",
                              "stdlib_docstrings.jsonl")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
FINEWEB_EDU = "HuggingFaceFW/fineweb-edu:sample-10BT"

# Directories of the standard library that hold test data, vendored code or
# generated tables rather than prose.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests",
                        "idle_test", "_vendor", "ensurepip", "lib2to3", "config-3"})
_MIN_CHARS = 80          # shorter docstrings/comments are mostly "Return x." noise
_MIN_WORDS = 12
_MIN_LETTER_FRACTION = 0.7
_DOCUMENT_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_COMMENT_LINE = re.compile(r"^[ \t]*#(?![!])[ ]?(.*)$")


@dataclasses.dataclass(frozen=True)
class Document:
    """One piece of text and the unit (module path, topic, file) that decides its split."""

    unit: str
    text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: tuple[str, ...]
    heldout: tuple[str, ...]

    def sizes(self) -> dict[str, int]:
        return {"train_documents": len(self.train), "train_chars": sum(map(len, self.train)),
                "heldout_documents": len(self.heldout), "heldout_chars": sum(map(len, self.heldout))}


def is_prose(text: str) -> bool:
    """Keep long enough text that is mostly letters and spaces (drops tables, code, ASCII art)."""
    if len(text) < _MIN_CHARS or len(text.split()) < _MIN_WORDS:
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return letters / len(text) >= _MIN_LETTER_FRACTION


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted in place so that os.walk visits directories in a fixed order.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def docstrings(source: str) -> list[str]:
    """Cleaned (dedented) module, class and function docstrings of one source file, in
    source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, _DOCUMENT_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append((getattr(node, "lineno", 0), doc))
    return [doc for _, doc in sorted(found, key=lambda item: item[0])]


def comment_blocks(source: str) -> list[str]:
    """Runs of consecutive full-line ``#`` comments, joined into paragraphs.

    A line-based scan: a ``#`` line inside a multi-line string is taken as a comment too,
    which is rare and harmless for a language-model corpus (``tokenize`` would be exact
    but is much slower over the whole standard library)."""
    blocks, current = [], []
    for line in source.splitlines():
        match = _COMMENT_LINE.match(line)
        if match:
            current.append(match.group(1).rstrip())
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return ["\n".join(block).strip() for block in blocks]


def stdlib_documents(root: Path | None = None) -> list[Document]:
    """Docstrings and comment blocks of every standard-library module, plus the language
    reference topics, in a fixed order."""
    root = root or stdlib_root()
    documents = []
    for path in _stdlib_files(root):
        unit = path.relative_to(root).as_posix()
        source = path.read_text(encoding="utf-8", errors="replace")
        documents += [Document(unit, text) for text in docstrings(source)]
        documents += [Document(unit, text) for text in comment_blocks(source)]
    documents += reference_topics()
    return documents


def reference_topics() -> list[Document]:
    """The language-reference chapters that ``help()`` shows (``pydoc_data.topics``)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [Document(f"pydoc_data.topics/{name}", topics[name].strip()) for name in sorted(topics)]


def file_documents(path: str | os.PathLike, text_field: str = "text", paragraphs: bool = True) -> list[Document]:
    """Documents of a local file (``LOCAL_SUFFIXES``), texts as stored: a ``.txt`` file gives
    one document per blank-line separated paragraph (``paragraphs``) or one for the whole
    file; a ``.jsonl``/``.json`` file one per line, from its ``text_field`` string; a
    ``.parquet`` file one per non-null row of column ``text_field``. Unreadable content
    raises ``DataError`` naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if not paragraphs:
            return [Document(path.name, text)]
        pieces = [p.strip() for p in re.split(r"\n[ \t]*\n", text)]
        return [Document(f"{path.name}#{i}", p) for i, p in enumerate(pieces) if p]
    if path.suffix in (".jsonl", ".json"):
        documents = []
        for line, row in read_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise DataError(f"{path}, line {line}: expected an object with a string field {text_field!r}")
            documents.append(Document(f"{path.name}:{line}", row[text_field]))
        return documents
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise DataError(f"{path}: no column {text_field!r}; columns: {', '.join(schema.names)}")
        column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
        return [Document(f"{path.name}#{i}", t) for i, t in enumerate(column) if t is not None]
    raise DataError(f"unsupported corpus file {str(path)!r}: expected a {'/'.join(LOCAL_SUFFIXES)} file")


def local_files(path: str) -> list[str]:
    """``path`` itself, or the ``LOCAL_SUFFIXES`` files below a directory, in sorted order."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist (expected a {'/'.join(LOCAL_SUFFIXES)} "
                        f"file, a directory of them, or a Hugging Face dataset id such as {FINEWEB_EDU!r})")
    if os.path.isfile(path):
        if not path.endswith(LOCAL_SUFFIXES):
            raise DataError(f"data file {path!r} has an unsupported type; supported: {', '.join(LOCAL_SUFFIXES)}")
        return [path]
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.endswith(LOCAL_SUFFIXES))
    if not files:
        raise DataError(f"data directory {path!r} holds no {', '.join(LOCAL_SUFFIXES)} files")
    return files


def read_documents(data: str | None, text_field: str = "text") -> list[str]:
    """The distillation documents of a local source (a file or directory; ``None``: the
    embedded corpus), non-empty ones in file order, a ``.txt`` file as one document. Raises
    ``DataError`` naming the file for anything unreadable or empty."""
    files = [DEFAULT_CORPUS] if data is None else local_files(data)
    texts: list[str] = []
    for path in files:
        try:
            texts += [doc.text for doc in file_documents(path, text_field, paragraphs=False)]
        except DataError:
            raise
        except (OSError, UnicodeDecodeError, ValueError) as e:  # pyarrow errors are ValueErrors
            raise DataError(f"cannot read data file {path!r}: {type(e).__name__}: {e}") from e
    texts = [t for t in texts if t.strip()]
    if not texts:
        source = "the embedded default corpus" if data is None else repr(data)
        raise DataError(f"the corpus {source} is empty: no document has any text "
                        f"(read {len(files)} file(s), field {text_field!r})")
    return texts


def is_heldout(unit: str, heldout_percent: float) -> bool:
    """Stable split: the first 8 bytes of sha256(unit) pick a point in [0, 100)."""
    digest = int.from_bytes(hashlib.sha256(unit.encode("utf-8")).digest()[:8], "big")
    return digest / 2**64 * 100 < heldout_percent


def split(documents: Iterable[Document], heldout_percent: float = 5.0, min_chars_filter: bool = True) -> Corpus:
    """Filter (prose only), deduplicate (first occurrence wins) and split ``documents``."""
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout_percent must be in (0, 100), got {heldout_percent}")
    seen, train, heldout = set(), [], []
    for doc in documents:
        if (min_chars_filter and not is_prose(doc.text)) or doc.text in seen:
            continue
        seen.add(doc.text)
        (heldout if is_heldout(doc.unit, heldout_percent) else train).append(doc.text)
    return Corpus(tuple(train), tuple(heldout))


def build_corpus(files: Sequence[str | os.PathLike] = (), use_stdlib: bool = True,
                 heldout_percent: float = 5.0) -> Corpus:
    """The default corpus (standard library) and/or local ``.txt``/``.jsonl`` files."""
    if not use_stdlib and not files:
        raise ValueError("empty corpus: give corpus files or keep the standard-library corpus")
    documents = stdlib_documents() if use_stdlib else []
    for path in files:
        documents += [Document(doc.unit, doc.text.strip()) for doc in file_documents(path)]
    corpus = split(documents, heldout_percent)
    if not corpus.train or not corpus.heldout:
        raise ValueError(f"corpus split left an empty side: {corpus.sizes()}; "
                         "add more documents or change --heldout-percent")
    return corpus


def sample(texts: Sequence[str], max_chars: int) -> list[str]:
    """The documents of ``texts``, in order, that fit in a budget of ``max_chars`` (a
    document that would overflow it is skipped, later shorter ones may still fit)."""
    chosen, used = [], 0
    for text in texts:
        if used + len(text) <= max_chars:
            chosen.append(text)
            used += len(text)
    return chosen


def write_jsonl(path: str | os.PathLike, texts: Sequence[str]) -> None:
    """One ``{"text": ...}`` object per line, written atomically."""
    write_text_atomic(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))


# ----------------------------------------------------------------------------- embedded corpus
# One document per module or class of a fixed list of pure-Python standard-library modules: its
# docstring followed by the docstrings of its public functions and methods.

EMBEDDED_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib",
    "email.message", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html",
    "html.parser", "http.client", "http.cookies", "http.server", "imaplib", "inspect",
    "ipaddress", "json", "locale", "logging", "logging.handlers", "mailbox", "mimetypes",
    "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "quopri", "random",
    "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "webbrowser", "xml.dom.minidom", "zipfile", "zipimport", "_pydecimal",
)
EMBEDDED_MAX_CHARS = 700_000  # keeps the file well under 1 MB
EMBEDDED_MIN_CHARS = 200  # one-line docstrings are too short to be useful documents


def _doc(obj) -> str:
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    return inspect.cleandoc(doc) if doc else ""


def _members(owner, module_name: str):
    """Public functions/classes defined in ``module_name``, in source order."""
    out = []
    for name, value in vars(owner).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module_name:
            continue
        if inspect.isfunction(value) or inspect.isclass(value):
            try:
                line = inspect.getsourcelines(value)[1]
            except (OSError, TypeError):
                line = sys.maxsize
            out.append((line, name, value))
    return [(name, value) for _, name, value in sorted(out, key=lambda t: (t[0], t[1]))]


def embedded_documents():
    """Yield ``(title, text)`` for each module, then each of its classes."""
    for module_name in EMBEDDED_MODULES:
        module = importlib.import_module(module_name)
        public = module_name.lstrip("_")
        functions, classes = [], []
        for name, value in _members(module, module.__name__):
            (classes if inspect.isclass(value) else functions).append((name, value))
        parts = [_doc(module)] + [f"{name}{_signature(fn)}\n{_doc(fn)}" for name, fn in functions if _doc(fn)]
        yield public, "\n\n".join(p for p in parts if p)
        for name, cls in classes:
            methods = [(m, f) for m, f in vars(cls).items()
                       if not m.startswith("_") and inspect.isfunction(f) and _doc(f)]
            parts = [_doc(cls)] + [f"{m}{_signature(f)}\n{_doc(f)}" for m, f in methods]
            yield f"{public}.{name}", "\n\n".join(p for p in parts if p)


def _signature(fn) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def write_embedded_corpus(path: str | os.PathLike = DEFAULT_CORPUS) -> None:
    """Rewrite the embedded distillation corpus: one ``{"title", "text"}`` object per line, in
    a fixed order (the shipped file was made with CPython 3.11). The same interpreter version
    writes the same text except where a signature's default value is an object whose repr
    depends on the process (a memory address, the logging handlers alive)."""
    seen, total, lines = set(), 0, []
    for title, text in embedded_documents():
        if len(text) < EMBEDDED_MIN_CHARS or text in seen:
            continue
        seen.add(text)
        text = f"{title}\n\n{text}"
        if total + len(text) > EMBEDDED_MAX_CHARS:
            break
        total += len(text)
        lines.append(json.dumps({"title": title, "text": text}, ensure_ascii=False))
    write_text_atomic(path, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} documents, {total} characters to {path}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="*", default=[], help="local .txt / .jsonl files to add")
    parser.add_argument("--no-stdlib", action="store_true", help="use only --files")
    parser.add_argument("--heldout-percent", type=float, default=5.0, help="share of units held out")
    parser.add_argument("--out", help="directory to write train.txt and heldout.txt into")
    parser.add_argument("--heldout-sample", help="write a .jsonl sample of the held-out split here")
    parser.add_argument("--heldout-sample-chars", type=int, default=20000,
                        help="size budget of --heldout-sample in characters")
    parser.add_argument("--rebuild-embedded", nargs="?", const=DEFAULT_CORPUS, metavar="PATH",
                        help="only rewrite the embedded distillation corpus (default path: "
                             "train/default_corpus/stdlib_docstrings.jsonl)")
    args = parser.parse_args(argv)
    if args.rebuild_embedded:
        write_embedded_corpus(args.rebuild_embedded)
        return
    corpus = build_corpus(args.files, not args.no_stdlib, args.heldout_percent)
    print(json.dumps({"python": sys.version.split()[0], **corpus.sizes()}))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, docs in (("train.txt", corpus.train), ("heldout.txt", corpus.heldout)):
            write_text_atomic(out / name, "\n\n".join(docs) + "\n")
    if args.heldout_sample:
        write_jsonl(args.heldout_sample, sample(corpus.heldout, args.heldout_sample_chars))


if __name__ == "__main__":
    main()
