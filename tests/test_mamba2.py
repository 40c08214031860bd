"""Mamba2 backbone: parity with transformers' ``Mamba2ForCausalLM`` (torch_forward path, CPU,
float32), cached decode and padded prefill against the full forward, the Codestral 7B
shape, and the Hugging Face / Codestral converters."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax.convert.errors import ConfigError, CorruptFileError, MissingTensorError, ShapeMismatchError
from dynamax_jax.config import Mamba2Config
from dynamax_jax.models import mamba2
from tests.conftest import random_tokens

TINY_HF = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, head_dim=8,
               num_heads=8, conv_kernel=4, chunk_size=16, initializer_range=0.1, tie_word_embeddings=False,
               layer_norm_epsilon=1e-5)
CHUNK = TINY_HF["chunk_size"]


def build_hf_mamba2(seed: int = 0, **overrides):
    """A tiny random ``Mamba2ForCausalLM`` in eval mode. Norm weights, conv bias, D, dt_bias
    and A_log are randomised too (their inits are constants that would hide a swap)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.Mamba2Config(**{**TINY_HF, **overrides})
    model = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("conv1d.bias"):
                param.normal_(0.0, 0.1)
            elif name.endswith(".D"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("A_log"):
                param.add_(torch.rand_like(param) * 0.5)
            elif name.endswith("dt_bias"):
                param.add_(torch.randn_like(param) * 0.5)
    return model


def set_hf_norm_groups(model, per_group: bool) -> None:
    """Make transformers' gated norm normalise per group (mamba_ssm) or over the full width."""
    for layer in model.backbone.layers:
        norm = layer.mixer.norm
        if not hasattr(norm, "group_size"):  # older transformers: full width only
            if per_group and model.config.n_groups > 1:
                pytest.skip("the installed transformers cannot normalise the gated norm per group")
            return
        inner = model.config.expand * model.config.hidden_size
        norm.group_size = inner // model.config.n_groups if per_group else inner


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long), use_cache=False).logits.float().numpy()


def to_ours(model, tmp_path, name="hf"):
    """Save the torch model in HF format and load it through our converter."""
    path = tmp_path / name
    model.save_pretrained(path)
    return dx.load_pretrained(path)


@pytest.fixture(scope="module")
def hf_g1():
    return build_hf_mamba2(seed=0, n_groups=1)


@pytest.fixture(scope="module")
def ours_g1(hf_g1, tmp_path_factory):
    return to_ours(hf_g1, tmp_path_factory.mktemp("g1"))


