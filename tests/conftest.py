"""Shared test helpers: tiny random Hugging Face Mistral/Llama models (float32, eager
attention, fixed seeds) and checkpoint directories saved from them."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import dynamax_jax as dx


EVAL_DATA = Path(__file__).resolve().parents[1] / "eval" / "data"

TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-5, initializer_range=0.1)


def build_hf_model(model_type: str = "mistral", seed: int = 0, **overrides):
    """A tiny random ``MistralForCausalLM`` / ``LlamaForCausalLM`` in eval mode. Norm weights
    are randomised too (Hugging Face initialises them to one, which would hide a swapped
    norm), and ``initializer_range`` is raised so logits are O(1), not O(0.01)."""
    import torch
    import transformers

    classes = {"mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}
    config_cls, model_cls = classes[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY_HF, **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Float32 logits ``[B, T, V]`` of a torch model for ``tokens [B, T]``."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def random_tokens(vocab_size: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, length)).astype(np.int32)


@pytest.fixture
def save_hf_model(tmp_path):
    """``save_hf_model(model_type="mistral", name="model", **config_overrides) -> (model, dir)``:
    builds a tiny model and writes it with ``save_pretrained`` under ``tmp_path``."""

    def make(model_type: str = "mistral", name: str = "model", seed: int = 0, save_kwargs=None, **overrides):
        model = build_hf_model(model_type, seed=seed, **overrides)
        path = tmp_path / name
        model.save_pretrained(path, **(save_kwargs or {}))
        return model, path

    return make


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def eval_fixture_texts():
    """Every string in the evaluation stand-in fixtures (``eval/data/*.jsonl``)."""
    for path in sorted(EVAL_DATA.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            yield from _strings(json.loads(line))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 4-layer Llama in HF format with a byte-level BPE tokenizer trained on the
    evaluation fixtures (for end-to-end runs of the eval CLIs)."""
    import jax
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import dynamax_jax as dx

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(eval_fixture_texts()), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    config = dx.MistralConfig.tiny(model_type="llama", vocab_size=len(fast), num_layers=4,
                                   eos_token_id=fast.eos_token_id, max_position_embeddings=1024)
    params = dx.init_params(config, jax.random.key(0))
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    dx.save_pretrained(config, params, path)
    fast.save_pretrained(path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path):
    config = dx.MistralConfig.tiny(num_layers=2, model_type="llama")
    params = dx.init_params(config, jax.random.key(0))
    path = tmp_path / "model"
    dx.save_pretrained(config, params, path)
    return path


@pytest.fixture
def exits_dir(tmp_path):
    import os

    config = dx.MistralConfig.tiny(num_layers=4)
    exit_config = dx.ExitConfig(layers=(2, 3), kind="calm")
    params = dx.init_exits(config, exit_config, jax.random.key(0))
    old = os.umask(0o022)
    try:
        dx.save_exits(exit_config, params, tmp_path / "exits")
    finally:
        os.umask(old)
    return tmp_path / "exits"


def file_tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``, by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
