"""Device mesh and the one table of ``PartitionSpec``s for params and activations.

Shape legend: B batch, T tokens, D hidden, V vocabulary, L layers, N query heads,
K key/value heads, H head dim, F MLP width, E exits, I Mamba inner width, C conv
channels, W conv kernel, J Mamba heads, Z Mamba in_proj width, X an exit's 2 logits.

The mesh has two axes: ``data`` (the batch is split over it) and ``model`` (tensor
parallelism: vocabulary, attention heads, MLP width, Mamba inner width). Both axes are
``AxisType.Auto``: the model code carries no sharding annotations, so the compiler
propagates the shardings given to ``jax.jit``'s ``in_shardings``/``out_shardings``
through it. (``Explicit`` axes would need an output sharding for every op whose operands
are sharded along a contracted dimension, i.e. annotations inside the models.)

Every param and activation is named once in ``ShardingTable``; the letters at the end
of a name are its dimensions. ``param_specs(config)`` and ``exit_param_specs(kind)``
build spec trees with exactly the structure of the param trees (written out, not
matched by regex), and ``shardings_for`` checks a param tree against its spec tree and
turns it into ``NamedSharding``s. A dimension whose size the mesh axis does not divide
(e.g. 3 key/value heads over ``model=2``) is replicated instead: still correct, only
less memory is saved.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from dynamax_jax.errors import ShardingError  # noqa: F401  (importable from here too)

DATA, MODEL = "data", "model"
AXIS_NAMES = (DATA, MODEL)


@dataclasses.dataclass(frozen=True)
class ShardingTable:
    """PartitionSpec of every param and activation; dimension letters end each name."""

    # activations
    tokens_bt: P = P(DATA, None)
    act_btd: P = P(DATA, None, None)
    logits_btv: P = P(DATA, None, MODEL)
    exit_hidden_ebtd: P = P(None, DATA, None, None)
    exit_logits_ebtx: P = P(None, DATA, None, None)
    exit_labels_ebt: P = P(None, DATA, None)
    # shared by both backbones
    embed_vd: P = P(MODEL, None)
    lm_head_dv: P = P(None, MODEL)
    norm_d: P = P(None)
    layer_norm_ld: P = P(None, None)
    # Mistral / Llama layers
    attn_q_ldnh: P = P(None, None, MODEL, None)
    attn_kv_ldkh: P = P(None, None, MODEL, None)
    attn_out_lnhd: P = P(None, MODEL, None, None)
    mlp_in_ldf: P = P(None, None, MODEL)
    mlp_out_lfd: P = P(None, MODEL, None)
    # Mamba2 layers: the inner width I (gate norm, out_proj) and in_proj's output columns Z are
    # split over model. A column block of in_proj mixes parts of z, x, B, C and dt, so XLA
    # gathers its output where they are split apart (one token's at decode); a whole in_proj
    # would be held and read by every device, and XLA:TPU keeps a copy of each device's block
    # besides, to split the matmul anyway.
    mamba_in_proj_ldz: P = P(None, None, MODEL)
    mamba_conv_w_lwc: P = P(None, None, None)
    mamba_conv_b_lc: P = P(None, None)
    mamba_head_lj: P = P(None, None)
    mamba_gate_norm_li: P = P(None, MODEL)
    mamba_out_proj_lid: P = P(None, MODEL, None)
    mamba_bias_lz: P = P(None, None)
    mamba_out_bias_ld: P = P(None, None)
    # exit classifiers (stacked over exits E); the small ones are replicated
    exit_norm_ed: P = P(None, None)
    exit_linear_edx: P = P(None, None, None)
    exit_bias_ex: P = P(None, None)
    exit_ffn_in_edf: P = P(None, None, MODEL)
    exit_ffn_in_bias_ef: P = P(None, MODEL)
    exit_ffn_out_efx: P = P(None, MODEL, None)
    exit_mamba_in_proj_edz: P = P(None, None, None)
    exit_mamba_conv_w_ewc: P = P(None, None, None)
    exit_mamba_conv_b_ec: P = P(None, None)
    exit_mamba_head_ej: P = P(None, None)
    exit_mamba_gate_norm_ei: P = P(None, None)
    exit_mamba_out_proj_eix: P = P(None, None, None)
    exit_hybrid_out_proj_eid: P = P(None, None, None)
    exit_adapter_w_edd: P = P(None, None, MODEL)
    exit_adapter_down_edr: P = P(None, None, None)
    exit_adapter_up_erd: P = P(None, None, None)
    exit_adapter_b_ed: P = P(None, None)
    exit_fill_shift_eld: P = P(None, None, None)
    # decode state, one layer's (or one exit's) slice: rows over data; a Transformer's key /
    # value heads and a Mamba2 layer's heads over model, like the weights that write them
    rows_b: P = P(DATA)
    kv_cache_bksh: P = P(DATA, MODEL, None, None)
    mamba_conv_state_bwc: P = P(DATA, None, None)
    mamba_ssm_state_bjpn: P = P(DATA, MODEL, None, None)
    exit_mamba_conv_state_bwc: P = P(DATA, None, None)
    exit_mamba_ssm_state_bjpn: P = P(DATA, None, None, None)


TABLE = ShardingTable()


# ----------------------------------------------------------------------------- mesh


def parse_mesh(spec: str) -> tuple[int, int]:
    """``"8x1"`` -> ``(8, 1)``: the sizes of the ``data`` and ``model`` axes."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(spec))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ShardingError(f"mesh must look like DATAxMODEL with positive sizes, e.g. '8x1' or '4x2'; got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def make_mesh(spec: str | tuple[int, int], devices=None) -> Mesh:
    """A ``data`` x ``model`` mesh (Auto axes) over the first ``D * M`` devices.

    Raises ``ShardingError`` when the mesh needs more devices than there are."""
    data, model = parse_mesh(spec) if isinstance(spec, str) else spec
    devices = list(jax.devices() if devices is None else devices)
    need = data * model
    if need > len(devices):
        hint = ""
        if devices and devices[0].platform == "cpu":
            hint = (f" On CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count={need} "
                    "set before jax starts.")
        raise ShardingError(f"mesh {data}x{model} needs {need} devices but only {len(devices)} "
                            f"{devices[0].platform if devices else ''} device(s) are available.{hint}")
    return jax.make_mesh((data, model), AXIS_NAMES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:need])


