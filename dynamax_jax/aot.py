"""Programs compiled ahead of time for TPU slices, on a host with no TPU.

Shape legend: B batch, T tokens per row, S cache slots, L layers, E exits.

libtpu's compiler (``pip install -e ".[tpu]"``) runs on any host: ``topology_devices`` gives
the device descriptions of a TPU slice (``TOPOLOGIES``), a ``data`` x ``model`` mesh over them
(``sharding.make_mesh``) places ``jax.ShapeDtypeStruct``s by the sharding table
(``abstract_params``, ``abstract_decode_params``, ``abstract_exit_params``,
``abstract_decode_state``), so that no weight, cache or batch is allocated, and
``jax.jit(f).lower(...).compile()`` goes through XLA:TPU. ``memory_of(compiled)`` is XLA:TPU's
own per-chip account of HBM; XLA:CPU's account does not transfer (it runs bfloat16 dots in
float32). With ``mesh=None`` the same helpers describe one-device arrays for XLA:CPU, whose
compile time is what research code pays on a CPU host.

The programs are those a TPU run compiles: ``lower_decode`` (``decode_chunk``: the caches
donated, exits on), ``lower_prefill``, ``lower_distill_step`` (``train.distill.jit_train_step``)
and ``lower_cached_pass`` (``train.cached.make_backbone_pass``). ``benchmarks/scale_7b.py``
prints them for the 7B models (``PRESETS``) and ``docs/tpu.md`` holds the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dynamax_jax import sharding as S
from dynamax_jax.config import Mamba2Config, MistralConfig
from dynamax_jax.decoding import configure, decode_chunk, prefill
from dynamax_jax.errors import ShardingError
from dynamax_jax.exits import ExitConfig, init_exits
from dynamax_jax.models import module_for

GIB = 2**30

# TPU slices by name: ``jax.experimental.topologies.get_topology_desc`` arguments. A v5e chip
# has one TensorCore; a v4 chip's two act as one device (megacore). A v5e pod slice's hosts
# hold 2x2 chips each, so "v5e-32" is 8 processes of 4 devices.
TOPOLOGIES = {
    "v5e": dict(topology_name="v5e:2x4", chip_config_name="default", chips_per_host_bounds=(2, 4, 1)),
    "v4": dict(topology_name="v4:2x2x1", chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1)),
    "v5e-32": dict(topology_name="v5e:4x8", chip_config_name="default", chips_per_host_bounds=(2, 2, 1)),
}
# HBM of one device, by ``device_kind``.
DEVICE_HBM = {"TPU v5 lite": 16 * GIB, "TPU v4": 32 * GIB}

# The models of the paper, from their config.json (Mistral) and params.json (Codestral Mamba).
PRESETS = {
    "mistralai/Mistral-7B-v0.1": MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096,
        max_position_embeddings=32768, bos_token_id=1, eos_token_id=2),
    "mistralai/Mamba-Codestral-7B-v0.1": Mamba2Config(
        vocab_size=32768, hidden_size=4096, num_layers=64, state_size=128, expand=2, head_dim=64,
        n_groups=8, conv_kernel=4, chunk_size=256),
}


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice named in ``TOPOLOGIES`` (descriptions only: a compile target,
    nothing runs on them). Needs libtpu, not a TPU."""
    if topology not in TOPOLOGIES:
        raise ShardingError(f"unknown TPU topology {topology!r}; known: {', '.join(TOPOLOGIES)}")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", num_slices=1, wrap=(False, False, False),
                                        **TOPOLOGIES[topology])
    return list(desc.devices)


def tpu_device(topology: str):
    """The first chip of ``topology``."""
    return topology_devices(topology)[0]


def device_hbm(device) -> int | None:
    """HBM bytes of one ``device`` of a TPU slice (None for a kind not in ``DEVICE_HBM``)."""
    return DEVICE_HBM.get(device.device_kind)


