"""Programs compiled ahead of time for a TPU slice (``dynamax_jax.aot``), the way
``benchmarks/scale_7b.py`` measures the 7B models: a small model's decode step and distill step
compiled by XLA:TPU for a v5e-8 on a 2x4 mesh, from abstract arrays placed by the sharding
table. The compiles need libtpu (``pip install -e ".[tpu]"``) and are skipped without it; the
check that the abstract decode layout is the one ``decode_params`` makes runs everywhere (on 8
simulated CPU devices, in a subprocess: this process's device count is fixed when jax starts).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamax_jax import aot
from dynamax_jax import sharding as S
from dynamax_jax.config import Mamba2Config, MistralConfig
from dynamax_jax.exits import ExitConfig

# libtpu takes a host-wide lock when it loads; another process holding it (a benchmark, a
# second test run) would fail the compile. With no TPU attached there is nothing to guard.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'), so there is no TPU compiler")

# Small, with every split of the table active on model=4: 8 query and 4 key/value heads, MLP
# width 512, vocabulary 1024; Mamba2 inner width 256 (8 heads of 32).
SMALL = {"transformer": MistralConfig(vocab_size=1024, hidden_size=128, intermediate_size=512, num_layers=4,
                                      num_heads=8, num_kv_heads=4, head_dim=16, max_position_embeddings=512),
         "mamba2": Mamba2Config(vocab_size=1024, hidden_size=128, num_layers=4, state_size=32, head_dim=32,
                                n_groups=2, chunk_size=128)}
CACHE_LEN, BATCH = 256, 8


def per_device_bytes(tree) -> int:
    """Bytes one device holds of the abstract arrays of ``tree`` (its shard of each)."""
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def logical_bytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def v5e_mesh():
    return S.make_mesh("2x4", devices=aot.topology_devices("v5e"))


@needs_libtpu
def test_topologies_are_tpu_slices():
    devices = aot.topology_devices("v5e")
    assert len(devices) == 8 and aot.device_hbm(devices[0]) == 16 * 2**30
    assert aot.device_hbm(aot.tpu_device("v4")) == 32 * 2**30
    pod = aot.topology_devices("v5e-32")
    assert len(pod) == 32 and len({d.process_index for d in pod}) == 8  # several hosts
    with pytest.raises(S.ShardingError, match="unknown TPU topology 'v9'"):
        aot.topology_devices("v9")


@needs_libtpu
@pytest.mark.parametrize("family", ["transformer", "mamba2"])
def test_decode_step_compiles_for_v5e(v5e_mesh, family):
    """``decode_chunk`` (exits on, the state donated) compiled by XLA:TPU for a 2x4 mesh: each
    chip holds its shard of the weights and caches, not the whole, and the caches are updated
    in the donated buffers."""
    config, ec = SMALL[family], ExitConfig(kind="ffn")
    result = aot.compile_timed(lambda: aot.lower_decode(config, v5e_mesh, batch=BATCH, cache_len=CACHE_LEN,
                                                        num_steps=2, exit_config=ec))
    memory = result.memory
    params = aot.abstract_decode_params(config, v5e_mesh, jnp.bfloat16)
    stacked = aot.abstract_exit_params(config, ec, v5e_mesh, jnp.bfloat16)
    settings, _, exit_params = aot.abstract_configure(config, 2, v5e_mesh, ec, stacked)
    state = aot.abstract_decode_state(config, settings, params, exit_params, BATCH, CACHE_LEN, v5e_mesh)
    shard = per_device_bytes((params, exit_params, state))
    assert per_device_bytes(params) < logical_bytes(params)  # the model axis splits the weights
    assert shard <= memory.arguments <= 4 * shard + 2**20  # TPU layouts pad small arrays to (8, 128) tiles
    assert memory.aliased >= per_device_bytes(state.caches)  # caches donated and updated in place
    assert 0 < memory.total < 2**30 and memory.temporaries >= 0
    assert result.lower_s > 0 and result.compile_s > 0


@needs_libtpu
def test_distill_step_compiles_for_v5e(v5e_mesh):
    """One ``train.distill`` step (``jit_train_step``) compiled by XLA:TPU for a 2x4 mesh: the
    exit params and AdamW state are donated, the backbone split over the model axis."""
    config, ec = SMALL["transformer"], ExitConfig(kind="ffn")
    memory = aot.compile_timed(lambda: aot.lower_distill_step(config, v5e_mesh, exit_config=ec)).memory
    backbone = aot.abstract_params(config, v5e_mesh, jnp.bfloat16)
    exits = aot.abstract_exit_params(config, ec, v5e_mesh, jnp.float32)
    batch = (8 * 256 * 4 + 8 * 256 * 4) // 2  # tokens (int32) and mask (float32) [8, 256], rows over data=2
    shard = per_device_bytes((backbone, exits)) + batch
    assert shard <= memory.arguments <= 4 * shard + 2**20
    assert memory.aliased >= per_device_bytes(exits)  # exit params (and optimizer state) updated in place
    assert 0 < memory.total < 2**30


@needs_libtpu
def test_mamba2_prefill_runs_the_kernel_per_device_on_v5e(v5e_mesh):
    """A Mamba2 prefill on a 2x4 mesh compiles through Mosaic: XLA cannot partition a Pallas
    kernel, so ``ops.ssd`` runs it on each device's rows and heads (``shard_map``)."""
    config = SMALL["mamba2"]
    result = aot.compile_timed(lambda: aot.lower_prefill(config, v5e_mesh, batch=2, prompt_len=300,
                                                         cache_len=CACHE_LEN, exit_config=ExitConfig(kind="ffn")))
    assert "tpu_custom_call" in result.compiled.as_text()
    assert 0 < result.memory.total < 2**30


