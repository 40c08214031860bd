"""Mamba2 decoder (the Codestral Mamba architecture) as pure-functional ``flax.linen``.

Shape legend: B batch, T tokens in this call, D hidden, I inner width (expand * D),
G groups sharing B/C, N state size, H heads, P head dim (I = H * P), C conv channels
(I + 2 G N), K conv kernel, Z in_proj width (2 I + 2 G N + H), V vocabulary, L layers.

Parameters (plain nested dict; layer params stacked on a leading ``[L]`` axis)::

    embed [V, D]
    layers/norm [L, D]        layers/in_proj [L, D, Z]   layers/conv_w [L, K, C]
    layers/conv_b [L, C]      layers/dt_bias [L, H]      layers/A_log [L, H]
    layers/D [L, H]           layers/gate_norm [L, I]    layers/out_proj [L, I, D]
    final_norm [D]            lm_head [D, V]   (absent when embeddings are tied)
    layers/in_proj_bias [L, Z], layers/out_proj_bias [L, D]   (only when config.use_bias)
    (conv_b is absent when not config.use_conv_bias)

``in_proj`` columns are ordered ``[z (I) | x (I) | B (G N) | C (G N) | dt (H)]`` as in
mamba_ssm; ``x | B | C`` (C channels) go through the causal depthwise convolution.

State (``Mamba2State``, a registered dataclass): ``conv [L, B, K-1, C]`` holds the last
K-1 conv inputs of each row (in the activation dtype), ``ssm [L, B, H, P, N]`` float32.
``state`` slices per layer with ``jax.tree.map(lambda a: a[i], state)``.

Entry points (the per-layer interface every backbone follows):

- ``forward(config, params, tokens, return_hidden=False)``: full depth from an empty state.
- ``apply(config, params, tokens, state, lengths=None, return_hidden=False)`` ->
  ``(logits [B,T,V] float32, state, hidden [L,B,T,D] float32 or None)``: continues from
  ``state``. ``lengths [B]`` (int, ``0 <= lengths <= T``) marks right-padded rows: the
  positions ``t >= lengths[b]`` leave row ``b``'s state untouched (their outputs are
  meaningless). T == 1 is one decode step (direct recurrence, no chunking).
- the decode protocol (``dynamax_jax.models.Backbone``, used by ``dynamax_jax.decoding``):
  ``init_cache`` (one state per layer), ``prefill_layer(config, layer_params, x, layer_state,
  lengths)`` -> ``(x, layer_state)`` on hidden states ``x [B, T, D]`` (T >= 1, float32 out)
  with one layer's params and state slice, ``decode_layer`` / ``propagate_layer`` (one token,
  returning the layer's new state as its entry), ``read_entry`` / ``write_entry``,
  ``decode_layout`` (the stored layout), ``cache_capacity`` (no limit) and
  ``SKIPPED_LAYER_MODES``.
- ``embed`` (float32: the residual stream's dtype), ``head`` (final norm + LM head ->
  float32 logits), ``init_params``, ``init_state`` / ``Mamba2State.init(config, batch, dtype)``.

Numerics: the residual stream, norms, the conv output, dt, the SSM state and logits are
float32; matmul inputs are cast to the weight dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynamax_jax.config import Mamba2Config
from dynamax_jax.models import layers
# head is part of this module's interface (shared with the Mistral model)
from dynamax_jax.models.layers import declare_head, flatten_scanned_block, head, nest_scanned_block, rms_norm
from dynamax_jax.kernels.ssd import ops as ssd_ops

Params = dict[str, Any]
_init = nn.initializers.normal(stddev=0.02)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Mamba2State:
    """Recurrent state of every layer: ``conv [L, B, K-1, C]``, ``ssm [L, B, H, P, N]`` float32.
    A per-layer slice (leaves without the ``[L]`` axis) is what ``prefill_layer`` and ``decode_layer`` take."""

    conv: jax.Array
    ssm: jax.Array

    @classmethod
    def init(cls, config: Mamba2Config, batch: int, dtype=jnp.float32) -> "Mamba2State":
        """Zero state (an empty history) for ``batch`` rows; ``dtype`` is the conv state's."""
        conv = jnp.zeros((config.num_layers, batch, config.conv_kernel - 1, config.conv_dim), dtype)
        ssm = jnp.zeros((config.num_layers, batch, config.num_heads, config.head_dim, config.state_size),
                        jnp.float32)
        return cls(conv=conv, ssm=ssm)


