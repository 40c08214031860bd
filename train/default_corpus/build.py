"""Rebuild ``stdlib_docstrings.jsonl``, the embedded default distillation corpus.

    python -m train.default_corpus.build

Each document is the documentation of one module or class of the Python standard
library (its docstring followed by the docstrings of its public functions and methods),
taken from a fixed list of pure-Python modules and written in a fixed order, so that
the same interpreter version always writes the same file. The shipped file was made
with CPython 3.11; docstrings are under the PSF license (see LICENSE beside it).
Rebuilding is never needed at run time: the file in the repository is the corpus.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys

MODULES = (
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
MAX_CHARS = 700_000  # keeps the file well under 1 MB
MIN_DOC_CHARS = 200  # one-line docstrings are too short to be useful documents


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


def documents():
    """Yield ``(title, text)`` for each module, then each of its classes."""
    for module_name in MODULES:
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


def main(out_path: str | None = None) -> None:
    out_path = out_path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "stdlib_docstrings.jsonl")
    seen, total, lines = set(), 0, []
    for title, text in documents():
        if len(text) < MIN_DOC_CHARS or text in seen:
            continue
        seen.add(text)
        text = f"{title}\n\n{text}"
        if total + len(text) > MAX_CHARS:
            break
        total += len(text)
        lines.append(json.dumps({"title": title, "text": text}, ensure_ascii=False))
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, out_path)
    print(f"wrote {len(lines)} documents, {total} characters to {out_path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
