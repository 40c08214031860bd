"""Analytic FLOPs per decoded token: backbone layers, LM head, exit classifiers, skipped-layer
handling. Used to report early-exit savings relative to full depth.

What is counted: every matrix product as ``2 * m * n * k``; attention as ``4 * N * H * ctx``
(scores and weighted sum over the ``ctx`` keys a token attends to); the Mamba2 recurrence
(``5 * J * P * N`` per token: decay, input and readout) and its depthwise convolution.
Norms, activations, RoPE and softmaxes are a few FLOPs per element and are left out.
Counts are *logical*: a batched early-exit loop runs a layer for every row while any row is
still going; those extra computations are not charged to the rows that already left.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dynamax_jax.exits import ExitConfig, _mamba_dims


def transformer_layer_flops(config, context: int | np.ndarray) -> np.ndarray:
    """One Mistral/Llama layer for one token attending to ``context`` keys."""
    d, n, k, h, f = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                     config.intermediate_size)
    proj = 2 * d * (n * h + 2 * k * h) + 2 * n * h * d
    mlp = 2 * 3 * d * f
    return proj + mlp + 4 * n * h * np.asarray(context)


def mamba2_layer_flops(config, state_update_only: bool = False) -> float:
    """One Mamba2 layer for one token; ``state_update_only`` drops the readout, gate and output
    projection (what "propagate" needs for a skipped layer)."""
    d, inner, g, ns, heads, hd = (config.hidden_size, config.d_inner, config.n_groups, config.state_size,
                                  config.num_heads, config.head_dim)
    in_proj = 2 * d * (2 * inner + 2 * g * ns + heads)
    conv = 2 * config.conv_dim * config.conv_kernel
    if state_update_only:
        return float(in_proj + conv + 3 * heads * hd * ns)
    return float(in_proj + conv + 5 * heads * hd * ns + 2 * inner * d)


def layer_flops(config, context) -> np.ndarray:
    """One backbone layer for one token (``context``: keys attended, ignored for Mamba2)."""
    if config.family == "transformer":
        return transformer_layer_flops(config, context)
    return np.asarray(mamba2_layer_flops(config)) + 0 * np.asarray(context)


def head_flops(config) -> float:
    """Final norm + LM head for one token."""
    return float(2 * config.hidden_size * config.vocab_size)


def skipped_layer_flops(config, mode: str, context=1):
    """Work done for one layer a token skipped: 0 for ``copy`` / ``skip``; the K/V projections
    (Transformer) or the state update (Mamba2) for ``propagate``, plus adding the fill shift
    for ``shift``; the whole layer (over ``context`` keys) for ``recompute``."""
    if mode in ("copy", "skip"):
        return 0.0
    if mode == "recompute":
        return layer_flops(config, context)
    shift = config.hidden_size if mode == "shift" else 0
    if config.family == "transformer":
        return float(2 * config.hidden_size * 2 * config.num_kv_heads * config.head_dim + shift)
    return mamba2_layer_flops(config, state_update_only=True) + shift


def classifier_flops(config, exit_config: ExitConfig) -> float:
    """One exit's confidence computation for one token (for ``softmax`` / ``margin`` this is the
    LM head run at the exit)."""
    d = config.hidden_size
    if exit_config.confidence in ("softmax", "margin"):
        return head_flops(config)
    if exit_config.confidence == "saturation":
        return float(6 * d)  # dot product and two norms
    if exit_config.kind == "calm":
        return float(2 * d * 2)
    if exit_config.kind == "ffn":
        f = exit_config.ffn_expand * d
        return float(2 * d * f + 2 * f * 2)
    if exit_config.kind == "hybrid":  # the mamba mixer with output width D, then the ffn classifier
        ffn = classifier_flops(config, dataclasses.replace(exit_config, kind="ffn"))
        return mixer_flops(exit_config, d, out_width=d) + ffn
    return mixer_flops(exit_config, d, out_width=2)


def mixer_flops(exit_config: ExitConfig, d: int, out_width: int) -> float:
    """One token through a ``mamba`` / ``hybrid`` classifier's Mamba2 mixer on hidden size
    ``d`` whose output projection gives ``out_width`` values."""
    inner, n, heads, head_dim, conv_dim = _mamba_dims(exit_config, d)
    return float(2 * d * (2 * inner + 2 * n + heads) + 2 * conv_dim * exit_config.mamba_conv_kernel
                 + 5 * heads * head_dim * n + 2 * inner * out_width)


def adapter_flops(config, exit_config: ExitConfig) -> float:
    """One exit's adapter on one token (0 without one)."""
    d = config.hidden_size
    if exit_config.adapter == "affine":
        return float(2 * d * d)
    if exit_config.adapter == "lowrank":
        return float(2 * 2 * d * exit_config.adapter_rank)
    return 0.0