# ----------------------------------------------------------------------------- abstract arrays


def _place(mesh: Mesh | None, spec: P, shape, dtype) -> jax.ShapeDtypeStruct:
    if mesh is None:
        return jax.ShapeDtypeStruct(tuple(shape), dtype)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, S.fit_spec(spec, shape, mesh)))


def place(mesh: Mesh | None, specs, shapes):
    """``shapes`` (a tree of ``ShapeDtypeStruct``s) placed on ``mesh`` by the spec tree
    ``specs`` (each spec fit to its shape; ``mesh=None``: unplaced, for one device)."""
    return jax.tree.map(lambda s, a: _place(mesh, s, a.shape, a.dtype), specs, shapes,
                        is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh | None, shapes):
    """Every array of ``shapes`` whole on every device of ``mesh``."""
    return jax.tree.map(lambda a: _place(mesh, P(), a.shape, a.dtype), shapes)


def _mesh_of(tree) -> Mesh | None:
    for leaf in jax.tree.leaves(tree):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    return None


def unstack(tree) -> tuple:
    """Abstract stacked ``[N, ...]`` arrays as N trees of ``[...]`` arrays, each spec without
    its first axis (the abstract ``models.layers.unstack``)."""
    mesh = _mesh_of(tree)

    def one(a):
        spec = a.sharding.spec if mesh is not None else P()
        return _place(mesh, P(*tuple(spec)[1:]), a.shape[1:], a.dtype)

    sliced = jax.tree.map(one, tree)
    count = jax.tree.leaves(tree)[0].shape[0]
    return tuple(sliced for _ in range(count))


def abstract_params(config, mesh: Mesh | None, dtype=jnp.bfloat16):
    """The backbone's params (stored layout, layers stacked) as abstract arrays placed by
    ``sharding.param_specs``."""
    shapes = jax.eval_shape(lambda: module_for(config).init_params(config, jax.random.key(0), dtype))
    return place(mesh, S.param_specs(config), shapes)


def _decode_layer(model, layer: dict) -> dict:
    """One layer's abstract params in the decode layout. A Transformer layer is fused only when
    its query projection is whole on every device (``mistral.fuse_decode_weights``: columns of a
    fused matrix split over devices would mix queries, keys and values). A traced array carries
    no placement, so the fused shapes come from tracing and each fused matrix is placed like
    the first of its parts (``w_qkv`` like ``wq``, ``w_gate_up`` like ``w_gate``)."""
    query = layer.get("wq")
    if getattr(query, "sharding", None) is not None and not query.sharding.is_fully_replicated:
        return layer
    shapes = jax.eval_shape(model.decode_layout, layer)
    mesh, first_part = _mesh_of(layer), {"w_qkv": "wq", "w_gate_up": "w_gate"}
    out = {}
    for name, a in shapes.items():
        if name in layer:
            out[name] = layer[name]
            continue
        spec = tuple(layer[first_part[name]].sharding.spec) if mesh is not None else ()
        out[name] = _place(mesh, P(*(spec + (None,) * a.ndim)[:a.ndim]), a.shape, a.dtype)
    return out


def abstract_decode_params(config, mesh: Mesh | None, dtype=jnp.bfloat16):
    """The backbone's params in the decode layout (``decoding.decode_params`` of params placed
    by the sharding table), abstract."""
    params = abstract_params(config, mesh, dtype)
    model = module_for(config)
    return {**params, "layers": tuple(_decode_layer(model, layer) for layer in unstack(params["layers"]))}


def abstract_exit_params(config, exit_config: ExitConfig, mesh: Mesh | None, dtype=jnp.float32):
    """Exit params stacked ``[E, ...]`` (``init_exits``), abstract, placed by
    ``sharding.exit_param_specs``."""
    ec = exit_config.resolve(config)
    shapes = jax.eval_shape(lambda: init_exits(config, ec, jax.random.key(0), dtype))
    return place(mesh, S.exit_param_specs(ec.kind, ec.adapter, fill_shift="fill_shift" in shapes), shapes)


