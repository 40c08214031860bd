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
floating-point weight, so an integer or boolean tensor is refused rather than cast. A
reader with ``view(name)`` (a context manager giving the tensor memory-mapped) lets a
sharded load read only the slices it needs; others are read whole, one tensor at a time.

Memory: without a mesh the loader preallocates each stacked param (64-byte aligned so
``jax.device_put`` on CPU aliases it instead of copying) and reads one checkpoint tensor
at a time into it, so peak host memory is the output params plus one tensor. With a mesh
(``load_params(..., mesh=...)``) each param is built block by block, one block per
distinct shard on this process's devices (``sharded_param``): the host holds one block
and one tensor's mapped pages beyond what the devices hold, and a process of a
multi-host mesh reads only the blocks its own devices hold. The sharding comes from
``dynamax_jax.sharding.param_specs`` and the layouts from the same rows, so neither is
written twice.
"""

from __future__ import annotations

import contextlib
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


def _plan(reader: CheckpointReader, config, arch: Architecture, expected) -> list[tuple[Row, list[str], tuple]]:
    """``(row, checkpoint names, our stacked shape)`` per row of ``arch``'s table, after
    checking every tensor's presence, shape and stored dtype (before any data is read),
    and warning about checkpoint tensors no row uses."""
    rows = arch.table(config)
    _check_table(rows, expected, "/".join(arch.model_types))
    plan = []
    for row in rows:
        shape = tuple(expected[row.ours].shape)
        per_tensor = shape[1:] if row.per_layer else shape
        want = _hf_shape(row, config, per_tensor)
        names = [row.hf.format(i=i) for i in range(shape[0])] if row.per_layer else [row.hf]
        for name in names:
            _check_tensor(reader, row, name, want)
        plan.append((row, names, shape))

    used = {name for _, names, _ in plan for name in names}
    leftover = [n for n in reader.names() if n not in used and not arch.ignored(n)]
    if leftover:
        warnings.warn(f"{reader.path}: {len(leftover)} checkpoint tensors are not used, "
                      f"e.g. {leftover[:5]}", stacklevel=4)
    return plan


def _check_tensor(reader, row: Row, name: str, want: tuple[int, ...]) -> None:
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


def load_params(reader: CheckpointReader, config, arch: Architecture, dtype=jnp.float32,
                progress: bool = False, mesh=None) -> Params:
    """Read our param tree for ``config`` from ``reader`` using ``arch``'s table.

    Every tensor's presence and shape is checked before any data is read: a missing one
    raises ``MissingTensorError`` naming it, a wrong one ``ShapeMismatchError`` naming it
    with the expected and found shapes.

    Without ``mesh``, stacked params are filled layer by layer into preallocated host
    arrays cast to ``dtype`` (on the default device). With a ``jax.sharding.Mesh``
    (axes ``data``, ``model``), every param is created already sharded as
    ``dynamax_jax.sharding.param_specs(config)`` says (``shardings_for``): see
    ``sharded_param``."""
    expected = expected_shapes(config, dtype)
    plan = _plan(reader, config, arch, expected)
    np_dtype = np.dtype(dtype)
    shardings = _param_shardings(config, mesh, expected) if mesh is not None else None
    flat = {}
    with _progress(sum(len(names) for _, names, _ in plan), progress, "loading") as bar:
        for row, names, shape in plan:
            if shardings is None:
                flat[row.ours] = _host_param(reader, config, row, names, shape, np_dtype, bar.update)
            else:
                flat[row.ours] = sharded_param(reader, config, row, names, shape, np_dtype, shardings[row.ours])
                bar.update(len(names))
    return unflatten(flat)


def _host_param(reader, config, row: Row, names: Sequence[str], shape: tuple[int, ...], dtype,
                on_tensor: Callable[[int], Any]) -> jax.Array:
    """One param on the default device, filled one checkpoint tensor at a time."""
    out = aligned_empty(shape, dtype)
    for i, name in enumerate(names):
        tensor = row.to_ours(reader.read(name), config)
        if row.per_layer:
            out[i] = tensor  # casts to the output dtype in place
        else:
            out[...] = tensor
        del tensor
        on_tensor(1)
    return jax.device_put(out)  # aliases `out` on CPU (aligned), no copy


def _param_shardings(config, mesh, expected) -> dict[str, Any]:
    """Our param paths -> ``NamedSharding`` on ``mesh``, from the one sharding table."""
    from dynamax_jax.sharding import param_specs, shardings_for

    return flatten(shardings_for(mesh, param_specs(config), unflatten(expected)))


@contextlib.contextmanager
def _tensor(reader, name: str):
    """Tensor ``name`` in Hugging Face layout for the duration of a ``with``: the reader's
    memory-mapped ``view`` where it has one, else a fresh ``read``."""
    if hasattr(reader, "view"):
        with reader.view(name) as tensor:
            yield tensor
    else:
        yield reader.read(name)


def _shard_shape(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))


def read_shard(reader, config, row: Row, names: Sequence[str], shape: tuple[int, ...], index, dtype) -> np.ndarray:
    """The block ``index`` (a tuple of slices into our ``shape``) of the param that ``row``
    fills from tensors ``names``, as a new host array of ``dtype``. Each checkpoint tensor
    is seen through ``row.to_ours`` (on a memory map that is a view), sliced, then copied
    and cast, so only the slice is materialised; a stacked ``[L, ...]`` param reads the
    layers in ``index[0]`` one at a time."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    out = aligned_empty(_shard_shape(index, shape), dtype)
    if row.per_layer:
        for j, i in enumerate(range(shape[0])[index[0]]):
            _copy_slice(reader, config, row, names[i], index[1:], out, j)
    else:
        _copy_slice(reader, config, row, names[0], index, out, Ellipsis)
    return out


def _copy_slice(reader, config, row: Row, name: str, index, out: np.ndarray, at) -> None:
    """``out[at] = row.to_ours(tensor name)[index]``, cast to ``out``'s dtype; the tensor
    (or its map) is released on return."""
    with _tensor(reader, name) as tensor:
        out[at] = row.to_ours(tensor, config)[index]


def sharded_param(reader, config, row: Row, names: Sequence[str], shape: tuple[int, ...], dtype,
                  sharding) -> jax.Array:
    """One param as a global ``jax.Array`` with ``sharding``, built from this process's
    devices' blocks only (``read_shard``). Devices holding the same block (replicas along
    an axis the spec does not use) share one read. Each block goes to its devices before
    the next is read, so the host holds one block (plus one tensor's mapped pages) beyond
    what the devices hold; ``jax.make_array_from_callback`` would gather every local block
    first."""
    local = sharding.addressable_devices_indices_map(shape)
    blocks: dict[tuple, list] = {}
    for device, index in local.items():
        key = tuple(s.indices(n) for s, n in zip(index, shape))
        blocks.setdefault(key, [index, []])[1].append(device)
    on_device = {}
    for index, devices in blocks.values():
        block = read_shard(reader, config, row, names, shape, index, dtype)
        for device in devices:
            on_device[device] = jax.device_put(block, device)
        del block
    return jax.make_array_from_single_device_arrays(shape, sharding, [on_device[d] for d in local])


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
