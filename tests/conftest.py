"""Shared test helpers: tiny random Hugging Face Mistral/Llama models (float32, eager
attention, fixed seeds) and checkpoint directories saved from them."""

from __future__ import annotations

import numpy as np
import pytest

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
