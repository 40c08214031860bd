"""Checkpoint conversion: Hugging Face safetensors, Codestral consolidated and GGUF <-> our
param pytrees.

    config, params = load_checkpoint(path, dtype=jnp.float32)
    save_hf(config, params, out_dir)            # loads with AutoModelForCausalLM.from_pretrained
    tokenizer = load_tokenizer(path)

``load_checkpoint`` dispatches on what ``path`` is:

- a ``.gguf`` file -> ``convert.gguf.load_gguf(path, dtype)``;
- a directory with ``params.json`` + ``consolidated.safetensors`` (Codestral Mamba release)
  -> ``convert.mamba2.load_codestral(path, dtype)``;
- a directory with ``config.json`` -> by ``model_type`` through ``convert.tables.REGISTRY``
  (``mistral``/``llama`` from ``convert/mistral.py``, ``mamba2`` registered by
  ``convert/mamba2.py``, imported lazily).

Adding an architecture: write a table (``convert/tables.py`` explains rows) and call
``convert.tables.register(Architecture(...))`` in its module; add the module to
``convert.tables.LAZY_MODULES`` if it should be imported on demand.

Every failure raises a ``convert.errors.CheckpointError`` (or ``ConfigError``) naming the
file, tensor or field at fault. Writers never leave half-written output: files and
directories are built under a temporary name beside the target and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import jax.numpy as jnp
import numpy as np

import convert.mistral  # noqa: F401  (registers mistral and llama)
from convert.errors import (CheckpointError, ConfigError, CorruptFileError, MissingTensorError,
                            ShapeMismatchError, UnsupportedModelError)
from convert.safetensors_io import CheckpointReader, write_sharded
from convert.tables import architecture, architecture_for_config, hf_tensors, load_params

# Files copied next to converted weights when the source directory has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
_DTYPE_NAMES = {np.dtype(jnp.float32): "float32", np.dtype(jnp.bfloat16): "bfloat16",
                np.dtype(jnp.float16): "float16"}


def read_hf_config(path) -> dict:
    """``config.json`` of a checkpoint directory as a dict (clear errors when absent/corrupt)."""
    file = Path(path) / "config.json"
    if not file.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        config = json.loads(file.read_text())
    except ValueError as err:
        raise CorruptFileError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CorruptFileError(f"{file}: expected a JSON object")
    return config


def load_checkpoint(path, dtype=jnp.float32, progress: bool = False):
    """``(config, params)`` from a Hugging Face directory, a Codestral Mamba directory or a
    ``.gguf`` file (see the module docstring). Params are cast to ``dtype``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            from convert.gguf import load_gguf
            return load_gguf(path, dtype, progress=progress)
        raise UnsupportedModelError(
            f"{path}: unsupported checkpoint file; expected a .gguf file or a directory with "
            "config.json + model.safetensors (or its index), or params.json + consolidated.safetensors")
    if (path / "params.json").exists() and (path / "consolidated.safetensors").exists():
        from convert.mamba2 import load_codestral
        return load_codestral(path, dtype)
    if not (path / "config.json").exists():
        raise CheckpointError(
            f"{path}: no config.json (Hugging Face) and no params.json + consolidated.safetensors (Codestral)")
    hf_config = read_hf_config(path)
    model_type = hf_config.get("model_type")
    if model_type is None:
        raise ConfigError(f"{path / 'config.json'} is missing the required field 'model_type'")
    arch = architecture(model_type)
    config = arch.config_from_hf(hf_config)
    with CheckpointReader(path) as reader:
        params = load_params(reader, config, arch, dtype, progress=progress)
    return config, params


@contextlib.contextmanager
def atomic_directory(out_dir, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; on success it replaces
    ``out_dir`` (an existing one is removed only after the new one is complete, and only
    when ``overwrite``); on failure it is deleted and ``out_dir`` is left untouched."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "dir")
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old / "dir", out_dir)  # put the previous directory back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_hf_dir(config, params, directory, max_shard_bytes: int = 5 * 2**30, progress: bool = False):
    """Write ``config.json`` and the safetensors weights (sharded above ``max_shard_bytes``)
    into an existing ``directory`` (not atomic; ``save_hf`` wraps it)."""
    directory = Path(directory)
    arch = architecture_for_config(config)
    specs, get = hf_tensors(config, params, arch)
    hf_config = dict(config.to_hf_config())
    first_dtype = next(iter(specs.values()))[1] if specs else np.dtype(np.float32)
    hf_config.setdefault("dtype", _DTYPE_NAMES.get(np.dtype(first_dtype), str(first_dtype)))
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    from tqdm.auto import tqdm

    with tqdm(total=len(specs), disable=not progress, desc="writing", unit="tensor") as bar:
        write_sharded(directory, specs, get, max_shard_bytes=max_shard_bytes,
                      on_tensor=lambda name: bar.update(1))


def save_hf(config, params, out_dir, max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> None:
    """Write ``config`` + ``params`` as a Hugging Face checkpoint directory (config.json +
    model.safetensors, or shards + index) that ``transformers.AutoModelForCausalLM``
    loads. Atomic: ``out_dir`` appears only when complete (an existing one is replaced)."""
    with atomic_directory(out_dir) as tmp:
        write_hf_dir(config, params, tmp, max_shard_bytes=max_shard_bytes, progress=progress)


def copy_tokenizer(src, directory) -> list[str]:
    """Put the tokenizer of checkpoint ``src`` into ``directory``: copies the tokenizer files
    of a source directory, or saves the tokenizer rebuilt from a ``.gguf`` file. Returns the
    file names written (empty when the source has no tokenizer)."""
    src, directory = Path(src), Path(directory)
    if src.is_file() and src.suffix == ".gguf":
        tokenizer = load_tokenizer(src)
        return [Path(p).name for p in tokenizer.save_pretrained(directory)]
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, directory / name)
            copied.append(name)
    return copied


def load_tokenizer(path):
    """The tokenizer of a checkpoint: ``AutoTokenizer.from_pretrained`` for a directory,
    ``convert.gguf.load_gguf_tokenizer`` for a ``.gguf`` file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from convert.gguf import load_gguf_tokenizer
        return load_gguf_tokenizer(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path} (expected a checkpoint directory or a .gguf file)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


__all__ = [
    "CheckpointError", "ConfigError", "CorruptFileError", "MissingTensorError", "ShapeMismatchError",
    "UnsupportedModelError", "atomic_directory", "copy_tokenizer", "load_checkpoint", "load_tokenizer",
    "read_hf_config", "save_hf", "write_hf_dir",
]
