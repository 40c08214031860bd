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
chosen threshold into the exit checkpoint. With ``--mesh DATAxMODEL`` the model and the heads
are loaded sharded over a device mesh and measured there (the losses, and so the threshold,
are one device's); with ``--distributed`` process 0 alone prints and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from dataclasses import dataclass

import numpy as np
from scipy import stats

from dynamax_jax.cli import add_debug_flag, run_cli
from dynamax_jax.cli.mesh import add_mesh_arguments, is_main_process, setup_mesh
from dynamax_jax.exits import EXIT_FILES, write_exits
from dynamax_jax.io import atomic_directory, check_destination
from dynamax_jax.sharding import shard_exit_params
from dynamax_jax.eval import tasks as tasks_lib
from dynamax_jax.eval.errors import CalibrationError
from dynamax_jax.eval.harness import (command_line, compute_summary, generate_all, load_backbone, model_path,
                                      output_directory, shared_flags)
from dynamax_jax.eval.metrics import rouge_inconsistency, token_disagreement
from dynamax_jax.eval.tasks import answer_from_generation

PROG = "python -m eval.calibrate"
CALIBRATION_FILE = "calibration.json"
OWNED_FILES = EXIT_FILES + (CALIBRATION_FILE,)  # what calibrate writes into --exits


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
                slopes=(0.0, 0.25, 0.5), bases=None) -> list[tuple[tuple[float, ...], ...]]:
    """Candidate families of per-exit threshold vectors, each ordered strict to loose.

    A family with slope ``s`` sets exit ``e``'s threshold to ``base + s * (1 - e/(E-1)) *
    (1 - base)``: early exits stay stricter than late ones (their tokens agree less often with
    the final layer). Slope 0 is the shared threshold. Each family is tested with fixed-sequence
    LTT at ``epsilon / len(slopes)`` (Bonferroni over families) and the cheapest certified
    vector wins (``calibrate_vectors``)."""
    families = []
    # the base thresholds, strict to loose: given, or ``steps`` evenly from ``top`` to ``floor``
    bases = sorted(bases, reverse=True) if bases is not None else np.linspace(top, floor, steps)
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


# ----------------------------------------------------------------------------- measuring losses

def default_thresholds() -> list[float]:
    """Candidates ordered strict to loose: never exit (1.01), then 0.99 down to 0.05."""
    return [1.01, 0.99, 0.97, 0.95] + [round(x, 2) for x in np.arange(0.9, 0.0, -0.05)]


def parse_thresholds(text: str) -> list[float]:
    """``"0.5,0.9,0.7"`` -> ``[0.9, 0.7, 0.5]``: candidates ordered strict to loose (fixed-sequence
    testing needs that order, decided before seeing the data)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CalibrationError(f"--thresholds must be comma-separated numbers, got {text!r}") from None
    if not values or any(not v >= 0 for v in values):
        raise CalibrationError(f"--thresholds must be numbers >= 0, got {text!r}")
    return sorted(set(values), reverse=True)


def parse_levels(text: str) -> list[tuple[float, float]]:
    """``"0.05:0.1,0.2:0.05"`` -> ``[(0.05, 0.1), (0.2, 0.05)]`` (each level checked)."""
    levels = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        try:
            delta, epsilon = (float(v) for v in item.split(":"))
        except ValueError:
            raise CalibrationError(f"--also takes DELTA:EPSILON pairs, got {item!r}") from None
        _check_level("delta", delta)
        _check_level("epsilon", epsilon)
        levels.append((delta, epsilon))
    return levels


def answer_inconsistency(early_text: str, full_text: str) -> float:
    """``--loss rouge``: 1 - ROUGE-L F1 of the two answers as ``eval.run`` scores them (the
    first non-empty line of each generation), so that a calibrated ``delta`` of 0.1 is a
    consistency of 90 in ``eval.run``'s reports."""
    return rouge_inconsistency(answer_from_generation(early_text), answer_from_generation(full_text))


