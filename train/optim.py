"""The optimizer of every training run: AdamW after global-norm gradient clipping, with a
linear warm-up from 0 to the peak learning rate and a cosine decay to ``end_ratio`` of it."""

from __future__ import annotations

import optax


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, end_ratio: float) -> optax.Schedule:
    """Learning rate at each step: 0 -> ``peak_lr`` over ``warmup_steps``, then a cosine decay
    to ``end_ratio * peak_lr`` at ``total_steps`` (at least one step after the warm-up)."""
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, max(total_steps, warmup_steps + 1),
                                              end_value=peak_lr * end_ratio)


def adamw(schedule: optax.Schedule, *, weight_decay: float, clip_norm: float, decay_mask,
          b2: float = 0.999) -> optax.GradientTransformation:
    """Clip gradients to global norm ``clip_norm``, then AdamW (b1 0.9, eps 1e-8) with
    decoupled ``weight_decay`` on the leaves ``decay_mask`` selects (a pytree of bools or a
    function of the params)."""
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=b2, eps=1e-8, weight_decay=weight_decay,
                                   mask=decay_mask))