def initialize_distributed(**kwargs) -> None:
    """``jax.distributed.initialize()`` for multi-host runs (one process per host; on TPU
    VMs and SLURM/Open MPI the coordinator is found automatically). Call before any other
    jax use."""
    jax.distributed.initialize(**kwargs)


# ----------------------------------------------------------------------------- spec trees


def param_specs(config, table: ShardingTable = TABLE) -> dict[str, Any]:
    """Spec tree of a backbone's params (the structure of ``init_params(config, ...)``)."""
    family = config.family
    if family == "transformer":
        layers = {
            "attn_norm": table.layer_norm_ld, "wq": table.attn_q_ldnh, "wk": table.attn_kv_ldkh,
            "wv": table.attn_kv_ldkh, "wo": table.attn_out_lnhd, "mlp_norm": table.layer_norm_ld,
            "w_gate": table.mlp_in_ldf, "w_up": table.mlp_in_ldf, "w_down": table.mlp_out_lfd,
        }
    elif family == "mamba2":
        layers = {
            "norm": table.layer_norm_ld, "in_proj": table.mamba_in_proj_ldz,
            "conv_w": table.mamba_conv_w_lwc, "dt_bias": table.mamba_head_lj,
            "A_log": table.mamba_head_lj, "D": table.mamba_head_lj,
            "gate_norm": table.mamba_gate_norm_li, "out_proj": table.mamba_out_proj_lid,
        }
        if config.use_conv_bias:
            layers["conv_b"] = table.mamba_conv_b_lc
        if config.use_bias:
            layers["in_proj_bias"] = table.mamba_bias_lz
            layers["out_proj_bias"] = table.mamba_out_bias_ld
    else:
        raise ShardingError(f"no sharding table for model family {family!r}; supported: transformer, mamba2")
    specs = {"embed": table.embed_vd, "layers": layers, "final_norm": table.norm_d}
    if not config.tie_word_embeddings:
        specs["lm_head"] = table.lm_head_dv
    return specs