def embed(config: Mamba2Config, params: Params, tokens: jax.Array) -> jax.Array:
    """``tokens [B, T] -> [B, T, D]`` float32: the residual stream stays in float32."""
    return layers.embed(config, params, tokens).astype(jnp.float32)


def init_state(config: Mamba2Config, batch: int, dtype=jnp.float32) -> Mamba2State:
    """``Mamba2State.init``: the zero state of ``batch`` rows."""
    return Mamba2State.init(config, batch, dtype)


# ----------------------------------------------------------------------------- pure math

def causal_conv(xbc: jax.Array, conv_state: jax.Array, weight: jax.Array, bias: jax.Array | None):
    """Causal depthwise conv1d continuing from ``conv_state``.

    ``xbc [B, T, C]`` new inputs, ``conv_state [B, K-1, C]`` the previous K-1 inputs,
    ``weight [K, C]`` (tap k multiplies the input K-1-k steps back), ``bias [C]``.
    Returns ``out [B, T, C]`` float32 (before the activation) and the padded input window
    ``[B, K-1+T, C]`` (the caller picks the new conv state from it)."""
    k = weight.shape[0]
    t = xbc.shape[1]
    window = jnp.concatenate([conv_state.astype(xbc.dtype), xbc], axis=1)  # [B, K-1+T, C]
    w = weight.astype(jnp.float32)
    # K is 4 in every released model: K shifted multiply-adds beat a general conv here.
    out = sum(window[:, tap:tap + t].astype(jnp.float32) * w[tap] for tap in range(k))
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out, window


def last_inputs(window: jax.Array, lengths: jax.Array | None, keep: int) -> jax.Array:
    """The ``keep`` inputs ending at each row's last real position: ``window [B, keep+T, C]``
    (previous state then this call's inputs), ``lengths [B]`` real inputs of this call
    (None: all T) -> ``[B, keep, C]``. With ``lengths[b] = 0`` the old state is kept."""
    if lengths is None:
        return window[:, window.shape[1] - keep:]
    take = lambda w, n: jax.lax.dynamic_slice_in_dim(w, n, keep, axis=0)  # noqa: E731
    return jax.vmap(take)(window, lengths)


