"""Decoding with params on a mesh of 8 simulated CPU devices gives the single-device tokens,
exit layers and FLOPs, for both backbones and the decode behaviours: per-row exits in the
default and ``shift`` skipped-layer modes, an adapter, static pruning, the budget controller, sampling, chunked
streaming (``prefill`` + ``decode_chunk``) and new thresholds without a retrace. The caches
follow the sharding table. The checks run in a subprocess, because this pytest process may
already have started jax with one device."""

from __future__ import annotations

import pytest

from dynamax_jax.models import skipped_layer_modes
from tests.test_sharding import run_with_devices


def checked(family: str, cases: list[str], meshes: list[str]) -> None:
    """Run ``CHECK`` and assert that every case the backbone supports was compared."""
    family_name = "transformer" if family == "mistral" else family
    modes = skipped_layer_modes(family_name)
    want = [c for c in cases if not c.startswith("mode:") or c[5:] in modes]
    out = run_with_devices(CHECK.format(family=family, meshes=meshes, cases=cases))
    assert [line.split()[1] for line in out.splitlines() if line.startswith("checked")] == want, out

CHECK = """
import dataclasses
import jax, jax.numpy as jnp, numpy as np
import dynamax_jax as dx
from dynamax_jax import decoding, sharding as S
from dynamax_jax.config import Mamba2Config, MistralConfig
from dynamax_jax.exits import ExitConfig, init_exits
from dynamax_jax.models import module_for

FAMILY, MESHES, CASES = {family!r}, {meshes!r}, {cases!r}
config = (MistralConfig.tiny(num_kv_heads=3, num_heads=6) if FAMILY == "mistral"
          else Mamba2Config.tiny())
params = dx.init_params(config, jax.random.key(0))
modes = module_for(config).SKIPPED_LAYER_MODES
prompt = [list(range(3, 3 + n)) for n in (5, 2, 7, 4, 6, 3, 5, 1)]

def heads(mode, adapter="none", kind="ffn"):
    ec = ExitConfig(layers=(1, 2, 3), kind=kind, threshold=0.5, mode=mode, adapter=adapter,
                    mamba_head_dim=16, adapter_rank=4)
    ep = init_exits(config, ec, jax.random.key(1))
    ep = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), ep)
    return ec, ep

def case(name):
    kw = dict(max_new_tokens=6)
    if name == "full":
        return kw
    if name.startswith("mode:"):
        ec, ep = heads(name[5:])
        return {{**kw, "exit_config": ec, "exit_params": ep}}
    if name == "static":
        return {{**kw, "static_exit_layer": 2}}
    if name == "sampled":  # an adapter, a mamba classifier, the budget controller and sampling
        ec, ep = heads(None, adapter="affine", kind="mamba")
        return {{**kw, "exit_config": ec, "exit_params": ep, "target_layers": 2.5, "temperature": 0.8,
                 "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.3, "key": jax.random.key(7)}}
    raise ValueError(name)

def shard(mesh, kw):
    kw = dict(kw)
    if "exit_params" in kw:
        kw["exit_params"] = S.shard_exit_params(mesh, kw["exit_config"], kw["exit_params"])
    return S.shard(mesh, S.param_specs(config), params), kw

def same(a, b, name):
    for field in ("tokens", "exit_layers", "num_generated"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), (name, field, getattr(a, field),
                                                                        getattr(b, field))
    for field in ("avg_layers", "flops_per_token", "flops_relative"):
        assert getattr(a, field) == getattr(b, field), (name, field)

for name in CASES:
    if name.startswith("mode:") and name[5:] not in modes:
        continue
    kw = case(name)
    want = dx.generate(config, params, prompt, **kw)
    for spec in MESHES:
        mesh = S.make_mesh(spec)
        sharded, skw = shard(mesh, kw)
        same(dx.generate(config, sharded, prompt, **skw), want, (name, spec))
    print("checked", name)
"""