def full_depth(backbone, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int):
    """The full model's greedy generations of ``prompts`` (the reference of ``measure``)."""
    return generate_all(backbone, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        pad_multiple=16, desc="full depth")[0]


def measure(backbone, prompts: list[list[int]], full, exit_config, exit_params, candidates, *, loss: str,
            max_new_tokens: int, batch_size: int):
    """Run every candidate threshold on ``prompts`` against their full-depth generations
    ``full`` (``full_depth``); returns ``losses [n, C]``, the average layers per candidate
    ``[C]`` and its FLOPs relative to full depth ``[C]`` (classifiers, adapters and the head
    counted)."""
    full_text = [backbone.decode(g.tokens) for g in full]
    losses = np.zeros((len(prompts), len(candidates)))
    layers, compute = np.zeros(len(candidates)), np.zeros(len(candidates))
    for j, thr in enumerate(candidates):
        ec = dataclasses.replace(exit_config, threshold=tuple(thr) if isinstance(thr, (tuple, list)) else float(thr))
        gens, _ = generate_all(backbone, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               pad_multiple=16, exit_config=ec, exit_params=exit_params, desc=f"threshold {thr}")
        for i, (g, f) in enumerate(zip(gens, full)):
            losses[i, j] = (token_disagreement(g.tokens, f.tokens) if loss == "token"
                            else answer_inconsistency(backbone.decode(g.tokens), full_text[i]))
        summary = compute_summary(backbone.config, ec, gens, [len(p) for p in prompts])
        layers[j], compute[j] = summary["avg_layers"], summary["compute"]
    return losses, layers, compute


def _parser():
    import argparse
    # CoQA is left out by default: its bundled stand-in has no calibration part
    shared = shared_flags(("--model", "--tasks", "--split", "--limit", "--max-new-tokens", "--batch-size"),
                          tasks=["truthful_qa", "trivia_qa"])
    p = argparse.ArgumentParser(
        prog=PROG, parents=[shared],
        description="Pick the loosest early-exit threshold whose expected inconsistency with full-depth "
                    "generation is at most --delta with probability >= 1 - --epsilon (Learn-then-Test), "
                    "and write it into the exit checkpoint (held alone while this runs: a second writer is "
                    "refused). Warns when calibration prompts repeat: the guarantee assumes independent prompts.")
    p.add_argument("--exits", required=True, help="exit checkpoint directory (dx.save_exits); updated in place "
                                                  "unless --no-write")
    p.add_argument("--delta", type=float, default=0.1, help="allowed expected inconsistency, in (0, 1)")
    p.add_argument("--epsilon", type=float, default=0.05, help="allowed failure probability, in (0, 1)")
    p.add_argument("--data", default=None, help="directory of task files (<task>.jsonl) whose prompts form the "
                                                "calibration set, or 'hub'; none: the bundled real data")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of prompts kept out of calibration to check the realised inconsistency")
    p.add_argument("--loss", choices=("token", "rouge"), default="token",
                   help="inconsistency: token-level disagreement with the full model's greedy output, or "
                        "1 - ROUGE-L of the answer")
    p.add_argument("--per-exit", action="store_true",
                   help="also search per-exit threshold vectors (Bonferroni over families) and keep the cheapest")
    p.add_argument("--also", default="",
                   help="more DELTA:EPSILON levels (comma-separated, e.g. 0.05:0.1,0.2:0.05) to report from the "
                        "same measured losses; only --delta/--epsilon is written into the checkpoint")
    p.add_argument("--thresholds", default=None,
                   help="comma-separated candidate thresholds; they are tested from strict (high) to loose "
                        "whatever the order given (default: 1.01, 0.99, 0.97, 0.95, 0.9, 0.85, ..., 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration/hold-out split")
    p.add_argument("--no-write", action="store_true", help="report only; leave the exit checkpoint unchanged")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --exits directory that also holds other files (they are kept)")
    add_mesh_arguments(p, distributed_note="Every process reads the data and measures every candidate; process 0 "
                                           "alone prints the report and writes into --exits")
    add_debug_flag(p)
    return p


# ----------------------------------------------------------------------------- the command's stages

