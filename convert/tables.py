"""Converters as tables: one generic loader and one generic writer for every architecture.

A table is a list of ``Row``s, one per Hugging Face tensor name pattern::

    Row("model.layers.{i}.self_attn.q_proj.weight", "layers/wq",
        to_ours=lambda w, c: w.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
        to_hf=lambda w, c: w.reshape(c.hidden_size, -1).T)

- ``hf``: the tensor name in the checkpoint; ``{i}`` stands for the 0-based layer index.
  Rows with ``{i}`` fill one stacked ``[L, ...]`` param layer by layer.
- ``ours``: the slash-separated path in our param tree (``params["layers"]["wq"]``).
- ``to_ours`` / ``to_hf``: ``(array, config) -> array`` for ONE tensor (one layer's slice).
  Use only array methods (``.T``, ``.reshape``, ``.transpose``, ``.swapaxes``) so the same
  function runs on numpy arrays and under ``jax.eval_shape``; the loader derives the
  Hugging Face shape it expects by running ``to_hf`` on our expected shape.

Our expected shapes come from ``jax.eval_shape`` of the model's ``init_params``, so a table
must name every param of the model exactly once (checked).

An ``Architecture`` bundles a table with its config class and ``config.json`` parser and is
registered per ``model_type`` in ``REGISTRY`` (``register(...)``). ``convert/mistral.py``
registers ``mistral`` and ``llama``; ``convert/mamba2.py`` registers ``mamba2`` when
imported (``convert.checkpoint.load_checkpoint`` imports it lazily, see ``LAZY_MODULES``).

Readers: ``load_params`` takes any object with ``path``, ``name in reader``, ``names()``,
``shape(name)`` and ``read(name) -> numpy array`` in Hugging Face names and layout
(``safetensors_io.CheckpointReader``; ``convert.gguf.GGUFTensors`` presents a GGUF file so).
A reader with ``dtype(name)`` has each tensor's stored dtype checked: every param is a
floating-point weight, so an integer or boolean tensor is refused rather than cast.

Memory: the loader preallocates each stacked param (64-byte aligned so ``jax.device_put``
on CPU aliases it instead of copying) and reads one checkpoint tensor at a time into it,
so peak host memory is the output params plus one tensor.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax.convert.errors import CheckpointError, MissingTensorError, ShapeMismatchError, UnsupportedModelError
from dynamax_jax.convert.safetensors_io import FLOAT_DTYPES, CheckpointReader, aligned_empty, dtype_name

Transform = Callable[[Any, Any], Any]
Params = dict[str, Any]


def identity(x, config):
    return x


@dataclasses.dataclass(frozen=True)
class Row:
    """One Hugging Face tensor pattern <-> one of our params (see the module docstring)."""

    hf: str
    ours: str
    to_ours: Transform = identity
    to_hf: Transform = identity

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the generic loader/writer need for one family of ``model_type``s.

    ``table(config)`` returns the rows for that config (e.g. without ``lm_head`` when
    embeddings are tied); ``ignored(name)`` says which leftover checkpoint tensors are
    expected and not worth a warning (e.g. rotary ``inv_freq`` buffers)."""

    model_types: tuple[str, ...]
    config_class: type
    config_from_hf: Callable[[Mapping[str, Any]], Any]
    table: Callable[[Any], Sequence[Row]]
    ignored: Callable[[str], bool] = lambda name: False


REGISTRY: dict[str, Architecture] = {}
# model_type -> module that registers it on import (kept lazy: importing it may be costly).
LAZY_MODULES: dict[str, str] = {"mamba2": "dynamax_jax.convert.mamba2"}


def register(arch: Architecture) -> Architecture:
    for model_type in arch.model_types:
        REGISTRY[model_type] = arch
    return arch


def supported_model_types() -> list[str]:
    return sorted(set(REGISTRY) | set(LAZY_MODULES))


def architecture(model_type: str) -> Architecture:
    """The registered architecture for ``model_type``; raises ``UnsupportedModelError``
    listing the supported ones."""
    if model_type not in REGISTRY and model_type in LAZY_MODULES:
        importlib.import_module(LAZY_MODULES[model_type])
    if model_type not in REGISTRY:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}")
    return REGISTRY[model_type]


