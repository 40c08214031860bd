"""The decode engine: jit-compiled prefill and token loop with early exits.

Shape legend: B batch, T prompt width (right-padded), N new tokens, S cache slots (T + N),
D hidden, V vocabulary, L layers, E exits.

Layout. Decoding reads one buffer per layer: ``params["layers"]`` is a tuple of L per-layer
param dicts (``decode_params`` makes it once from the stacked ``[L, ...]`` storage layout), and
the cache is a tuple of L per-layer caches. On XLA:CPU a slice of stacked weights, static or
dynamic, is copied before its matmul, which made every layer cost two to three times its bytes.

How a token is decoded (``_token_step``). The layers are cut into *segments* that end at the
exit layers (exits at 18, 21, 24, 27 of 30: layers 1-18, 19-21, 22-24, 25-27, 28-30; static
pruning: one layer each; full depth: one segment). The first segment runs; each later one is
a ``lax.cond`` on "some row is still going" around its unrolled layers and the confidence of
the exit at its end. Rows whose confidence reaches their threshold leave
(their hidden state freezes); once every row has left, the later segments' layers cost
nothing. Layers a row skipped get, at its position, what ``settings.mode`` says: ``copy`` (the
exit layer's K/V), ``propagate`` (their state update run on the exit hidden state),
``skip`` (state unchanged), ``shift`` (``propagate`` from the exit hidden state moved by
the average update of the layers in between, the heads' ``fill_shift``) or ``recompute``
(a diagnostic: the row keeps running its layers,
so the cache is the full model's and only the early token differs; no compute is saved and
the loop always runs to the last layer); each backbone lists the modes it allows. The next
token comes from the final norm and LM head on the exit hidden state (after the exit's adapter, when the
heads have one). An exit whose threshold is above 1 for every row cannot fire: its
classifier does not run (a ``mamba`` head's state then does not advance), unless the budget
controller may lower the threshold again.

The token loop is itself a ``lax.while_loop`` (no host sync per token). The prompt's last
token is not part of the full-depth prefill: it is the first input of the token loop, so every
generated token (the first included) may exit.

Public, pure and traceable (research code may call them inside its own ``jax.jit``):
``configure`` (host-side checks -> static ``DecodeSettings``, traced ``DecodeControls``),
``prefill`` and ``decode_chunk``; ``generate`` wraps the three.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax import flops as flops_lib
from dynamax_jax import sharding as S
from dynamax_jax.exits import (FILL_SHIFT, ExitConfig, adapt, check_exits, classifier_confidence, classifier_sequence,
                               classifier_step, init_exit_state, margin_confidence, saturation_confidence,
                               softmax_confidence)
from dynamax_jax.models import module_for, module_for_params
from dynamax_jax.models.layers import unstack
from dynamax_jax.sampling import apply_repetition_penalty, sample_token
from dynamax_jax.errors import GenerateError, NonFiniteError  # noqa: F401  (importable from here too)

Params = dict[str, Any]

# Threshold at which the budget controller stops raising thresholds: above every confidence.
NEVER_EXIT = 1.01


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

def is_decode_layout(params: Params) -> bool:
    return isinstance(params["layers"], (tuple, list))


def decode_params(params: Params, donate: bool = False, config=None) -> Params:
    """``params`` with ``layers`` as a tuple of per-layer dicts, each in its backbone's
    ``decode_layout`` (a Mistral layer's q/k/v and gate/up projections become one matrix each;
    a Mamba2 layer stays as it is); params already in that layout are returned as they are.
    The backbone is ``config``'s, or without it the one whose layer params ``params`` holds.
    With ``donate`` each stacked leaf is deleted once split (peak memory: the model plus one
    stacked leaf or one layer); the caller must then drop ``params``. The stacked layout stays
    the storage, sharding and training layout."""
    if is_decode_layout(params):
        return params
    model = module_for(config) if config is not None else module_for_params(params)
    missing = model.LAYER_PARAMS - set(params["layers"])
    if missing:
        raise GenerateError(f"params: the layers lack {', '.join(sorted(missing))}, which every layer of "
                            f"{model.__name__} has")
    layers = list(unstack(params["layers"], donate=donate))
    for i, layer in enumerate(layers):
        layers[i] = model.decode_layout(layer)  # the layer's stored matrices go
    return {**params, "layers": tuple(layers)}


def per_exit(exit_params: Params | None, dtype=None):
    """Stacked ``[E, ...]`` exit params as a tuple of per-exit dicts (one buffer each), cast
    to ``dtype`` when given."""
    if exit_params is None or isinstance(exit_params, (tuple, list)):
        return exit_params
    if dtype is not None:
        exit_params = jax.tree.map(lambda a: a.astype(dtype), exit_params)
    return unstack(exit_params)


# --------------------------------------------------------------------------------------------
# Settings (static) and controls (traced)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Compile-time settings of prefill and the token loop (hashable; a change recompiles).

    exit_config: resolved exits, threshold zeroed (thresholds are traced), or None.
    mode: what layers a token skipped get, one of the backbone's ``SKIPPED_LAYER_MODES``
        (``dynamax_jax.models``); None at full depth. static: static layer pruning
        (``DecodeControls.static_layer``).
    segments: ``(start, end)`` 0-based layer ranges the layer loop runs one branch each.
    skip_unfireable: exits whose threshold is above 1 for every row skip their classifier.
    budget: adapt thresholds towards ``DecodeControls.target_layers`` (``update_thresholds``)."""

    exit_config: ExitConfig | None
    mode: str | None
    static: bool
    segments: tuple[tuple[int, int], ...]
    greedy: bool = True
    top_k: int = 0
    use_top_p: bool = False
    use_penalty: bool = False
    return_logits: bool = False
    pad_token: int = 0
    budget: bool = False
    skip_unfireable: bool = True

    @property
    def dynamic(self) -> bool:
        """Exits decided by a confidence (not static pruning, not full depth)."""
        return self.exit_config is not None and not self.static


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeControls:
    """Traced inputs of the token loop: changing them does not recompile. ``thresholds [E]``
    (or ``[B, E]``), ``static_layer`` (layers run under static pruning), sampling
    ``temperature`` / ``top_p`` / ``penalty``, ``stop_tokens [4k]`` (-1 pads), budget
    controller ``target_layers`` and ``budget_gain``."""

    thresholds: jax.Array
    static_layer: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    penalty: jax.Array
    stop_tokens: jax.Array
    target_layers: jax.Array
    budget_gain: jax.Array


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _segments(num_layers: int, exit_layers: Sequence[int] | None, static: bool) -> tuple[tuple[int, int], ...]:
    if static:
        return tuple((layer, layer + 1) for layer in range(num_layers))
    ends = sorted(set(exit_layers or ()) | {num_layers})
    return tuple(zip([0] + ends[:-1], ends))