@pytest.mark.parametrize("family", ["transformer", "mamba2"])
def test_bfloat16_training_programs_lower(family):
    """The distill step and the cached pass lower with bfloat16 weights for both backbones
    (here for this host's one device): the stacked forward keeps its residual stream in
    float32 whatever the weights' dtype."""
    config, ec, mesh = SMALL[family], ExitConfig(kind="ffn"), S.make_mesh("1x1")
    for lower in (aot.lower_distill_step, aot.lower_cached_pass):
        lowered = lower(config, mesh, exit_config=ec, dtype=jnp.bfloat16, batch_size=2, seq_len=64)
        assert "bf16" in lowered.as_text()


SSD_ON_A_MESH = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from dynamax_jax import sharding as S
from dynamax_jax.kernels.ssd import ops
b, l, h, p, g, n, q = 4, 40, 8, 16, 4, 16, 16
rng = np.random.default_rng(0)
normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
args = (normal(b, l, h, p), 0.1 * jnp.abs(normal(b, l, h)), -jnp.abs(normal(h)), normal(b, l, g, n),
        normal(b, l, g, n), normal(h), normal(b, h, p, n))
specs = (P("data", None, "model", None), P("data", None, "model"), P("model"), P("data", None, "model", None),
         P("data", None, "model", None), P("model"), P("data", "model", None, None))

def loss(impl):
    return lambda *a: sum(jnp.sum(o ** 2) for o in ops.ssd(*a[:6], chunk_size=q, initial_state=a[6], impl=impl))

want = ops.ssd(*args[:6], chunk_size=q, initial_state=args[6], impl="reference")
want_grads = jax.grad(loss("reference"), argnums=tuple(range(7)))(*args)
for spec in ("2x4",):
    mesh = S.make_mesh(spec)
    placed = [jax.device_put(a, NamedSharding(mesh, S.fit_spec(s, a.shape, mesh))) for a, s in zip(args, specs)]
    run = jax.jit(lambda *a: ops.ssd(*a[:6], chunk_size=q, initial_state=a[6], impl="interpret"))
    for got, ref in zip(run(*placed), want):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    grads = jax.jit(jax.grad(loss("interpret"), argnums=tuple(range(7))))(*placed)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
    print("checked", spec)
"""


def test_ssd_kernel_on_a_mesh_equals_the_reference():
    """On 8 simulated CPU devices (a 2x4 mesh), the SSD kernel (interpret mode) on inputs
    split over rows and heads, run per device, gives the reference's outputs and gradients."""
    proc = subprocess.run([sys.executable, "-c", SSD_ON_A_MESH], cwd=ROOT, env=S.xla_cpu_devices_flag(8),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines()] == ["2x4"]


def test_abstract_decode_layout_matches_decode_params():
    """On 8 simulated CPU devices, ``aot.abstract_decode_params`` has the shapes, dtypes and
    placements that ``decode_params`` gives params placed by the table (fused projections when
    the heads are whole on every device, the stored ones when they are split)."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        import dynamax_jax as dx
        from dynamax_jax import aot, sharding as S
        from dynamax_jax.config import MistralConfig, Mamba2Config
        from dynamax_jax.models import module_for
        configs = [MistralConfig.tiny(num_heads=8, num_kv_heads=4, intermediate_size=256),
                   MistralConfig.tiny(num_heads=3, num_kv_heads=1, intermediate_size=256),
                   Mamba2Config.tiny()]
        for config in configs:
            for spec in ("1x8", "2x4", "8x1"):
                mesh = S.make_mesh(spec)
                params = module_for(config).init_params(config, jax.random.key(0), jnp.bfloat16)
                real = dx.decode_params(S.shard(mesh, S.param_specs(config), params), config=config)
                abstract = aot.abstract_decode_params(config, mesh, jnp.bfloat16)
                assert jax.tree.structure(real) == jax.tree.structure(abstract), (config, spec)
                for path, r, a in zip(jax.tree_util.tree_leaves_with_path(real), jax.tree.leaves(real),
                                      jax.tree.leaves(abstract)):
                    where = (type(config).__name__, spec, jax.tree_util.keystr(path[0]))
                    assert (r.shape, r.dtype) == (a.shape, a.dtype), where
                    assert r.sharding.is_equivalent_to(a.sharding, r.ndim), (where, r.sharding, a.sharding)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=S.xla_cpu_devices_flag(8),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
