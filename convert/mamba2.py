"""Mamba2: Hugging Face ``Mamba2ForCausalLM`` and the Codestral Mamba release <-> our params.

Two layouts of the same tensors (see ``dynamax_jax/models/mamba2.py`` for ours):

- Hugging Face (``config.json`` + ``model.safetensors``): ``backbone.embeddings.weight``,
  ``backbone.layers.{i}.norm.weight``, ``backbone.layers.{i}.mixer.{in_proj, conv1d,
  dt_bias, A_log, D, norm, out_proj}``, ``backbone.norm_f.weight``, ``lm_head.weight``.
- Codestral Mamba release (``params.json`` + ``consolidated.safetensors``, mistral_inference
  wrapping mamba_ssm's ``MambaLMHeadModel`` as ``model``): the same names under ``model.``,
  with ``embedding`` for ``embeddings``.

``nn.Linear`` weights are ``[out, in]``, ours ``[in, out]``: in_proj ``[Z, D]`` <-> ``[D, Z]``,
out_proj ``[D, I]`` <-> ``[I, D]``, lm_head ``[V, D]`` <-> ``[D, V]``. The depthwise conv
weight is ``[C, 1, K]`` <-> conv_w ``[K, C]``. ``load_codestral(path, dtype)`` reads a release
directory; the ``mamba2`` model_type is registered with ``convert.tables`` on import, so
``convert.checkpoint.load_checkpoint`` / ``save_hf`` handle Hugging Face directories.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from dynamax_jax.convert.errors import CheckpointError
from dynamax_jax.convert.safetensors_io import CheckpointReader
from dynamax_jax.convert.tables import Architecture, Row, identity, load_params, register
from dynamax_jax.config import Mamba2Config

CODESTRAL_PARAMS = "params.json"
CODESTRAL_WEIGHTS = "consolidated.safetensors"


def _transpose(w, config):
    return w.T


def _conv_to_ours(w, config):  # [C, 1, K] -> [K, C]
    return w.reshape(w.shape[0], w.shape[2]).T


def _conv_to_hf(w, config):  # [K, C] -> [C, 1, K]
    return w.T.reshape(w.shape[1], 1, w.shape[0])


def _table(config: Mamba2Config, backbone: str, embedding: str, lm_head: str) -> list[Row]:
    layer = backbone + "layers.{i}."
    mixer = layer + "mixer."
    rows = [
        Row(backbone + embedding, "embed"),
        Row(layer + "norm.weight", "layers/norm"),
        Row(mixer + "in_proj.weight", "layers/in_proj", _transpose, _transpose),
        Row(mixer + "conv1d.weight", "layers/conv_w", _conv_to_ours, _conv_to_hf),
        Row(mixer + "dt_bias", "layers/dt_bias"),
        Row(mixer + "A_log", "layers/A_log"),
        Row(mixer + "D", "layers/D"),
        Row(mixer + "norm.weight", "layers/gate_norm"),
        Row(mixer + "out_proj.weight", "layers/out_proj", _transpose, _transpose),
        Row(backbone + "norm_f.weight", "final_norm", identity, identity),
    ]
    if config.use_conv_bias:
        rows.append(Row(mixer + "conv1d.bias", "layers/conv_b"))
    if config.use_bias:
        rows += [Row(mixer + "in_proj.bias", "layers/in_proj_bias"),
                 Row(mixer + "out_proj.bias", "layers/out_proj_bias")]
    if not config.tie_word_embeddings:
        rows.append(Row(lm_head, "lm_head", _transpose, _transpose))
    return rows


def hf_table(config: Mamba2Config) -> list[Row]:
    """Rows for Hugging Face ``Mamba2ForCausalLM`` checkpoints (model_type mamba2)."""
    return _table(config, "backbone.", "embeddings.weight", "lm_head.weight")


def codestral_table(config: Mamba2Config) -> list[Row]:
    """Rows for the Codestral Mamba release layout (``consolidated.safetensors``)."""
    return _table(config, "model.backbone.", "embedding.weight", "model.lm_head.weight")


MAMBA2 = register(Architecture(
    model_types=("mamba2",),
    config_class=Mamba2Config,
    config_from_hf=Mamba2Config.from_hf_config,
    table=hf_table,
    # A tied checkpoint may still store lm_head (the embedding again).
    ignored=lambda name: name == "lm_head.weight",
))

# Not registered: it shares the config class with MAMBA2, and writing goes to HF layout.
CODESTRAL = Architecture(
    model_types=("mamba2",),
    config_class=Mamba2Config,
    config_from_hf=Mamba2Config.from_hf_config,
    table=codestral_table,
    ignored=lambda name: name == "model.lm_head.weight",
)


def read_codestral_params(path) -> dict:
    """``params.json`` of a Codestral Mamba directory as a dict."""
    from dynamax_jax.convert.checkpoint import read_checkpoint_json

    return read_checkpoint_json(path, CODESTRAL_PARAMS)


def load_codestral(path, dtype=jnp.float32, progress: bool = False, mesh=None):
    """``(config, params)`` from a Codestral Mamba release directory (``params.json`` +
    ``consolidated.safetensors``), params cast to ``dtype`` (created sharded on ``mesh`` when
    one is given, see ``convert.tables.load_params``). The mixer sizes params.json leaves
    out are read from the layer-0 tensor shapes (``Mamba2Config.from_codestral_params``)."""
    path = Path(path)
    raw = read_codestral_params(path)
    weights = path / CODESTRAL_WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{path}: no {CODESTRAL_WEIGHTS}")
    with CheckpointReader(weights) as reader:
        shapes = {name: reader.shape(name) for name in reader.names()}
        config = Mamba2Config.from_codestral_params(raw, shapes)
        params = load_params(reader, config, CODESTRAL, dtype, progress=progress, mesh=mesh)
    return config, params
