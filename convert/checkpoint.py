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
directories are built under a temporary name beside the target and renamed when complete
(``dynamax_jax.io.atomic_directory``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import dynamax_jax.convert.mistral  # noqa: F401  (registers mistral and llama)
from dynamax_jax.convert.errors import (CheckpointError, ConfigError, CorruptFileError, MissingTensorError,
                                        ShapeMismatchError, UnsupportedModelError)
from dynamax_jax.convert.safetensors_io import CheckpointReader, write_sharded
from dynamax_jax.convert.tables import architecture, architecture_for_config, hf_tensors, load_params
from dynamax_jax.io import atomic_directory, read_json_object

# What ``save_hf`` writes (fnmatch patterns): weights, their index, config.json.
HF_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
# Files copied next to converted weights when the source directory has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


def read_checkpoint_json(path, name: str) -> dict:
    """The JSON object in file ``name`` of checkpoint directory ``path``; ``CheckpointError``
    when it is absent, ``CorruptFileError`` naming it when it is not a JSON object."""
    file = Path(path) / name
    if not file.exists():
        raise CheckpointError(f"{path}: no {name}")
    return read_json_object(file, CorruptFileError)


def read_hf_config(path) -> dict:
    """``config.json`` of a checkpoint directory as a dict (clear errors when absent/corrupt)."""
    return read_checkpoint_json(path, "config.json")


def load_checkpoint(path, dtype=jnp.float32, progress: bool = False):
    """``(config, params)`` from a Hugging Face directory, a Codestral Mamba directory or a
    ``.gguf`` file (see the module docstring). Params are cast to ``dtype``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            from dynamax_jax.convert.gguf import load_gguf
            return load_gguf(path, dtype, progress=progress)
        raise UnsupportedModelError(
            f"{path}: unsupported checkpoint file; expected a .gguf file or a directory with "
            "config.json + model.safetensors (or its index), or params.json + consolidated.safetensors")
    if (path / "params.json").exists() and (path / "consolidated.safetensors").exists():
        from dynamax_jax.convert.mamba2 import load_codestral
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


def write_hf_dir(config, params, directory, max_shard_bytes: int = 5 * 2**30, progress: bool = False):
    """Write ``config.json`` and the safetensors weights (sharded above ``max_shard_bytes``)
    into an existing ``directory`` (not atomic; ``save_hf`` wraps it)."""
    directory = Path(directory)
    arch = architecture_for_config(config)
    specs, get = hf_tensors(config, params, arch)
    hf_config = dict(config.to_hf_config())
    first_dtype = next(iter(specs.values()))[1] if specs else np.dtype(np.float32)
    hf_config.setdefault("dtype", np.dtype(first_dtype).name)  # "float32", "bfloat16", ...
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    from tqdm.auto import tqdm

    with tqdm(total=len(specs), disable=not progress, desc="writing", unit="tensor") as bar:
        write_sharded(directory, specs, get, max_shard_bytes=max_shard_bytes,
                      on_tensor=lambda name: bar.update(1))


def save_hf(config, params, out_dir, max_shard_bytes: int = 5 * 2**30, progress: bool = False,
            overwrite: bool = False) -> None:
    """Write ``config`` + ``params`` as a Hugging Face checkpoint directory (config.json +
    model.safetensors, or shards + index) that ``transformers.AutoModelForCausalLM``
    loads. Atomic: ``out_dir`` appears only when complete. An existing ``out_dir`` holding
    only such files is replaced; one holding anything else (a tokenizer, exit heads, notes)
    is refused unless ``overwrite``, which replaces the ``HF_FILES`` and keeps the rest."""
    with atomic_directory(out_dir, owned=HF_FILES, overwrite=overwrite) as tmp:
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
        from dynamax_jax.convert.gguf import load_gguf_tokenizer
        return load_gguf_tokenizer(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path} (expected a checkpoint directory or a .gguf file)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


__all__ = [
    "CheckpointError", "ConfigError", "CorruptFileError", "HF_FILES", "MissingTensorError", "ShapeMismatchError",
    "TOKENIZER_FILES", "UnsupportedModelError", "copy_tokenizer", "load_checkpoint", "load_tokenizer",
    "read_hf_config", "save_hf", "write_hf_dir",
]
