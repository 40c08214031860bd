"""The objective of early-exit-aware fine-tuning (``train.ee_tune``), as pure functions of arrays.

Shape legend: B batch, T tokens per row, D hidden, V vocabulary, L layers, K the original's
top-k, E exits.

The *original* is the frozen pretrained model; the *tuned* model starts equal to it (its LoRA
factor ``B`` is zero, or its params are a copy) and is trained. At a position let ``z_o`` be the
original's final logits and ``p = softmax(z_o)``; let ``z`` be logits of the tuned model (at its
last layer or at an exit) and ``q = softmax(z)``, both over the whole vocabulary. ``S`` is the
set of the K tokens of largest ``p`` (``jax.lax.top_k``).

**Top-k KL** (``topk_kl``): KL(original || tuned) restricted to ``S``, in one of two ways (``rest``):

- ``bucket``: both distributions coarsened to K + 1 outcomes, the tokens of ``S`` and "any other
  token", whose masses are ``p_rest = 1 - sum_S p`` and ``q_rest = 1 - sum_S q``::

      KL = sum_{i in S} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)

  It is zero exactly when ``q`` equals ``p`` on every token of ``S``; it keeps the original's
  confidence (its mass outside the top-k is a target too), and with K = V it is the full KL.
- ``renormalize``: the original renormalized over ``S``, ``p'_i = p_i / sum_S p``, against the
  tuned model's full distribution::

      KL = sum_{i in S} p'_i log(p'_i / q_i)

  the KL from a distribution on ``S`` to ``q``: zero exactly when ``q = p'``, so it also pushes
  the tuned model's mass outside ``S`` to zero (a sharper model than the original).

``q_rest`` is computed as a log-sum-exp over the tokens outside ``S``, never as ``1 - sum``,
which loses all precision when ``S`` holds nearly all the mass. Each term is the mean of its
per-position value over the positions of ``mask``.

**Loss**: ``final_weight * final + exit_weight * sum_e w_e exit_e``, where

- ``final`` is the top-k KL of the tuned model's last layer to the original's: the
  self-distillation that keeps full-depth outputs the original's;
- ``exit_e`` is the top-k KL of the tuned model's prediction at exit ``e`` (its hidden state
  after layer ``l_e`` through the shared final norm and LM head, the tuned model's own: LoRA
  leaves them as they are) to the original's *final* distribution, with exit weights ``w_e``
  that sum to one (``position``: ``l_e / sum l``, rising with depth; ``uniform``; or a list).
  With exit adapters (``exit_head="adapter"``) the hidden state first goes through its exit's
  affine adapter ``h + h W_e + b_e`` (the exits' ``affine`` adapter, trained with the model;
  ``fit_exit_adapters`` starts it at the ridge fit of the last hidden state on the original),
  so that the loss asks the exit to be *linearly* predictive of the last layer, as the heads
  trained afterwards use it, rather than to be the last layer's state itself.

A weight of 0 leaves its term out of the loss (the last layer's term is still measured).

**Layer dropout** (LayerSkip, Elhoushi et al., 2024) is how the tuned model's training forward
runs: in each row, layer ``l`` (1-based) is skipped, an identity for the whole row, with
probability ``p_l = p_max * c(step) * (l - 1) / (L - 1)``, rising linearly from 0 at the first
layer to ``p_max`` at the last; ``c(step) = min(1, step / warmup)`` is the optional curriculum
(1 without a warm-up). The draws are ``uniform [B, L]`` from ``fold_in(key(seed), step)`` and a
layer is kept where its draw is ``>= p_l``: a run is reproducible and each step's mask is known
(``keep_mask``). A skipped layer is still computed and its output discarded, so every step runs
the same program. The exits read the hidden states of that same forward. The original always
runs at full depth.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax.delta import LoraSpec, expand_lora, merge_layer
from dynamax_jax.models import module_for

RESTS = ("bucket", "renormalize")
EXIT_HEADS = ("shared", "adapter")  # how an exit predicts: the shared head alone, or after its adapter


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TopK:
    """The original's final distribution at each position, as the loss needs it:
    ``ids [B, T, K]`` (its top-k tokens, most probable first), ``logp [B, T, K]`` (their
    log-probabilities) and ``logp_rest [B, T]`` (log of the mass outside them; -inf when the
    top-k is the whole vocabulary)."""

    ids: jax.Array
    logp: jax.Array
    logp_rest: jax.Array


def complement_logsumexp(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """``logsumexp`` of ``logits [..., V]`` over the tokens *not* in ``ids [..., K]`` -> ``[...]``
    (K < V, so that some token is left)."""
    lead = logits.shape[:-1]
    flat, flat_ids = logits.reshape(-1, logits.shape[-1]), ids.reshape(-1, ids.shape[-1])
    member = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], flat_ids].set(True)
    return jax.nn.logsumexp(jnp.where(member, -jnp.inf, flat), axis=-1).reshape(lead)


def teacher_topk(logits: jax.Array, k: int) -> TopK:
    """The original's ``TopK`` from its final ``logits [B, T, V]`` (no gradient flows)."""
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
    values, ids = jax.lax.top_k(logits, k)
    lse = jax.nn.logsumexp(logits, axis=-1)
    if k < logits.shape[-1]:
        rest = complement_logsumexp(logits, ids) - lse
    else:
        rest = jnp.full(lse.shape, -jnp.inf, jnp.float32)
    return TopK(ids.astype(jnp.int32), values - lse[..., None], rest)


