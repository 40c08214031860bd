"""Prefill attention (``dynamax_jax.models.attention``): every implementation equals one masked
attention over all the keys (``mistral.attention`` with an explicit mask), float32."""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax.errors import ConfigError
from dynamax_jax.models import attention, mistral
from dynamax_jax.models.layers import attention_mask


def _qkv(t: int, heads: int, kv_heads: int, head_dim: int, batch: int = 2, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, t, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, t, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, t, kv_heads, head_dim))
    return q, k, v


def _reference(q, k, v, window):
    """One masked attention over all T keys (the cache layout ``[B, K, S, H]``)."""
    b, t = q.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    return mistral.attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), attention_mask(positions, t, window))


# (T, query heads, key/value heads, head dim, block): one block, several, a partial last block,
# the default block over 300 tokens, and a 2,048-token prompt with small heads
BLOCKED_CASES = [(1, 3, 1, 8, 4), (7, 3, 1, 8, 4), (7, 2, 2, 8, 256), (128, 6, 2, 16, 32), (300, 3, 3, 16, 256),
                 (300, 6, 2, 8, 64), (2040, 3, 1, 8, 256)]


@pytest.mark.parametrize("window", [None, 1, 5, 100])
@pytest.mark.parametrize("t,heads,kv_heads,head_dim,block", BLOCKED_CASES)
def test_blocked_equals_masked_attention(t, heads, kv_heads, head_dim, block, window):
    """Online softmax over query x key blocks, with and without a sliding window (1: each token
    sees only itself; 5 and 100: shorter than a block, longer than several), GQA ratios 1 and 3."""
    q, k, v = _qkv(t, heads, kv_heads, head_dim, batch=1 if t > 1000 else 2)
    want = _reference(q, k, v, window)
    got = jax.jit(attention.blocked_causal_attention, static_argnums=(3, 4))(q, k, v, window, block)
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 9])
def test_blocked_result_does_not_depend_on_chains(window):
    """The query blocks are dealt into independent loops; each block's arithmetic is the same
    whichever loop runs it, so the outputs are bitwise equal."""
    q, k, v = _qkv(61, 6, 2, 8)
    run = jax.jit(attention.blocked_causal_attention, static_argnums=(3, 4, 5))
    one = run(q, k, v, window, 8, 1)
    for chains in (3, 8):
        np.testing.assert_array_equal(run(q, k, v, window, 8, chains), one)


def test_deal_balances_work_and_covers_every_block():
    groups = attention._deal(8, 2)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert [sum(i + 1 for i in g) for g in groups] == [18, 18]  # block i reads i + 1 key blocks
    assert attention._deal(3, 8) == [[0], [1], [2]]


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("implementation", ["xla", "cudnn"])
def test_dot_product_attention_path_equals_blocked(implementation, window):
    """The GPU path (``jax.nn.dot_product_attention``) on CPU: float32 inputs go to its XLA
    implementation (cuDNN's kernel takes 16-bit inputs only), which equals the CPU path."""
    q, k, v = _qkv(37, 6, 2, 16)
    got = jax.jit(attention.causal_attention, static_argnums=(3, 4))(q, k, v, window, implementation)
    np.testing.assert_allclose(got, attention.blocked_causal_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 70])
def test_splash_kernel_interpreted_equals_blocked(window):
    """The TPU path, the Pallas splash kernel, run by the Pallas interpreter: 200 tokens padded
    to two of its 128-token blocks, GQA ratio 3."""
    q, k, v = _qkv(200, 6, 2, 64, batch=1)
    got = jax.jit(attention.splash_causal_attention, static_argnums=(3, 4))(q, k, v, window, True)
    np.testing.assert_allclose(got, _reference(q, k, v, window), rtol=1e-5, atol=1e-5)


def test_default_implementation_by_platform():
    assert attention.default_implementation("cpu") == "blocked"
    assert attention.default_implementation("gpu") == "cudnn"
    assert attention.default_implementation("cuda") == "cudnn"
    assert attention.default_implementation("tpu") == "splash"
    assert attention.default_implementation() == "blocked"  # these tests run on CPU
    with pytest.raises(ConfigError, match="implementation"):
        attention.causal_attention(*_qkv(4, 2, 1, 8), None, implementation="flash")


