"""A compute budget against fixed thresholds and static pruning, at equal compute.

    python -m eval.budget --exits exits/smollm2-calm --targets 20,22,24 --limit 100 --out budget_results

On prompts drawn from the tasks' evaluation parts (``--data-dir``, ``--split``, ``--tasks``, ``--limit`` per task)
it runs, greedily, with ``dx.generate``:

1. ``full``: full depth, the reference every other run is compared with.
2. ``threshold``: the checkpoint's exits at each fixed ``--thresholds`` value.
3. ``budget``: the compute-budget controller (``dx.generate(target_layers=t,
   budget_gain=--gain)``, see ``dynamax_jax.decoding.update_thresholds``) at each
   ``--targets`` average number of layers per token; the checkpoint's exit config, its
   thresholds the controller's starting point.
4. ``static``: static layer pruning, every token leaves after layer k, for each k in
   ``--static-layers`` (default: the floor and ceil of every target); skipped layers are
   handled by the family's cheap mode (copy / skip), as in ``eval.run``.

Each run records the average layers per generated token, ``compute`` (FLOPs relative to full
depth over the same tokens, classifiers counted: ``eval.harness.compute_summary``), the token
disagreement with the full-depth tokens and 1 - ROUGE-L F1 against the full-depth text
(both averaged over prompts; lower is better), the repetition rate (seq-rep-4) of the text
and the wall time (generation only, compilation excluded).

Comparison at equal compute: the fixed-threshold runs and the static runs each form a curve
of quality against compute (sorted by compute; the static curve ends at full depth, which is
static pruning after layer L). For every budget run both curves are linearly interpolated at
the budget run's compute. Where that compute lies outside a curve's range the entry is
``None`` ("out of range"): curves are never extrapolated.

Writes ``budget.json`` (all runs and the comparison), ``budget.md`` (the command line, a table
of runs and one of the comparison) and ``budget.png`` (token disagreement against compute)
into ``--out``, all three or none, and prints the markdown. ``--out`` is held alone while the
command runs (a second writer is refused), and the three files of a previous run there are
replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from dynamax_jax.cli import add_debug_flag, run_cli
from dynamax_jax.io import atomic_directory, write_json_atomic, write_text_atomic
from dynamax_jax.eval import metrics, tasks
from dynamax_jax.eval.errors import BudgetError, OutputError
from dynamax_jax.eval.harness import (MODES, Backbone, Generation, HelpFormatter, check_settings, command_line,
                                      compute_summary, csv_list, generate_all, load_backbone, model_path,
                                      output_directory, shared_flags)
from dynamax_jax.eval.metrics import rouge_inconsistency, token_disagreement
from dynamax_jax.eval.report import fmt, interpolate, save_figure

QUALITY = ("token_disagreement", "rouge_inconsistency")  # lower is better
CURVES = ("threshold", "static")
DEFAULT_THRESHOLDS = "0.3,0.5,0.7,0.8,0.9,0.95"
PROG = "python -m eval.budget"
OUTPUTS = ("budget.json", "budget.md", "budget.png")  # what the command writes into --out


# ----------------------------------------------------------------------------- comparison

def curve(runs: list[dict], kind: str) -> list[dict]:
    """The runs of one curve, by compute; the static curve ends at full depth."""
    members = [r for r in runs if r["kind"] == kind or (kind == "static" and r["kind"] == "full")]
    return sorted(members, key=lambda r: r["compute"])


def compare(runs: list[dict]) -> list[dict]:
    """One row per budget run: its compute and, per quality measure, its value next to the
    fixed-threshold and static curves interpolated at that compute (``None``: out of range)."""
    rows = []
    for run in runs:
        if run["kind"] != "budget":
            continue
        row = dict(target_layers=run["target_layers"], avg_layers=run["avg_layers"], compute=run["compute"])
        for measure in QUALITY:
            row[measure] = {"budget": run[measure]}
            for kind in CURVES:
                row[measure][kind] = interpolate([(r["compute"], r[measure]) for r in curve(runs, kind)],
                                                 run["compute"])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- runs

def measure(backbone: Backbone, prompts: list[list[int]], exit_config, exit_params, args,
            static_layers: list[int], log=print) -> list[dict]:
    """Run full depth, every fixed threshold, every budget target and every static layer;
    one record per run (see the module docstring)."""
    from dynamax_jax.decoding import GenerateError

    config = backbone.config
    sizes = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, pad_multiple=args.pad_multiple)
    lengths = [len(p) for p in prompts]
    full, timing = generate_all(backbone, prompts, desc="full depth", **sizes)
    full_texts = [backbone.decode(g.tokens) for g in full]

    def record(kind: str, label: str, gens: list[Generation], timing: dict, ec=None, static_mode=None,
               **setting) -> dict:
        texts = [backbone.decode(g.tokens) for g in gens]
        run = dict(kind=kind, label=label, threshold=None, target_layers=None, static_layer=None)
        run.update(setting)
        run.update(compute_summary(config, ec, gens, lengths, static_mode=static_mode))
        run.update(
            token_disagreement=float(np.mean([token_disagreement(g.tokens, f.tokens) for g, f in zip(gens, full)])),
            rouge_inconsistency=float(np.mean([rouge_inconsistency(t, f) for t, f in zip(texts, full_texts)])),
            repetition_rate=float(np.mean([metrics.repetition_rate(t) for t in texts])), **timing)
        log(f"{label}: avg_layers={run['avg_layers']:.2f} compute={run['compute']:.3f} "
            f"token_disagreement={run['token_disagreement']:.3f} 1-ROUGE-L={run['rouge_inconsistency']:.3f}")
        return run

    runs = [record("full", "full", full, timing)]
    for threshold in args.thresholds:
        ec = dataclasses.replace(exit_config, threshold=float(threshold))
        gens, timing = generate_all(backbone, prompts, exit_config=ec, exit_params=exit_params,
                                    desc=f"threshold {threshold:g}", **sizes)
        runs.append(record("threshold", f"threshold {threshold:g}", gens, timing, ec, threshold=float(threshold)))
    for target in args.targets:
        try:
            gens, timing = generate_all(backbone, prompts, target_layers=target, budget_gain=args.gain,
                                        exit_config=exit_config, exit_params=exit_params,
                                        desc=f"budget {target:g}", **sizes)
        except GenerateError as err:
            raise BudgetError(f"--targets {target:g}: {err}") from None
        runs.append(record("budget", f"budget {target:g}", gens, timing, exit_config, target_layers=float(target)))
    static_mode = MODES[config.family][0]
    for k in static_layers:
        gens, timing = generate_all(backbone, prompts, static_layer=k, desc=f"static {k}", **sizes)
        runs.append(record("static", f"static {k}", gens, timing, None, static_mode, static_layer=k))
    return runs


# ----------------------------------------------------------------------------- outputs

def markdown(result: dict) -> str:
    """The command line, the runs and the equal-compute comparison as markdown tables."""
    s = result["settings"]
    lines = ["# Compute budget vs fixed thresholds vs static pruning", "", f"`{result['command']}`", "",
             f"{s['model']}: {s['num_layers']} layers. Exits {s['exits']}: {s['exit_kind']} at layers "
             f"{', '.join(map(str, s['exit_layers']))}, mode {s['exit_mode']}, threshold {s['exit_threshold']} "
             f"(the controller's start). {s['prompts']} prompts from {', '.join(s['tasks'])}, "
             f"{s['max_new_tokens']} new tokens, greedy; controller gain {s['gain']:g}.", "",
             "Compute = FLOPs relative to full depth (classifiers counted). Token disagreement with the "
             "full-depth tokens and 1 - ROUGE-L against the full-depth text: lower is better. Wall time: "
             "generation only, compilation excluded.", "", "## Runs", "",
             "| run | avg layers | compute | token disagreement | 1 - ROUGE-L | repetition | wall s | tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        cells = [r["label"], fmt(r["avg_layers"], 4), fmt(r["compute"]), fmt(r["token_disagreement"]),
                 fmt(r["rouge_inconsistency"]), fmt(r["repetition_rate"]), fmt(r["wall_time_s"]),
                 fmt(r["tokens_per_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Equal compute", "",
              "Each budget run next to the fixed-threshold and static-pruning curves, linearly interpolated "
              "at the budget run's compute; out of range: the curve does not reach that compute (no "
              "extrapolation).", "",
              "| target | avg layers | compute | disagreement: budget | threshold | static "
              "| 1 - ROUGE-L: budget | threshold | static |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in result["comparison"]:
        cells = [fmt(row["target_layers"]), fmt(row["avg_layers"], 4), fmt(row["compute"])]
        for measure in QUALITY:
            cells += ["out of range" if row[measure][k] is None else fmt(row[measure][k])
                      for k in ("budget",) + CURVES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Token disagreement against compute: the fixed-threshold line, the static line
    (dashed, ending at full depth), the budget runs as stars, full depth as a black dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    fixed = curve(runs, "threshold")
    ax.plot([r["compute"] for r in fixed], [r["token_disagreement"] for r in fixed], marker="o",
            label="fixed threshold")
    for r in fixed:
        ax.annotate(f"{r['threshold']:g}", (r["compute"], r["token_disagreement"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    static = curve(runs, "static")
    ax.plot([r["compute"] for r in static], [r["token_disagreement"] for r in static], "k--", marker="s",
            markevery=[i for i, r in enumerate(static) if r["kind"] == "static"], label="static pruning")
    budget = [r for r in runs if r["kind"] == "budget"]
    ax.scatter([r["compute"] for r in budget], [r["token_disagreement"] for r in budget], marker="*", s=200,
               color="gold", edgecolor="black", zorder=6, label="budget controller")
    for r in budget:
        ax.annotate(f"{r['target_layers']:g}", (r["compute"], r["token_disagreement"]), fontsize=7,
                    textcoords="offset points", xytext=(6, -10))
    full = [r for r in runs if r["kind"] == "full"]
    ax.scatter([r["compute"] for r in full], [r["token_disagreement"] for r in full], color="black", s=40,
               zorder=7, label="full depth")
    ax.set_xlabel("compute (FLOPs relative to full depth)")
    ax.set_ylabel("token disagreement with full depth")
    ax.set_title(f"{Path(result['settings']['model']).name}: budget vs thresholds vs static", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    shared = shared_flags(("--model", "--data-dir", "--split", "--tasks", "--limit", "--max-new-tokens",
                           "--batch-size", "--pad-multiple", "--no-chat-template", "--out"),
                          tasks="trivia_qa", pad_multiple=16, out="budget_results")
    p = argparse.ArgumentParser(
        prog=PROG, parents=[shared], formatter_class=HelpFormatter,
        description="Compare, at equal average compute, the compute-budget controller (target average "
                    "layers per token) against fixed exit thresholds and static layer pruning; quality is "
                    "agreement with full-depth greedy generation. Writes budget.json, budget.md and "
                    "budget.png into --out (held alone while this runs: a second writer is refused).")
    p.add_argument("--exits", required=True, help="exit checkpoint directory (dx.save_exits)")
    p.add_argument("--thresholds", type=csv_list(float), default=DEFAULT_THRESHOLDS,
                   help="comma-separated fixed thresholds, one run each (above 1: never exit)")
    p.add_argument("--targets", type=csv_list(float), required=True,
                   help="comma-separated budgets: average layers per token, between the first exit layer "
                        "and L; one controller run each")
    p.add_argument("--gain", type=float, default=0.5, help="the controller's gain (budget_gain)")
    p.add_argument("--static-layers", type=csv_list(int), default=None,
                   help="comma-separated layers k for static pruning, each in [1, L-1] (default: the floor "
                        "and ceil of every target, clipped to [1, L-1])")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the budget.json, budget.md and budget.png of a previous run in --out")
    add_debug_flag(p)
    return p


def check_args(args) -> None:
    """Reject bad settings before the model is loaded: ``eval.run``'s checks of the settings
    the two share (``SettingsError``: tasks, sizes, thresholds, directories), then this one's
    (``BudgetError``)."""
    check_settings(args.tasks, {"--limit": args.limit, "--max-new-tokens": args.max_new_tokens,
                                "--batch-size": args.batch_size, "--pad-multiple": args.pad_multiple},
                   args.thresholds, args.data_dir, [args.exits])
    if not args.thresholds:
        raise BudgetError("--thresholds: give at least one threshold")
    if not args.targets:
        raise BudgetError("--targets: give at least one target")
    for t in args.targets:
        if not (t > 0 and math.isfinite(t)):
            raise BudgetError(f"--targets: each must be > 0 (average layers per token), got {t:g}")
    if not (args.gain > 0 and math.isfinite(args.gain)):
        raise BudgetError(f"--gain must be > 0, got {args.gain}")
    for k in args.static_layers or []:
        if k < 1:
            raise BudgetError(f"--static-layers: each must be a positive integer, got {k}")
    if args.model is not None and not os.path.exists(args.model):
        raise BudgetError(f"--model {args.model} does not exist")


def check_against_model(args, num_layers: int, exit_config) -> list[int]:
    """Check the targets and static layers against the model and its exits; returns the
    static layers to run."""
    first_exit = exit_config.layers[0]
    for t in args.targets:
        if not first_exit <= t <= num_layers:
            raise BudgetError(f"--targets: {t:g} is outside [{first_exit}, {num_layers}], the averages the "
                              f"controller can reach (first exit layer {first_exit} to full depth)")
    if args.static_layers is not None:
        for k in args.static_layers:
            if not 1 <= k <= num_layers - 1:
                raise BudgetError(f"--static-layers: {k} is outside [1, {num_layers - 1}] "
                                  f"for a {num_layers}-layer model")
        return sorted(set(args.static_layers))
    ks = {f(t) for t in args.targets for f in (math.floor, math.ceil)}
    return sorted({min(max(k, 1), num_layers - 1) for k in ks})


def check_outputs(out, overwrite: bool) -> None:
    """Refuse (``OutputError``) an ``out`` that holds a previous run's files, unless ``overwrite``."""
    existing = [name for name in OUTPUTS if (Path(out) / name).exists()]
    if existing and not overwrite:
        raise OutputError(f"--out {out} already holds {', '.join(existing)} of a previous run; pass --overwrite to "
                          "replace them, or choose another --out")