def topk_kl(teacher: TopK, logits: jax.Array, rest: str = "bucket") -> jax.Array:
    """Per-position top-k KL(original || tuned) ``[B, T]`` of the tuned model's ``logits
    [B, T, V]``; ``rest`` picks the definition (module docstring)."""
    if rest not in RESTS:
        raise ValueError(f"rest must be one of {', '.join(RESTS)}, got {rest!r}")
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    logq = jnp.take_along_axis(logits, teacher.ids, axis=-1) - lse[..., None]  # [B, T, K]
    if rest == "renormalize":
        logp = teacher.logp - jax.nn.logsumexp(teacher.logp, axis=-1, keepdims=True)
        return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    kl = jnp.sum(jnp.exp(teacher.logp) * (teacher.logp - logq), axis=-1)
    if teacher.ids.shape[-1] < logits.shape[-1]:  # with K = V there is no rest
        logq_rest = complement_logsumexp(logits, teacher.ids) - lse
        kl = kl + jnp.exp(teacher.logp_rest) * (teacher.logp_rest - logq_rest)
    return kl


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``x [B, T]`` over the positions where ``mask [B, T]`` is set (0 with none)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


# ----------------------------------------------------------------------------- layer dropout


def drop_probabilities(num_layers: int, p_max: float, scale=1.0) -> jax.Array:
    """``[L]``: layer ``l`` (1-based) is skipped with ``p_max * scale * (l - 1) / (L - 1)``."""
    ramp = jnp.arange(num_layers, dtype=jnp.float32) / max(num_layers - 1, 1)
    return p_max * scale * ramp


