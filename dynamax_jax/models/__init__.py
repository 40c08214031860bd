"""Backbones and the per-layer decode protocol they implement.

A backbone is a module (``mistral``, ``mamba2``) that provides every member of ``Backbone``;
``module_for(config)`` returns the one for a config's family and refuses a module that lacks a
member, naming it. Everything the rest of the project lists per backbone is derived from here:
``skipped_layer_modes`` (the engine, ``ExitConfig``, the generate CLI's ``--mode`` choices, the
evaluation sweeps) reads each backbone's ``SKIPPED_LAYER_MODES``.

Shape legend: B batch, T tokens in a call, D hidden, V vocabulary, S cache slots.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Protocol
from dynamax_jax.errors import BackboneError  # noqa: F401  (importable from here too)

Params = dict[str, Any]

# family (``config.family``) -> the module implementing it; the order is the listing order
BACKBONES = {"transformer": "dynamax_jax.models.mistral", "mamba2": "dynamax_jax.models.mamba2"}


class Backbone(Protocol):
    """What a backbone module provides. The decode engine (``dynamax_jax.decoding``) runs one
    layer at a time on per-layer buffers: ``params["layers"]`` is a tuple of per-layer dicts in
    the backbone's decode layout and the cache a tuple of per-layer caches. A decode step reads
    a layer's cache and returns its *entry* (what the new token adds: a Transformer's K/V at the
    token's position, a recurrent layer's whole new state); the engine writes every entry once
    the token's layers are over (``write_entry``), so that XLA can update caches in place."""

    # What a layer a token skipped may get; the first is the default. ``copy`` (the exit
    # layer's entry), ``skip`` (the entry unchanged), ``propagate`` (the layer's entry for the
    # exit hidden state), ``shift`` (``propagate`` from the exit hidden state moved by the exit
    # heads' ``fill_shift``), ``recompute`` (a diagnostic: the layers still run).
    SKIPPED_LAYER_MODES: tuple[str, ...]
    # Names of one layer's params in the stored (stacked) layout: recognise a backbone's params.
    LAYER_PARAMS: frozenset[str]

    def init_params(self, config, key, dtype=...) -> Params:
        """Random params in the stored layout (layers stacked ``[L, ...]``)."""

    def forward(self, config, params: Params, tokens, return_hidden: bool = False):
        """Full depth from an empty cache: ``tokens [B, T]`` -> ``logits [B, T, V]`` float32."""

    def embed(self, config, params: Params, tokens):
        """``tokens [B, T]`` -> the residual stream ``[B, T, D]`` float32."""

    def head(self, config, params: Params, x):
        """Final norm and LM head: ``x [..., D]`` -> ``logits [..., V]`` float32."""

    def decode_layout(self, layer_params: Params) -> Params:
        """One layer's params in the layout its decode functions read fastest (made once by
        ``decoding.decode_params``); params already in that layout are returned as they are."""

    def init_cache(self, config, batch: int, cache_len: int, dtype=...) -> tuple:
        """One empty cache per layer for ``batch`` rows and ``cache_len`` positions."""

    def cache_capacity(self, caches: tuple) -> int | None:
        """Positions ``caches`` can hold (None: a recurrent state, no limit)."""

    def prefill_layer(self, config, layer_params: Params, x, cache, lengths):
        """One layer over right-padded prompts ``x [B, T, D]`` from position 0 -> ``(x, cache)``."""

    def decode_layer(self, config, layer_params: Params, x, cache, positions):
        """One token ``x [B, 1, D]`` at ``positions [B]``, reading ``cache`` -> ``(x, entry)``."""

    def propagate_layer(self, config, layer_params: Params, x, cache, positions):
        """The entry a skipped layer stores for the exit hidden state ``x [B, 1, D]``."""

    def read_entry(self, cache, positions):
        """The entry stored at ``positions [B]`` (what the layer keeps when nothing is written)."""

    def write_entry(self, cache, entry, positions, after=None):
        """``cache`` with ``entry`` written at ``positions [B]``; ``after``: a value computed from
        every read of ``cache`` this token, so that XLA orders the reads before the write."""


def protocol_members() -> tuple[str, ...]:
    """The names a backbone module must define (``Backbone``'s attributes and functions)."""
    names = list(Backbone.__annotations__)
    names += [name for name, value in vars(Backbone).items() if callable(value) and not name.startswith("_")]
    return tuple(dict.fromkeys(names))


def check_backbone(module: ModuleType) -> ModuleType:
    """``module`` if it implements ``Backbone``; a ``BackboneError`` naming what it lacks."""
    missing = [name for name in protocol_members() if not hasattr(module, name)]
    if missing:
        raise BackboneError(f"backbone {module.__name__} does not implement the decode protocol: it lacks "
                            f"{', '.join(missing)} (see dynamax_jax.models.Backbone)")
    modes = module.SKIPPED_LAYER_MODES
    if not modes or not all(isinstance(m, str) for m in modes):
        raise BackboneError(f"backbone {module.__name__}: SKIPPED_LAYER_MODES must be a non-empty tuple of "
                            f"names, got {modes!r}")
    return module


_CHECKED: dict[str, ModuleType] = {}


def backbone(family: str) -> ModuleType:
    """The checked module implementing ``family`` (a key of ``BACKBONES``)."""
    if family not in _CHECKED:
        if family not in BACKBONES:
            raise BackboneError(f"no backbone for the family {family!r}; known: {', '.join(BACKBONES)}")
        _CHECKED[family] = check_backbone(importlib.import_module(BACKBONES[family]))
    return _CHECKED[family]


def module_for(config) -> ModuleType:
    """The module (``mistral`` or ``mamba2``) implementing ``config``'s architecture."""
    family = getattr(config, "family", None)
    if family not in BACKBONES:
        raise TypeError(f"no model for config of type {type(config).__name__}")
    return backbone(family)


def module_for_params(params: Params) -> ModuleType:
    """The backbone whose layers ``params`` (stored layout: ``layers`` a dict of stacked
    arrays) holds, recognised by the names of its layer params (``LAYER_PARAMS``)."""
    names = set(params["layers"])
    for family in BACKBONES:
        if backbone(family).LAYER_PARAMS <= names:
            return backbone(family)
    raise BackboneError(f"the layer params ({', '.join(sorted(names))}) are none of a known backbone's "
                        f"({', '.join(BACKBONES)})")


def skipped_layer_modes(family: str | None = None) -> tuple[str, ...]:
    """The skipped-layer modes of ``family``'s backbone (the first is its default), or with no
    family the union over every backbone, in listing order."""
    if family is not None:
        return backbone(family).SKIPPED_LAYER_MODES
    return tuple(dict.fromkeys(m for f in BACKBONES for m in backbone(f).SKIPPED_LAYER_MODES))
