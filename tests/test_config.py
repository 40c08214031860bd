"""Model configs (dynamax_jax/config.py): a bad field is named, in config.json files and in
the constructors."""

from __future__ import annotations

import json

import pytest

import dynamax_jax as dx


@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", "four", "'num_hidden_layers' must be an integer >= 1, got 'four'"),
    ("num_hidden_layers", -1, "'num_hidden_layers' must be an integer >= 1, got -1"),
    ("num_hidden_layers", 2.5, "'num_hidden_layers' must be an integer >= 1, got 2.5"),
    ("hidden_size", True, "'hidden_size' must be an integer >= 1, got True"),
    ("rms_norm_eps", "x", "'rms_norm_eps' must be a positive number, got 'x'"),
    ("rms_norm_eps", -1e-5, "'rms_norm_eps' must be a positive number, got -1e-05"),
    ("max_position_embeddings", "4096", "'max_position_embeddings' must be an integer >= 1, got '4096'"),
])
def test_bad_config_field_is_named(tiny_checkpoint, field, value, message):
    file = tiny_checkpoint / "config.json"
    config = json.loads(file.read_text())
    config[field] = value
    file.write_text(json.dumps(config))
    with pytest.raises(dx.ConfigError, match=f"llama config field {message}"):
        dx.load_pretrained(tiny_checkpoint)


def test_bad_mamba2_config_field_is_named():
    base = dict(model_type="mamba2", vocab_size=128, hidden_size=64, num_hidden_layers=2, head_dim=16, n_groups=1)
    with pytest.raises(dx.ConfigError, match="mamba2 config field 'num_hidden_layers' must be an integer"):
        dx.Mamba2Config.from_hf_config({**base, "num_hidden_layers": "four"})
    with pytest.raises(dx.ConfigError, match="mamba2 config field 'layer_norm_epsilon' must be a positive number"):
        dx.Mamba2Config.from_hf_config({**base, "layer_norm_epsilon": "x"})
    with pytest.raises(dx.ConfigError, match="codestral params.json config field 'n_layers'"):
        dx.Mamba2Config.from_codestral_params({"dim": 64, "n_layers": -1, "vocab_size": 128})


@pytest.mark.parametrize("cls, field", [(dx.MistralConfig, "num_layers"), (dx.MistralConfig, "rms_norm_eps"),
                                        (dx.Mamba2Config, "num_layers"), (dx.Mamba2Config, "chunk_size")])
def test_config_constructor_checks_fields(cls, field):
    with pytest.raises(dx.ConfigError, match=f"{cls.__name__}.{field} must be a positive"):
        cls.tiny(**{field: -1})
    with pytest.raises(dx.ConfigError, match=f"{cls.__name__}.{field} must be a positive"):
        cls.tiny(**{field: "x"})