def curriculum(step, warmup_steps: int) -> jax.Array:
    """``min(1, step / warmup_steps)``: the share of ``p_max`` in force at ``step`` (1 when
    ``warmup_steps`` is 0)."""
    if warmup_steps <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def keep_mask(seed: int, step, batch: int, probabilities: jax.Array) -> jax.Array:
    """``[B, L]`` bool: which layers each row runs at ``step``; layer ``l`` is kept where the
    uniform draw of ``fold_in(key(seed), step)`` is ``>= probabilities[l]``."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.uniform(key, (batch, probabilities.shape[0])) >= probabilities


def dropout_keep(settings, num_layers: int, step, batch: int) -> jax.Array | None:
    """The layer-dropout mask ``[B, L]`` of ``step`` for ``settings`` with fields ``drop_max``,
    ``drop_warmup`` and ``seed`` (``None`` when ``drop_max`` is 0): ``keep_mask`` at the rising
    probabilities scaled by the curriculum."""
    if settings.drop_max <= 0:
        return None
    probabilities = drop_probabilities(num_layers, settings.drop_max, curriculum(step, settings.drop_warmup))
    return keep_mask(settings.seed, step, batch, probabilities)


# ----------------------------------------------------------------------------- forward


def layer_stack(config, params, tokens: jax.Array, keep: jax.Array | None = None, lora=None,
                spec: LoraSpec | None = None) -> jax.Array:
    """Hidden states ``[L, B, T, D]`` (``[l]``: the output of layer ``l + 1``) of the model
    ``params`` (stored layout) on ``tokens [B, T]`` from an empty cache, run with the
    backbone's own per-layer function (``prefill_layer``) in a scan over the stacked layers.
    ``keep [B, L]``: layer dropout, a dropped layer's output is its input for that row.
    ``lora``: factors (``delta.init_lora``) of ``spec``, merged into each layer's weights as it
    runs, so that gradients reach the factors."""
    module = module_for(config)
    b, t = tokens.shape
    x = module.embed(config, params, tokens)
    cache = module.init_cache(config, b, t, params["embed"].dtype)[0]
    factors = None if lora is None else expand_lora(lora, spec, config.num_layers)
    keep_by_layer = None if keep is None else jnp.swapaxes(keep, 0, 1)  # [L, B]

    def body(x, xs):
        layer, layer_factors, kept = xs
        if layer_factors is not None:
            layer = merge_layer(layer, layer_factors, spec.scale)
        y, _ = module.prefill_layer(config, layer, x, cache, None)
        y = y.astype(x.dtype)
        if kept is not None:
            y = jnp.where(kept[:, None, None], y, x)
        return y, y

    _, hidden = jax.lax.scan(body, x, (params["layers"], factors, keep_by_layer))
    return hidden


def original_topk(config, params, tokens: jax.Array, k: int) -> TopK:
    """The frozen original's ``TopK`` on ``tokens [B, T]`` at full depth."""
    hidden = layer_stack(config, jax.lax.stop_gradient(params), tokens)
    return teacher_topk(module_for(config).head(config, params, hidden[-1]), k)


def fit_exit_adapters(config, params, batches, layers, ridge: float) -> dict[str, np.ndarray]:
    """Affine exit adapters ``{"adapter_w" [E, D, D], "adapter_b" [E, D]}`` fitted by ridge
    regression of the last layer's hidden state on each exit's (``train.cached``'s fit), over
    every position of ``batches`` (token arrays ``[B, T]``) run through ``params`` at full depth."""
    from dynamax_jax.train.cached import fit_affine_adapters

    index = jnp.asarray([l - 1 for l in layers])

    @jax.jit
    def moments(params, tokens):  # params an argument: closed over, jit would embed them as constants
        hidden = layer_stack(config, params, tokens).astype(jnp.float32)
        h = hidden[index].reshape(len(layers), -1, hidden.shape[-1])  # [E, N, D]
        target = hidden[-1].reshape(1, -1, hidden.shape[-1]) - h
        x = jnp.concatenate([h, jnp.ones_like(h[..., :1])], axis=-1)  # [E, N, D+1]
        return jnp.einsum("enp,enq->epq", x, x), jnp.einsum("enp,end->epd", x, target)

    gram = cross = 0.0
    for tokens in batches:
        g, c = moments(params, jnp.asarray(tokens))
        gram, cross = gram + np.asarray(g, np.float64), cross + np.asarray(c, np.float64)
    return fit_affine_adapters(gram, cross, ridge)


def adapt_exit(h: jax.Array, adapters, e: int) -> jax.Array:
    """Exit ``e``'s affine adapter on ``h [B, T, D]`` (``h`` itself without adapters)."""
    if adapters is None:
        return h
    h32 = h.astype(jnp.float32)
    return (h32 + h32 @ adapters["adapter_w"][e] + adapters["adapter_b"][e]).astype(h.dtype)