STREAM = """
import jax, jax.numpy as jnp, numpy as np
import dynamax_jax as dx
from dynamax_jax import decoding, sharding as S
from dynamax_jax.config import Mamba2Config, MistralConfig
from dynamax_jax.exits import ExitConfig, init_exits

FAMILY = {family!r}
config = MistralConfig.tiny(num_kv_heads=3, num_heads=6) if FAMILY == "mistral" else Mamba2Config.tiny()
params = dx.init_params(config, jax.random.key(0))
ec = ExitConfig(layers=(1, 2, 3), kind="mamba", mamba_head_dim=16)
ep = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape),
                  init_exits(config, ec, jax.random.key(1)))
prompt, lengths = decoding.as_prompt([[3, 4, 5, 6], [7, 8], [9, 10, 11, 12], [5, 6, 7, 8]], None, config.vocab_size)

def stream(params, ep, thresholds, mesh=None):
    settings, controls, per_exit = decoding.configure(config, 8, exit_config=ec, exit_params=ep)
    controls = controls.__class__(**{{**vars(controls), "thresholds": jnp.asarray(thresholds, jnp.float32)}})
    p = decoding.decode_params(params, config=config)
    rows = (lambda a: S.place_rows(mesh, a)) if mesh is not None else jnp.asarray
    with (jax.set_mesh(mesh) if mesh is not None else __import__("contextlib").nullcontext()):
        state = decoding.prefill(config, settings, p, per_exit, rows(prompt), rows(lengths), cache_len=16)
        if mesh is not None:  # the caches follow the table
            for leaf, spec in zip(jax.tree.leaves(state.caches), jax.tree.leaves(
                    S.state_specs(state.caches), is_leaf=lambda x: isinstance(x, S.P))):
                want = jax.sharding.NamedSharding(mesh, S.fit_spec(spec, leaf.shape, mesh))
                assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)
        out = []
        for _ in range(2):
            chunk, state = decoding.decode_chunk(config, settings, 4, p, per_exit, state, controls, jax.random.key(0))
            out.append((np.asarray(chunk.tokens), np.asarray(chunk.exit_layers)))
    return out

for spec in ("2x4",):
    mesh = S.make_mesh(spec)
    sharded, sep = S.shard(mesh, S.param_specs(config), params), S.shard_exit_params(mesh, ec, ep)
    sizes = None
    for thresholds in ([0.5, 0.6, 0.7], [0.9, 0.2, 0.4]):
        want = stream(params, ep, thresholds)
        got = stream(sharded, sep, thresholds, mesh)
        for (wt, we), (gt, ge) in zip(want, got):
            assert np.array_equal(wt, gt) and np.array_equal(we, ge), (spec, thresholds, wt, gt, we, ge)
        now = (decoding.prefill._cache_size(), decoding.decode_chunk._cache_size())
        assert sizes is None or now == sizes, ("new thresholds recompiled", sizes, now)
        sizes = now
    print("ok stream", spec)
"""



@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "mamba2"])
def test_tokens_exits_and_flops_equal_on_a_mesh(family):
    """Full depth and exits in the backbone's default mode on meshes 1x8, 2x4 and 8x1; on 2x4
    (both axes split) also ``shift`` (``propagate``'s layer update from a moved hidden state),
    static pruning, and a mamba classifier with an adapter under the budget controller, sampled. The tiny Mistral has 3
    key/value heads, which 8 and 4 do not divide: the table replicates them."""
    checked(family, ["full", "mode:copy", "mode:skip"], ["1x8", "2x4", "8x1"])
    checked(family, ["mode:shift", "static", "sampled"], ["2x4"])


@pytest.mark.parametrize("family", ["mistral", "mamba2"])
def test_chunked_streaming_and_no_retrace_on_a_mesh(family):
    """``prefill`` then two ``decode_chunk`` calls under ``jax.set_mesh``: the caches follow
    the table, the tokens and exit layers equal one device's, and new thresholds reuse the
    compiled programs."""
    out = run_with_devices(STREAM.format(family=family))
    assert out.count("ok stream") == 1, out