def configure(config, max_new_tokens: int, *, exit_config: ExitConfig | None = None,
              exit_params: Params | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
              repetition_penalty: float = 1.0, stop_tokens: Sequence[int] = (),
              static_exit_layer: int | None = None, return_logits: bool = False, pad_token: int = 0,
              target_layers: float | None = None, budget_gain: float = 0.5, dtype=None):
    """Check the arguments of a generation (see ``generate``) and split them into static
    ``DecodeSettings``, traced ``DecodeControls`` and the exit params the loop reads (one dict
    per exit, or None when no classifier runs), cast to ``dtype`` (pass the backbone's weight
    dtype: XLA:CPU runs bfloat16 dots far slower than float32 ones, so heads saved in bfloat16
    must not slow a float32 backbone).
    Raises ``GenerateError`` / ``ExitError``."""
    n_layers = config.num_layers
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if exit_config is None and exit_params is not None:
        raise GenerateError("exit_params given without exit_config")
    modes = module_for(config).SKIPPED_LAYER_MODES
    static = static_exit_layer is not None
    if static:
        if not _is_int(static_exit_layer) or not 1 <= static_exit_layer <= n_layers:
            raise GenerateError(f"static_exit_layer must be in [1, {n_layers}] (an integer), got {static_exit_layer!r}")
        mode = (exit_config.mode if exit_config is not None else None) or modes[0]
        if mode not in modes:
            raise GenerateError(f"mode {mode!r} is not available for a {config.family} backbone; "
                                f"supported: {', '.join(modes)}")
        if mode == "recompute":
            raise GenerateError("mode 'recompute' needs exits: static pruning would run every layer")
        if mode == "shift":
            raise GenerateError("mode 'shift' needs exit heads (their fill_shift): use propagate with static pruning")
        ec = None
    else:
        ec = check_exits(config, exit_config, exit_params) if exit_config is not None else None
        mode = ec.mode if ec is not None else None
    thresholds = np.asarray(ec.thresholds() if ec is not None else (2.0,), np.float32)
    if not ec or not ec.needs_params:
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
    settings = DecodeSettings(
        exit_config=dataclasses.replace(ec, threshold=0.0) if ec is not None else None,
        mode=mode, static=static, segments=_segments(n_layers, ec.layers if ec is not None else None, static),
        greedy=temperature == 0, top_k=int(top_k) if temperature > 0 else 0,
        use_top_p=temperature > 0 and top_p < 1, use_penalty=repetition_penalty != 1,
        return_logits=bool(return_logits), pad_token=int(pad_token), budget=target_layers is not None,
        skip_unfireable=target_layers is None)
    controls = DecodeControls(
        thresholds=jnp.asarray(thresholds), static_layer=jnp.int32(static_exit_layer or n_layers),
        temperature=jnp.float32(max(temperature, 1e-6)), top_p=jnp.float32(top_p),
        penalty=jnp.float32(repetition_penalty), stop_tokens=jnp.asarray(stops),
        target_layers=jnp.float32(target_layers or 0.0), budget_gain=jnp.float32(budget_gain))
    return settings, controls, per_exit(exit_params, dtype)


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything the token loop carries between tokens (and between ``decode_chunk`` calls).

    caches: one cache per layer (the backbone's ``init_cache``); positions ``[B]``: position
    of the next input token; tokens ``[B]``: the next input token; exit_state: one
    ``MambaExitState`` per exit (``mamba`` heads) or None; seen ``[B, V]``: tokens in the
    prompt or generated (repetition penalty) or None; done ``[B]``: the row emitted a stop
    token; step: tokens generated so far (the sampling key is folded with it); thresholds
    ``[B, E]``: the budget controller's current thresholds (None until a ``decode_chunk``
    with a budget sets them)."""

    caches: tuple
    positions: jax.Array
    tokens: jax.Array
    exit_state: tuple | None
    seen: jax.Array | None
    done: jax.Array
    step: jax.Array
    thresholds: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerLoopState:
    """What passes from segment to segment in the layer loop of one token (fields a setting
    does not use stay None).

    segment: segments run so far; hidden ``[B, 1, D]``: the residual stream (frozen for rows
    that left); active ``[B]``: rows still going; exit_layer ``[B]``: layers run by rows that
    left; saturation_reference ``[B, 1, D]``: the hidden state at the previous exit
    (``saturation``); exit_logits ``[B, V]``: the head's logits where rows left (``softmax`` /
    ``margin``); predicted_hidden ``[B, D]``: the adapted hidden state of rows that left
    (adapters). The exits' recurrent states and the layers' cache entries are kept apart:
    each segment's branch takes and returns only its own (see ``_token_step``)."""

    segment: jax.Array
    hidden: jax.Array
    active: jax.Array
    exit_layer: jax.Array
    saturation_reference: jax.Array | None = None
    exit_logits: jax.Array | None = None
    predicted_hidden: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeChunk:
    """What ``decode_chunk`` emits for ``n`` steps: ``tokens [B, n]`` (``pad_token`` after a row
    stopped), ``exit_layers [B, n]`` (layers run, 1-based; 0 for padding), ``positions [B, n]``
    (of each step's input token), ``logits [B, n, V]`` when ``return_logits`` (else None) and
    ``nonfinite [B]``: the row's logits held a NaN or an infinity at some step (broken weights or
    inputs; its tokens are meaningless)."""

    tokens: jax.Array
    exit_layers: jax.Array
    positions: jax.Array
    logits: jax.Array | None = None
    nonfinite: jax.Array | None = None


