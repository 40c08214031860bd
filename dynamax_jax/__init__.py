"""dynamax-jax: early exits (DYNAMAX) for Mistral/Llama and Mamba2 models in JAX.

    import dynamax_jax as dx
    config, params = dx.load_pretrained(path)
    logits = dx.forward(config, params, tokens)
"""

from dynamax_jax.api import forward, init_params, load_pretrained, load_tokenizer, save_pretrained
from dynamax_jax.config import ConfigError, Mamba2Config, MistralConfig

__all__ = [
    "ConfigError", "Mamba2Config", "MistralConfig", "forward", "init_params", "load_pretrained",
    "load_tokenizer", "save_pretrained",
]
