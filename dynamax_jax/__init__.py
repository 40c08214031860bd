"""dynamax-jax: early exits (DYNAMAX) for Mistral/Llama and Mamba2 models in JAX.

    import dynamax_jax as dx
    config, params = dx.load_pretrained(path)
    logits = dx.forward(config, params, tokens)
"""

from dynamax_jax.api import forward, init_params, load_pretrained, load_tokenizer, save_pretrained
from dynamax_jax.config import ConfigError, Mamba2Config, MistralConfig
from dynamax_jax.exits import ExitConfig, ExitError, init_exits, load_exits, save_exits

__all__ = [
    "ConfigError", "Mamba2Config", "MistralConfig", "forward", "init_params", "load_pretrained",
    "load_tokenizer", "save_pretrained", "ExitConfig", "ExitError", "init_exits", "load_exits", "save_exits",
    "generate", "GenerateResult",
]


def __getattr__(name):
    # ``generate`` is imported lazily so that ``python -m dynamax_jax.generate`` does not find
    # its own module already imported (runpy warns), and so that ``dx.generate`` is the
    # function, not the submodule of the same name.
    if name in ("generate", "GenerateResult"):
        import importlib
        module = importlib.import_module("dynamax_jax.generate")
        globals().update(generate=module.generate, GenerateResult=module.GenerateResult)
        return globals()[name]
    raise AttributeError(f"module 'dynamax_jax' has no attribute {name!r}")
