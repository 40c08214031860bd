"""dynamax-jax: early exits (DYNAMAX) for Mistral/Llama and Mamba2 models in JAX.

    import dynamax_jax as dx
    config, params = dx.load_pretrained(path)
    logits = dx.forward(config, params, tokens)
    result = dx.generate(config, dx.decode_params(params), prompt_tokens, max_new_tokens=32)
"""

import sys
import types

from dynamax_jax.api import forward, init_params, load_pretrained, load_tokenizer, save_pretrained
from dynamax_jax.config import ConfigError, Mamba2Config, MistralConfig
from dynamax_jax.decoding import (DecodeChunk, DecodeControls, DecodeSettings, DecodeState, GenerateError,
                                  GenerateResult, configure, decode_chunk, decode_params, generate, prefill)
from dynamax_jax.exits import ExitConfig, ExitError, init_exits, load_exits, save_exits

__all__ = [
    "ConfigError", "Mamba2Config", "MistralConfig", "forward", "init_params", "load_pretrained",
    "load_tokenizer", "save_pretrained", "ExitConfig", "ExitError", "init_exits", "load_exits", "save_exits",
    "generate", "GenerateResult", "GenerateError", "configure", "prefill", "decode_chunk", "decode_params",
    "DecodeSettings", "DecodeControls", "DecodeState", "DecodeChunk",
]


class _Package(types.ModuleType):
    """``dx.generate`` is the function. The command line lives in the submodule of the same
    name (``python -m dynamax_jax.generate``); importing that submodule would make the import
    system rebind ``dx.generate`` to it, which this refuses (the submodule stays in
    ``sys.modules``)."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