_forward = jax.jit(mamba2.forward, static_argnums=(0,))
_apply = jax.jit(mamba2.apply, static_argnums=(0,), static_argnames=("return_hidden",))


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("length", [5, CHUNK, 2 * CHUNK + 5])
def test_parity_one_group(hf_g1, ours_g1, length):
    config, params = ours_g1
    assert config.n_groups == 1 and config.chunk_size == CHUNK and config.num_heads == 8
    tokens = random_tokens(config.vocab_size, 2, length, seed=length)
    ours = np.asarray(_forward(config, params, jnp.asarray(tokens)))
    ref = hf_logits(hf_g1, tokens)
    assert ours.shape == ref.shape == (2, length, config.vocab_size)
    assert np.abs(ref).max() > 0.5  # logits are O(1): the tolerance is meaningful
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("per_group", [True, False])
def test_parity_groups(tmp_path, per_group):
    """n_groups > 1 (heads share B/C by group) with a finite dt limit; the gated norm per
    group (mamba_ssm) and over the full width (older transformers)."""
    hf = build_hf_mamba2(seed=1, n_groups=2, time_step_limit=(0.0, 0.3))
    set_hf_norm_groups(hf, per_group)
    config, params = to_ours(hf, tmp_path)
    config = dataclasses.replace(config, norm_per_group=per_group)
    assert config.n_groups == 2 and config.time_step_limit == (0.0, 0.3)
    tokens = random_tokens(config.vocab_size, 2, CHUNK + 7, seed=3)
    ours = np.asarray(_forward(config, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_gated_norm_per_group_matches_einsum():
    rng = np.random.default_rng(0)
    y, z = rng.standard_normal((2, 3, 48)).astype(np.float32), rng.standard_normal((2, 3, 48)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 48).astype(np.float32)
    groups, eps = 4, 1e-5
    gated = (y * (z / (1 + np.exp(-z)))).reshape(2, 3, groups, 12)
    mean_sq = np.einsum("btgi,btgi->btg", gated, gated) / 12
    expected = np.einsum("btgi,btg,gi->btgi", gated, 1 / np.sqrt(mean_sq + eps), w.reshape(groups, 12))
    out = mamba2.gated_rms_norm(jnp.asarray(y), jnp.asarray(z), jnp.asarray(w), groups, eps)
    np.testing.assert_allclose(out, expected.reshape(2, 3, 48), atol=1e-5, rtol=1e-5)
    full = mamba2.gated_rms_norm(jnp.asarray(y), jnp.asarray(z), jnp.asarray(w), 1, eps)
    assert np.abs(np.asarray(full) - expected.reshape(2, 3, 48)).max() > 1e-2  # the choice matters


# ----------------------------------------------------------------------------- state

def test_decode_equals_prefill(ours_g1):
    """Prefill a prompt whose length is not a multiple of chunk_size, then decode one token
    at a time: every logit equals the full forward over the whole sequence."""
    config, params = ours_g1
    prompt_len, total = CHUNK + 5, CHUNK + 11
    tokens = jnp.asarray(random_tokens(config.vocab_size, 2, total, seed=7))
    full = np.asarray(_forward(config, params, tokens))
    state = mamba2.init_state(config, 2)
    logits, state, hidden = _apply(config, params, tokens[:, :prompt_len], state, return_hidden=True)
    np.testing.assert_allclose(logits, full[:, :prompt_len], atol=1e-4, rtol=0)
    np.testing.assert_allclose(mamba2.head(config, params, hidden[-1]), logits, atol=1e-5, rtol=0)
    for t in range(prompt_len, total):
        logits, state, _ = _apply(config, params, tokens[:, t:t + 1], state)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4, rtol=0)

    # From an empty state, token by token (the conv window filling up), then a prefill that
    # continues from that state.
    state = mamba2.init_state(config, 2)
    for t in range(5):
        logits, state, _ = _apply(config, params, tokens[:, t:t + 1], state)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4, rtol=0)
    logits, state, _ = _apply(config, params, tokens[:, 5:10], state)
    np.testing.assert_allclose(logits, full[:, 5:10], atol=1e-4, rtol=0)