def head_term(config, params, h: jax.Array, teacher: TopK, mask: jax.Array, rest: str):
    """``(mean top-k KL, top-1 agreement)`` of the prediction ``head(h)`` (``h [B, T, D]``)
    against the original's final distribution, over ``mask``."""
    logits = module_for(config).head(config, params, h)
    agree = (jnp.argmax(logits, axis=-1) == teacher.ids[..., 0]).astype(jnp.float32)
    return masked_mean(topk_kl(teacher, logits, rest), mask), masked_mean(agree, mask)


# ----------------------------------------------------------------------------- the loss


@dataclasses.dataclass(frozen=True)
class Objective:
    """The loss's settings (module docstring). ``exit_weights``: one per exit layer, summing
    to one."""

    exit_layers: tuple[int, ...]
    exit_weights: tuple[float, ...]
    final_weight: float = 1.0
    exit_weight: float = 1.0
    topk: int = 32
    rest: str = "bucket"
    drop_max: float = 0.0
    drop_warmup: int = 0
    seed: int = 0

    def keep(self, num_layers: int, step, batch: int) -> jax.Array | None:
        """The layer-dropout mask ``[B, L]`` of ``step`` (``None`` without dropout)."""
        return dropout_keep(self, num_layers, step, batch)


def loss_terms(config, objective: Objective, params, hidden: jax.Array, teacher: TopK, mask: jax.Array,
               with_exits: bool, adapters=None) -> dict:
    """``{"final_kl", "final_agree"}`` (scalars) and, ``with_exits``, ``{"exit_kl",
    "exit_agree"}`` ``[E]`` of the tuned model's ``hidden [L, B, T, D]``; ``params`` holds its
    final norm and LM head; ``adapters``: the exits' affine adapters (``None``: the shared head
    reads the exit's hidden state directly)."""
    out = dict(zip(("final_kl", "final_agree"),
                   head_term(config, params, hidden[-1], teacher, mask, objective.rest)))
    if with_exits:
        terms = [head_term(config, params, adapt_exit(hidden[l - 1], adapters, e), teacher, mask, objective.rest)
                 for e, l in enumerate(objective.exit_layers)]
        out["exit_kl"] = jnp.stack([kl for kl, _ in terms])
        out["exit_agree"] = jnp.stack([agree for _, agree in terms])
    return out


def total_loss(objective: Objective, terms: dict) -> jax.Array:
    """``final_weight * final + exit_weight * sum_e w_e exit_e`` (a zero weight: no term)."""
    loss = jnp.float32(0.0)
    if objective.final_weight > 0:
        loss = loss + objective.final_weight * terms["final_kl"]
    if objective.exit_weight > 0:
        loss = loss + objective.exit_weight * jnp.sum(jnp.asarray(objective.exit_weights) * terms["exit_kl"])
    return loss


def tuned_loss(config, objective: Objective, params, tokens: jax.Array, mask: jax.Array, teacher: TopK,
               keep: jax.Array | None = None, lora=None, spec: LoraSpec | None = None, adapters=None):
    """``(loss, terms)`` of the tuned model (``params``, plus ``lora`` factors of ``spec`` when
    it is a LoRA fine-tune) on ``tokens [B, T]``, ``mask [B, T]``, against the original's
    ``teacher``, with layer dropout ``keep [B, L]`` and the exits' ``adapters``."""
    hidden = layer_stack(config, params, tokens, keep, lora, spec)
    terms = loss_terms(config, objective, params, hidden, teacher, mask, with_exits=objective.exit_weight > 0,
                       adapters=adapters)
    return total_loss(objective, terms), terms


def exit_weight_vector(spec: str, layers) -> tuple[float, ...]:
    """Per-exit weights summing to one: ``position`` (``l_e / sum l``), ``uniform`` or a comma
    list (``train.distill.exit_weight_vector``, which names a wrong count)."""
    from dynamax_jax.train.distill import exit_weight_vector as vector

    return tuple(float(w) for w in np.asarray(vector(spec, layers)))