def load_inputs(args):
    """The backbone, the resolved exits checked against it, and the static layers to run."""
    import dynamax_jax as dx
    from dynamax_jax.exits import check_exits

    backbone = load_backbone(args.model, "float32", not args.no_chat_template)
    exit_config, exit_params = dx.load_exits(args.exits)
    exit_config = check_exits(backbone.config, exit_config, exit_params)  # resolved; fits the model
    return backbone, exit_config, exit_params, check_against_model(args, backbone.config.num_layers, exit_config)


def run_settings(args, backbone: Backbone, exit_config, prompts: int) -> dict:
    """What ``budget.json`` and ``budget.md`` say the runs were made with."""
    # a training-free confidence (softmax, margin, saturation) names the exits, as in eval.run
    kind = exit_config.kind if exit_config.confidence == "classifier" else exit_config.confidence
    return dict(model=args.model, exits=args.exits, exit_kind=kind,
                exit_layers=list(exit_config.layers), exit_mode=exit_config.mode,
                exit_threshold=exit_config.threshold, num_layers=backbone.config.num_layers,
                tasks=args.tasks, data_dir=args.data_dir, split=args.split, limit=args.limit, prompts=prompts,
                max_new_tokens=args.max_new_tokens, gain=args.gain, chat_template=backbone.chat_template,
                static_mode=MODES[backbone.config.family][0])


