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

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax import flops as flops_lib
from dynamax_jax.exits import (FILL_SHIFT, ExitConfig, adapt, check_exits, classifier_confidence, classifier_sequence,
                               classifier_step, init_exit_state, margin_confidence, saturation_confidence,
                               softmax_confidence)
from dynamax_jax.models import module_for
from dynamax_jax.models.layers import unstack
from dynamax_jax.models.mistral import fuse_decode_weights
from dynamax_jax.sampling import apply_repetition_penalty, sample_token

Params = dict[str, Any]

# Threshold at which the budget controller stops raising thresholds: above every confidence.
NEVER_EXIT = 1.01

TRACE_COUNT = {"prefill": 0, "decode": 0}  # incremented when tracing (tests check no retrace)


class GenerateError(ValueError):
    """Bad input to ``generate`` / ``configure``."""


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

def is_decode_layout(params: Params) -> bool:
    return isinstance(params["layers"], (tuple, list))


def decode_params(params: Params, donate: bool = False) -> Params:
    """``params`` with ``layers`` as a tuple of per-layer dicts (the decode layout: a Mistral
    layer's q/k/v and gate/up projections each one matrix, ``mistral.fuse_decode_weights``);
    params already in that layout are returned as they are. With ``donate`` each stacked leaf
    is deleted once split (peak memory: the model plus one stacked leaf or one layer); the
    caller must then drop ``params``. The stacked layout stays the storage, sharding and
    training layout."""
    if is_decode_layout(params):
        return params
    layers = list(unstack(params["layers"], donate=donate))
    for i, layer in enumerate(layers):
        layers[i] = fuse_decode_weights(layer)  # the layer's separate matrices go
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
    mode: what layers a token skipped get (``copy`` / ``propagate`` / ``skip``); None at
        full depth. static: static layer pruning (``DecodeControls.static_layer``).
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
    dtype: heads saved in bfloat16 ran ten times slower than in float32 under XLA:CPU).
    Raises ``GenerateError`` / ``ExitError``."""
    n_layers = config.num_layers
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if exit_config is None and exit_params is not None:
        raise GenerateError("exit_params given without exit_config")
    modes = module_for(config).SKIPPED_LAYER_MODES
    static = static_exit_layer is not None
    if static:
        if not 1 <= int(static_exit_layer) <= n_layers:
            raise GenerateError(f"static_exit_layer must be in [1, {n_layers}], got {static_exit_layer}")
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
    (of each step's input token) and ``logits [B, n, V]`` when ``return_logits`` (else None)."""

    tokens: jax.Array
    exit_layers: jax.Array
    positions: jax.Array
    logits: jax.Array | None = None


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
    layers = params["layers"]
    n_layers = config.num_layers
    ec = settings.exit_config
    dynamic = settings.dynamic
    stateful = dynamic and ec.stateful
    positions = state.positions
    x = model.embed(config, params, state.tokens[:, None])  # [B, 1, D]
    b = x.shape[0]
    exit_at_end = {layer: e for e, layer in enumerate(ec.layers)} if dynamic else {}
    stop_layer = static_layer if settings.static else n_layers
    recompute = settings.mode == "recompute"  # rows that left keep running their layers
    caches = state.caches  # read by the segments; written once they are over
    exit_state = list(state.exit_state) if stateful else None
    if settings.mode == "shift":
        # per layer, each exit's fill_shift and a zero row for rows that did not leave
        row_of_exit = np.full(n_layers + 1, len(ec.layers), np.int32)
        row_of_exit[list(ec.layers)] = np.arange(len(ec.layers))
        zero = jnp.zeros((1, config.hidden_size), exit_params[0][FILL_SHIFT].dtype)

    def skipped_layer_input(loop, layer):
        """What a row that left gives a layer it skips: its exit hidden state, moved under
        ``shift`` by its exit's average update up to that layer (rows still going: unchanged)."""
        if settings.mode != "shift" or layer < ec.layers[0]:  # (no row has left before the first exit)
            return loop.hidden
        table = jnp.concatenate([p[FILL_SHIFT][layer][None] for p in exit_params] + [zero])  # [E + 1, D]
        shift = table[jnp.asarray(row_of_exit)[loop.exit_layer]]  # [B, D]
        return (loop.hidden + shift[:, None].astype(loop.hidden.dtype))

    def run_segment(index, loop, exit_state_e):
        """The segment's layers for the rows still going (rows that left keep their exit hidden
        state: under "propagate" / "shift" the layers they skip take their entries from it,
        shifted under "shift"; under "copy" these are replaced later), then the exit at its end."""
        start, end = settings.segments[index]
        hidden = layer_input = loop.hidden
        entries = []
        for layer in range(start, end):
            layer_input = hidden
            x_in = skipped_layer_input(dataclasses.replace(loop, hidden=hidden), layer)
            new_hidden, entry = model.decode_layer(config, layers[layer], x_in, caches[layer], positions)
            if settings.mode == "skip":
                entry = _row_where(loop.active, entry, model.read_entry(caches[layer], positions))
            if recompute:  # the exit hidden state is kept in predicted_hidden
                hidden = new_hidden.astype(hidden.dtype)
            else:
                hidden = jnp.where(loop.active[:, None, None], new_hidden.astype(hidden.dtype), hidden)
            entries.append(_cast_like(entry, caches[layer]))
        loop = dataclasses.replace(loop, segment=jnp.int32(index + 1), hidden=hidden)
        if end in exit_at_end:
            loop, exit_state_e = _exit_check(config, settings, params, exit_params, thresholds, loop,
                                             exit_at_end[end], layer_input, exit_state_e)
        return loop, entries, exit_state_e

    def skip_segment(index, loop, exit_state_e):
        """A segment no row reached: what its layers store (``propagate`` / ``shift``: their
        entries from the (shifted) exit hidden state; ``skip``: unchanged; ``copy``: replaced
        below), and the exit at
        its end steps on the exit hidden state (see exits.py)."""
        start, end = settings.segments[index]
        if settings.mode in ("propagate", "shift"):
            entries = [_cast_like(model.propagate_layer(config, layers[layer], skipped_layer_input(loop, layer),
                                                        caches[layer], positions), caches[layer])
                       for layer in range(start, end)]
        else:
            entries = [model.read_entry(caches[layer], positions) for layer in range(start, end)]
        if stateful and end in exit_at_end:
            e = exit_at_end[end]
            runs = jnp.any(~state.done & (thresholds[:, e] <= 1.0)) if settings.skip_unfireable else True
            exit_state_e = jax.lax.cond(
                runs, lambda: classifier_step(ec, exit_params[e], loop.hidden[:, 0], exit_state_e)[1],
                lambda: exit_state_e)
        return loop, entries, exit_state_e

    loop = LayerLoopState(segment=jnp.int32(0), hidden=x, active=~state.done, exit_layer=jnp.zeros((b,), jnp.int32))
    if dynamic:
        if ec.confidence == "saturation":
            loop.saturation_reference = x
        if ec.confidence in ("softmax", "margin"):
            loop.exit_logits = jnp.zeros((b, config.vocab_size), jnp.float32)
        elif ec.has_adapter or recompute:
            loop.predicted_hidden = x[:, 0]
    entries = []
    for index, (start, end) in enumerate(settings.segments):
        e = exit_at_end.get(end)
        exit_state_e = exit_state[e] if stateful and e is not None else None
        with jax.named_scope(f"segment{index}"):  # (tests find the segments by it)
            if index == 0 or recompute:  # the token loop runs only while some row is going
                loop, segment_entries, exit_state_e = run_segment(index, loop, exit_state_e)
            else:
                reached = jnp.any(loop.active) & (start < stop_layer)
                loop, segment_entries, exit_state_e = jax.lax.cond(
                    reached, functools.partial(run_segment, index), functools.partial(skip_segment, index),
                    loop, exit_state_e)
        entries += segment_entries
        if exit_state_e is not None:
            exit_state[e] = exit_state_e
    ends = jnp.asarray([0] + [end for _, end in settings.segments], jnp.int32)
    exit_layer = jnp.where(loop.active, ends[loop.segment], loop.exit_layer)  # done rows stay 0
    x = loop.hidden

    if settings.mode == "copy":  # layers a row skipped take its exit layer's entry
        copied = _copy_exit_entries(_stack(entries), jnp.where(state.done, n_layers, exit_layer))
        entries = [jax.tree.map(lambda a, layer=layer: a[layer], copied) for layer in range(n_layers)]
    # after x: every segment's reads of the caches come before these writes (in place)
    caches = tuple(model.write_entry(cache, entry, positions, after=x) for cache, entry in zip(caches, entries))

    if dynamic and ec.confidence in ("softmax", "margin"):
        ran_to_end = loop.active
        logits = jax.lax.cond(jnp.any(ran_to_end),
                              lambda: jnp.where(ran_to_end[:, None], model.head(config, params, x[:, 0]),
                                                loop.exit_logits),
                              lambda: loop.exit_logits)
    elif dynamic and (ec.has_adapter or recompute):  # rows that left predict from their (adapted) exit state
        logits = model.head(config, params, jnp.where(loop.active[:, None], x[:, 0], loop.predicted_hidden))
    else:
        logits = model.head(config, params, x[:, 0])
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