@dataclass(frozen=True)
class Plan:
    """What a calibration run tests, settled before any model loads: the candidate thresholds
    (strict to loose), the ``(delta, epsilon)`` levels (the first is the one written), the
    calibration and hold-out examples, and how many distinct prompts the calibration set holds."""

    candidates: list
    levels: list
    calib: list
    hold: list
    distinct: int


def split_examples(examples: list, holdout: float, seed: int) -> tuple[list, list]:
    """``(calibration, hold_out)``: the examples permuted with ``seed``; the first
    ``round(holdout * n)`` of the permutation are held out."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_hold = int(round(holdout * len(examples)))
    return [examples[i] for i in order[n_hold:]], [examples[i] for i in order[:n_hold]]


def distinct_prompts(examples) -> int:
    """How many different prompts ``examples`` hold."""
    return len({ex.prompt for ex in examples})


def duplicate_warning(n: int, distinct: int, delta: float, epsilon: float) -> str | None:
    """The warning for ``n`` calibration prompts of which only ``distinct`` differ (``None``
    when none repeats): the guarantee assumes independent prompts, and a repeated one counts
    again without adding evidence."""
    if distinct == n:
        return None
    need = min_calibration_size(delta, epsilon)
    short = f", fewer than the {need} that delta={delta}, epsilon={epsilon} needs" if distinct < need else ""
    return (f"warning: the {n} calibration prompts hold only {distinct} distinct ones{short}; the guarantee "
            "assumes independent prompts and a repeated prompt adds no evidence: deduplicate the data")


def plan_calibration(args, log=print) -> Plan:
    """Check the settings and draw the calibration and hold-out sets before any model loads
    (``CalibrationError``, ``DataError``, ``FileExistsError`` naming the flag or file); warns
    through ``log`` when calibration prompts repeat."""
    _check_level("delta", args.delta)
    _check_level("epsilon", args.epsilon)
    if not 0.0 <= args.holdout < 1.0:
        raise CalibrationError(f"--holdout must be in [0, 1), got {args.holdout}")
    candidates = parse_thresholds(args.thresholds) if args.thresholds else default_thresholds()
    levels = [(args.delta, args.epsilon)] + parse_levels(args.also)
    args.split = tasks_lib.resolve_split(args.split, args.data, "calibration")
    examples = [ex for name in args.tasks for ex in tasks_lib.get_task(name).load(args.data, args.limit, args.split)]
    calib, hold = split_examples(examples, args.holdout, args.seed)
    need = min_calibration_size(args.delta, args.epsilon)
    if len(calib) < need:
        raise CalibrationError(
            f"{len(calib)} calibration prompts are too few for delta={args.delta}, epsilon={args.epsilon}: "
            f"at least {need} are needed (add prompts, raise --limit, lower --holdout, or relax delta/epsilon)")
    distinct = distinct_prompts(calib)
    warning = duplicate_warning(len(calib), distinct, args.delta, args.epsilon)
    if warning:
        log(warning)
    if not args.no_write:  # refuse before the work, not after
        check_destination(args.exits, OWNED_FILES, args.overwrite)
    return Plan(candidates, levels, calib, hold, distinct)


@dataclass(frozen=True)
class Measurement:
    """Candidates measured on one prompt set against its full-depth generations ``full``:
    ``losses [n, C]``, average layers ``[C]`` and FLOPs relative to full depth ``[C]``."""

    prompts: list
    full: list
    losses: np.ndarray
    layers: np.ndarray
    compute: np.ndarray


def _measure_settings(args) -> dict:
    return dict(loss=args.loss, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)


def measure_set(backbone, examples, exit_config, exit_params, candidates, args) -> Measurement | None:
    """Full depth once, then every candidate, on ``examples``' prompts (``None`` for no examples)."""
    if not examples:
        return None
    prompts = [backbone.encode(e.prompt) for e in examples]
    full = full_depth(backbone, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    losses, layers, compute = measure(backbone, prompts, full, exit_config, exit_params, candidates,
                                      **_measure_settings(args))
    return Measurement(prompts, full, losses, layers, compute)


def holdout_check(hold: Measurement, index: int, delta: float) -> dict:
    """The inconsistency and cost realised on the hold-out set by candidate ``index``."""
    mean = float(hold.losses[:, index].mean())
    return dict(prompts=len(hold.prompts), mean_loss=mean, avg_layers=float(hold.layers[index]),
                compute=float(hold.compute[index]), within_delta=mean <= delta)


def outcome(cal: Calibration, calib: Measurement, hold: Measurement | None) -> dict:
    """A level's result: the certified candidate, its cost on the calibration set and, with a
    hold-out set, what it realises there."""
    out = dict(cal.as_dict(), avg_layers=None, compute=None, holdout=None)
    if cal.index is not None:
        out.update(avg_layers=float(calib.layers[cal.index]), compute=float(calib.compute[cal.index]))
        if hold is not None:
            out["holdout"] = holdout_check(hold, cal.index, cal.delta)
    return out


def level_outcome(calib: Measurement, hold: Measurement | None, candidates, delta: float, epsilon: float) -> dict:
    """``outcome`` at one ``--also`` level; a level this set is too small for is reported, not fatal."""
    try:
        return outcome(learn_then_test(calib.losses, candidates, delta, epsilon), calib, hold)
    except CalibrationError as err:
        return dict(delta=delta, epsilon=epsilon, threshold=None, error=str(err))


def build_report(args, model: str, plan: Plan, num_layers: int, shared: Calibration, calib: Measurement,
                 hold: Measurement | None) -> dict:
    """The printed report: settings, the shared threshold's outcome, every level, every candidate."""
    rows = zip(plan.candidates, shared.mean_losses, shared.p_values, calib.layers, calib.compute)
    return dict(model=model, exits=args.exits, loss=args.loss, data=tasks_lib.data_label(args.data, args.split),
                calibration_prompts=len(plan.calib), distinct_calibration_prompts=plan.distinct, seed=args.seed,
                full_layers=num_layers, shared=outcome(shared, calib, hold),
                levels=[level_outcome(calib, hold, plan.candidates, d, e) for d, e in plan.levels],
                candidates=[dict(threshold=c, mean_loss=m, p_value=p, avg_layers=a, compute=f,
                                 holdout_mean_loss=None if hold is None else float(hold.losses[:, j].mean()))
                            for j, (c, m, p, a, f) in enumerate(rows)])


def search_per_exit(backbone, calib: Measurement, exit_config, exit_params, candidates, args):
    """``(calibration, avg_layers)`` of the cheapest certified per-exit threshold vector
    (``calibrate_vectors`` over the slope 0 and 0.5 families built on the shared candidates),
    ``(None, inf)`` when none is certified."""
    # the slope-0 family is the shared candidates: reuse their measurement
    cache = {tuple((float(c),) * exit_config.num_exits for c in candidates): (calib.losses, calib.layers)}

    def run(family):
        key = tuple(family)
        if key not in cache:
            cache[key] = measure(backbone, calib.prompts, calib.full, exit_config, exit_params, family,
                                 **_measure_settings(args))[:2]
        return cache[key]
    # the shared candidates as bases: the vectors refine the grid the shared search used
    families = vector_path(exit_config.num_exits, slopes=(0.0, 0.5), bases=candidates)
    best, best_layers, _ = calibrate_vectors(lambda f: run(f)[0], lambda f: run(f)[1], families,
                                             args.delta, args.epsilon)
    return best, best_layers


def choose(report: dict, shared: Calibration, backbone, calib: Measurement, hold: Measurement | None,
           exit_config, exit_params, plan: Plan, args) -> Calibration:
    """The threshold to write: the shared one or, with ``--per-exit``, a cheaper certified
    vector (measured on the hold-out set too). Fills ``report["per_exit"]`` and ``report["chosen"]``."""
    chosen, chosen_meta = shared, report["shared"]
    if args.per_exit:
        best, best_layers = search_per_exit(backbone, calib, exit_config, exit_params, plan.candidates, args)
        report["per_exit"] = None if best is None else dict(best.as_dict(), avg_layers=best_layers)
        if best is not None and (shared.index is None or best_layers < report["shared"]["avg_layers"]):
            chosen, chosen_meta = best, dict(report["per_exit"], holdout=None)
            if hold is not None:
                at_best = measure(backbone, hold.prompts, hold.full, exit_config, exit_params, [best.threshold],
                                  **_measure_settings(args))
                chosen_meta["holdout"] = holdout_check(Measurement(hold.prompts, hold.full, *at_best), 0, args.delta)
    report["chosen"] = chosen_meta
    return chosen


def write_threshold(args, exit_config, exit_params, chosen: Calibration, meta: dict) -> None:
    """Write the chosen threshold into the ``--exits`` checkpoint, with ``calibration.json``."""
    thr = chosen.threshold
    new_config = dataclasses.replace(exit_config, threshold=tuple(thr) if isinstance(thr, (tuple, list)) else float(thr))
    with atomic_directory(args.exits, owned=OWNED_FILES, overwrite=args.overwrite) as tmp:
        write_exits(new_config, exit_params, tmp)
        (tmp / CALIBRATION_FILE).write_text(json.dumps(meta, indent=2, default=float) + "\n")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _calibrate(argv=None) -> int:
    """The command: plan, measure, test, report, write. Raises this package's errors."""
    import dynamax_jax as dx

    parser = _parser()
    args = parser.parse_args(argv)
    mesh = setup_mesh(parser, args, PROG, batch_size=args.batch_size)
    main_process = is_main_process()
    plan = plan_calibration(args, log=_stderr if main_process else _quiet)
    exit_config, exit_params = dx.load_exits(args.exits)
    # the checkpoint is held alone from here to the write: a second writer is refused
    holding = (contextlib.nullcontext() if args.no_write
               else output_directory(args.exits, command_line(PROG, argv), flag="--exits"))
    with holding:
        model = model_path(args.model)
        backbone = load_backbone(model, "float32", use_chat_template=True, mesh=mesh)
        exit_config = exit_config.resolve(backbone.config)
        # the heads measured on the backbone's mesh; the checkpoint is rewritten from the host copy
        placed = exit_params if mesh is None else shard_exit_params(mesh, exit_config, exit_params)
        calib = measure_set(backbone, plan.calib, exit_config, placed, plan.candidates, args)
        # the hold-out set at every candidate, so that each level's choice can be checked
        hold = measure_set(backbone, plan.hold, exit_config, placed, plan.candidates, args)
        shared = learn_then_test(calib.losses, plan.candidates, args.delta, args.epsilon)
        report = build_report(args, model, plan, backbone.config.num_layers, shared, calib, hold)
        chosen = choose(report, shared, backbone, calib, hold, exit_config, placed, plan, args)
        if not main_process:  # a multi-host run: process 0 reports and writes
            return 0 if chosen.index is not None else 1
        print(json.dumps(report, indent=2, default=float))
        if chosen.index is None:
            _stderr(f"no threshold is certified at delta={args.delta}, epsilon={args.epsilon} with "
                    f"{len(plan.calib)} prompts; the checkpoint is unchanged")
            return 1
        if not args.no_write:
            meta = dict(report["chosen"], full_layers=backbone.config.num_layers, loss=args.loss, seed=args.seed,
                        distinct_calibration_prompts=plan.distinct)
            write_threshold(args, exit_config, exit_params, chosen, meta)
            _stderr(f"wrote threshold {chosen.threshold} into {args.exits} (calibration.json has delta, epsilon, "
                    "n and savings)")
    return 0


def _quiet(line: str) -> None:
    """The log of a process other than process 0 of a multi-host run: it prints nothing."""


def main(argv=None) -> int:
    """``python -m eval.calibrate``: 0 when a threshold is certified (and written), 1 when none
    is, 2 on a user error, printed as one line by ``dynamax_jax.cli.run_cli`` (``--debug``
    keeps the traceback)."""
    return run_cli(_calibrate, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
