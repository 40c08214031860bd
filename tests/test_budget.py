"""The compute-budget controller of ``dx.generate(target_layers=...)``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax import decoding
from dynamax_jax.decoding import GenerateError, update_thresholds

TOLERANCE = 0.25  # layers: the stated accuracy of the running average over 256 tokens


@pytest.fixture(scope="module")
def tiny():
    config = dx.MistralConfig.tiny(num_layers=8, vocab_size=96, max_position_embeddings=512)  # 256 new tokens
    params = dx.init_params(config, jax.random.key(0))
    exit_config = dx.ExitConfig(kind="calm", threshold=0.9).resolve(config)
    exit_params = dx.init_exits(config, exit_config, jax.random.key(1))
    # scale the random heads up so their confidences spread over (0, 1) token by token
    exit_params = jax.tree.map(lambda a: a * 40.0, exit_params)
    return config, params, exit_config, exit_params


@pytest.mark.parametrize("target", [5.0, 6.5])
def test_average_layers_meets_the_target_over_a_long_generation(tiny, target):
    config, params, exit_config, exit_params = tiny
    prompts = [[3, 17, 5, 9], [40, 2, 7, 11, 13, 8]]
    result = dx.generate(config, params, prompts, max_new_tokens=256, exit_config=exit_config,
                         exit_params=exit_params, target_layers=target, repetition_penalty=1.3)
    per_row = [result.exit_layers[r][result.exit_layers[r] > 0].mean() for r in range(2)]
    assert all(abs(a - target) <= TOLERANCE for a in per_row), per_row
    assert abs(result.avg_layers - target) <= TOLERANCE
    # it really adapts: the fixed starting threshold alone lands elsewhere
    fixed = dx.generate(config, params, prompts, max_new_tokens=256, exit_config=exit_config,
                        exit_params=exit_params, repetition_penalty=1.3)
    assert abs(fixed.avg_layers - target) > TOLERANCE


def test_update_rule():
    thr = jnp.full((3, 2), 0.5)
    out = update_thresholds(thr, jnp.array([8, 4, 8]), jnp.array([True, True, False]), 6.0, 0.5, 8)
    np.testing.assert_allclose(out[:, 0], [0.5 - 0.5 * 2 / 8, 0.5 + 0.5 * 2 / 8, 0.5])
    assert float(update_thresholds(jnp.zeros((1, 1)), jnp.array([4]), jnp.array([True]), 8.0, 1.0, 8)[0, 0]) == 0.5
    assert float(update_thresholds(jnp.ones((1, 1)), jnp.array([4]), jnp.array([True]), 8.0, 1.0, 8)[0, 0]) == np.float32(1.01)


def test_bad_budgets(tiny):
    config, params, exit_config, exit_params = tiny
    with pytest.raises(GenerateError, match="needs exits"):
        dx.generate(config, params, [[1, 2]], max_new_tokens=2, target_layers=6.0)
    with pytest.raises(GenerateError, match=r"target_layers must be in \[5, 8\]"):
        dx.generate(config, params, [[1, 2]], max_new_tokens=2, exit_config=exit_config,
                    exit_params=exit_params, target_layers=2.0)


def test_chunked_decoding_carries_the_controller(tiny):
    """The CLI streams with several decode calls: the adapted thresholds must carry over."""
    config, params, exit_config, exit_params = tiny
    params = decoding.decode_params(params)
    prompt, lengths = jnp.asarray([[3, 17, 5, 9]], jnp.int32), jnp.asarray([4], jnp.int32)
    settings, controls, p = decoding.configure(config, 48, exit_config=exit_config, exit_params=exit_params,
                                               repetition_penalty=1.3, target_layers=5.5)

    def run(chunks):
        state = decoding.prefill(config, settings, params, p, prompt, lengths, cache_len=4 + 48)
        layers = []
        for n in chunks:
            chunk, state = decoding.decode_chunk(config, settings, n, params, p, state, controls, jax.random.key(0))
            layers.append(np.asarray(chunk.exit_layers[0]))
        return np.concatenate(layers)

    np.testing.assert_array_equal(run([16, 16, 16]), run([48]))