@functools.partial(jax.jit, static_argnames=("config", "settings", "cache_len"))
def prefill(config, settings: DecodeSettings, params: Params, exit_params, prompt: jax.Array,
            lengths: jax.Array, cache_len: int) -> DecodeState:
    """Full-depth prefill of every prompt token but each row's last one. ``params`` in the
    decode layout, ``exit_params`` per exit (as ``configure`` returns them), ``prompt [B, T]``
    right-padded, ``lengths [B]``, ``cache_len`` (static) cache slots. Returns the
    ``DecodeState`` whose next input is the last prompt token of each row."""
    TRACE_COUNT["prefill"] += 1
    model = module_for(config)
    b, t = prompt.shape
    ec = settings.exit_config
    stateful = settings.dynamic and ec.stateful
    caches = list(model.init_cache(config, b, cache_len, params["embed"].dtype))
    exit_state = None
    if stateful:
        exit_state = unstack(init_exit_state(config, ec, b))
    if t > 1:
        x = model.embed(config, params, prompt[:, :t - 1])
        valid = lengths - 1
        at_exits = {}
        for layer, layer_params in enumerate(params["layers"]):
            x, caches[layer] = model.prefill_layer(config, layer_params, x, caches[layer], valid)
            at_exits[layer + 1] = x
        if stateful:
            exit_state = tuple(classifier_sequence(ec, p, at_exits[layer], st, valid)[1]
                               for p, layer, st in zip(exit_params, ec.layers, exit_state))
    seen = None
    if settings.use_penalty:
        valid = jnp.arange(t)[None] < lengths[:, None]
        seen = jnp.zeros((b, config.vocab_size), bool).at[jnp.arange(b)[:, None], prompt].max(valid)
    last = jnp.take_along_axis(prompt, (lengths - 1)[:, None], axis=1)[:, 0]
    return DecodeState(caches=tuple(caches), positions=lengths - 1, tokens=last, exit_state=exit_state, seen=seen,
                       done=jnp.zeros((b,), bool), step=jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("config", "settings", "num_steps"), donate_argnames=("state",))
