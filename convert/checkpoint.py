"""Checkpoint conversion: Hugging Face safetensors, Codestral consolidated and GGUF <-> our
param pytrees.

    config, params = load_checkpoint(path, dtype=jnp.float32)
    save_hf(config, params, out_dir)            # loads with AutoModelForCausalLM.from_pretrained
    tokenizer = load_tokenizer(path)

``load_checkpoint`` first turns a Hugging Face hub id (``owner/name[@revision]``, when no
such local path exists) into a directory of the local hub cache (``resolve_checkpoint``:
the cache first, the hub only when the files are not cached and it may be reached;
weights, config and tokenizer files only), then dispatches on what the path is:

- a ``.gguf`` file -> ``convert.gguf.load_gguf(path, dtype)``;
- a directory with ``params.json`` + ``consolidated.safetensors`` (Codestral Mamba release)
  -> ``convert.mamba2.load_codestral(path, dtype)``;
- a directory with ``config.json`` -> by ``model_type`` through ``convert.tables.REGISTRY``
  (``mistral``/``llama`` from ``convert/mistral.py``, ``mamba2`` registered by
  ``convert/mamba2.py``, imported lazily).

Adding an architecture: write a table (``convert/tables.py`` explains rows) and call
``convert.tables.register(Architecture(...))`` in its module; add the module to
``convert.tables.LAZY_MODULES`` if it should be imported on demand.

With ``mesh`` (a ``data`` x ``model`` ``jax.sharding.Mesh``) every param is created already
sharded by ``dynamax_jax.sharding.param_specs``, each process reading only the slices its
devices hold (``convert.tables.load_params``).

Every failure raises a ``convert.errors.CheckpointError`` (or ``ConfigError``) naming the
file, tensor or field at fault. Writers never leave half-written output: files and
directories are built under a temporary name beside the target and renamed when complete
(``dynamax_jax.io.atomic_directory``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import dynamax_jax.convert.mistral  # noqa: F401  (registers mistral and llama)
from dynamax_jax.convert.errors import (CheckpointError, ConfigError, CorruptFileError, HubCheckpointError,
                                        MissingTensorError, ShapeMismatchError, UnsupportedModelError)
from dynamax_jax.convert.safetensors_io import CheckpointReader, write_sharded
from dynamax_jax.convert.tables import architecture, architecture_for_config, hf_tensors, load_params
from dynamax_jax.io import atomic_directory, read_json_object

# What ``save_hf`` writes (fnmatch patterns): weights, their index, config.json.
HF_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
# Files copied next to converted weights when the source directory has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


# A Hugging Face hub id: owner/name, optionally @revision (a branch, tag or commit hash).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-][\w./-]*))?")
# Names that end so are files the user meant, not repositories.
_FILE_SUFFIXES = (".gguf", ".safetensors", ".json", ".bin")
# What is fetched for a hub id: weights and config in Hugging Face layout, and the tokenizer.
# The Codestral Mamba release files are fetched only for a repository without config.json,
# as repositories that ship both layouts would otherwise be downloaded twice.
HUB_FILES = HF_FILES + TOKENIZER_FILES
CODESTRAL_FILES = ("params.json", "consolidated.safetensors")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "consolidated.safetensors")


def parse_hub_id(value) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``value`` is a string that names no existing local path
    and reads as ``owner/name[@revision]``; ``None`` otherwise (a path to use as it is)."""
    if not isinstance(value, str) or Path(value).expanduser().exists():
        return None
    match = HUB_ID.fullmatch(value)
    if match is None or match["repo"].endswith(_FILE_SUFFIXES) or ".." in value:
        return None
    return match["repo"], match["revision"]


def resolve_checkpoint(path_or_id) -> Path:
    """The local path of a checkpoint: ``path_or_id`` itself when it is not a hub id (see
    ``parse_hub_id``), else that repository's snapshot in the Hugging Face cache
    (``HF_HUB_CACHE``, or ``HF_HOME``/hub). A cached snapshot holding weights is used
    without asking the hub; otherwise the weights, config and tokenizer files
    (``HUB_FILES``) are downloaded, unless ``HF_HUB_OFFLINE`` is set. Raises
    ``HubCheckpointError`` naming the id when it is not cached and the hub is out of reach,
    or when the hub refuses it."""
    parsed = parse_hub_id(path_or_id)
    if parsed is None:
        return Path(path_or_id)
    snapshot = _hub_snapshot(path_or_id, *parsed, HUB_FILES)
    if not (snapshot / "config.json").exists():  # a Codestral Mamba release repository
        snapshot = _hub_snapshot(path_or_id, *parsed, CODESTRAL_FILES)
    return snapshot


