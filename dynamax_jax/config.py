"""Model configurations: frozen dataclasses with ``tiny()``, ``from_hf_config()`` and
``to_hf_config()``.

Two backbones share the same conventions (see ``dynamax_jax/models``):
``MistralConfig`` (model_type ``mistral`` or ``llama``) and ``Mamba2Config``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("mistral", "llama", "mamba2")


class ConfigError(ValueError):
    """A checkpoint configuration is missing a field or asks for something unsupported."""


def _require(hf: Mapping[str, Any], key: str, model_type: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"{model_type} config is missing the required field '{key}'")
    return hf[key]


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    """Mistral / Llama decoder. ``sliding_window=None`` means full causal attention."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    model_type: str = "mistral"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.model_type not in ("mistral", "llama"):
            raise ConfigError(f"MistralConfig model_type must be 'mistral' or 'llama', got {self.model_type!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or None, got {self.sliding_window}")

    @property
    def family(self) -> str:
        return "transformer"

    @classmethod
    def tiny(cls, **overrides) -> "MistralConfig":
        base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                    sliding_window=None, max_position_embeddings=256)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "MistralConfig":
        model_type = hf.get("model_type")
        if model_type not in ("mistral", "llama"):
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        req = lambda k: _require(hf, k, model_type)  # noqa: E731
        hidden, heads = req("hidden_size"), req("num_attention_heads")
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"rope_scaling {rope_scaling!r} is not supported (only plain RoPE)")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"{model_type} config sets {flag}=true; biases are not supported")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 keeps it inside rope_parameters
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=req("vocab_size"),
            hidden_size=hidden,
            intermediate_size=req("intermediate_size"),
            num_layers=req("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "llama" and False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    def to_hf_config(self) -> dict[str, Any]:
        arch = "MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"
        out = dict(
            architectures=[arch], model_type=self.model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        )
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        else:
            out.update(attention_bias=False, mlp_bias=False)
        return out


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Mamba2 decoder (mamba_ssm ``Mamba2`` mixer in pre-norm residual blocks).

    ``norm_per_group=True`` normalises the gated RMSNorm per group of
    ``d_inner / n_groups`` channels as mamba_ssm does; ``False`` reproduces transformers'
    full-width normalisation (they differ only when ``n_groups > 1``).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    state_size: int = 128
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 256
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    rms_norm_eps: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    tie_word_embeddings: bool = False
    norm_per_group: bool = True
    model_type: str = "mamba2"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if (self.expand * self.hidden_size) % self.head_dim:
            raise ConfigError(f"d_inner ({self.expand * self.hidden_size}) must be a multiple of head_dim ({self.head_dim})")
        if self.num_heads % self.n_groups:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})")

    @property
    def family(self) -> str:
        return "mamba2"

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_size

    @property
    def num_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.state_size

    @classmethod
    def tiny(cls, **overrides) -> "Mamba2Config":
        base = dict(vocab_size=128, hidden_size=64, num_layers=4, state_size=16, expand=2,
                    head_dim=16, n_groups=1, conv_kernel=4, chunk_size=16)
        base.update(overrides)
        return cls(**base)

    # from_hf_config / to_hf_config / from_codestral_params are implemented with the
    # Mamba2 converter (convert/mamba2.py) and attached there.