def test_padded_prefill_matches_each_row_alone(ours_g1):
    """Right-padded rows (one full, one short) get the state of that row run alone, from a
    non-empty starting state; a row with length 0 keeps its state."""
    config, params = ours_g1
    t = CHUNK + 5
    tokens = jnp.asarray(random_tokens(config.vocab_size, 2, t, seed=11))
    lengths = jnp.asarray([t, 6], jnp.int32)
    _, start, _ = _apply(config, params, tokens[:, :5], mamba2.init_state(config, 2))
    logits, state, _ = _apply(config, params, tokens, start, lengths=lengths)
    for row in range(2):
        n = int(lengths[row])
        row_start = jax.tree.map(lambda a: a[:, row:row + 1], start)
        row_logits, row_state, _ = _apply(config, params, tokens[row:row + 1, :n], row_start)
        np.testing.assert_allclose(logits[row, :n], row_logits[0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(state.conv[:, row], row_state.conv[:, 0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(state.ssm[:, row], row_state.ssm[:, 0], atol=1e-4, rtol=0)

    _, kept, _ = _apply(config, params, tokens[:, :1], start, lengths=jnp.asarray([1, 0]))
    np.testing.assert_array_equal(kept.conv[:, 1], start.conv[:, 1])
    np.testing.assert_array_equal(kept.ssm[:, 1], start.ssm[:, 1])
    assert np.abs(np.asarray(kept.ssm[:, 0] - start.ssm[:, 0])).max() > 1e-3


def test_prefill_layer_matches_scanned_stack(ours_g1):
    """Layer by layer with sliced params and state reproduces ``apply``'s hidden states."""
    config, params = ours_g1
    tokens = jnp.asarray(random_tokens(config.vocab_size, 2, CHUNK + 5, seed=5))
    state = mamba2.init_state(config, 2)
    logits, new_state, hidden = _apply(config, params, tokens, state, return_hidden=True)
    layer_fn = jax.jit(mamba2.prefill_layer, static_argnums=(0,))
    x = mamba2.embed(config, params, tokens)
    for i in range(config.num_layers):
        layer_params = jax.tree.map(lambda a: a[i], params["layers"])
        layer_state = jax.tree.map(lambda a: a[i], state)
        x, layer_state = layer_fn(config, layer_params, x, layer_state)
        np.testing.assert_allclose(x, hidden[i], atol=1e-5, rtol=0)
        np.testing.assert_allclose(layer_state.ssm, new_state.ssm[i], atol=1e-5, rtol=0)
        np.testing.assert_allclose(layer_state.conv, new_state.conv[i], atol=1e-6, rtol=0)
    np.testing.assert_allclose(mamba2.head(config, params, x), logits, atol=1e-5)


def test_bad_lengths_shape(ours_g1):
    config, params = ours_g1
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        mamba2.apply(config, params, jnp.zeros((2, 3), jnp.int32), mamba2.init_state(config, 2),
                     lengths=jnp.array([3]))


# ----------------------------------------------------------------------------- shapes

CODESTRAL_7B = dict(vocab_size=32768, hidden_size=4096, num_layers=64, state_size=128, expand=2, head_dim=64,
                    n_groups=8, conv_kernel=4, chunk_size=256, tie_word_embeddings=False)


def test_codestral_7b_parameter_count():
    config = Mamba2Config(**CODESTRAL_7B)
    assert config.num_heads == 128
    shapes = jax.eval_shape(lambda: mamba2.init_params(config, jax.random.key(0), jnp.bfloat16))
    assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == 7_285_403_648
    layers = shapes["layers"]
    assert layers["in_proj"].shape == (64, 4096, 2 * 8192 + 2 * 8 * 128 + 128)
    assert layers["conv_w"].shape == (64, 4, 8192 + 2 * 8 * 128)
    state = jax.eval_shape(lambda: mamba2.init_state(config, 1))
    assert state.conv.shape == (64, 1, 3, 10240) and state.ssm.shape == (64, 1, 128, 64, 128)


# ----------------------------------------------------------------------------- converters

def _codestral_fixture(model, path, params_json=None):
    """Write ``model`` in the Codestral Mamba release layout (params.json + consolidated)."""
    from safetensors.numpy import save_file

    path.mkdir()
    renamed = {}
    for name, tensor in model.state_dict().items():
        name = name.replace("backbone.embeddings.", "backbone.embedding.")
        renamed["model." + name] = tensor.numpy().copy()
    save_file(renamed, str(path / "consolidated.safetensors"))
    cfg = model.config
    params_json = params_json or dict(
        dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size, n_groups=cfg.n_groups,
        rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=1,
        tie_embeddings=False, model_type="mamba")
    (path / "params.json").write_text(json.dumps(params_json))
    return path


def _assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def hf_g2():
    return build_hf_mamba2(seed=2, n_groups=2)


def test_codestral_and_hf_layouts_load_identically(hf_g2, tmp_path):
    hf_config, hf_params = to_ours(hf_g2, tmp_path)
    cs_config, cs_params = dx.load_pretrained(_codestral_fixture(hf_g2, tmp_path / "codestral"))
    _assert_same_params(cs_params, hf_params)
    # Sizes params.json leaves out come from the tensor shapes; chunk_size takes the default.
    assert cs_config.chunk_size == 256
    assert dataclasses.replace(cs_config, chunk_size=CHUNK, bos_token_id=0, eos_token_id=2) == hf_config


def test_codestral_params_json_defaults():
    config = Mamba2Config.from_codestral_params(dict(
        dim=4096, n_layers=64, vocab_size=32768, n_groups=8, rms_norm=True, residual_in_fp32=True,
        fused_add_norm=True, pad_vocab_size_multiple=1, tie_embeddings=False, model_type="mamba"))
    assert config == Mamba2Config(**CODESTRAL_7B)
    with pytest.raises(ConfigError, match="'dim'"):
        Mamba2Config.from_codestral_params(dict(n_layers=2, vocab_size=8, model_type="mamba"))
    with pytest.raises(ConfigError, match="not a Mamba model"):
        Mamba2Config.from_codestral_params(dict(dim=8, n_layers=2, vocab_size=8, model_type="transformer"))


def test_save_pretrained_round_trip_in_transformers(tmp_path):
    import transformers

    config = Mamba2Config.tiny(num_layers=2, n_groups=2, hidden_size=32, head_dim=8, state_size=8,
                               vocab_size=96, bos_token_id=0, eos_token_id=2)
    params = mamba2.init_params(config, jax.random.key(3))
    # Non-trivial norms, so that a swapped or dropped norm shows.
    params["layers"]["gate_norm"] = jax.random.uniform(jax.random.key(4), params["layers"]["gate_norm"].shape,
                                                       minval=0.5, maxval=1.5)
    dx.save_pretrained(config, params, tmp_path / "out")
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    set_hf_norm_groups(hf, config.norm_per_group)
    tokens = random_tokens(config.vocab_size, 2, 21, seed=9)
    np.testing.assert_allclose(hf_logits(hf, tokens), _forward(config, params, jnp.asarray(tokens)),
                               atol=1e-4, rtol=0)
    back_config, back_params = dx.load_pretrained(tmp_path / "out")
    assert back_config == config
    _assert_same_params(back_params, params)


def test_bad_checkpoints(hf_g1, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "hf"
    hf_g1.save_pretrained(path)
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))

    missing = {k: v for k, v in tensors.items() if k != "backbone.layers.1.mixer.A_log"}
    save_file(missing, str(weights))
    with pytest.raises(MissingTensorError, match="'backbone.layers.1.mixer.A_log'"):
        dx.load_pretrained(path)

    wrong = dict(tensors)
    wrong["backbone.layers.0.mixer.conv1d.weight"] = np.zeros((80, 1, 3), np.float32)
    save_file(wrong, str(weights))
    with pytest.raises(ShapeMismatchError, match=r"conv1d.weight.*expected \(80, 1, 4\), found \(80, 1, 3\)"):
        dx.load_pretrained(path)

    save_file(tensors, str(weights))
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) - 100])
    with pytest.raises(CorruptFileError, match="truncated"):
        dx.load_pretrained(path)

    hf_config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf_config, "num_heads": 5}))
    with pytest.raises(ConfigError, match=r"num_heads \(5\)"):
        dx.load_pretrained(path)


def test_bad_codestral_checkpoint(hf_g1, tmp_path):
    path = _codestral_fixture(hf_g1, tmp_path / "cs")
    (path / "params.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="params.json"):
        dx.load_pretrained(path)
    (path / "params.json").write_text(json.dumps(dict(dim=32, n_layers=3, vocab_size=96, n_groups=1,
                                                      model_type="mamba")))
    with pytest.raises(MissingTensorError, match="'model.backbone.layers.2.norm.weight'"):
        dx.load_pretrained(path)