def exit_param_specs(kind: str, adapter: str = "none", fill_shift: bool = False,
                     table: ShardingTable = TABLE) -> dict[str, P]:
    """Spec tree of exit-classifier params of ``kind`` with an ``adapter`` (``none``,
    ``affine`` or ``lowrank``; ``dynamax_jax.exits`` layout), and the ``fill_shift`` that
    ``train.cached`` measures for the ``shift`` mode when ``fill_shift``."""
    specs = {"none": {},
             "affine": {"adapter_w": table.exit_adapter_w_edd, "adapter_b": table.exit_adapter_b_ed},
             "lowrank": {"adapter_down": table.exit_adapter_down_edr, "adapter_up": table.exit_adapter_up_erd,
                         "adapter_b": table.exit_adapter_b_ed}}
    if adapter not in specs:
        raise ShardingError(f"no sharding table for exit adapter {adapter!r}; supported: {', '.join(specs)}")
    shift = {"fill_shift": table.exit_fill_shift_eld} if fill_shift else {}
    return {**_classifier_specs(kind, table), **specs[adapter], **shift}


def shard_exit_params(mesh: Mesh, exit_config, exit_params):
    """Exit params (stacked ``[E, ...]``, ``dynamax_jax.exits`` layout) placed on ``mesh`` by
    the table; ``None`` (training-free confidences) stays ``None``."""
    if exit_params is None:
        return None
    specs = exit_param_specs(exit_config.kind, exit_config.adapter, fill_shift="fill_shift" in exit_params)
    return shard(mesh, specs, exit_params)


def _classifier_specs(kind: str, table: ShardingTable) -> dict[str, P]:
    if kind == "calm":
        return {"norm": table.exit_norm_ed, "w": table.exit_linear_edx, "b": table.exit_bias_ex}
    if kind == "ffn":
        return {"norm": table.exit_norm_ed, "w_in": table.exit_ffn_in_edf, "b_in": table.exit_ffn_in_bias_ef,
                "w_out": table.exit_ffn_out_efx, "b_out": table.exit_bias_ex}
    if kind == "mamba":
        return {"norm": table.exit_norm_ed, "in_proj": table.exit_mamba_in_proj_edz,
                "conv_w": table.exit_mamba_conv_w_ewc, "conv_b": table.exit_mamba_conv_b_ec,
                "dt_bias": table.exit_mamba_head_ej, "A_log": table.exit_mamba_head_ej,
                "D": table.exit_mamba_head_ej, "gate_norm": table.exit_mamba_gate_norm_ei,
                "out_proj": table.exit_mamba_out_proj_eix, "out_bias": table.exit_bias_ex}
    from dynamax_jax.exits import HYBRID_FFN, KINDS

    if kind == "hybrid":  # the mamba mixer (output width D, no out_bias), then the ffn classifier
        mixer = {k: v for k, v in _classifier_specs("mamba", table).items() if k != "out_bias"}
        ffn = {HYBRID_FFN + k: v for k, v in _classifier_specs("ffn", table).items()}
        return {**mixer, "out_proj": table.exit_hybrid_out_proj_eid, **ffn}
    raise ShardingError(f"no sharding table for exit classifier kind {kind!r}; supported: {', '.join(KINDS)}")


def _check_structure(specs, tree, path: str = "params") -> None:
    if isinstance(specs, dict):
        if not isinstance(tree, dict):
            raise ShardingError(f"{path}: expected a dict of params, found {type(tree).__name__}")
        missing, extra = sorted(set(specs) - set(tree)), sorted(set(tree) - set(specs))
        if missing:
            raise ShardingError(f"{path} is missing {missing} (the sharding table expects {sorted(specs)})")
        if extra:
            raise ShardingError(f"{path} has {extra}, which the sharding table does not name; add them to "
                                "dynamax_jax/sharding.py")
        for k in specs:
            _check_structure(specs[k], tree[k], f"{path}/{k}")
    elif len(specs) != np.ndim(tree):
        raise ShardingError(f"{path} has {np.ndim(tree)} dimensions {tuple(np.shape(tree))}, but its "
                            f"PartitionSpec {specs} names {len(specs)}")


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """``spec`` with every mesh axis that does not divide its dimension replaced by ``None``."""
    dims = []
    for axis, size in zip(spec, shape):
        names = axis if isinstance(axis, tuple) else (axis,) if axis is not None else ()
        ways = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        dims.append(axis if size % ways == 0 else None)
    return P(*dims)


