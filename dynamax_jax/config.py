"""Model configurations: frozen dataclasses with ``tiny()``, ``from_hf_config()`` and
``to_hf_config()``.

Two backbones share the same conventions (see ``dynamax_jax/models``):
``MistralConfig`` (model_type ``mistral`` or ``llama``) and ``Mamba2Config``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping
from dynamax_jax.errors import ConfigError  # noqa: F401  (importable from here too)

SUPPORTED_MODEL_TYPES = ("mistral", "llama", "mamba2")


_REQUIRED = object()


def _int_field(hf: Mapping[str, Any], key: str, where: str, default: Any = _REQUIRED, minimum: int = 1):
    """``hf[key]`` as an int >= ``minimum`` (``default`` when absent or null; required when no
    default is given); a ``ConfigError`` names the field otherwise."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where} config is missing the required field '{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} config field '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _float_field(hf: Mapping[str, Any], key: str, where: str, default: float) -> float:
    """``hf[key]`` as a positive finite float (``default`` when absent or null); a
    ``ConfigError`` names the field otherwise."""
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{where} config field '{key}' must be a positive number, got {value!r}")
    return float(value)


def _check_fields(config, positive_ints: tuple[str, ...], positive_floats: tuple[str, ...]) -> None:
    """Type and range checks of a config's own fields, naming the field at fault."""
    name = type(config).__name__
    for field in positive_ints:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{name}.{field} must be a positive integer, got {value!r}")
    for field in positive_floats:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise ConfigError(f"{name}.{field} must be a positive number, got {value!r}")


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
        _check_fields(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                             "num_kv_heads", "head_dim", "max_position_embeddings"),
                      ("rope_theta", "rms_norm_eps"))
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
        integer = lambda k, default=_REQUIRED, minimum=1: _int_field(hf, k, model_type, default, minimum)  # noqa: E731
        hidden, heads = integer("hidden_size"), integer("num_attention_heads")
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"rope_scaling {rope_scaling!r} is not supported (only plain RoPE)")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"{model_type} config sets {flag}=true; biases are not supported")
        if hf.get("rope_theta") is not None:
            rope_theta = _float_field(hf, "rope_theta", model_type, 10000.0)
        else:  # transformers >= 5 keeps it inside rope_parameters
            rope_parameters = hf.get("rope_parameters") or {}
            rope_theta = _float_field(rope_parameters if isinstance(rope_parameters, Mapping) else {},
                                      "rope_theta", f"{model_type} rope_parameters", 10000.0)
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            num_layers=integer("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=integer("num_key_value_heads", heads),
            head_dim=integer("head_dim", hidden // heads),
            rope_theta=rope_theta,
            rms_norm_eps=_float_field(hf, "rms_norm_eps", model_type, 1e-5),
            sliding_window=integer("sliding_window", None) if model_type == "mistral" else None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=integer("max_position_embeddings", 4096),
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
    ``d_inner / n_groups`` channels as mamba_ssm (and transformers 5.24) do; ``False``
    normalises over the full ``d_inner`` as older transformers versions did (they differ
    only when ``n_groups > 1``).
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
        _check_fields(self, ("vocab_size", "hidden_size", "num_layers", "state_size", "expand", "head_dim",
                             "n_groups", "conv_kernel", "chunk_size"), ("rms_norm_eps",))
        if (self.expand * self.hidden_size) % self.head_dim:
            raise ConfigError(f"d_inner ({self.expand * self.hidden_size}) must be a multiple of head_dim ({self.head_dim})")
        if self.num_heads % self.n_groups:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})")
        # Configs are static jit arguments: keep every field hashable.
        object.__setattr__(self, "time_step_limit", tuple(float(v) for v in self.time_step_limit))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

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

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "Mamba2Config":
        """From a Hugging Face ``Mamba2Config`` dict (``config.json``, model_type mamba2).

        ``norm_per_group`` is read when present (``to_hf_config`` writes it); otherwise it is
        True: mamba_ssm, which trained the released checkpoints, normalises per group."""
        model_type = hf.get("model_type")
        if model_type != "mamba2":
            raise ConfigError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        integer = lambda k, default=_REQUIRED: _int_field(hf, k, model_type, default)  # noqa: E731
        hidden, expand, head_dim = integer("hidden_size"), integer("expand", 2), integer("head_dim", 64)
        num_heads = integer("num_heads", None)
        if num_heads is not None and num_heads * head_dim != expand * hidden:
            raise ConfigError(f"mamba2 config: num_heads ({num_heads}) x head_dim ({head_dim}) must equal "
                              f"expand ({expand}) x hidden_size ({hidden})")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"mamba2 config: hidden_act {act!r} is not supported (only silu)")
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=integer("vocab_size"), hidden_size=hidden, num_layers=integer("num_hidden_layers"),
            state_size=integer("state_size", 128), expand=expand, head_dim=head_dim,
            n_groups=integer("n_groups", 8), conv_kernel=integer("conv_kernel", 4),
            chunk_size=integer("chunk_size", 256),
            time_step_limit=_time_step_limit(hf.get("time_step_limit", (0.0, math.inf))),
            rms_norm_eps=_float_field(hf, "layer_norm_epsilon", model_type, 1e-5),
            use_bias=bool(hf.get("use_bias", False)), use_conv_bias=bool(hf.get("use_conv_bias", True)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            norm_per_group=bool(hf.get("norm_per_group", True)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``Mamba2ForCausalLM`` loads.

        ``norm_per_group`` is an extra key transformers keeps but does not read: its
        ``MambaRMSNormGated`` normalises per group in recent versions (5.24 here) and over the
        full inner width in older ones, so a model saved with the other choice than the
        installed transformers makes differs there when ``n_groups > 1``."""
        return dict(
            architectures=["Mamba2ForCausalLM"], model_type="mamba2", vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers, state_size=self.state_size,
            expand=self.expand, head_dim=self.head_dim, num_heads=self.num_heads, n_groups=self.n_groups,
            conv_kernel=self.conv_kernel, chunk_size=self.chunk_size,
            time_step_limit=list(self.time_step_limit), layer_norm_epsilon=self.rms_norm_eps,
            use_bias=self.use_bias, use_conv_bias=self.use_conv_bias, hidden_act="silu",
            residual_in_fp32=True, tie_word_embeddings=self.tie_word_embeddings,
            norm_per_group=self.norm_per_group, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        )

    @classmethod
    def from_codestral_params(cls, params: Mapping[str, Any],
                              tensor_shapes: Mapping[str, tuple[int, ...]] | None = None) -> "Mamba2Config":
        """From a Codestral Mamba release ``params.json`` (mistral_inference ``MambaArgs``:
        ``dim``, ``n_layers``, ``vocab_size``, ``n_groups``, ``rms_norm``,
        ``residual_in_fp32``, ``fused_add_norm``, ``pad_vocab_size_multiple``,
        ``tie_embeddings``, ``model_type: "mamba"``).

        The mixer's sizes are not in that file (mamba_ssm's ``Mamba2`` defaults apply: state
        128, conv 4, expand 2, head dim 64, chunk 256, eps 1e-5); optional keys ``d_state``,
        ``d_conv``, ``expand``, ``headdim``, ``chunk_size``, ``norm_eps`` (top level or in
        ``ssm_cfg``) override them. With ``tensor_shapes`` (name -> shape of the release
        checkpoint, e.g. ``model.backbone.layers.0.mixer.in_proj.weight``) the sizes a key
        does not give are read from the layer-0 tensors, and the vocabulary from the
        embedding."""
        model_type = params.get("model_type", "mamba")
        if model_type != "mamba":
            raise ConfigError(f"params.json model_type {model_type!r} is not a Mamba model (expected 'mamba')")
        where = "codestral params.json"
        if not params.get("rms_norm", True):
            raise ConfigError("params.json sets rms_norm=false; only RMSNorm Mamba2 models are supported")
        ssm_cfg = dict(params.get("ssm_cfg") or {})
        if ssm_cfg.get("layer", "Mamba2") != "Mamba2":
            raise ConfigError(f"params.json ssm_cfg.layer {ssm_cfg['layer']!r} is not supported (only Mamba2)")
        given = lambda *keys: next((src[k] for k in keys for src in (params, ssm_cfg) if k in src), None)  # noqa: E731
        dim, n_groups = _int_field(params, "dim", where), int(given("n_groups", "ngroups") or 1)
        sizes = {"state_size": given("d_state", "state_size"), "conv_kernel": given("d_conv", "conv_kernel"),
                 "expand": given("expand"), "head_dim": given("headdim", "head_dim")}
        multiple = int(params.get("pad_vocab_size_multiple", 1) or 1)
        vocab = _int_field(params, "vocab_size", where)
        vocab = -(-vocab // multiple) * multiple  # mamba_ssm pads the embedding to the multiple
        if tensor_shapes:
            prefix = "model.backbone.layers.0.mixer."
            shape = lambda name: tensor_shapes.get(prefix + name)  # noqa: E731
            in_proj, conv, a_log = shape("in_proj.weight"), shape("conv1d.weight"), shape("A_log")
            if in_proj and conv and a_log:
                heads, conv_dim = a_log[0], conv[0]
                inner = in_proj[0] - conv_dim - heads
                inferred = {"state_size": (conv_dim - inner) // (2 * n_groups), "conv_kernel": conv[-1],
                            "expand": inner // dim, "head_dim": inner // heads}
                sizes = {k: v if v is not None else inferred[k] for k, v in sizes.items()}
            emb = tensor_shapes.get("model.backbone.embedding.weight")
            if emb:
                vocab = emb[0]
        defaults = {"state_size": 128, "conv_kernel": 4, "expand": 2, "head_dim": 64}
        sizes = {k: int(v if v is not None else defaults[k]) for k, v in sizes.items()}
        return cls(
            vocab_size=vocab, hidden_size=dim, num_layers=_int_field(params, "n_layers", where), n_groups=n_groups,
            chunk_size=int(given("chunk_size") or 256), rms_norm_eps=float(given("norm_eps", "norm_epsilon") or 1e-5),
            tie_word_embeddings=bool(params.get("tie_embeddings", False)), norm_per_group=True, **sizes,
        )


def _time_step_limit(value) -> tuple[float, float]:
    """``time_step_limit`` from JSON: a pair whose items may be numbers, ``"inf"`` strings or
    transformers' ``{"__float__": "Infinity"}`` encoding."""
    def number(v):
        if isinstance(v, Mapping) and "__float__" in v:
            v = v["__float__"]
        return float(v)
    try:
        lo, hi = (number(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"mamba2 config: time_step_limit must be a pair of numbers, got {value!r}") from None
    return lo, hi