def gated_rms_norm(y: jax.Array, z: jax.Array, weight: jax.Array, n_groups: int, eps: float) -> jax.Array:
    """mamba_ssm's ``RMSNormGated`` with ``norm_before_gate=False``: RMS-normalise
    ``y * silu(z)`` over groups of ``I / n_groups`` channels (``n_groups=1``: the full
    width), then scale. ``y, z [..., I]``, ``weight [I]`` -> float32 ``[..., I]``."""
    gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    grouped = gated.reshape(gated.shape[:-1] + (n_groups, gated.shape[-1] // n_groups))
    grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    return grouped.reshape(gated.shape) * weight.astype(jnp.float32)


def ssm_step(x, dt, A, B, C, D, state):
    """One step of the SSD recurrence (decode). ``x [B, H, P]``, ``dt [B, H]`` float32,
    ``A, D [H]``, ``B, C [B, G, N]``, ``state [B, H, P, N]`` float32.
    Returns ``y [B, H, P]`` float32 and the new state."""
    h, g = x.shape[1], B.shape[1]
    x = x.astype(jnp.float32)
    head_B = jnp.repeat(B.astype(jnp.float32), h // g, axis=1)  # [B, H, N]
    head_C = jnp.repeat(C.astype(jnp.float32), h // g, axis=1)  # [B, H, N]
    decay = jnp.exp(dt * A)  # [B, H]
    state = decay[..., None, None] * state + jnp.einsum("bh,bhp,bhn->bhpn", dt, x, head_B)
    y = jnp.einsum("bhpn,bhn->bhp", state, head_C) + D.astype(jnp.float32)[:, None] * x
    return y, state


def mixer(cfg: Mamba2Config, p: Params, u: jax.Array, conv_state: jax.Array, ssm_state: jax.Array,
          lengths: jax.Array | None = None):
    """The Mamba2 mixer on normalised inputs ``u [B, T, D]`` (weight dtype) with one layer's
    params ``p`` and state (``conv_state [B, K-1, C]``, ``ssm_state [B, H, P, N]``).
    Returns ``(out [B, T, D] in the weight dtype, conv_state, ssm_state)``."""
    b, t, _ = u.shape
    i, g, n, h, hp = cfg.d_inner, cfg.n_groups, cfg.state_size, cfg.num_heads, cfg.head_dim
    zxbcdt = jnp.einsum("btd,dz->btz", u, p["in_proj"])  # [B, T, Z]
    if "in_proj_bias" in p:
        zxbcdt = zxbcdt + p["in_proj_bias"]
    z, xbc, dt = jnp.split(zxbcdt, [i, i + cfg.conv_dim], axis=-1)

    valid = None if lengths is None else jnp.arange(t)[None, :] < lengths[:, None]  # [B, T]
    if valid is not None:  # padded inputs must not reach the conv state
        xbc = jnp.where(valid[..., None], xbc, 0)
    conv_out, window = causal_conv(xbc, conv_state, p["conv_w"], p.get("conv_b"))
    new_conv_state = last_inputs(window, lengths, cfg.conv_kernel - 1).astype(conv_state.dtype)
    xbc = jax.nn.silu(conv_out)  # [B, T, C] float32
    x, B, C = jnp.split(xbc, [i, i + g * n], axis=-1)

    dt = jax.nn.softplus(dt.astype(jnp.float32) + p["dt_bias"].astype(jnp.float32))  # [B, T, H]
    lo, hi = cfg.time_step_limit
    if (lo, hi) != (0.0, math.inf):
        dt = jnp.clip(dt, lo, hi)
    if valid is not None:  # dt = 0: the state neither decays nor takes the input
        dt = jnp.where(valid[..., None], dt, 0.0)
    A = -jnp.exp(p["A_log"].astype(jnp.float32))  # [H]

    if t == 1:
        y, new_ssm = ssm_step(x[:, 0].reshape(b, h, hp), dt[:, 0], A, B[:, 0].reshape(b, g, n),
                              C[:, 0].reshape(b, g, n), p["D"], ssm_state)
        y = y[:, None]
    else:
        y, new_ssm = ssd_ops.ssd(x.reshape(b, t, h, hp), dt, A, B.reshape(b, t, g, n), C.reshape(b, t, g, n),
                                 p["D"].astype(jnp.float32), chunk_size=cfg.chunk_size,
                                 initial_state=ssm_state.astype(jnp.float32))
    y = y.reshape(b, t, i)  # [B, T, I]
    norm_groups = g if cfg.norm_per_group else 1
    y = gated_rms_norm(y, z, p["gate_norm"], norm_groups, cfg.rms_norm_eps)
    out = jnp.einsum("bti,id->btd", y.astype(p["out_proj"].dtype), p["out_proj"])
    if "out_proj_bias" in p:
        out = out + p["out_proj_bias"]
    return out, new_conv_state, new_ssm


def block(cfg: Mamba2Config, p: Params, x: jax.Array, conv_state, ssm_state, lengths=None):
    """Pre-norm residual block: ``x + mixer(norm(x))``; ``x [B, T, D]`` -> float32."""
    residual = x.astype(jnp.float32)
    u = rms_norm(residual, p["norm"], cfg.rms_norm_eps).astype(p["in_proj"].dtype)
    out, conv_state, ssm_state = mixer(cfg, p, u, conv_state, ssm_state, lengths)
    return residual + out.astype(jnp.float32), conv_state, ssm_state


# ----------------------------------------------------------------------------- modules

def _a_log_init(key, shape, dtype=jnp.float32):
    """S4D-real init: ``A = -(1, 2, ..., H)``."""
    del key
    return jnp.log(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32)).astype(dtype)


def _dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=1e-1, floor=1e-4):
    """``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]`` (mamba_ssm's init)."""
    log_dt = jax.random.uniform(key, shape, minval=math.log(dt_min), maxval=math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus


def _conv_init(key, shape, dtype=jnp.float32):
    """Depthwise conv taps uniform in ``+-1/sqrt(K)`` (PyTorch's default for fan-in K)."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


class Mamba2Block(nn.Module):
    """One layer: holds its params and calls ``block``. ``__call__(x [B,T,D], conv_state,
    ssm_state, lengths)`` -> ``(x float32, (conv_state, ssm_state))``."""

    config: Mamba2Config

    @nn.compact
    def __call__(self, x, conv_state, ssm_state, lengths=None):
        cfg = self.config
        d, i, c, h, k = cfg.hidden_size, cfg.d_inner, cfg.conv_dim, cfg.num_heads, cfg.conv_kernel
        z = 2 * i + 2 * cfg.n_groups * cfg.state_size + h
        p = {
            "norm": self.param("norm", nn.initializers.ones, (d,)),
            "in_proj": self.param("in_proj", _init, (d, z)),
            "conv_w": self.param("conv_w", _conv_init, (k, c)),
            "dt_bias": self.param("dt_bias", _dt_bias_init, (h,)),
            "A_log": self.param("A_log", _a_log_init, (h,)),
            "D": self.param("D", nn.initializers.ones, (h,)),
            "gate_norm": self.param("gate_norm", nn.initializers.ones, (i,)),
            "out_proj": self.param("out_proj", _init, (i, d)),
        }
        if cfg.use_conv_bias:
            p["conv_b"] = self.param("conv_b", nn.initializers.zeros, (c,))
        if cfg.use_bias:
            p["in_proj_bias"] = self.param("in_proj_bias", nn.initializers.zeros, (z,))
            p["out_proj_bias"] = self.param("out_proj_bias", nn.initializers.zeros, (d,))
        x, conv_state, ssm_state = block(cfg, p, x, conv_state, ssm_state, lengths)
        return x, (conv_state, ssm_state)


class _ScannedBlock(nn.Module):
    """Adapter for ``nn.scan``: carry ``x``, per-layer ``(conv, ssm)`` in and out, ``lengths``
    broadcast."""

    config: Mamba2Config
    return_hidden: bool = False

    @nn.compact
    def __call__(self, x, layer_state, lengths):
        x, layer_state = Mamba2Block(self.config, name="block")(x, layer_state[0], layer_state[1], lengths)
        return x, (layer_state, x if self.return_hidden else None)


class Mamba2(nn.Module):
    """Full-depth decoder. ``__call__(tokens [B,T], state, lengths [B] or None, return_hidden)``
    returns ``(logits [B,T,V] float32, state, hidden [L,B,T,D] float32 or None)``; ``hidden[i]``
    is the output of layer ``i + 1`` before the final norm."""

    config: Mamba2Config

    @nn.compact
    def __call__(self, tokens, state: Mamba2State, lengths=None, return_hidden: bool = False):
        cfg = self.config
        emb = self.param("embed", _init, (cfg.vocab_size, cfg.hidden_size))
        layers = nn.scan(_ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast), length=cfg.num_layers)
        x = jnp.take(emb, tokens, axis=0).astype(jnp.float32)  # the residual stream (scan carry) is float32
        x, ((conv, ssm), hidden) = layers(cfg, return_hidden, name="layers")(x, (state.conv, state.ssm), lengths)
        logits = declare_head(self, cfg, emb, x, _init)
        return logits, Mamba2State(conv=conv, ssm=ssm), hidden


# ----------------------------------------------------------------------------- functional API

def init_params(config: Mamba2Config, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters, cast to ``dtype``: projections normal(0.02), norms and D at one,
    ``A = -(1..H)``, ``softplus(dt_bias)`` log-uniform in [1e-3, 1e-1], conv taps
    uniform(+-1/sqrt(K)), biases zero."""
    return _init_params(config, key, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(config: Mamba2Config, key: jax.Array, dtype) -> Params:
    # Jitted: linen's init traces a whole forward pass, which op by op compiles every op.
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Mamba2(config).init(key, tokens, Mamba2State.init(config, 1))
    return flatten_scanned_block(jax.tree.map(lambda a: a.astype(dtype), variables["params"]))


def _check_lengths(lengths, batch: int):
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},) (one per row), found {lengths.shape}")
    return lengths.astype(jnp.int32)


def apply(config: Mamba2Config, params: Params, tokens: jax.Array, state: Mamba2State,
          lengths=None, return_hidden: bool = False):
    """Run the full stack over ``tokens [B, T]`` continuing from ``state``; see the module
    docstring. Returns ``(logits [B, T, V] float32, state, hidden [L, B, T, D] or None)``."""
    lengths = _check_lengths(lengths, tokens.shape[0])
    return Mamba2(config).apply({"params": nest_scanned_block(params)}, tokens, state, lengths, return_hidden)


# ----------------------------------------------------------------------------- decode protocol
# ``dynamax_jax.models.Backbone``: one layer at a time on per-layer buffers (``dynamax_jax.decoding``).
# A layer's *entry* (what a decode step writes) is its whole new state.

SKIPPED_LAYER_MODES = ("skip", "propagate", "shift", "recompute")  # the first is the default
LAYER_PARAMS = frozenset(("norm", "in_proj", "conv_w", "dt_bias", "A_log", "D", "gate_norm", "out_proj"))


def decode_layout(layer_params: Params) -> Params:
    """The decode layout of one layer is the stored one (each projection is one matrix already)."""
    return layer_params


def cache_capacity(caches: tuple[Mamba2State, ...]) -> None:
    """A recurrent state holds any number of positions."""
    return None


def init_cache(config: Mamba2Config, batch: int, cache_len: int = 0, dtype=jnp.float32) -> tuple[Mamba2State, ...]:
    """One zero ``Mamba2State`` (``conv [B, K-1, C]``, ``ssm [B, H, P, N]``) per layer; a
    recurrent state has no length, so ``cache_len`` is unused."""
    del cache_len
    conv = (batch, config.conv_kernel - 1, config.conv_dim)
    ssm = (batch, config.num_heads, config.head_dim, config.state_size)
    return tuple(Mamba2State(conv=jnp.zeros(conv, dtype), ssm=jnp.zeros(ssm, jnp.float32))
                 for _ in range(config.num_layers))


def prefill_layer(config: Mamba2Config, layer_params: Params, x: jax.Array, layer_state: Mamba2State,
                  lengths=None):
    """One layer: ``x [B, T, D]`` and one layer's ``Mamba2State`` -> ``(x [B, T, D] float32,
    layer_state)``. ``lengths [B]`` (None: all T) marks right-padded rows, whose padded steps
    leave the state untouched."""
    lengths = _check_lengths(lengths, x.shape[0])
    x, conv, ssm = block(config, layer_params, x, layer_state.conv, layer_state.ssm, lengths)
    return x, Mamba2State(conv=conv, ssm=ssm)


def decode_layer(config: Mamba2Config, layer_params: Params, x: jax.Array, layer_state: Mamba2State,
                 positions=None):
    """One token ``x [B, 1, D]`` through one layer -> ``(x float32, entry)``, the entry being
    the layer's new state (``positions`` is unused: the state carries the history)."""
    del positions
    return prefill_layer(config, layer_params, x, layer_state)


def propagate_layer(config: Mamba2Config, layer_params: Params, x: jax.Array, layer_state: Mamba2State,
                    positions=None) -> Mamba2State:
    """State propagation for a skipped layer: its new state for the exit hidden state
    ``x [B, 1, D]`` (XLA drops the unused output path)."""
    return decode_layer(config, layer_params, x, layer_state, positions)[1]


def read_entry(layer_state: Mamba2State, positions=None) -> Mamba2State:
    """A layer's current entry: its state."""
    return layer_state


def write_entry(layer_state: Mamba2State, entry: Mamba2State, positions=None, after=None) -> Mamba2State:
    """The new state is the entry (``after``, an ordering hint for partial writes, is not
    needed: nothing is updated in place)."""
    return entry


def forward(config: Mamba2Config, params: Params, tokens: jax.Array, return_hidden: bool = False):
    """Full forward from an empty state: ``tokens [B, T] -> logits [B, T, V]`` float32
    (and ``hidden [L, B, T, D]`` float32 when ``return_hidden``)."""
    if isinstance(params["layers"], (tuple, list)):  # the decode layout
        return layers.unrolled_forward(sys.modules[__name__], config, params, tokens, return_hidden)
    state = Mamba2State.init(config, tokens.shape[0], params["embed"].dtype)
    logits, _, hidden = apply(config, params, tokens, state, None, return_hidden)
    return (logits, hidden) if return_hidden else logits