def decode_chunk(config, settings: DecodeSettings, num_steps: int, params: Params, exit_params,
                 state: DecodeState, controls: DecodeControls, key: jax.Array) -> tuple[DecodeChunk, DecodeState]:
    """Decode ``num_steps`` (static) tokens, fewer if every row stopped, continuing from
    ``state`` (donated). ``key``: the sampling PRNG key (folded with the step). Returns
    ``(DecodeChunk, state)``."""
    TRACE_COUNT["decode"] += 1
    b = state.tokens.shape[0]
    out = DecodeChunk(tokens=jnp.full((b, num_steps), settings.pad_token, jnp.int32),
                      exit_layers=jnp.zeros((b, num_steps), jnp.int32),
                      positions=jnp.zeros((b, num_steps), jnp.int32),
                      logits=(jnp.zeros((b, num_steps, config.vocab_size), jnp.float32)
                              if settings.return_logits else None))

    def cond(carry):
        i, st, _, _ = carry
        return (i < num_steps) & ~jnp.all(st.done)

    def body(carry):
        i, st, o, thr = carry
        logits, exit_layer, caches, exit_state = _token_step(config, settings, params, exit_params, st, thr,
                                                             controls.static_layer)
        if settings.budget:
            thr = update_thresholds(thr, exit_layer, ~st.done, controls.target_layers, controls.budget_gain,
                                    config.num_layers)
        scores = logits
        if settings.use_penalty:
            scores = apply_repetition_penalty(scores, st.seen, controls.penalty)
        if settings.greedy:
            token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        else:
            token = sample_token(scores, jax.random.fold_in(key, st.step), controls.temperature, settings.top_k,
                                 controls.top_p, settings.use_top_p)
        was_done = st.done
        token = jnp.where(was_done, settings.pad_token, token)
        o = DecodeChunk(tokens=o.tokens.at[:, i].set(token),
                        exit_layers=o.exit_layers.at[:, i].set(jnp.where(was_done, 0, exit_layer)),
                        positions=o.positions.at[:, i].set(st.positions),
                        logits=o.logits.at[:, i].set(logits) if settings.return_logits else None)
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
    params = decode_params(params)
    key = jax.random.key(0) if key is None else key
    state = prefill(config, settings, params, exit_params, jnp.asarray(prompt), jnp.asarray(lengths),
                    cache_len=int(max(cache_len, t)))
    chunk, _ = decode_chunk(config, settings, int(max_new_tokens), params, exit_params, state, controls, key)
    tokens, exit_layers, positions = (np.asarray(chunk.tokens), np.asarray(chunk.exit_layers),
                                      np.asarray(chunk.positions))
    summary = summarize(config, settings, controls, exit_layers, positions)
    return GenerateResult(tokens=tokens, exit_layers=exit_layers, num_generated=(exit_layers > 0).sum(axis=1),
                          logits=None if chunk.logits is None else np.asarray(chunk.logits), **summary)
