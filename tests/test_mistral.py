"""Mistral / Llama backbone: parity with transformers (float32, CPU), cached decode,
full-size shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax.models import mistral
from tests.conftest import hf_logits, random_tokens

PARITY_CASES = {
    # sliding window (6) shorter than the sequence (20), GQA ratio 2
    "mistral_sliding_window": ("mistral", dict(sliding_window=6)),
    # tied embeddings (no lm_head), GQA ratio 1, non-default rope_theta
    "llama_tied_mha": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4, rope_theta=500000.0)),
    # head_dim (24) != hidden / heads (64 / 8), GQA ratio 4
    "llama_gqa4_head_dim": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24)),
    "mistral_head_dim_no_window": ("mistral", dict(head_dim=8, sliding_window=None, num_hidden_layers=3)),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_with_transformers(save_hf_model, case):
    model_type, overrides = PARITY_CASES[case]
    hf_model, path = save_hf_model(model_type, **overrides)
    config, params = dx.load_pretrained(path)
    hf_cfg = hf_model.config
    assert config.model_type == model_type
    assert (config.num_heads, config.num_kv_heads) == (hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads)
    assert config.head_dim == (getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads)
    assert config.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    assert ("lm_head" in params) != config.tie_word_embeddings
    if "rope_theta" in overrides:
        assert config.rope_theta == overrides["rope_theta"]
    if model_type == "mistral":
        assert config.sliding_window == overrides.get("sliding_window")

    tokens = random_tokens(config.vocab_size, 2, 20)
    expected = hf_logits(hf_model, tokens)
    assert np.abs(expected).max() > 0.5  # logits large enough for the tolerance to mean something
    forward = jax.jit(lambda p, t: mistral.forward(config, p, t, return_hidden=True))
    logits, hidden = forward(params, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
    # the decode layout: one buffer per layer, q/k/v and gate/up each one matrix
    layout = dx.decode_params(params)
    assert {"w_qkv", "w_gate_up", "wk", "wv"} <= set(layout["layers"][0]) and "wq" not in layout["layers"][0]
    np.testing.assert_allclose(np.asarray(jax.jit(lambda p, t: mistral.forward(config, p, t))(layout, jnp.asarray(tokens))),
                               expected, atol=1e-4, rtol=0)

    # hidden[i] is the output of layer i + 1 (1-based layer counts), as hidden_states[i + 1]
    # in transformers (whose last entry is after the final norm, so it is skipped).
    import torch

    with torch.no_grad():
        hf_hidden = hf_model(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True).hidden_states
    for i in range(config.num_layers - 1):
        np.testing.assert_allclose(np.asarray(hidden[i]), hf_hidden[i + 1].numpy(), atol=1e-4, rtol=0)


def _random_params(config, seed: int):
    """Random params of the right shapes without running ``init_params`` (whose flax init
    costs seconds of compile); weights std 0.1 so logits are O(1), norm scales around one."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: dx.init_params(config, jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if "norm" in jax.tree_util.keystr(path)
                                    else rng.normal(0.0, 0.1, s.shape), jnp.float32), shapes)


def _decode_step_by_step(config, params, tokens, prompt_lens):
    """Prefill each row's prompt (right-padded to the longest), then feed the rest of each
    row one token at a time at its own position. Returns logits ``[B, T, V]`` where row
    ``b``'s positions ``< prompt_lens[b]`` come from the prefill and the rest from decode."""
    batch, total = tokens.shape
    cache = mistral.KVCache.init(config, batch, total)
    prefill_len = max(prompt_lens)
    step = jax.jit(lambda p, tok, c, s: mistral.apply(config, p, tok, c, s)[:2])
    logits, cache = step(params, jnp.asarray(tokens[:, :prefill_len]), cache, jnp.zeros((batch,), jnp.int32))
    out = np.zeros((batch, total, config.vocab_size), np.float32)
    for b, n in enumerate(prompt_lens):
        out[b, :n] = np.asarray(logits[b, :n])
    position = np.array(prompt_lens)
    while (position < total).any():
        index = np.minimum(position, total - 1)
        next_tokens = tokens[np.arange(batch), index][:, None]
        logits, cache = step(params, jnp.asarray(next_tokens), cache, jnp.asarray(position, jnp.int32))
        for b in range(batch):
            if position[b] < total:
                out[b, position[b]] = np.asarray(logits[b, 0])
        position = position + 1
    return out


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_cached_decode_matches_full_forward(sliding_window):
    config = dx.MistralConfig.tiny(sliding_window=sliding_window, num_layers=2)
    params = _random_params(config, seed=1)
    tokens = random_tokens(config.vocab_size, 2, 14, seed=2)
    full = np.asarray(dx.forward(config, params, jnp.asarray(tokens)))
    assert np.abs(full).max() > 0.5
    # rows at different positions: row 1's prompt is shorter, its padding slots are overwritten
    decoded = _decode_step_by_step(config, params, tokens, prompt_lens=[6, 3])
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=0)


MISTRAL_7B_V01 = {  # config.json of mistralai/Mistral-7B-v0.1
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_mistral_7b_shapes_without_allocating():
    config = dx.MistralConfig.from_hf_config(MISTRAL_7B_V01)
    shapes = jax.eval_shape(lambda: dx.init_params(config, jax.random.key(0), jnp.bfloat16))
    leaves = jax.tree.leaves(shapes)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == 7_241_732_096
    assert shapes["layers"]["wq"].shape == (32, 4096, 32, 128)
    assert shapes["layers"]["wk"].shape == (32, 4096, 8, 128)
    assert shapes["lm_head"].shape == (4096, 32000)
    assert config.to_hf_config()["sliding_window"] == 4096