def abstract_configure(config, num_steps: int, mesh: Mesh | None, exit_config: ExitConfig | None,
                       exit_params, dtype=jnp.bfloat16):
    """``decoding.configure`` on abstract exit params (stacked, ``abstract_exit_params``) ->
    ``(settings, controls, per-exit params)``: the static settings, and the traced controls and
    the exit params the token loop reads as abstract arrays (controls whole on every device)."""
    found = {}

    def run(stacked):
        found["settings"], controls, _ = configure(config, num_steps, exit_config=exit_config, exit_params=stacked,
                                                   dtype=dtype)
        return controls

    controls = jax.eval_shape(run, exit_params)
    settings, per_exit = found["settings"], None
    if settings.exit_config is not None and settings.exit_config.needs_params:
        per_exit = tuple(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding), one)
                         for one in unstack(exit_params))
    return settings, replicated(mesh, controls), per_exit


def abstract_decode_state(config, settings, params, exit_params, batch: int, cache_len: int, mesh: Mesh | None):
    """The ``DecodeState`` that ``prefill`` returns for ``batch`` rows and ``cache_len`` slots,
    abstract, placed as prefill leaves it: caches and exit states by ``sharding.state_specs``,
    per-row vectors over ``data``."""
    table = S.TABLE

    def state(p, e):
        prompt, lengths = jnp.zeros((batch, 1), jnp.int32), jnp.ones((batch,), jnp.int32)
        return prefill(config, settings, p, e, prompt, lengths, cache_len=cache_len)

    shapes = jax.eval_shape(state, params, exit_params)
    specs = dataclasses.replace(
        shapes, caches=S.state_specs(shapes.caches), positions=table.rows_b, tokens=table.rows_b,
        done=table.rows_b, step=P(),
        exit_state=None if shapes.exit_state is None else S.state_specs(shapes.exit_state, exit_state=True),
        seen=None if shapes.seen is None else P(*table.rows_b, None))
    return place(mesh, specs, shapes)


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass(frozen=True)
class Memory:
    """XLA's per-device account of a compiled program (``compiled.memory_analysis()``), bytes:
    ``arguments`` and ``outputs`` (``aliased``: output buffers that reuse a donated argument's),
    ``temporaries``, ``code`` (the program itself); ``total`` what the program needs at once."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        return cls(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
                   temporaries=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    """A program lowered and compiled for a mesh, with the seconds each stage took."""

    compiled: Any
    lower_s: float
    compile_s: float

    @property
    def memory(self) -> Memory:
        return Memory.of(self.compiled)


def compile_timed(lower) -> CompiledProgram:
    """``lower()`` (returning a ``jax.stages.Lowered``) then its compile, both timed."""
    start = time.perf_counter()
    lowered = lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return CompiledProgram(compiled, lowered_at - start, time.perf_counter() - lowered_at)


def _on(mesh: Mesh | None):
    """``jax.set_mesh(mesh)`` (what ``generate`` runs the engine under, so that the caches follow
    the table), or nothing for one device."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def lower_decode(config, mesh: Mesh | None, *, batch: int, cache_len: int, num_steps: int,
                 exit_config: ExitConfig | None, dtype=jnp.bfloat16) -> jax.stages.Lowered:
    """``decode_chunk`` of ``num_steps`` tokens from a state of ``batch`` rows and ``cache_len``
    slots (donated, as every call donates it), the backbone in ``dtype`` in the decode layout
    and, with ``exit_config``, its exits (in ``dtype``) on."""
    params = abstract_decode_params(config, mesh, dtype)
    stacked = None if exit_config is None else abstract_exit_params(config, exit_config, mesh, dtype)
    settings, controls, exit_params = abstract_configure(config, num_steps, mesh, exit_config, stacked, dtype)
    state = abstract_decode_state(config, settings, params, exit_params, batch, cache_len, mesh)
    key = replicated(mesh, jax.eval_shape(lambda: jax.random.key(0)))
    with _on(mesh):
        return decode_chunk.lower(config, settings, num_steps, params, exit_params, state, controls, key)