def shardings_for(mesh: Mesh, specs, tree):
    """``NamedSharding`` tree for ``tree`` (params or activations, arrays or
    ``ShapeDtypeStruct``s) from its spec tree; raises ``ShardingError`` on a mismatch."""
    _check_structure(specs, tree)
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    return jax.tree.map(lambda s, a: NamedSharding(mesh, fit_spec(s, tuple(np.shape(a)), mesh)),
                        specs, tree, is_leaf=is_spec)


def shard(mesh: Mesh, specs, tree):
    """``tree`` placed on ``mesh`` by its spec tree (a ``jax.device_put``)."""
    return jax.device_put(tree, shardings_for(mesh, specs, tree))


def batch_sharding(mesh: Mesh, spec: P = TABLE.tokens_bt) -> NamedSharding:
    """Sharding of a per-step input batch (batch over ``data``)."""
    return NamedSharding(mesh, spec)


def global_batch(mesh: Mesh, local: np.ndarray, spec: P = TABLE.tokens_bt) -> jax.Array:
    """One global array from each process's rows ``local [B / processes, ...]`` (on one
    process: the whole batch)."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)


def mesh_of(tree) -> Mesh | None:
    """The mesh of more than one device that the arrays of ``tree`` are placed on, or None
    (host arrays, one device)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def place_rows(mesh: Mesh, rows: np.ndarray, spec: P = TABLE.rows_b) -> jax.Array:
    """A host array whose first axis is the batch, placed on ``mesh`` by ``spec`` (fit to its
    shape). Every process passes the same whole array (each keeps what its devices hold)."""
    rows = np.asarray(rows)
    spec = P(*spec, *(None,) * (rows.ndim - len(spec)))
    sharding = NamedSharding(mesh, fit_spec(spec, rows.shape, mesh))
    return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])


def state_specs(caches, exit_state: bool = False, table: ShardingTable = TABLE):
    """Spec tree of decode caches (a tuple of per-layer ``KVCache`` / ``Mamba2State``) or,
    with ``exit_state``, of per-exit ``MambaExitState``s, by their field names."""
    by_name = ({"conv": table.exit_mamba_conv_state_bwc, "ssm": table.exit_mamba_ssm_state_bjpn} if exit_state else
               {"k": table.kv_cache_bksh, "v": table.kv_cache_bksh, "conv": table.mamba_conv_state_bwc,
                "ssm": table.mamba_ssm_state_bjpn})

    def spec(path, _):
        name = getattr(path[-1], "name", None)
        if name not in by_name:
            raise ShardingError(f"decode state leaf {jax.tree_util.keystr(path)}: the sharding table names "
                                f"only {', '.join(sorted(by_name))}")
        return by_name[name]

    return jax.tree_util.tree_map_with_path(spec, caches)


def constrain(tree, specs):
    """Inside a traced function: ``tree`` pinned to its spec tree (fit to each shape) on the
    mesh that ``jax.set_mesh`` set; ``tree`` itself when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tree is None:
        return tree
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    return jax.tree.map(lambda s, a: jax.lax.with_sharding_constraint(a, fit_spec(s, a.shape, mesh)),
                        specs, tree, is_leaf=is_spec)


def to_host(tree):
    """A host (numpy) copy of a pytree of arrays, also of global arrays that span processes."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def xla_cpu_devices_flag(count: int) -> dict[str, str]:
    """Environment for a subprocess that should see ``count`` simulated CPU devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
    return {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={count}".strip()}