def _row_where(mask: jax.Array, new, old):
    """Per-row select on pytrees whose leaves lead with the batch axis."""
    return jax.tree.map(lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _cast_like(entry, cache):
    """A layer's entry in its cache's dtypes (the two are the same pytree)."""
    return jax.tree.map(lambda e, c: e.astype(c.dtype), entry, cache)


def _copy_exit_entries(entries, exit_layer: jax.Array):
    """DYNAMAX copy: every layer a row skipped takes the entry (K/V) of the row's exit layer.
    ``entries`` stacked ``[L, B, ...]``, ``exit_layer [B]``: layers run (1-based; L: nothing
    skipped)."""
    n_layers = jax.tree.leaves(entries)[0].shape[0]
    rows = jnp.arange(exit_layer.shape[0])
    source = jnp.clip(exit_layer - 1, 0, n_layers - 1)
    skipped = jnp.arange(n_layers)[:, None] >= exit_layer[None, :]  # [L, B]

    def copy(a):
        exit_entry = a[source, rows]  # [B, ...]
        return jnp.where(skipped.reshape(skipped.shape + (1,) * (a.ndim - 2)), exit_entry[None], a)
    return jax.tree.map(copy, entries)


# --------------------------------------------------------------------------------------------
# One token through the layers with exits
# --------------------------------------------------------------------------------------------

def _exit_check(config, settings: DecodeSettings, params, exit_params, thresholds, loop: LayerLoopState,
                exit_index: int, layer_input: jax.Array, exit_state):
    """The confidence of exit ``exit_index`` (static) on ``loop.hidden``; rows reaching their
    threshold leave. ``layer_input [B, 1, D]``: the hidden state entering the exit layer;
    ``exit_state``: this exit's recurrent state (``mamba`` heads) or None. Returns
    ``(loop, exit_state)``."""
    ec = settings.exit_config
    model = module_for(config)
    layer = ec.layers[exit_index]
    h = loop.hidden[:, 0]  # [B, D]
    p = exit_params[exit_index] if exit_params is not None else None
    threshold = thresholds[:, exit_index]
    can_fire = jnp.any(loop.active & (threshold <= 1.0)) if settings.skip_unfireable else jnp.bool_(True)
    b = h.shape[0]
    never = jnp.zeros((b,), jnp.float32)
    changes = {}
    if ec.confidence == "classifier":
        def run():
            logits2, new_state = classifier_step(ec, p, h, exit_state)
            return classifier_confidence(logits2), new_state

        # rows that left earlier step on their exit hidden state (frozen)
        confidence, exit_state = jax.lax.cond(can_fire, run, lambda: (never, exit_state))
    elif ec.confidence in ("softmax", "margin"):
        measure = softmax_confidence if ec.confidence == "softmax" else margin_confidence

        def run():
            logits = model.head(config, params, adapt(ec, p, h))
            return measure(logits), logits

        confidence, logits = jax.lax.cond(can_fire, run, lambda: (never, loop.exit_logits))
    else:
        reference = layer_input if exit_index == 0 else loop.saturation_reference
        confidence = saturation_confidence(h, reference[:, 0])
        changes["saturation_reference"] = loop.hidden
    leave = loop.active & (confidence >= threshold)
    if ec.confidence in ("softmax", "margin"):
        changes["exit_logits"] = jnp.where(leave[:, None], logits, loop.exit_logits)
    elif ec.has_adapter or settings.mode == "recompute":  # adapt only when some row leaves (once per token)
        changes["predicted_hidden"] = jax.lax.cond(
            jnp.any(leave), lambda: jnp.where(leave[:, None], adapt(ec, p, h), loop.predicted_hidden),
            lambda: loop.predicted_hidden)
    loop = dataclasses.replace(loop, exit_layer=jnp.where(leave, layer, loop.exit_layer),
                               active=loop.active & ~leave, **changes)
    return loop, exit_state


@dataclasses.dataclass(frozen=True)
class _Token:
    """What every stage of one token's layer loop reads and nothing changes: the static
    ``settings``, the backbone ``model``, the weights, ``thresholds [B, E]``, the caches (read
    only; written once the layers are over), ``positions [B]`` and ``done [B]`` of the input
    tokens, and ``exit_at_end`` (layer count -> index of the exit after it)."""

    config: Any
    settings: DecodeSettings
    model: Any
    params: Params
    exit_params: Any
    thresholds: jax.Array
    caches: tuple
    positions: jax.Array
    done: jax.Array
    exit_at_end: dict

    @property
    def layers(self):
        return self.params["layers"]


def _skipped_layer_input(token: _Token, loop: LayerLoopState, layer: int) -> jax.Array:
    """What a row that left gives a layer it skips: its exit hidden state, moved under ``shift``
    by its exit's average update up to that layer (rows still going: unchanged)."""
    ec = token.settings.exit_config
    if token.settings.mode != "shift" or layer < ec.layers[0]:  # (no row has left before the first exit)
        return loop.hidden
    row_of_exit = np.full(token.config.num_layers + 1, len(ec.layers), np.int32)  # rows going: the zero row
    row_of_exit[list(ec.layers)] = np.arange(len(ec.layers))
    zero = jnp.zeros((1, token.config.hidden_size), token.exit_params[0][FILL_SHIFT].dtype)
    table = jnp.concatenate([p[FILL_SHIFT][layer][None] for p in token.exit_params] + [zero])  # [E + 1, D]
    shift = table[jnp.asarray(row_of_exit)[loop.exit_layer]]  # [B, D]
    return loop.hidden + shift[:, None].astype(loop.hidden.dtype)


def _run_segment(token: _Token, index: int, loop: LayerLoopState, exit_state_e):
    """Segment ``index``'s layers for the rows still going, then the exit at its end. Rows that
    left keep their exit hidden state: under ``propagate`` / ``shift`` the layers they skip take
    their entries from it (shifted under ``shift``), under ``skip`` their entries stay, under
    ``copy`` they are replaced once the token is over (``_copy_exit_entries``), under
    ``recompute`` they run the layers on. Returns ``(loop, entries, exit_state_e)``."""
    settings, model = token.settings, token.model
    recompute = settings.mode == "recompute"
    start, end = settings.segments[index]
    hidden = layer_input = loop.hidden
    entries = []
    for layer in range(start, end):
        layer_input = hidden
        cache = token.caches[layer]
        x_in = _skipped_layer_input(token, dataclasses.replace(loop, hidden=hidden), layer)
        new_hidden, entry = model.decode_layer(token.config, token.layers[layer], x_in, cache, token.positions)
        if settings.mode == "skip":
            entry = _row_where(loop.active, entry, model.read_entry(cache, token.positions))
        if recompute:  # the exit hidden state is kept in predicted_hidden
            hidden = new_hidden.astype(hidden.dtype)
        else:
            hidden = jnp.where(loop.active[:, None, None], new_hidden.astype(hidden.dtype), hidden)
        entries.append(_cast_like(entry, cache))
    loop = dataclasses.replace(loop, segment=jnp.int32(index + 1), hidden=hidden)
    if end in token.exit_at_end:
        loop, exit_state_e = _exit_check(token.config, settings, token.params, token.exit_params, token.thresholds,
                                         loop, token.exit_at_end[end], layer_input, exit_state_e)
    return loop, entries, exit_state_e


def _kept_entries(token: _Token, loop: LayerLoopState, start: int, end: int) -> list:
    """``skip`` (and ``copy``, whose entries are replaced once the token is over): the skipped
    layers keep what they store."""
    return [token.model.read_entry(token.caches[layer], token.positions) for layer in range(start, end)]


def _propagated_entries(token: _Token, loop: LayerLoopState, start: int, end: int) -> list:
    """``propagate`` / ``shift``: each skipped layer's entry for the (shifted) exit hidden state."""
    return [_cast_like(token.model.propagate_layer(token.config, token.layers[layer],
                                                   _skipped_layer_input(token, loop, layer), token.caches[layer],
                                                   token.positions), token.caches[layer])
            for layer in range(start, end)]


# What a segment that no row reached stores, per skipped-layer mode (``recompute`` runs them all).
_SKIPPED_SEGMENT_ENTRIES = {"copy": _kept_entries, "skip": _kept_entries, "propagate": _propagated_entries,
                            "shift": _propagated_entries}


def _skip_segment(token: _Token, index: int, loop: LayerLoopState, exit_state_e):
    """A segment no row reached: what its layers store (``_SKIPPED_SEGMENT_ENTRIES``), and the
    recurrent exit at its end steps on the exit hidden state (see exits.py)."""
    settings, ec = token.settings, token.settings.exit_config
    start, end = settings.segments[index]
    entries = _SKIPPED_SEGMENT_ENTRIES[settings.mode](token, loop, start, end)
    if settings.dynamic and ec.stateful and end in token.exit_at_end:
        e = token.exit_at_end[end]
        runs = jnp.any(~token.done & (token.thresholds[:, e] <= 1.0)) if settings.skip_unfireable else True
        exit_state_e = jax.lax.cond(
            runs, lambda: classifier_step(ec, token.exit_params[e], loop.hidden[:, 0], exit_state_e)[1],
            lambda: exit_state_e)
    return loop, entries, exit_state_e


def _initial_loop(token: _Token, x: jax.Array) -> LayerLoopState:
    """The layer loop's state before the first layer: every row not done goes, ``x [B, 1, D]``."""
    settings, ec = token.settings, token.settings.exit_config
    b = x.shape[0]
    loop = LayerLoopState(segment=jnp.int32(0), hidden=x, active=~token.done, exit_layer=jnp.zeros((b,), jnp.int32))
    if settings.dynamic:
        if ec.confidence == "saturation":
            loop.saturation_reference = x
        if ec.confidence in ("softmax", "margin"):
            loop.exit_logits = jnp.zeros((b, token.config.vocab_size), jnp.float32)
        elif ec.has_adapter or settings.mode == "recompute":
            loop.predicted_hidden = x[:, 0]
    return loop


def _token_logits(token: _Token, loop: LayerLoopState) -> jax.Array:
    """``[B, V]`` float32: rows that ran to the end predict from the last hidden state, rows that
    left from their exit (the head's logits there, or the adapted exit hidden state)."""
    settings, ec, model = token.settings, token.settings.exit_config, token.model
    x = loop.hidden[:, 0]
    if settings.dynamic and ec.confidence in ("softmax", "margin"):
        ran_to_end = loop.active
        return jax.lax.cond(jnp.any(ran_to_end),
                            lambda: jnp.where(ran_to_end[:, None], model.head(token.config, token.params, x),
                                              loop.exit_logits),
                            lambda: loop.exit_logits)
    if settings.dynamic and (ec.has_adapter or settings.mode == "recompute"):
        return model.head(token.config, token.params, jnp.where(loop.active[:, None], x, loop.predicted_hidden))
    return model.head(token.config, token.params, x)


def _token_step(config, settings: DecodeSettings, params, exit_params, state: DecodeState, thresholds,
                static_layer):
    """Run the input tokens of ``state`` through the layers with exits; ``thresholds [B, E]``.
    Returns ``(logits [B, V] float32, exit_layer [B] int32, caches, exit_state)``.

    Straight-line code over the segments: the first runs; each later one is a ``lax.cond``
    on "some row is still going" (and, under static pruning, "the segment starts before the
    static layer"). A branch takes the loop state, reads the caches and returns the loop
    state, the entries of its own layers and the state of the exit at its end, nothing else:
    XLA:CPU copies every buffer that a conditional passes through or updates in place, and a
    loop that carried all layers' entries (a Mamba2 layer's whole state) through a
    ``lax.switch`` per segment ran at half the speed of full depth."""
    model = module_for(config)
    ec = settings.exit_config
    stateful = settings.dynamic and ec.stateful
    token = _Token(config=config, settings=settings, model=model, params=params, exit_params=exit_params,
                   thresholds=thresholds, caches=state.caches, positions=state.positions, done=state.done,
                   exit_at_end={layer: e for e, layer in enumerate(ec.layers)} if settings.dynamic else {})
    stop_layer = static_layer if settings.static else config.num_layers
    exit_state = list(state.exit_state) if stateful else None
    loop = _initial_loop(token, model.embed(config, params, state.tokens[:, None]))  # hidden [B, 1, D]
    entries = []
    for index, (start, end) in enumerate(settings.segments):
        e = token.exit_at_end.get(end)
        exit_state_e = exit_state[e] if stateful and e is not None else None
        with jax.named_scope(f"segment{index}"):  # (tests find the segments by it)
            if index == 0 or settings.mode == "recompute":  # the token loop runs only while some row is going
                loop, segment_entries, exit_state_e = _run_segment(token, index, loop, exit_state_e)
            else:
                reached = jnp.any(loop.active) & (start < stop_layer)
                loop, segment_entries, exit_state_e = jax.lax.cond(
                    reached, functools.partial(_run_segment, token, index),
                    functools.partial(_skip_segment, token, index), loop, exit_state_e)
        entries += segment_entries
        if exit_state_e is not None:
            exit_state[e] = exit_state_e
    ends = jnp.asarray([0] + [end for _, end in settings.segments], jnp.int32)
    exit_layer = jnp.where(loop.active, ends[loop.segment], loop.exit_layer)  # done rows stay 0
    if settings.mode == "copy":  # layers a row skipped take its exit layer's entry
        copied = _copy_exit_entries(_stack(entries), jnp.where(state.done, config.num_layers, exit_layer))
        entries = [jax.tree.map(lambda a, layer=layer: a[layer], copied) for layer in range(config.num_layers)]
    # after the hidden state: every segment's reads of the caches come before these writes (in place)
    caches = tuple(model.write_entry(cache, entry, state.positions, after=loop.hidden)
                   for cache, entry in zip(state.caches, entries))
    logits = _token_logits(token, loop)
    return logits, exit_layer, caches, tuple(exit_state) if stateful else state.exit_state


# --------------------------------------------------------------------------------------------
# Prefill and the token loop
# --------------------------------------------------------------------------------------------

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


def _refuse_if(bad: jax.Array, message: str, *values) -> None:
    """Inside a jitted function: raise ``GenerateError(message.format(*values))`` where only
    the device knows (traced values). A ``jax.debug.callback`` under a ``lax.cond``: nothing
    runs or waits on the host unless ``bad``; the caller then gets a ``JaxRuntimeError``
    carrying the message."""
    def fail(*host_values):
        raise GenerateError(message.format(*(np.asarray(v).tolist() for v in host_values)))

    def callback(partitioned: bool):
        return lambda: jax.debug.callback(fail, *values, partitioned=partitioned)

    # XLA:TPU has no partitioned host callback: there the callback runs once, on the values gathered.
    refuse = lambda: jax.lax.platform_dependent(cpu=callback(True), cuda=callback(True), rocm=callback(True),  # noqa: E731
                                                default=callback(False))
    jax.lax.cond(bad, refuse, lambda: None)


def _check_prompt_array(prompt, name: str) -> None:
    """``prompt`` (numpy or jax) is ``[B, T]`` integer token ids with B, T >= 1."""
    if prompt.ndim != 2 or prompt.shape[1] < 1 or prompt.shape[0] < 1:
        raise GenerateError(f"{name} must be [B, T] with B, T >= 1 (one token at least), got shape {prompt.shape}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise GenerateError(f"{name} must hold integer token ids, got dtype {prompt.dtype}")


def _check_prefill(config, model, params: Params, prompt: jax.Array, lengths: jax.Array, cache_len: int) -> None:
    """Host-side checks of ``prefill``'s arguments (shapes and static values, at trace time)."""
    if not is_decode_layout(params):
        raise GenerateError("params: pass the decode layout, decode_params(params) (made once)")
    if len(params["layers"]) != config.num_layers:
        raise GenerateError(f"params: {len(params['layers'])} layers for a {config.num_layers}-layer config")
    _check_prompt_array(prompt, "prompt")
    if lengths.shape != prompt.shape[:1]:
        raise GenerateError(f"lengths must have shape ({prompt.shape[0]},) (one per prompt row), got {lengths.shape}")
    if not _is_int(cache_len) or cache_len < 0:
        raise GenerateError(f"cache_len must be a non-negative integer, got {cache_len!r}")
    capacity = model.cache_capacity(jax.eval_shape(lambda: model.init_cache(config, 1, cache_len)))
    if capacity is not None and capacity < prompt.shape[1]:
        raise GenerateError(f"cache_len ({cache_len}) is smaller than the prompt width ({prompt.shape[1]} tokens); "
                            "it must hold the prompt and the tokens to generate")


@functools.partial(jax.jit, static_argnames=("config", "settings", "cache_len"))
def prefill(config, settings: DecodeSettings, params: Params, exit_params, prompt: jax.Array,
            lengths: jax.Array, cache_len: int) -> DecodeState:
    """Full-depth prefill of every prompt token but each row's last one. ``params`` in the
    decode layout, ``exit_params`` per exit (as ``configure`` returns them), ``prompt [B, T]``
    right-padded, ``lengths [B]`` (in ``[1, T]``), ``cache_len`` (static) cache slots, at
    least T. Returns the ``DecodeState`` whose next input is the last prompt token of each row.
    Shapes are checked when tracing (``GenerateError``); token ids outside the vocabulary and
    lengths outside ``[1, T]`` when running (a ``JaxRuntimeError`` naming the argument)."""
    model = module_for(config)
    _check_prefill(config, model, params, prompt, lengths, cache_len)
    b, t = prompt.shape
    valid = jnp.arange(t)[None] < lengths[:, None]  # [B, T]
    _refuse_if(jnp.any((lengths < 1) | (lengths > t)), "prefill: lengths must be in [1, {}], got {}", t, lengths)
    _refuse_if(jnp.any(valid & ((prompt < 0) | (prompt >= config.vocab_size))),
               "prefill: prompt token ids must be in [0, {}) (the vocabulary), got {}", config.vocab_size,
               jnp.where(valid, prompt, 0))
    ec = settings.exit_config
    stateful = settings.dynamic and ec.stateful
    caches = list(model.init_cache(config, b, cache_len, params["embed"].dtype))
    exit_state = None
    if stateful:
        exit_state = unstack(init_exit_state(config, ec, b))
        exit_state = S.constrain(exit_state, S.state_specs(exit_state, exit_state=True))
    if t > 1:
        x = model.embed(config, params, prompt[:, :t - 1])
        at_exits = {}
        for layer, layer_params in enumerate(params["layers"]):
            x, caches[layer] = model.prefill_layer(config, layer_params, x, caches[layer], lengths - 1)
            at_exits[layer + 1] = x
        if stateful:
            exit_state = tuple(classifier_sequence(ec, p, at_exits[layer], st, lengths - 1)[1]
                               for p, layer, st in zip(exit_params, ec.layers, exit_state))
    seen = None
    if settings.use_penalty:
        seen = jnp.zeros((b, config.vocab_size), bool).at[jnp.arange(b)[:, None], prompt].max(valid)
    last = jnp.take_along_axis(prompt, (lengths - 1)[:, None], axis=1)[:, 0]
    caches = S.constrain(tuple(caches), S.state_specs(tuple(caches)))
    return DecodeState(caches=caches, positions=lengths - 1, tokens=last, exit_state=exit_state, seen=seen,
                       done=jnp.zeros((b,), bool), step=jnp.int32(0))


def _check_state(config, settings: DecodeSettings, model, state: DecodeState) -> None:
    """Host-side check (at trace time) that ``state`` is what ``prefill`` returns for
    ``config`` and ``settings``: its caches have the backbone's structure and shapes."""
    b = state.tokens.shape[0]
    want = jax.eval_shape(lambda: model.init_cache(config, b, 0))
    kinds_differ = [type(c) for c in state.caches] != [type(c) for c in want]
    if kinds_differ or jax.tree.structure(state.caches) != jax.tree.structure(want):
        kinds = sorted({type(c).__name__ for c in state.caches})
        raise GenerateError(f"state: its caches ({len(state.caches)} x {'/'.join(kinds) or 'nothing'}) are not "
                            f"those of this config ({config.num_layers} x {type(want[0]).__name__}, a "
                            f"{config.family} backbone): pass the state prefill returned for this config")
    capacity = model.cache_capacity(state.caches)
    want = jax.eval_shape(lambda: model.init_cache(config, b, capacity or 0))
    for have_leaf, want_leaf in zip(jax.tree.leaves(state.caches), jax.tree.leaves(want)):
        if have_leaf.shape != want_leaf.shape:
            raise GenerateError(f"state: a cache of shape {have_leaf.shape} where this config's is "
                                f"{want_leaf.shape}: pass the state prefill returned for this config")
    stateful = settings.dynamic and settings.exit_config.stateful
    for name, needed in (("exit_state", stateful), ("seen", settings.use_penalty)):
        if (getattr(state, name) is not None) != needed:
            raise GenerateError(f"state: {name} is {'missing' if needed else 'present'} for these settings: pass "
                                "the state prefill returned for the same settings")


@functools.partial(jax.jit, static_argnames=("config", "settings", "num_steps"), donate_argnames=("state",))
def decode_chunk(config, settings: DecodeSettings, num_steps: int, params: Params, exit_params,
                 state: DecodeState, controls: DecodeControls, key: jax.Array) -> tuple[DecodeChunk, DecodeState]:
    """Decode ``num_steps`` (static) tokens, fewer if every row stopped, continuing from
    ``state`` (donated). ``key``: the sampling PRNG key (folded with the step). Returns
    ``(DecodeChunk, state)``. A ``state`` of another config or settings is refused when
    tracing (``GenerateError``); ``num_steps`` past the cache that ``prefill`` made when
    running (a ``JaxRuntimeError`` naming ``cache_len``), before any token is decoded."""
    model = module_for(config)
    _check_state(config, settings, model, state)
    capacity = model.cache_capacity(state.caches)
    if capacity is not None:  # each step writes at its input's position
        last = state.positions + num_steps - 1
        _refuse_if(jnp.any(~state.done & (last >= capacity)),
                   "decode_chunk: {} steps from positions {} write up to position {}, past the cache of {} "
                   "slots (prefill's cache_len)", num_steps, state.positions, jnp.max(last), capacity)
    b = state.tokens.shape[0]
    out = DecodeChunk(tokens=jnp.full((b, num_steps), settings.pad_token, jnp.int32),
                      exit_layers=jnp.zeros((b, num_steps), jnp.int32),
                      positions=jnp.zeros((b, num_steps), jnp.int32),
                      logits=(jnp.zeros((b, num_steps, config.vocab_size), jnp.float32)
                              if settings.return_logits else None),
                      nonfinite=jnp.zeros((b,), bool))

    def cond(carry):
        i, st, _, _ = carry
        return (i < num_steps) & ~jnp.all(st.done)

    def body(carry):
        i, st, o, thr = carry
        logits, exit_layer, caches, exit_state = _token_step(config, settings, params, exit_params, st, thr,
                                                             controls.static_layer)
        caches = S.constrain(caches, S.state_specs(caches))
        if settings.budget:
            thr = update_thresholds(thr, exit_layer, ~st.done, controls.target_layers, controls.budget_gain,
                                    config.num_layers)
        token = _next_token(settings, controls, key, st, logits)
        was_done = st.done
        token = jnp.where(was_done, settings.pad_token, token)
        o = DecodeChunk(tokens=o.tokens.at[:, i].set(token),
                        exit_layers=o.exit_layers.at[:, i].set(jnp.where(was_done, 0, exit_layer)),
                        positions=o.positions.at[:, i].set(st.positions),
                        logits=o.logits.at[:, i].set(logits) if settings.return_logits else None,
                        nonfinite=o.nonfinite | (~was_done & ~jnp.all(jnp.isfinite(logits), axis=-1)))
        seen = st.seen
        if settings.use_penalty:
            seen = seen.at[jnp.arange(b), token].set(seen[jnp.arange(b), token] | ~was_done)
        done = was_done | jnp.any(token[:, None] == controls.stop_tokens[None, :], axis=-1)
        st = DecodeState(caches=caches, positions=st.positions + (~was_done).astype(jnp.int32),
                         tokens=jnp.where(was_done, st.tokens, token), exit_state=exit_state, seen=seen,
                         done=done, step=st.step + 1, thresholds=st.thresholds)
        return i + 1, st, o, thr

    thresholds = controls.thresholds
    thr0 = jnp.broadcast_to(thresholds, (b, thresholds.shape[-1]))
    if settings.budget and state.thresholds is not None:
        thr0 = state.thresholds
    _, state, out, thr = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out, thr0))
    if settings.budget:
        state = dataclasses.replace(state, thresholds=thr)
    return out, state