def hub_cache_dir() -> Path | None:
    """The hub cache named by the environment now (``HF_HUB_CACHE``, else ``HF_HOME``/hub);
    ``None`` for huggingface_hub's default. Read at each call: huggingface_hub reads these
    once, when it is imported."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    return Path(os.environ["HF_HOME"]).expanduser() / "hub" if os.environ.get("HF_HOME") else None


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, now or when
    huggingface_hub was imported."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_snapshot(name: str, repo: str, revision: str | None, patterns) -> Path:
    """Snapshot directory of ``repo`` at ``revision`` holding ``patterns``: the cache
    first, then the hub (see ``resolve_checkpoint``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    cache = hub_cache_dir()
    kwargs = dict(repo_id=repo, revision=revision, allow_patterns=list(patterns), cache_dir=cache)
    offline = hub_offline()
    try:
        local = Path(snapshot_download(**kwargs, local_files_only=True))
        if offline or any((local / f).exists() for f in _WEIGHTS):
            return local
    except LocalEntryNotFoundError:
        if offline:
            raise HubCheckpointError(_not_cached(name, repo, revision, cache, "HF_HUB_OFFLINE is set")) from None
    try:
        return Path(snapshot_download(**kwargs))
    except LocalEntryNotFoundError as err:
        raise HubCheckpointError(_not_cached(name, repo, revision, cache,
                                             f"the hub could not be reached ({err})")) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError, HfHubHTTPError) as err:
        raise HubCheckpointError(f"{name!r} is not a local path, and the Hugging Face hub refused it as a "
                                 f"repository id: {type(err).__name__}: {err}") from None


def _not_cached(name: str, repo: str, revision: str | None, cache: Path | None, why: str) -> str:
    from huggingface_hub import constants

    where = cache if cache is not None else constants.HF_HUB_CACHE
    rev = f" --revision {revision}" if revision else ""
    return (f"{name!r} is not a local path, and the Hugging Face hub repository {repo!r}"
            f"{f' at revision {revision!r}' if revision else ''} is not in the local cache ({where}) "
            f"while {why}. Fetch it on a machine with network (`hf download {repo}{rev}`, or "
            f"`huggingface-cli download {repo}{rev}` with older huggingface_hub) into a cache this "
            "machine reads (HF_HUB_CACHE or HF_HOME), or pass a local checkpoint directory or .gguf file.")


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


def load_checkpoint(path, dtype=jnp.float32, progress: bool = False, mesh=None):
    """``(config, params)`` from a Hugging Face directory, a Codestral Mamba directory, a
    ``.gguf`` file or a hub id (see the module docstring). Params are cast to ``dtype``;
    with ``mesh`` each is created sharded by ``dynamax_jax.sharding.param_specs``."""
    path = resolve_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            from dynamax_jax.convert.gguf import load_gguf
            return load_gguf(path, dtype, progress=progress, mesh=mesh)
        raise UnsupportedModelError(
            f"{path}: unsupported checkpoint file; expected a .gguf file or a directory with "
            "config.json + model.safetensors (or its index), or params.json + consolidated.safetensors")
    if (path / "params.json").exists() and (path / "consolidated.safetensors").exists():
        from dynamax_jax.convert.mamba2 import load_codestral
        return load_codestral(path, dtype, progress=progress, mesh=mesh)
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
        params = load_params(reader, config, arch, dtype, progress=progress, mesh=mesh)
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
    """The tokenizer of a checkpoint: ``AutoTokenizer.from_pretrained`` for a directory (or a
    hub id, resolved as ``load_checkpoint`` does), ``convert.gguf.load_gguf_tokenizer`` for
    a ``.gguf`` file."""
    path = resolve_checkpoint(path)
    if path.is_file() and path.suffix == ".gguf":
        from dynamax_jax.convert.gguf import load_gguf_tokenizer
        return load_gguf_tokenizer(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path} (expected a checkpoint directory or a .gguf file)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


__all__ = [
    "CheckpointError", "ConfigError", "CorruptFileError", "HF_FILES", "HUB_FILES", "HubCheckpointError",
    "MissingTensorError", "ShapeMismatchError", "TOKENIZER_FILES", "UnsupportedModelError", "copy_tokenizer",
    "hub_cache_dir", "load_checkpoint", "load_tokenizer", "parse_hub_id", "read_hf_config", "resolve_checkpoint",
    "save_hf", "write_hf_dir",
]