@pytest.mark.parametrize("window", [None, 40])
def test_prefill_layers_equal_the_stacked_forward(window):
    """The per-layer prefill (``prefill_layer``, as ``generate`` runs it; the decode layout's
    forward) over 300 tokens, two blocks of the default size, equals the stacked forward, which
    attends with an explicit mask over a cache of T slots."""
    config = dx.MistralConfig.tiny(num_layers=2, sliding_window=window, max_position_embeddings=512)
    params = mistral.init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 300)), jnp.int32)
    want = jax.jit(lambda p, t: dx.forward(config, p, t))(params, tokens)
    got = jax.jit(lambda p, t: dx.forward(config, p, t))(dx.decode_params(params), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'), so there is no TPU compiler")
@pytest.mark.parametrize("topology", ["v5e", "v4"])
@pytest.mark.parametrize("t,heads,kv_heads,head_dim,window", [(2047, 9, 3, 64, None), (300, 32, 8, 128, 100)])
def test_attention_on_tpu_inputs_compiles_the_splash_kernel(monkeypatch, topology, t, heads, kv_heads, head_dim,
                                                             window):
    """``causal_attention`` lowered on abstract bfloat16 inputs placed on one chip of a TPU
    topology (no TPU needed: libtpu's compiler runs here) picks the splash kernel from the
    inputs' devices, and Mosaic compiles it: SmolLM2's heads over 2,047 tokens, and Mistral 7B's
    with a sliding window over a prompt that is not a multiple of the kernel's block."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu's lock
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dynamax_jax.kernels.ssd import aot

    chip = NamedSharding(Mesh(np.array([aot.tpu_device(topology)]), ("chip",)), PartitionSpec())
    q = jax.ShapeDtypeStruct((1, t, heads, head_dim), jnp.bfloat16, sharding=chip)
    kv = jax.ShapeDtypeStruct((1, t, kv_heads, head_dim), jnp.bfloat16, sharding=chip)
    compiled = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, window)).lower(q, kv, kv).compile()
    assert re.search(r'custom_call_target="tpu_custom_call"', compiled.as_text()), "no Mosaic kernel: not splash"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]'), so there is no TPU compiler")
def test_attention_over_a_tpu_mesh_compiles_without_the_splash_kernel(monkeypatch):
    """XLA cannot partition a Mosaic kernel: inputs split over a v5e-8 mesh (batch over
    ``data``, heads over ``model``) take ``jax.nn.dot_product_attention``, which it can."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dynamax_jax.kernels.ssd import aot

    devices = topologies.get_topology_desc(platform="tpu", num_slices=1, wrap=(False, False, False),
                                           **aot.TOPOLOGIES["v5e"]).devices
    split = NamedSharding(Mesh(np.array(devices).reshape(2, 4), ("data", "model")),
                          PartitionSpec("data", None, "model", None))
    q = jax.ShapeDtypeStruct((2, 512, 32, 128), jnp.bfloat16, sharding=split)
    kv = jax.ShapeDtypeStruct((2, 512, 8, 128), jnp.bfloat16, sharding=split)
    compiled = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, None)).lower(q, kv, kv).compile()
    assert "tpu_custom_call" not in compiled.as_text()


@pytest.mark.parametrize("window", [None, 100])
def test_blocked_attention_has_the_gradient_of_the_same_function(window):
    """Training differentiates prefill layers: the blocked path's gradient (through its
    custom VJP) equals the gradient of ``jax.nn.dot_product_attention``'s path."""
    q = jax.random.normal(jax.random.key(0), (2, 300, 6, 16))
    k, v = (jax.random.normal(jax.random.key(i), (2, 300, 2, 16)) for i in (1, 2))

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention.causal_attention(q, k, v, window, impl)))

    got = jax.grad(loss("blocked"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)