def architecture_for_config(config) -> Architecture:
    """The architecture whose config class ``config`` is an instance of."""
    for _ in range(2):
        for arch in REGISTRY.values():
            if isinstance(config, arch.config_class):
                return arch
        for module in LAZY_MODULES.values():  # not registered yet: import and look again
            importlib.import_module(module)
    raise UnsupportedModelError(f"no converter for config type {type(config).__name__}; "
                                f"supported model types: {', '.join(supported_model_types())}")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b": leaf}``."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> Params:
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def expected_shapes(config, dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """Our param paths -> shapes for ``config``, without allocating (``jax.eval_shape``)."""
    from dynamax_jax.models import module_for

    module = module_for(config)
    tree = jax.eval_shape(lambda: module.init_params(config, jax.random.key(0), dtype))
    return flatten(tree)


def _check_table(rows: Sequence[Row], expected: Mapping[str, Any], what: str) -> None:
    paths = [row.ours for row in rows]
    duplicated = sorted({p for p in paths if paths.count(p) > 1})
    missing = sorted(set(expected) - set(paths))
    unknown = sorted(set(paths) - set(expected))
    if duplicated or missing or unknown:  # a bug in a table, not in the checkpoint
        raise CheckpointError(f"{what} table does not match the model's params: missing {missing}, "
                              f"unknown {unknown}, duplicated {duplicated}")


def _layer_count(row: Row, shape: Sequence[int]) -> int:
    return shape[0] if row.per_layer else 1


def _hf_shape(row: Row, config, ours_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(jax.eval_shape(lambda x: row.to_hf(x, config),
                                jax.ShapeDtypeStruct(tuple(ours_shape), jnp.float32)).shape)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="tensor")


def load_params(reader: CheckpointReader, config, arch: Architecture, dtype=jnp.float32,
                progress: bool = False) -> Params:
    """Read our param tree for ``config`` from ``reader`` using ``arch``'s table.

    Every tensor's presence and shape is checked before any data is read: a missing one
    raises ``MissingTensorError`` naming it, a wrong one ``ShapeMismatchError`` naming it
    with the expected and found shapes. Stacked params are filled layer by layer into
    preallocated arrays cast to ``dtype``."""
    rows = arch.table(config)
    expected = expected_shapes(config, dtype)
    _check_table(rows, expected, "/".join(arch.model_types))
    np_dtype = np.dtype(dtype)

    plan = []  # (row, [hf names], our per-tensor shape)
    for row in rows:
        shape = expected[row.ours].shape
        per_tensor = shape[1:] if row.per_layer else shape
        want = _hf_shape(row, config, per_tensor)
        names = [row.hf.format(i=i) for i in range(shape[0])] if row.per_layer else [row.hf]
        for name in names:
            if name not in reader:
                raise MissingTensorError(f"{reader.path}: checkpoint has no tensor '{name}' "
                                         f"(needed for {row.ours}, expected shape {want})")
            found = reader.shape(name)
            if found != want:
                raise ShapeMismatchError(f"{reader.path}: tensor '{name}' has the wrong shape: "
                                         f"expected {want}, found {found}")
            stored = reader.dtype(name) if hasattr(reader, "dtype") else None
            if stored is not None and stored not in FLOAT_DTYPES:  # an integer/bool tensor is no weight
                raise CheckpointError(f"{reader.path}: tensor '{name}' is stored as {dtype_name(stored)}; "
                                      f"{row.ours} is a floating-point weight (expected one of "
                                      f"{', '.join(sorted(dtype_name(d) for d in FLOAT_DTYPES))})")
        plan.append((row, names, shape))

    used = {name for _, names, _ in plan for name in names}
    leftover = [n for n in reader.names() if n not in used and not arch.ignored(n)]
    if leftover:
        warnings.warn(f"{reader.path}: {len(leftover)} checkpoint tensors are not used, "
                      f"e.g. {leftover[:5]}", stacklevel=3)

    flat = {}
    with _progress(len(used), progress, "loading") as bar:
        for row, names, shape in plan:
            out = aligned_empty(shape, np_dtype)
            for i, name in enumerate(names):
                tensor = row.to_ours(reader.read(name), config)
                if row.per_layer:
                    out[i] = tensor  # casts to the output dtype in place
                else:
                    out[...] = tensor
                del tensor
                bar.update(1)
            flat[row.ours] = jax.device_put(out)  # aliases `out` on CPU (aligned), no copy
            del out
    return unflatten(flat)


def hf_tensors(config, params: Params, arch: Architecture):
    """Our params -> ``(specs, get)`` for ``safetensors_io.write_safetensors``/``write_sharded``:
    ``specs`` maps each Hugging Face name to ``(shape, dtype)`` and ``get(name)`` produces
    that tensor (one at a time). Checks that ``params`` has every param with the shape
    ``config`` implies; raises ``CheckpointError`` naming the param otherwise."""
    rows = arch.table(config)
    flat = flatten(params)
    first_dtype = next(iter(flat.values())).dtype if flat else jnp.float32
    expected = expected_shapes(config, first_dtype)
    _check_table(rows, expected, "/".join(arch.model_types))
    for path, want in expected.items():
        if path not in flat:
            raise MissingTensorError(f"params have no '{path}' (expected shape {tuple(want.shape)})")
        if tuple(flat[path].shape) != tuple(want.shape):
            raise ShapeMismatchError(f"param '{path}' has the wrong shape: expected {tuple(want.shape)}, "
                                     f"found {tuple(flat[path].shape)}")

    specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    source: dict[str, tuple[Row, int | None]] = {}
    for row in rows:
        shape = tuple(flat[row.ours].shape)
        per_tensor = shape[1:] if row.per_layer else shape
        hf_shape = _hf_shape(row, config, per_tensor)
        dtype = np.dtype(flat[row.ours].dtype)
        layers = range(shape[0]) if row.per_layer else [None]
        for i in layers:
            name = row.hf.format(i=i) if row.per_layer else row.hf
            specs[name] = (hf_shape, dtype)
            source[name] = (row, i)

    def get(name: str) -> np.ndarray:
        row, i = source[name]
        array = np.asarray(flat[row.ours])  # on CPU a view of the jax buffer, no copy
        return np.ascontiguousarray(row.to_hf(array if i is None else array[i], config))

    return specs, get
