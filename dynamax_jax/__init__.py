"""dynamax-jax: early exits (DYNAMAX) for Mistral/Llama and Mamba2 models in JAX.

    import dynamax_jax as dx
    config, params = dx.load_pretrained(path)
    logits = dx.forward(config, params, tokens)
    result = dx.generate(config, dx.decode_params(params), prompt_tokens, max_new_tokens=32)

On a mesh: ``dx.load_pretrained(path, mesh=dx.make_mesh("2x4"))`` creates the params sharded,
and ``generate`` splits the prompt rows over the mesh's ``data`` axis.
"""

from dynamax_jax.api import forward, init_params, load_pretrained, load_tokenizer, save_pretrained
from dynamax_jax.config import ConfigError, Mamba2Config, MistralConfig
from dynamax_jax.decoding import (DecodeChunk, DecodeControls, DecodeSettings, DecodeState, GenerateError,
                                  GenerateResult, configure, decode_chunk, decode_params, generate, prefill)
from dynamax_jax.exits import ExitConfig, ExitError, init_exits, load_exits, save_exits
from dynamax_jax.sharding import make_mesh, shard_exit_params

__all__ = [
    "ConfigError", "Mamba2Config", "MistralConfig", "forward", "init_params", "load_pretrained",
    "load_tokenizer", "save_pretrained", "ExitConfig", "ExitError", "init_exits", "load_exits", "save_exits",
    "generate", "GenerateResult", "GenerateError", "configure", "prefill", "decode_chunk", "decode_params",
    "DecodeSettings", "DecodeControls", "DecodeState", "DecodeChunk", "make_mesh", "shard_exit_params",
]

