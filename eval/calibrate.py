"""Thresholds with a statistical guarantee: Learn-then-Test calibration (Angelopoulos et al.,
2021) of early-exit thresholds against inconsistency with the full model.

For a threshold ``lam`` let ``R(lam)`` be the expected inconsistency (a loss in [0, 1]) of
early-exit generation against full-depth generation on a fresh prompt. Given losses measured
on ``n`` calibration prompts, we want the loosest (cheapest) threshold such that, with
probability at least ``1 - epsilon`` over the draw of the calibration set,
``R(lam) <= delta``.

Procedure (fixed-sequence testing):
1. Order the candidate thresholds from strict (high: exits rarely, consistent) to loose.
2. For each, test the null ``H0: R(lam) > delta`` with a valid p-value computed from the
   calibration losses (Hoeffding-Bentkus: the minimum of the Hoeffding bound and Bentkus'
   binomial bound, both valid for losses in [0, 1]).
3. Walk the sequence while ``p <= epsilon``; stop at the first threshold whose null is not
   rejected. Fixed-sequence testing controls the family-wise error at ``epsilon`` without a
   multiplicity correction, because the order was fixed before seeing the data.
4. Return the last rejected threshold (the loosest certified one), or none.

Per-exit thresholds use the same procedure along a fixed path of threshold vectors
(``vector_path``), ordered strict to loose.

The CLI (``python -m eval.calibrate``) measures the losses with ``dx.generate`` and writes the
chosen threshold into the exit checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


class CalibrationError(ValueError):
    """Bad calibration settings or a calibration set too small for the guarantee asked."""


def _check_level(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise CalibrationError(f"{name} must be in (0, 1), got {value!r}")


def min_calibration_size(delta: float, epsilon: float) -> int:
    """The fewest prompts with which any threshold can be certified: even with zero observed
    inconsistency the Hoeffding-Bentkus p-value is ``min((1-delta)^n, e (1-delta)^n)`` =
    ``(1-delta)^n``, which must reach ``epsilon``."""
    _check_level("delta", delta)
    _check_level("epsilon", epsilon)
    return math.ceil(math.log(epsilon) / math.log1p(-delta))


def _kl_bernoulli(a: float, b: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(b)), the exponent of Hoeffding's tighter bound."""
    a = min(max(a, 0.0), 1.0)
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def hoeffding_bentkus_pvalue(mean_loss: float, n: int, delta: float) -> float:
    """Valid p-value for ``H0: E[loss] > delta`` from the mean of ``n`` losses in [0, 1]."""
    if mean_loss >= delta:
        return 1.0
    hoeffding = math.exp(-n * _kl_bernoulli(mean_loss, delta))
    bentkus = math.e * stats.binom.cdf(math.ceil(n * mean_loss), n, delta)
    return float(min(1.0, hoeffding, bentkus))


@dataclass(frozen=True)
class Calibration:
    """The outcome: ``index`` of the chosen candidate (None when none is certified), the
    candidates tested in order, their mean losses and p-values."""

    index: int | None
    threshold: object
    delta: float
    epsilon: float
    n: int
    mean_losses: tuple[float, ...]
    p_values: tuple[float, ...]

    def as_dict(self) -> dict:
        thr = self.threshold
        return dict(threshold=list(thr) if isinstance(thr, (tuple, list, np.ndarray)) else thr,
                    delta=self.delta, epsilon=self.epsilon, calibration_size=self.n,
                    mean_loss=None if self.index is None else self.mean_losses[self.index],
                    p_value=None if self.index is None else self.p_values[self.index])


def learn_then_test(losses: np.ndarray, candidates, delta: float, epsilon: float) -> Calibration:
    """Fixed-sequence Learn-then-Test.

    ``losses [n, C]``: inconsistency in [0, 1] of calibration prompt ``i`` under candidate
    ``j``; candidates (length C, scalars or vectors) ordered from strict to loose.
    """
    _check_level("delta", delta)
    _check_level("epsilon", epsilon)
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] != len(candidates):
        raise CalibrationError(
            f"losses must be [n_prompts, n_candidates] = [n, {len(candidates)}], got {losses.shape}")
    if np.any(losses < 0) or np.any(losses > 1) or not np.all(np.isfinite(losses)):
        raise CalibrationError("losses must lie in [0, 1]")
    n = losses.shape[0]
    need = min_calibration_size(delta, epsilon)
    if n < need:
        raise CalibrationError(
            f"a calibration set of {n} prompts is too small for delta={delta}, epsilon={epsilon}: "
            f"no threshold can be certified with fewer than {need} prompts")
    means = losses.mean(axis=0)
    p_values = [hoeffding_bentkus_pvalue(float(m), n, delta) for m in means]
    chosen = None
    for j, p in enumerate(p_values):
        if p > epsilon:
            break
        chosen = j
    return Calibration(index=chosen, threshold=None if chosen is None else candidates[chosen],
                       delta=delta, epsilon=epsilon, n=n, mean_losses=tuple(float(m) for m in means),
                       p_values=tuple(p_values))


def vector_path(num_exits: int, steps: int = 21, top: float = 1.0, floor: float = 0.0,
                slopes=(0.0, 0.25, 0.5)) -> list[tuple[tuple[float, ...], ...]]:
    """Candidate families of per-exit threshold vectors, each ordered strict to loose.

    A family with slope ``s`` sets exit ``e``'s threshold to ``base + s * (1 - e/(E-1)) *
    (1 - base)``: early exits stay stricter than late ones (their tokens agree less often with
    the final layer). Slope 0 is the shared threshold. Each family is tested with fixed-sequence
    LTT at ``epsilon / len(slopes)`` (Bonferroni over families) and the cheapest certified
    vector wins (``calibrate_vectors``)."""
    families = []
    bases = np.linspace(top, floor, steps)
    for s in slopes:
        fam = []
        for b in bases:
            ramp = [1.0 - e / max(num_exits - 1, 1) for e in range(num_exits)]
            fam.append(tuple(float(min(1.0, b + s * r * (1.0 - b))) if b <= 1.0 else float(b) for r in ramp))
        families.append(fam)
    return families


def calibrate_vectors(loss_fn, cost_fn, families, delta: float, epsilon: float):
    """Per-exit thresholds: run ``learn_then_test`` on each family at ``epsilon / F`` and keep the
    certified vector of lowest cost. ``loss_fn(family) -> losses [n, len(family)]``;
    ``cost_fn(family) -> mean cost per candidate`` (e.g. average layers measured on the
    calibration set). The Bonferroni split keeps the overall error at ``epsilon``."""
    best, best_cost, results = None, math.inf, []
    for fam in families:
        cal = learn_then_test(loss_fn(fam), fam, delta, epsilon / len(families))
        results.append(cal)
        if cal.index is not None:
            cost = cost_fn(fam)[cal.index]
            if cost < best_cost:
                best, best_cost = cal, cost
    return best, best_cost, results