def _next_token(settings: DecodeSettings, controls: DecodeControls, key, state: DecodeState, logits) -> jax.Array:
    """The token each row emits for ``logits [B, V]``: penalised, then greedy or sampled."""
    if settings.use_penalty:
        logits = apply_repetition_penalty(logits, state.seen, controls.penalty)
    if settings.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_token(logits, jax.random.fold_in(key, state.step), controls.temperature, settings.top_k,
                        controls.top_p, settings.use_top_p)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

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


def as_prompt(prompt_tokens, prompt_lengths, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``prompt_tokens`` (``[B, T]`` right-padded with ``prompt_lengths [B]``, or a list of token
    lists) checked and padded -> ``(prompt [B, T] int32, lengths [B] int32)``."""
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
    _check_prompt_array(prompt, "prompt_tokens")
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


def check_context(config, longest_prompt: int, max_new_tokens: int) -> None:
    """Refuse a generation longer than the model's context (Transformers: its
    ``max_position_embeddings``; a recurrent Mamba2 state has no limit)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and longest_prompt + max_new_tokens > limit:
        raise GenerateError(f"the prompt ({longest_prompt} tokens) plus max_new_tokens ({max_new_tokens}) is "
                            f"{longest_prompt + max_new_tokens} tokens, more than the model's context of {limit}")


