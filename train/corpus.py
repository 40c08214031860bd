"""A deterministic English corpus that every machine has without a network.

The default corpus is the English prose that ships with the Python standard library:
module/class/function docstrings, blocks of ``#`` comments and the language-reference
topics of ``pydoc_data.topics``. Local ``.txt`` files (one document per blank-line
separated paragraph block... no: one document per file) and ``.jsonl`` files (one document
per line, from its ``"text"`` field) can be added or used instead.

Documents are split into train and held-out sets by a hash of their *unit* (the module
path for standard-library text, the topic name for reference topics, the file path and
line number for local files), so the split never changes when other files come and go
and held-out modules are never seen in training. The same Python version gives the same
corpus byte for byte.

    python -m train.corpus                     # print sizes of the default corpus
    python -m train.corpus --out runs/corpus   # also write train.txt / heldout.txt
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Sequence

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
    but is ~20x slower over the whole standard library)."""
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


def file_documents(path: str | os.PathLike) -> list[Document]:
    """Documents of a local file: a ``.txt`` file gives one document per blank-line
    separated paragraph (so a long book still gets a fine-grained train/held-out split); a
    ``.jsonl`` file gives one document per line, from its ``"text"`` field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        paragraphs = [p.strip() for p in re.split(r"\n[ \t]*\n", text)]
        return [Document(f"{path.name}#{i}", p) for i, p in enumerate(paragraphs) if p]
    if path.suffix == ".jsonl":
        documents = []
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{line_number}: expected an object with a string 'text' field")
                documents.append(Document(f"{path.name}:{line_number}", row["text"].strip()))
        return documents
    raise ValueError(f"unsupported corpus file {str(path)!r}: expected a .txt or .jsonl file")


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
        documents += file_documents(path)
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
    """One ``{"text": ...}`` object per line, written to a temporary name then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                   encoding="utf-8")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="*", default=[], help="local .txt / .jsonl files to add")
    parser.add_argument("--no-stdlib", action="store_true", help="use only --files")
    parser.add_argument("--heldout-percent", type=float, default=5.0, help="share of units held out")
    parser.add_argument("--out", help="directory to write train.txt and heldout.txt into")
    parser.add_argument("--heldout-sample", help="write a .jsonl sample of the held-out split here")
    parser.add_argument("--heldout-sample-chars", type=int, default=20000,
                        help="size budget of --heldout-sample in characters")
    args = parser.parse_args(argv)
    corpus = build_corpus(args.files, not args.no_stdlib, args.heldout_percent)
    print(json.dumps({"python": sys.version.split()[0], **corpus.sizes()}))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, docs in (("train.txt", corpus.train), ("heldout.txt", corpus.heldout)):
            tmp = out / f".{name}.tmp"
            tmp.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
            tmp.replace(out / name)
    if args.heldout_sample:
        write_jsonl(args.heldout_sample, sample(corpus.heldout, args.heldout_sample_chars))


if __name__ == "__main__":
    main()