def write_outputs(out: Path, result: dict) -> str:
    """Write ``budget.json``, ``budget.md`` and ``budget.png`` into ``out`` together (on a
    failure none is replaced; other files in ``out`` are kept); returns the markdown."""
    table = markdown(result)
    with atomic_directory(out, owned=OUTPUTS, overwrite=True) as tmp:
        write_json_atomic(tmp / "budget.json", result, indent=1)
        write_text_atomic(tmp / "budget.md", table)
        plot(result, tmp / "budget.png")
    return table


def _budget(argv: Sequence[str] | None = None) -> int:
    """The command: check, measure, compare, write. Raises this package's errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_args(args)
    args.split = tasks.resolve_split(args.split, args.data_dir, "evaluation")
    examples = [ex for name in args.tasks for ex in tasks.get_task(name).load(args.data_dir, args.limit, args.split)]
    args.model = model_path(args.model)
    check_outputs(args.out, args.overwrite)
    with output_directory(args.out, command_line(PROG, argv)):
        check_outputs(args.out, args.overwrite)  # again, now that no other writer can add them
        backbone, exit_config, exit_params, static_layers = load_inputs(args)
        prompts = [backbone.encode(ex.prompt) for ex in examples]
        runs = measure(backbone, prompts, exit_config, exit_params, args, static_layers,
                       log=lambda line: print(line, file=sys.stderr))
        result = dict(command=shlex.join(["python", "-m", "eval.budget", *argv]),
                      settings=run_settings(args, backbone, exit_config, len(prompts)), runs=runs,
                      comparison=compare(runs))
        table = write_outputs(Path(args.out), result)
    print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m eval.budget``: 0, or 2 on a user error printed as one line by
    ``dynamax_jax.cli.run_cli`` (``--debug`` keeps the traceback)."""
    return run_cli(_budget, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
