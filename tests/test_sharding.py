"""The mesh helper and the sharding table: every param of both backbones and of every exit
classifier kind is named; a jitted forward with in/out shardings on 8 simulated CPU
devices equals the single-device result. Multi-device checks run in a subprocess because
this pytest process may already have started jax with one device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from dynamax_jax import sharding as S
from dynamax_jax.config import Mamba2Config, MistralConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(code: str, count: int = 8, timeout: int = 600) -> str:
    env = S.xla_cpu_devices_flag(count)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def spec_leaves(specs):
    return jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))


@pytest.mark.parametrize("tied", [False, True])
def test_table_covers_every_mistral_param(tied):
    from dynamax_jax.models import mistral

    config = MistralConfig.tiny(tie_word_embeddings=tied)
    params = mistral.init_params(config, jax.random.key(0))
    mesh = S.make_mesh("1x1")
    shardings = S.shardings_for(mesh, S.param_specs(config), params)
    assert jax.tree.structure(shardings) == jax.tree.structure(params)
    assert len(spec_leaves(S.param_specs(config))) == len(jax.tree.leaves(params))


@pytest.mark.parametrize("overrides", [{}, {"use_bias": True, "use_conv_bias": False, "tie_word_embeddings": True}])
def test_table_covers_every_mamba2_param(overrides):
    from dynamax_jax.models import mamba2

    config = Mamba2Config.tiny(**overrides)
    params = mamba2.init_params(config, jax.random.key(0))
    mesh = S.make_mesh("1x1")
    shardings = S.shardings_for(mesh, S.param_specs(config), params)
    assert jax.tree.structure(shardings) == jax.tree.structure(params)


@pytest.mark.parametrize("kind", ["calm", "ffn", "mamba", "hybrid"])
@pytest.mark.parametrize("adapter", ["none", "affine", "lowrank"])
def test_table_covers_every_exit_param(kind, adapter):
    from dynamax_jax.exits import ExitConfig, init_exits

    config = MistralConfig.tiny()
    ec = ExitConfig(layers=(2, 3), kind=kind, mamba_head_dim=16, adapter=adapter, adapter_rank=8)
    exit_params = init_exits(config, ec, jax.random.key(0))
    shardings = S.shardings_for(S.make_mesh("1x1"), S.exit_param_specs(kind, adapter), exit_params)
    assert jax.tree.structure(shardings) == jax.tree.structure(exit_params)
    with pytest.raises(S.ShardingError, match="supported: none, affine, lowrank"):
        S.exit_param_specs(kind, "mlp")


def test_mismatched_trees_are_named():
    from dynamax_jax.models import mistral

    config = MistralConfig.tiny()
    params = mistral.init_params(config, jax.random.key(0))
    mesh = S.make_mesh("1x1")
    broken = {**params, "layers": {k: v for k, v in params["layers"].items() if k != "wk"}}
    with pytest.raises(S.ShardingError, match=r"params/layers is missing \['wk'\]"):
        S.shardings_for(mesh, S.param_specs(config), broken)
    extra = {**params, "lora": jnp.zeros((2,))}
    with pytest.raises(S.ShardingError, match=r"params has \['lora'\]"):
        S.shardings_for(mesh, S.param_specs(config), extra)
    wrong_rank = {**params, "final_norm": jnp.zeros((2, 2))}
    with pytest.raises(S.ShardingError, match=r"params/final_norm has 2 dimensions"):
        S.shardings_for(mesh, S.param_specs(config), wrong_rank)
    with pytest.raises(S.ShardingError, match="supported: calm, ffn, mamba"):
        S.exit_param_specs("lstm")


def test_mesh_errors():
    with pytest.raises(S.ShardingError, match=r"mesh 64x2 needs 128 devices but only \d+"):
        S.make_mesh("64x2")
    for bad in ("8", "8x", "0x1", "axb", "2x2x2"):
        with pytest.raises(S.ShardingError, match="DATAxMODEL"):
            S.parse_mesh(bad)
    assert S.parse_mesh("4X2") == (4, 2)
    mesh = S.make_mesh("1x1")
    assert mesh.axis_names == ("data", "model")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_indivisible_dimensions_are_replicated():
    mesh = S.make_mesh("1x1")
    assert S.fit_spec(P(None, "model"), (3, 5), mesh) == P(None, "model")  # 1 divides all

    class FakeMesh:
        shape = {"data": 4, "model": 2}

    assert S.fit_spec(P(None, None, "model", None), (2, 8, 3, 4), FakeMesh) == P(None, None, None, None)
    assert S.fit_spec(P("data", None, "model"), (8, 3, 6), FakeMesh) == P("data", None, "model")


@pytest.mark.slow
def test_sharded_forward_on_8_devices_equals_one_device():
    out = run_with_devices("""
        import jax, jax.numpy as jnp
        from jax.sharding import NamedSharding
        from dynamax_jax import sharding as S
        from dynamax_jax.config import MistralConfig
        from dynamax_jax.models import mistral

        assert len(jax.devices()) == 8
        config = MistralConfig.tiny(num_kv_heads=2)
        params = mistral.init_params(config, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, config.vocab_size)
        reference = jax.jit(lambda p, t: mistral.forward(config, p, t))(params, tokens)
        for spec in ("8x1", "4x2"):
            mesh = S.make_mesh(spec)
            param_sh = S.shardings_for(mesh, S.param_specs(config), params)
            step = jax.jit(lambda p, t: mistral.forward(config, p, t),
                           in_shardings=(param_sh, S.batch_sharding(mesh)),
                           out_shardings=NamedSharding(mesh, S.TABLE.logits_btv))
            with jax.set_mesh(mesh):
                logits = step(jax.device_put(params, param_sh), S.global_batch(mesh, tokens))
            assert len(logits.sharding.device_set) == 8
            if spec == "4x2":
                assert params["layers"]["w_up"].shape[-1] % 2 == 0
                assert jax.device_put(params, param_sh)["layers"]["w_up"].sharding.spec[-1] == "model"
            err = float(jnp.max(jnp.abs(logits - reference)))
            assert err <= 1e-5, (spec, err)
            print(spec, err)
    """)
    assert "8x1" in out and "4x2" in out


@pytest.mark.slow
def test_sharded_mamba2_forward_on_8_devices_equals_one_device():
    out = run_with_devices("""
        import jax, jax.numpy as jnp
        from jax.sharding import NamedSharding
        from dynamax_jax import sharding as S
        from dynamax_jax.config import Mamba2Config
        from dynamax_jax.models import mamba2

        config = Mamba2Config.tiny(num_layers=2)
        params = mamba2.init_params(config, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, config.vocab_size)
        reference = jax.jit(lambda p, t: mamba2.forward(config, p, t))(params, tokens)
        mesh = S.make_mesh("4x2")
        param_sh = S.shardings_for(mesh, S.param_specs(config), params)
        assert param_sh["layers"]["out_proj"].spec == S.TABLE.mamba_out_proj_lid
        step = jax.jit(lambda p, t: mamba2.forward(config, p, t),
                       in_shardings=(param_sh, S.batch_sharding(mesh)),
                       out_shardings=NamedSharding(mesh, S.TABLE.logits_btv))
        with jax.set_mesh(mesh):
            logits = step(jax.device_put(params, param_sh), S.global_batch(mesh, tokens))
        err = float(jnp.max(jnp.abs(logits - reference)))
        assert err <= 1e-5, err
        print("4x2", err)
    """)
    assert "4x2" in out