def lower_prefill(config, mesh: Mesh | None, *, batch: int, prompt_len: int, cache_len: int,
                  exit_config: ExitConfig | None, dtype=jnp.bfloat16) -> jax.stages.Lowered:
    """``prefill`` of ``batch`` prompts of ``prompt_len`` tokens into caches of ``cache_len``
    slots (a ``mamba`` exit's state runs over the prompt too)."""
    params = abstract_decode_params(config, mesh, dtype)
    stacked = None if exit_config is None else abstract_exit_params(config, exit_config, mesh, dtype)
    settings, _, exit_params = abstract_configure(config, 1, mesh, exit_config, stacked, dtype)
    prompt = _place(mesh, S.TABLE.tokens_bt, (batch, prompt_len), jnp.int32)
    lengths = _place(mesh, S.TABLE.rows_b, (batch,), jnp.int32)
    with _on(mesh):
        return prefill.lower(config, settings, params, exit_params, prompt, lengths, cache_len=cache_len)


def _distill_settings(exit_config: ExitConfig, dtype, batch_size: int | None, seq_len: int | None):
    from dynamax_jax.train.distill import DistillSettings

    d = DistillSettings()
    return DistillSettings(exit_kind=exit_config.kind, adapter=exit_config.adapter, dtype=jnp.dtype(dtype).name,
                           batch_size=batch_size or d.batch_size, seq_len=seq_len or d.seq_len)


def lower_distill_step(config, mesh: Mesh, *, exit_config: ExitConfig, dtype=jnp.bfloat16,
                       batch_size: int | None = None, seq_len: int | None = None) -> jax.stages.Lowered:
    """One ``train.distill`` step as ``jit_train_step`` compiles it: the frozen backbone in
    ``dtype``, float32 exit params and AdamW state (donated), a global batch of
    ``batch_size`` x ``seq_len`` tokens (default: ``train.distill``'s)."""
    from dynamax_jax.train import distill

    settings = _distill_settings(exit_config, dtype, batch_size, seq_len)
    ec = exit_config.resolve(config)
    tx = distill.make_optimizer(settings)
    backbone = abstract_params(config, mesh, dtype)
    exits = abstract_exit_params(config, ec, mesh, jnp.float32)
    opt_state = jax.eval_shape(tx.init, exits)
    step = distill.jit_train_step(mesh, config, ec, settings, tx, backbone, exits, opt_state)
    shape = (settings.batch_size, settings.seq_len)
    tokens, mask = (_place(mesh, S.TABLE.tokens_bt, shape, kind) for kind in (jnp.int32, jnp.float32))
    return step.fn.lower(backbone, exits, opt_state, tokens, mask)


def lower_cached_pass(config, mesh: Mesh | None, *, exit_config: ExitConfig, dtype=jnp.bfloat16,
                      batch_size: int | None = None, seq_len: int | None = None,
                      topk: int = 1) -> jax.stages.Lowered:
    """``train.cached``'s backbone pass (``make_backbone_pass``: exit hidden states, the final
    top-k and the adapters' normal equations) over a batch of ``batch_size`` x ``seq_len``
    tokens (default: ``train.cached``'s, those of ``train.distill``)."""
    from dynamax_jax.train.cached import make_backbone_pass

    settings = _distill_settings(exit_config, dtype, batch_size, seq_len)
    ec = exit_config.resolve(config)
    params = abstract_params(config, mesh, dtype)
    tokens = _place(mesh, S.TABLE.tokens_bt, (settings.batch_size, settings.seq_len), jnp.int32)
    with _on(mesh):
        return make_backbone_pass(config, tuple(ec.layers), topk).lower(params, tokens)