def cache_bytes(config, batch: int, cache_len: int, dtype) -> int:
    """Bytes of the decode caches (``init_cache``) for ``batch`` rows of ``cache_len`` slots."""
    shapes = jax.eval_shape(lambda: module_for(config).init_cache(config, batch, cache_len, dtype))
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def check_cache_memory(config, batch: int, cache_len: int, dtype) -> None:
    """Refuse caches larger than the memory this host has available (CPU backend only: an
    accelerator's memory is its own)."""
    if jax.default_backend() != "cpu" or not hasattr(os, "sysconf"):
        return
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    needed = cache_bytes(config, batch, cache_len, dtype)
    if needed > available:
        raise GenerateError(f"the cache for {batch} x {cache_len} tokens needs {needed / 2**30:.1f} GiB, more than "
                            f"the {available / 2**30:.1f} GiB of memory available")


def check_finite(chunk: DecodeChunk) -> None:
    """Refuse a chunk whose logits held a NaN or an infinity (``NonFiniteError``): the tokens of
    such a row are meaningless (argmax of NaN), and the row often stops at once on token 0."""
    bad = np.flatnonzero(np.asarray(chunk.nonfinite))
    if bad.size:
        raise NonFiniteError(f"the logits of prompt row(s) {bad.tolist()} were not finite (NaN or infinity): the "
                             "weights or the inputs hold non-finite values, so the generated tokens mean nothing")