def token_flops(config, exit_config: ExitConfig | None, exit_layer: np.ndarray, position: np.ndarray,
                static_mode: str | None = None, running_exits: np.ndarray | None = None) -> np.ndarray:
    """FLOPs of each token: ``exit_layer`` (layers run, 1-based) and ``position`` (0-based, of
    the input token) of the same shape. ``exit_config`` (resolved) is ``None`` at full depth.
    ``static_mode`` (``copy`` / ``propagate`` / ``skip``) means static layer pruning with that
    skipped-layer handling: no classifier runs. ``running_exits [E]`` bool: the exits whose
    confidence is computed (default all; an exit that cannot fire skips it)."""
    exit_layer = np.asarray(exit_layer, np.int64)
    context = np.asarray(position, np.int64) + 1
    if config.family == "transformer" and getattr(config, "sliding_window", None):
        context = np.minimum(context, config.sliding_window)
    per_layer = layer_flops(config, context)
    total = exit_layer * per_layer + head_flops(config)
    skipped = config.num_layers - exit_layer
    if static_mode is not None:
        return (total + skipped * skipped_layer_flops(config, static_mode)).astype(np.float64)
    if exit_config is None:
        return total.astype(np.float64)
    total = total + skipped * skipped_layer_flops(config, exit_config.mode, context)
    exits = np.asarray(exit_config.layers)
    running = np.ones(len(exits), bool) if running_exits is None else np.asarray(running_exits, bool)
    reached_exits = exits[None, :] <= exit_layer.reshape(-1, 1)  # [tokens, E]
    # stateful classifiers also step the exits a token skipped (see exits.py)
    evaluated = (np.full_like(reached_exits, True) if exit_config.stateful else reached_exits) & running
    evaluated = np.sum(evaluated, axis=1).reshape(exit_layer.shape)
    total = total + evaluated * classifier_flops(config, exit_config)
    left = exit_layer < config.num_layers
    if exit_config.confidence in ("softmax", "margin"):
        # the head already ran at the exit the token left from: only tokens that ran to the
        # end pay the final head on top of the heads at every exit (each on adapted states)
        adapted = np.sum(reached_exits & running, axis=1).reshape(exit_layer.shape)
        total = total - np.where(left, head_flops(config), 0.0) + adapted * adapter_flops(config, exit_config)
    else:  # the adapter runs once, at the exit the token leaves from
        total = total + np.where(left, adapter_flops(config, exit_config), 0.0)
    return total.astype(np.float64)


def summarize(config, exit_config: ExitConfig | None, exit_layers: np.ndarray, positions: np.ndarray,
              counted: np.ndarray, static_mode: str | None = None, running_exits: np.ndarray | None = None) -> dict:
    """Average layers and FLOPs per token over the ``counted`` tokens (``[B, N]`` bool), and the
    FLOPs relative to full depth at the same positions."""
    counted = np.asarray(counted, bool)
    if not counted.any():
        return dict(avg_layers=float("nan"), flops_per_token=float("nan"),
                    full_flops_per_token=float("nan"), flops_relative=float("nan"))
    el, pos = np.asarray(exit_layers)[counted], np.asarray(positions)[counted]
    ours = token_flops(config, exit_config, el, pos, static_mode, running_exits)
    full = token_flops(config, None, np.full_like(el, config.num_layers), pos)
    return dict(avg_layers=float(el.mean()), flops_per_token=float(ours.mean()),
                full_flops_per_token=float(full.mean()), flops_relative=float(ours.sum() / full.sum()))
