"""The distillation objective of early-exit classifiers, as pure functions of arrays.

Shape legend: E exits, B batch, T tokens per row, D hidden, V vocabulary, L layers.

A position is *positive* at exit ``e`` when the token predicted there (the backbone's own
final norm and LM head on the exit's hidden state, after the exit's adapter when it has
one) is within the final layer's top-k: fewer than ``k`` vocabulary entries have a final
logit strictly greater than its own (k = 1: exact agreement up to ties, as in CALM). Each
classifier is trained with a weighted cross-entropy on its 2 logits (continue, exit);
adapters are distilled from the final layer with ``KL(final || exit)``. ``train.distill``
runs them; ``exit_counts`` and ``summarize`` report precision, recall and the oracle.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax import exits as ex
from dynamax_jax.models import module_for


def exit_labels(config, params, exit_hidden: jax.Array, final_logits: jax.Array, topk: int) -> jax.Array:
    """Distillation labels ``[E, B, T]`` bool from ``exit_hidden [E, B, T, D]`` and
    ``final_logits [B, T, V]``: positive where the exit's token (argmax of the shared head
    on its hidden state) has fewer than ``topk`` final logits strictly above its own."""
    head = module_for(config).head

    def one_exit(h):  # [B, T, D] -> [B, T]; one exit at a time bounds memory to one [B, T, V]
        predicted = jnp.argmax(head(config, params, h), axis=-1)  # [B, T]
        own = jnp.take_along_axis(final_logits, predicted[..., None], axis=-1)  # [B, T, 1]
        rank = jnp.sum(final_logits > own, axis=-1)  # [B, T]
        return rank < topk

    return jax.lax.map(one_exit, exit_hidden)


def backbone_outputs(config, params, tokens: jax.Array, exit_layers: Sequence[int]):
    """Frozen backbone: ``tokens [B, T]`` -> ``(exit_hidden [E, B, T, D], final_logits [B, T, V])``."""
    params = jax.lax.stop_gradient(params)
    logits, hidden = module_for(config).forward(config, params, tokens, return_hidden=True)  # hidden [L, B, T, D]
    return hidden[np.asarray(exit_layers) - 1], logits  # layer l's output is hidden[l - 1]


def backbone_pass(config, params, tokens: jax.Array, exit_layers: Sequence[int], topk: int):
    """Frozen backbone and plain logit-lens labels: ``tokens [B, T]`` ->
    ``(exit_hidden [E, B, T, D], labels [E, B, T])``."""
    exit_hidden, logits = backbone_outputs(config, params, tokens, exit_layers)
    return exit_hidden, exit_labels(config, jax.lax.stop_gradient(params), exit_hidden, logits, topk)


def adapted_exits(config, params, exit_config: ex.ExitConfig, adapters, exit_hidden: jax.Array,
                  final_logits: jax.Array, mask: jax.Array, topk: int):
    """Labels ``[E, B, T]`` bool and ``KL(final || exit) [E]`` (mean over ``mask``ed tokens) of
    the adapted exit predictions ``head(adapter_e(h_e))``; ``adapters``: the ``adapter_*``
    params stacked ``[E, ...]``. Differentiable in ``adapters`` through the KL only."""
    head = module_for(config).head
    logp_final = jax.nn.log_softmax(final_logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    p_final = jnp.exp(logp_final)
    m = mask.astype(jnp.float32)

    def one_exit(_, xs):  # one exit at a time bounds memory to a few [B, T, V]
        p_e, h = xs
        logits = head(config, params, ex.adapt(exit_config, p_e, h)).astype(jnp.float32)  # [B, T, V]
        predicted = jnp.argmax(logits, axis=-1)
        own = jnp.take_along_axis(final_logits, predicted[..., None], axis=-1)
        labels = jnp.sum(final_logits > own, axis=-1) < topk
        kl = jnp.sum(p_final * (logp_final - jax.nn.log_softmax(logits, axis=-1)), axis=-1)  # [B, T]
        return None, (labels, jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0))

    _, (labels, kl) = jax.lax.scan(one_exit, None, (adapters, exit_hidden))
    return labels, kl


def exit_loss(logits2: jax.Array, labels: jax.Array, mask: jax.Array, exit_weights: jax.Array,
              balanced: bool):
    """Weighted cross-entropy. ``logits2 [E, B, T, 2]``, ``labels [E, B, T]`` bool,
    ``mask [B, T]`` (1 for real tokens), ``exit_weights [E]`` -> ``(loss, per_exit [E])``."""
    y = labels.astype(jnp.int32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits2.astype(jnp.float32), axis=-1),
                              y[..., None], axis=-1)[..., 0]  # [E, B, T]
    m = jnp.broadcast_to(mask.astype(jnp.float32), labels.shape)  # [E, B, T]
    if balanced:  # each class of each exit gets half of the batch's weight
        n_pos = jnp.sum(m * y, axis=(1, 2), keepdims=True)
        n_neg = jnp.sum(m * (1 - y), axis=(1, 2), keepdims=True)
        w = m * jnp.where(labels, 0.5 / jnp.maximum(n_pos, 1.0), 0.5 / jnp.maximum(n_neg, 1.0))
    else:
        w = m
    per_exit = jnp.sum(w * ce, axis=(1, 2)) / jnp.maximum(jnp.sum(w, axis=(1, 2)), 1e-12)  # [E]
    return jnp.sum(exit_weights * per_exit), per_exit


def exit_counts(logits2: jax.Array, labels: jax.Array, mask: jax.Array, exit_layers, num_layers: int):
    """Confusion counts per exit (prediction: p(exit) >= 0.5) and the oracle's layers: a
    token leaves at the first exit whose label is positive, else runs all ``num_layers``."""
    pred = logits2[..., 1] > logits2[..., 0]  # [E, B, T]
    m = mask.astype(jnp.float32)
    count = lambda x: jnp.sum(x.astype(jnp.float32) * m, axis=(1, 2))  # noqa: E731  [E]
    layers = jnp.asarray(exit_layers, jnp.float32)[:, None, None]
    first = jnp.min(jnp.where(labels, layers, float(num_layers)), axis=0)  # [B, T]
    return {"tp": count(pred & labels), "fp": count(pred & ~labels), "fn": count(~pred & labels),
            "positives": count(labels), "tokens": jnp.sum(m), "oracle_layers": jnp.sum(first * m)}


def summarize(counts: dict[str, np.ndarray], layers: Sequence[int]) -> dict[str, Any]:
    """Precision, recall, positive rate and predicted-exit rate per exit from summed counts."""
    out = []
    tokens = float(counts["tokens"])
    for e, layer in enumerate(layers):
        tp, fp, fn, pos = (float(counts[k][e]) for k in ("tp", "fp", "fn", "positives"))
        out.append({"layer": int(layer), "precision": tp / (tp + fp) if tp + fp else 0.0,
                    "recall": tp / (tp + fn) if tp + fn else 0.0,
                    "positive_rate": pos / tokens if tokens else 0.0,
                    "exit_rate": (tp + fp) / tokens if tokens else 0.0})
    return {"exits": out, "oracle_layers": float(counts["oracle_layers"]) / tokens if tokens else 0.0}