def summarize(config, settings: DecodeSettings, controls: DecodeControls, exit_layers, positions) -> dict:
    """Average layers and FLOPs of the generated tokens (``exit_layers > 0``), see
    ``dynamax_jax.flops.summarize``; exits whose threshold is above 1 ran no classifier."""
    running = None
    if settings.dynamic and settings.skip_unfireable:
        running = np.asarray(controls.thresholds).reshape(-1, settings.exit_config.num_exits) <= 1.0
        running = running.any(axis=0)
    return flops_lib.summarize(config, settings.exit_config if settings.dynamic else None, exit_layers, positions,
                               np.asarray(exit_layers) > 0, settings.mode if settings.static else None,
                               running_exits=running)


def generate(config, params, prompt_tokens, *, max_new_tokens: int, exit_config: ExitConfig | None = None,
             exit_params: Params | None = None, prompt_lengths=None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             stop_tokens: Sequence[int] = (), key: jax.Array | None = None,
             static_exit_layer: int | None = None, return_logits: bool = False, pad_token: int = 0,
             cache_len: int | None = None, target_layers: float | None = None,
             budget_gain: float = 0.5) -> GenerateResult:
    """Generate ``max_new_tokens`` per row with early exits (or at full depth).

    params: the backbone's params, best in the decode layout (``decode_params``, once); stacked
        params are split here on every call.
    prompt_tokens: ``[B, T]`` int (right-padded, with ``prompt_lengths [B]``), or a list of
        token lists of different lengths (padded here).
    exit_config / exit_params: exits (``None``: full depth). Training-free confidences
        (``softmax``, ``margin``, ``saturation``) need no params.
    temperature: 0 = greedy; else sample with ``top_k`` (0 = off), ``top_p`` (1 = off) and
        the PRNG ``key`` (default ``jax.random.key(0)``).
    repetition_penalty: CTRL penalty on tokens in the prompt or generated (1 = off).
    stop_tokens: a row stops after emitting one (it is kept); then it emits ``pad_token``
        with exit layer 0, and is not counted in the averages.
    static_exit_layer: static layer pruning, every token leaves after this many layers (any
        layer); skipped layers handled by ``exit_config.mode`` if given (default: the
        backbone's first mode, copy / skip).
    cache_len: KV-cache slots (default ``T + max_new_tokens``); too small is an error.
    target_layers: a compute budget: average layers per token to aim for (between the first
        exit layer and L). Each row's thresholds start at ``exit_config.threshold`` and are
        adapted after every token by ``update_thresholds`` (gain ``budget_gain``) so that the
        row's running average of layers executed meets the target.

    Compiled once per (config, shapes, static settings); thresholds, temperature, top_p,
    penalty, stop tokens and the static exit layer are traced, so changing them does not
    recompile.
    """
    prompt, lengths = as_prompt(prompt_tokens, prompt_lengths, config.vocab_size)
    t = prompt.shape[1]
    settings, controls, exit_params = configure(
        config, max_new_tokens, exit_config=exit_config, exit_params=exit_params, temperature=temperature,
        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, stop_tokens=stop_tokens,
        static_exit_layer=static_exit_layer, return_logits=return_logits, pad_token=pad_token,
        target_layers=target_layers, budget_gain=budget_gain, dtype=params["embed"].dtype)
    check_context(config, int(lengths.max()), int(max_new_tokens))
    needed = int(lengths.max()) + int(max_new_tokens)
    if cache_len is None:
        cache_len = t + max_new_tokens
    elif cache_len < needed:
        raise GenerateError(f"the cache has {cache_len} slots but the longest prompt ({int(lengths.max())} "
                            f"tokens) plus max_new_tokens ({max_new_tokens}) needs {needed}")
    check_cache_memory(config, prompt.shape[0], int(max(cache_len, t)), params["embed"].dtype)
    params = decode_params(params, config=config)
    key = jax.random.key(0) if key is None else key
    chunk = _prefill_and_decode(config, settings, controls, params, exit_params, prompt, lengths,
                                int(max(cache_len, t)), int(max_new_tokens), key)
    check_finite(chunk)
    summary = summarize(config, settings, controls, chunk.exit_layers, chunk.positions)
    return GenerateResult(tokens=chunk.tokens, exit_layers=chunk.exit_layers,
                          num_generated=(chunk.exit_layers > 0).sum(axis=1), logits=chunk.logits, **summary)


def _prefill_and_decode(config, settings: DecodeSettings, controls: DecodeControls, params: Params, exit_params,
                        prompt: np.ndarray, lengths: np.ndarray, cache_len: int, num_steps: int,
                        key: jax.Array) -> DecodeChunk:
    """``prefill`` then one ``decode_chunk`` of ``num_steps``; the chunk on the host. With
    params on a mesh (``sharding.mesh_of``) the prompt rows are split over its ``data`` axis
    and both run under ``jax.set_mesh``, so that the caches follow the sharding table."""
    mesh = S.mesh_of(params)
    if mesh is None:
        prompt, lengths, context = jnp.asarray(prompt), jnp.asarray(lengths), contextlib.nullcontext()
    else:
        prompt, lengths, context = S.place_rows(mesh, prompt), S.place_rows(mesh, lengths), jax.set_mesh(mesh)
    with context:
        state = prefill(config, settings, params, exit_params, prompt, lengths, cache_len=cache_len)
        chunk, _ = decode_chunk(config, settings, num_steps, params, exit_params, state, controls, key)
    return S.to_host(chunk)
