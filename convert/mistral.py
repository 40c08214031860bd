"""Mistral / Llama: Hugging Face ``MistralForCausalLM`` / ``LlamaForCausalLM`` <-> our params.

Hugging Face ``nn.Linear`` weights are ``[out, in]``; ours are ``[in, ...]`` with heads
split out (see ``dynamax_jax/models/mistral.py``): q_proj ``[N*H, D]`` <-> wq ``[D, N, H]``,
o_proj ``[D, N*H]`` <-> wo ``[N, H, D]``, gate/up ``[F, D]`` <-> ``[D, F]``, down ``[D, F]``
<-> ``[F, D]``, lm_head ``[V, D]`` <-> ``[D, V]``. Tied embeddings have no lm_head.
RoPE needs no permutation: both sides use the rotate-half layout.
"""

from __future__ import annotations

from dynamax_jax.convert.tables import Architecture, Row, identity, register
from dynamax_jax.config import MistralConfig

_LAYER = "model.layers.{i}."


def _transpose(w, config):
    return w.T


def _split_heads(heads_attr: str):
    """``[heads*H, D] -> [D, heads, H]`` and back, for q/k/v projections."""

    def to_ours(w, c):
        return w.T.reshape(c.hidden_size, getattr(c, heads_attr), c.head_dim)

    def to_hf(w, c):
        return w.reshape(c.hidden_size, getattr(c, heads_attr) * c.head_dim).T

    return to_ours, to_hf


def _o_to_ours(w, c):  # [D, N*H] -> [N, H, D]
    return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _o_to_hf(w, c):  # [N, H, D] -> [D, N*H]
    return w.reshape(c.num_heads * c.head_dim, c.hidden_size).T


def mistral_table(config: MistralConfig) -> list[Row]:
    """Rows for model_type mistral and llama (same tensor names)."""
    q, kv = _split_heads("num_heads"), _split_heads("num_kv_heads")
    rows = [
        Row("model.embed_tokens.weight", "embed"),
        Row(_LAYER + "input_layernorm.weight", "layers/attn_norm"),
        Row(_LAYER + "self_attn.q_proj.weight", "layers/wq", *q),
        Row(_LAYER + "self_attn.k_proj.weight", "layers/wk", *kv),
        Row(_LAYER + "self_attn.v_proj.weight", "layers/wv", *kv),
        Row(_LAYER + "self_attn.o_proj.weight", "layers/wo", _o_to_ours, _o_to_hf),
        Row(_LAYER + "post_attention_layernorm.weight", "layers/mlp_norm"),
        Row(_LAYER + "mlp.gate_proj.weight", "layers/w_gate", _transpose, _transpose),
        Row(_LAYER + "mlp.up_proj.weight", "layers/w_up", _transpose, _transpose),
        Row(_LAYER + "mlp.down_proj.weight", "layers/w_down", _transpose, _transpose),
        Row("model.norm.weight", "final_norm", identity, identity),
    ]
    if not config.tie_word_embeddings:
        rows.append(Row("lm_head.weight", "lm_head", _transpose, _transpose))
    return rows


def _ignored(name: str) -> bool:
    # Older checkpoints store RoPE's inv_freq buffers; tied ones may still carry lm_head.
    return name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"


MISTRAL = register(Architecture(
    model_types=("mistral", "llama"),
    config_class=MistralConfig,
    config_from_hf=MistralConfig.from_hf_config,
    table=mistral_table,
    ignored=_ignored,
))
