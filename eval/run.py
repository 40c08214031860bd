"""Evaluate early exit against full depth, static layer pruning and the exit oracle.

    python -m eval.run --exits exits/mamba --thresholds 0.5,0.7,0.9 --limit 100 --out results/

For each task the sweep runs, in order:

1. ``full``: full-depth greedy answers (the reference for consistency and the oracle).
2. ``oracle``: the ceiling. The full model's own generations are re-run through one
   teacher-forced forward pass that keeps every layer's hidden state; a token's oracle exit
   is the earliest exit layer whose logit-lens token (final norm + LM head on that layer's
   hidden state) equals the final layer's token, else L. Its answers *are* the full
   answers, so its quality is the full model's; its compute is those exit layers with no
   classifier cost. (It is an optimistic ceiling: a real exit would change the K/V or
   states the following tokens see.)
3. ``exit``: one run per exit checkpoint (classifier kind) x mode (copy/propagate for
   Transformers, skip/propagate for Mamba2) x threshold, through ``dx.generate``.
4. ``static``: static layer pruning (every token leaves after layer k) at the average
   depths the exit runs reached (``--static-layers auto``), or at given layers.

Each run is written to ``--out`` as one JSON file (atomically) named after its settings
and a hash of them; a run whose JSON already exists is skipped, so an interrupted sweep
resumes where it stopped. A sweep holds ``--out`` alone while it runs (a second command
writing there is refused at once, naming the first's PID, host and command), and checks
before any work that it can write there and that the exits fit the model. The backbone is
swept by running the command once per model with the same ``--out``: the report groups runs by model and task. At the end
``eval.report`` writes ``results.md`` and one PNG per model and task into ``--out``.
Each run records what it was computed on (``inputs``: the data file and its sha256, the
model's and the exit heads' fingerprints); a sweep whose data, limit, new tokens or dtype
differ from the runs already in ``--out``, or whose model or exit heads changed under the
same path, is refused before the model loads: its rows could not be told apart there.

FLOPs come from ``dynamax_jax.flops`` (backbone layers, LM head, the classifiers' own cost,
K/V or state propagation); ``compute`` is FLOPs relative to full depth over the same tokens.

``--mesh DATAxMODEL`` (``dynamax_jax.cli.mesh``) loads the model and the exit heads sharded over
a device mesh, and every run computes on it (prompt rows over ``data``; heads, MLP width and
vocabulary over ``model``): its files are one device's, timings aside. With ``--distributed``
every host's process computes every run and process 0 alone holds and writes ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from dynamax_jax import sharding as S
from dynamax_jax.cli import add_debug_flag, run_cli
from dynamax_jax.cli.mesh import add_mesh_arguments, is_main_process, setup_mesh
from dynamax_jax.io import fingerprint, write_json_atomic
from dynamax_jax.eval import metrics, tasks
from dynamax_jax.eval.errors import OutputError, SettingsError
from dynamax_jax.eval.harness import (MODES, Backbone, Generation, HelpFormatter, check_settings, command_line,
                                      compute_summary, csv_list, generate_all, load_backbone, model_path,
                                      oracle_layers, output_directory, shared_flags)
from dynamax_jax.eval.report import read_json

PROG = "python -m eval.run"

# ----------------------------------------------------------------------------- run identity

@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's result. ``exits`` is a checkpoint path or
    ``random:<kind>:<seed>``; ``exit_layers`` is resolved against the model."""

    task: str
    variant: str
    model: str
    data: str
    limit: int | None
    max_new_tokens: int
    dtype: str
    chat_template: bool
    exits: str | None = None
    kind: str | None = None
    mode: str | None = None
    threshold: float | None = None
    exit_layers: tuple[int, ...] | None = None
    static_layer: int | None = None
    reference: str | None = None  # the fingerprint of the model whose full-depth answers consistency is against

    @property
    def label(self) -> str:
        if self.variant == "exit":
            return f"{self.kind}-{self.mode}-t{self.threshold:g}"
        if self.variant == "static":
            return f"static-{self.static_layer}"
        if self.variant == "oracle":  # with exits: the adapted (tuned-lens) predictions of that checkpoint
            return "oracle-" + "-".join(map(str, self.exit_layers)) + (f"-{self.kind}" if self.kind else "")
        return "full"

    def filename(self) -> str:
        fields = dataclasses.asdict(self)
        if self.reference is None:  # runs against their own full depth keep the names they always had
            del fields["reference"]
        blob = json.dumps(fields, sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        model_tag = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.model).stem or Path(self.model).name)
        return f"{model_tag}__{self.task}__{self.label}__{digest}.json"


# ----------------------------------------------------------------------------- what runs are computed on

def data_inputs(task: tasks.Task, data_dir: str | None, split: str | None, limit: int | None) -> dict:
    """What a task's runs read: the source, the part, the limit, and the file with its sha256
    (``None`` for the Hub, whose datasets are named, not hashed)."""
    file = None if data_dir == tasks.HUB else (
        tasks.DATA_DIR / task.bundled if data_dir is None else Path(data_dir) / task.fixture_file)
    return {"source": tasks.data_label(data_dir, split), "limit": limit,
            "file": None if file is None else str(file), "sha256": None if file is None else fingerprint(file)}


def run_inputs(args) -> dict:
    """What the sweep's runs are computed on: ``{"data": {task: data_inputs(...)}, "model":
    {"path", "fingerprint"}, "exits": {path: fingerprint}}``. An ``--out`` inside the model's
    or an exit checkpoint's folder is left out of its fingerprint: the results written there
    are not the model."""
    out = (args.out,)
    return {"data": {name: data_inputs(tasks.get_task(name), args.data_dir, args.split, args.limit)
                     for name in args.tasks},
            "model": {"path": args.model, "fingerprint": fingerprint(args.model, exclude=out)},
            "exits": {str(path): fingerprint(path, exclude=out) for path in args.exits}}


def check_out_dir(out: Path, data: dict[str, dict], settings: dict, model: tuple[str, str],
                  exits: dict[str, str]) -> None:
    """Refuse (``OutputError``) to add runs to ``out`` that its report could not tell apart
    from the runs it holds: for a task, other data (source, part, limit or file content) or
    other generation settings (``settings``: new tokens, dtype); for the same model path or
    exit checkpoint path, other weights. Different models and exit checkpoints may share an ``--out``."""
    from dynamax_jax.eval.report import load_runs

    problems = []
    for run in load_runs(out) if out.is_dir() else []:
        spec, inputs = run["spec"], run.get("inputs", {})
        task = spec["task"]
        if task in data:
            ours, theirs = data[task], inputs.get("data", {})
            differ = [f"{key} {spec.get(key)!r} (here {value!r})"
                      for key, value in (("data", ours["source"]), ("limit", ours["limit"]), *settings.items())
                      if spec.get(key) != value]
            if theirs.get("sha256") not in (None, ours["sha256"]):
                differ.append(f"another content of {theirs.get('file')}")
            if differ:
                problems.append(f"{task} runs with {', '.join(differ)}")
        path, weights = model
        if spec["model"] == path and inputs.get("model", {}).get("fingerprint") not in (None, weights):
            problems.append(f"the model at {path} has changed since its runs on it")
        if spec.get("exits") in exits and inputs.get("exits", {}).get("fingerprint") not in (None, exits[spec["exits"]]):
            problems.append(f"the exit heads at {spec['exits']} have changed since its runs with them")
    if problems:
        unique = list(dict.fromkeys(problems))
        raise OutputError(f"--out {out} holds runs that this one cannot share a report with: {'; '.join(unique[:5])}. "
                          "Use another --out, or remove those runs")


# ----------------------------------------------------------------------------- scoring

def score_examples(task: tasks.Task, examples: list[tasks.Example], texts: list[str],
                   full_answers: list[str], reference_answers: list[str] | None = None) -> tuple[list[dict], dict]:
    """Per-example records and their means: task metrics on the answer (first line),
    repetition on the whole generation, consistency against the full-depth answer. With
    ``reference_answers`` (another model's full-depth answers, ``--reference``) the
    ``consistency_*`` scores are against those, and ``own_consistency_*`` against
    ``full_answers``."""
    records = []
    for ex, text in zip(examples, texts):
        answer = tasks.answer_from_generation(text)
        rec = {"id": ex.id, "answer": answer, "generation": text, "scores": task.score(answer, ex)}
        rec["scores"]["repetition_rate"] = metrics.repetition_rate(text)
        records.append(rec)
    for i, (rec, full) in enumerate(zip(records, full_answers)):
        if reference_answers is None:
            rec["scores"].update(metrics.consistency(rec["answer"], full))
            continue
        rec["scores"].update(metrics.consistency(rec["answer"], reference_answers[i]))
        rec["scores"].update({f"own_{k}": v for k, v in metrics.consistency(rec["answer"], full).items()})
    names = records[0]["scores"].keys()
    means = {k: float(np.mean([r["scores"][k] for r in records])) for k in names}
    return records, means


# ----------------------------------------------------------------------------- reference answers

@dataclasses.dataclass(frozen=True)
class Reference:
    """Another model's full-depth run of a task, whose answers consistency is measured
    against (``--reference``): the run, and what each run records of it."""

    run: dict
    record: dict  # {"path", "model", "fingerprint"}

    @property
    def answers(self) -> list[str]:
        return [r["answer"] for r in self.run["examples"]]

    @property
    def key(self) -> str:
        return self.record["fingerprint"]


def find_reference(paths: Sequence[str], spec: RunSpec, example_ids: list[str]) -> Reference:
    """The full-depth run of ``spec``'s task among ``paths`` (``eval.run --out`` directories
    or run JSON files) on the same data, part, limit, new tokens and prompt format, over the
    same examples in the same order. None, several models' or other examples raise
    ``SettingsError`` saying what to run."""
    keys = ("task", "data", "limit", "max_new_tokens", "chat_template")
    found = []
    for path in map(Path, paths):
        for file in [path] if path.is_file() else sorted(path.glob("*.json")):
            run = read_json(file)
            s = run.get("spec", {}) if isinstance(run, dict) else {}
            if (s.get("variant") == "full" and s.get("reference") is None
                    and all(s.get(k) == getattr(spec, k) for k in keys)):
                found.append((file, run))
    where = f"--reference {' '.join(map(str, paths))}"
    if not found:
        raise SettingsError(f"{where}: no full-depth run of {spec.task} on {spec.data} (limit {spec.limit}, "
                            f"{spec.max_new_tokens} new tokens); run eval.run on the reference model with the "
                            "same --tasks, --split, --limit and --max-new-tokens and pass its --out")
    if len(found) > 1:
        raise SettingsError(f"{where}: several full-depth runs of {spec.task} fit ("
                            + ", ".join(str(f) for f, _ in found) + "); pass one run's JSON file per task")
    file, run = found[0]
    if [r["id"] for r in run["examples"]] != example_ids:
        raise SettingsError(f"{where}: {file} answers other examples of {spec.task} than this sweep")
    fp = (run.get("inputs") or {}).get("model", {}).get("fingerprint") or fingerprint(file)
    return Reference(run, {"path": str(file), "model": run["spec"]["model"], "fingerprint": fp})


# ----------------------------------------------------------------------------- sweep

def _exit_sources(args, backbone: Backbone, model_fingerprint: str, mesh=None):
    """``(tag, exit_config, exit_params)`` for each ``--exits`` checkpoint and ``--random-exits``
    kind. Heads trained on another architecture are refused; on other weights, warned about.
    With ``mesh`` the heads are placed on it by the sharding table, like the backbone."""
    import dynamax_jax as dx
    from dynamax_jax.exits import check_trained_on
    sources = []
    for path in args.exits:
        exit_config, exit_params = dx.load_exits(path)
        check_trained_on(exit_config, backbone.config, fingerprint=model_fingerprint, where=f"the exit heads in {path}")
        sources.append((str(path), exit_config, exit_params))
    for kind in args.random_exits:
        exit_config = dx.ExitConfig(kind=kind)
        exit_params = dx.init_exits(backbone.config, exit_config, jax.random.key(args.seed))
        sources.append((f"random:{kind}:{args.seed}", exit_config, exit_params))
    if mesh is None:
        return sources
    return [(tag, ec, S.shard_exit_params(mesh, ec, p)) for tag, ec, p in sources]


class Sweep:
    """Runs one backbone over the tasks, writing one JSON per run and skipping finished ones."""

    def __init__(self, args, backbone: Backbone, log=print, inputs: dict | None = None, write: bool = True):
        self.args, self.backbone, self.log = args, backbone, log
        self.write = write  # False on the processes of a multi-host run other than process 0
        self.out = Path(args.out)
        self.num_layers = backbone.config.num_layers
        # what the runs are computed on (recorded in each run): {"data": {task: ...},
        # "model": {"path", "fingerprint"}, "exits": {path: fingerprint}}
        self.inputs = inputs or {}
        self.references: dict[str, Reference] = {}  # by task, with --reference

    def spec(self, task: str, variant: str, **kw) -> RunSpec:
        a = self.args
        reference = self.references[task].key if task in self.references else None
        return RunSpec(task=task, variant=variant, model=self.backbone.path, data=tasks.data_label(a.data_dir, a.split),
                       limit=a.limit, max_new_tokens=a.max_new_tokens, dtype=a.dtype,
                       chat_template=self.backbone.chat_template, reference=reference, **kw)

    def find_references(self, example_ids: dict[str, list[str]]) -> None:
        """Look up ``--reference``'s full-depth run of every task (before any run)."""
        for task, ids in example_ids.items():
            self.references[task] = find_reference(self.args.reference, self.spec(task, "full"), ids)

    def done(self, spec: RunSpec) -> dict | None:
        path = self.out / spec.filename()
        if path.exists():
            self.log(f"skip (already done): {path}")
            return read_json(path)
        return None

    def record(self, spec: RunSpec, compute: dict, timing: dict, means: dict, records: list[dict],
               extra: dict | None = None) -> dict:
        task = tasks.get_task(spec.task)
        data = {"spec": dataclasses.asdict(spec), "label": spec.label,
                "backbone": {"family": self.backbone.config.family, "num_layers": self.num_layers,
                             "model_type": self.backbone.config.model_type},
                "primary": task.primary, "metrics": means, "compute": {**compute, **timing},
                "examples": records, **(extra or {})}
        if spec.task in self.references:
            data["reference"] = self.references[spec.task].record
        if (spec.exits or "").startswith("random:"):  # untrained heads: the seed they were drawn with
            data["seed"] = self.args.seed
        if self.inputs:
            exits = self.inputs["exits"]
            data["inputs"] = {"data": self.inputs["data"][spec.task], "model": self.inputs["model"],
                              **({"exits": {"path": spec.exits, "fingerprint": exits[spec.exits]}}
                                 if spec.exits in exits else {})}
        path = self.out / spec.filename()
        if self.write:
            write_json_atomic(path, data, indent=1)
        self.log(f"wrote {path}: {spec.label} {task.primary}={means[task.primary]:.4g} "
                 f"avg_layers={compute['avg_layers']:.2f} compute={compute['compute']:.3f}")
        return data

    def generate_run(self, spec, examples, prompts, full, exit_config=None, exit_params=None,
                     static_layer=None):
        task = tasks.get_task(spec.task)
        a = self.args
        gens, timing = generate_all(self.backbone, prompts, max_new_tokens=a.max_new_tokens,
                                    batch_size=a.batch_size, pad_multiple=a.pad_multiple,
                                    exit_config=exit_config, exit_params=exit_params,
                                    static_layer=static_layer, desc=f"{spec.task} {spec.label}")
        texts = [self.backbone.decode(g.tokens) for g in gens]
        # the full-depth run is scored against itself (consistency 1) so every run has the columns
        full_answers = ([tasks.answer_from_generation(t) for t in texts] if full is None
                        else [r["answer"] for r in full["examples"]])
        reference = self.references.get(spec.task)
        records, means = score_examples(task, examples, texts, full_answers,
                                        reference.answers if reference else None)
        for rec, g in zip(records, gens):
            rec["tokens"], rec["exit_layers"] = g.tokens, g.exit_layers
        if full is not None:  # for each changed answer, the token where its generation first left full depth's
            for rec, f in zip(records, full["examples"]):
                changed = rec["scores"].get("own_consistency_em", rec["scores"]["consistency_em"]) < 1.0
                rec["scores"].update(metrics.first_divergence(rec["tokens"], rec["exit_layers"], f["tokens"],
                                                              self.num_layers) if changed
                                     else {"diverged_at_exit": 0.0, "diverged_after_exit": 0.0})
            for name in ("diverged_at_exit", "diverged_after_exit"):
                means[name] = float(np.mean([r["scores"][name] for r in records]))
        # generate prunes statically with the family's cheap mode (copy / skip) when given no exits
        static_mode = MODES[self.backbone.config.family][0] if static_layer is not None else None
        compute = compute_summary(self.backbone.config, exit_config, gens, [len(p) for p in prompts],
                                  static_mode=static_mode)
        return self.record(spec, compute, timing, means, records)

    def exit_runs(self, exit_sources) -> list[tuple[str, object, object, str]]:
        """``(tag, exit_config, exit_params, kind)`` for every exit run of a task, in sweep order
        (checkpoint x mode x threshold), each config resolved and checked against the model
        (``SettingsError`` naming the checkpoint), so that exits that do not fit the model are
        refused before any run rather than after the full-depth one."""
        from dynamax_jax.exits import ExitError, check_exits
        runs = []
        for tag, exit_config, exit_params in exit_sources:
            for mode in self.args.modes or MODES[self.backbone.config.family]:
                for threshold in self.args.thresholds or [exit_config.threshold]:
                    try:
                        ec = check_exits(self.backbone.config,
                                         dataclasses.replace(exit_config, mode=mode, threshold=threshold), exit_params)
                    except ExitError as err:
                        flag = "--random-exits" if tag.startswith("random:") else "--exits"
                        raise SettingsError(f"{flag} {tag}: {err}") from None
                    # a training-free confidence (softmax, margin, saturation) names the run
                    kind = ec.kind if ec.confidence == "classifier" else ec.confidence
                    runs.append((tag, ec, exit_params, kind + (f"+{ec.adapter}" if ec.has_adapter else "")))
        return runs

    def check_static_layers(self) -> None:
        """Explicit ``--static-layers`` must exist in the model (checked before any run)."""
        choice = self.args.static_layers
        bad = [k for k in choice if not 1 <= k <= self.num_layers] if choice not in ("auto", "none") else []
        if bad:
            raise SettingsError(f"--static-layers: {bad} outside [1, {self.num_layers}] for a "
                                f"{self.num_layers}-layer model")

    def run_task(self, task_name: str, exit_sources, exit_runs=None) -> None:
        """Every run of one task: full depth, the oracles, the exit runs (``exit_runs``, from
        ``exit_runs(exit_sources)`` when not given) and static pruning; finished ones skipped."""
        import dynamax_jax as dx
        a = self.args
        exit_runs = self.exit_runs(exit_sources) if exit_runs is None else exit_runs
        task = tasks.get_task(task_name)
        examples = task.load(a.data_dir, a.limit, a.split)
        prompts = [self.backbone.encode(ex.prompt) for ex in examples]
        self.log(f"{task_name}: {len(examples)} examples ({a.split or 'all'} part) from "
                 f"{task.source_name(a.data_dir)}")

        spec = self.spec(task_name, "full")
        full = self.done(spec) or self.generate_run(spec, examples, prompts, None)
        if [r["id"] for r in full["examples"]] != [ex.id for ex in examples]:
            raise OutputError(f"{self.out / spec.filename()} holds other examples than this task's; "
                              "remove it or use another --out")

        layer_sets = {ec.resolve(self.backbone.config).layers for _, ec, _ in exit_sources}
        if not layer_sets:
            layer_sets = {dx.ExitConfig().resolve(self.backbone.config).layers}
        if not a.no_oracle:
            for layers in sorted(layer_sets):
                self.oracle_run(task_name, layers, examples, prompts, full)
            for tag, ec, p in exit_sources:  # the tuned-lens ceiling of each checkpoint with adapters
                if ec.has_adapter:
                    self.oracle_run(task_name, ec.resolve(self.backbone.config).layers, examples, prompts,
                                    full, (tag, ec, p))

        depths = []
        for tag, ec, exit_params, kind in exit_runs:
            spec = self.spec(task_name, "exit", exits=tag, kind=kind, mode=ec.mode, threshold=float(ec.threshold),
                             exit_layers=ec.layers)
            run = self.done(spec) or self.generate_run(spec, examples, prompts, full, ec, exit_params)
            depths.append(run["compute"]["avg_layers"])

        for k in self.static_layers(depths, layer_sets):
            spec = self.spec(task_name, "static", static_layer=k)
            self.done(spec) or self.generate_run(spec, examples, prompts, full, static_layer=k)

    def static_layers(self, depths: list[float], layer_sets) -> list[int]:
        """``--static-layers``: ``auto`` = the exit runs' average depths rounded (the exit
        layers when there are no exit runs), ``none``, or explicit layers."""
        choice = self.args.static_layers
        if choice == "none":
            return []
        if choice != "auto":
            return sorted(set(choice))
        if depths:
            ks = {int(round(d)) for d in depths}
        else:
            ks = {l for layers in layer_sets for l in layers}
        return sorted(min(max(k, 1), self.num_layers - 1) for k in ks)

    def oracle_run(self, task_name, layers, examples, prompts, full, source=None) -> None:
        """The oracle at ``layers``; with ``source = (tag, exit_config, exit_params)`` its
        exits predict through that checkpoint's adapters."""
        tag, ec, p = source or (None, None, None)
        spec = self.spec(task_name, "oracle", exit_layers=tuple(layers), exits=tag,
                         kind=f"{ec.adapter}-lens" if ec is not None else None)
        if self.done(spec):
            return
        a = self.args
        gens = [Generation(r["tokens"], r["exit_layers"]) for r in full["examples"]]
        start = time.perf_counter()
        per_token, agreement, reproduced = oracle_layers(self.backbone, tuple(layers), prompts, gens,
                                                         a.batch_size, a.pad_multiple, ec, p)
        elapsed = time.perf_counter() - start
        oracle_gens = [Generation(g.tokens, l) for g, l in zip(gens, per_token)]
        # The oracle emits the full model's tokens and runs no classifier; skipped layers are
        # charged as under the family's cheap mode (copy / skip).
        compute = compute_summary(self.backbone.config, None, oracle_gens, [len(p) for p in prompts],
                                  static_mode=MODES[self.backbone.config.family][0])
        # its answers, scores and consistency (1) are the full run's
        records = [{**r, "exit_layers": l} for r, l in zip(full["examples"], per_token)]
        extra = {"oracle": {"exit_agreement": dict(zip(map(str, layers), agreement)),
                            "final_layer_reproduces_generation": reproduced}}
        self.record(spec, compute, {"wall_time_s": elapsed, "tokens_per_s": None}, full["metrics"], records,
                    extra)


# ----------------------------------------------------------------------------- CLI

def _static_layers(text: str):
    if text in ("auto", "none"):
        return text
    return csv_list(int)(text)


def build_parser() -> argparse.ArgumentParser:
    from dynamax_jax.exits import KINDS

    shared = shared_flags(("--model", "--dtype", "--tasks", "--data-dir", "--split", "--limit", "--max-new-tokens",
                           "--batch-size", "--pad-multiple", "--no-chat-template", "--out"), out="eval_results")
    p = argparse.ArgumentParser(
        prog="python -m eval.run", parents=[shared], formatter_class=HelpFormatter,
        description="Sweep early-exit settings on TruthfulQA, CoQA and TriviaQA against full depth, "
                    "static layer pruning and the exit oracle; one JSON per run, a markdown table and "
                    "PNG plots in --out. Runs whose JSON exists are skipped (resume). Sweep backbones by "
                    "running once per --model with the same --out.")
    p.add_argument("--exits", nargs="*", default=[],
                   help="exit checkpoints (dx.save_exits directories), one per classifier kind to compare")
    p.add_argument("--random-exits", type=csv_list(str), default=[],
                   help=f"also sweep untrained exit heads of these kinds ({','.join(KINDS)}): a pipeline check, "
                        "not a quality result")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-exits")
    p.add_argument("--thresholds", type=csv_list(float), default=None,
                   help="comma-separated thresholds to sweep (default: each checkpoint's own)")
    p.add_argument("--modes", type=csv_list(str), default=None,
                   help="skipped-layer handling to sweep (default: copy,propagate for Transformers, "
                        "skip,propagate for Mamba2); 'shift' (heads with a fill_shift) propagates from the exit "
                        "state moved by the skipped layers' average update; 'recompute' is a diagnostic: skipped "
                        "layers still run, so the cache is full depth's and only wrong exits change answers (no "
                        "compute saved)")
    p.add_argument("--static-layers", type=_static_layers, default="auto",
                   help="static layer pruning baseline: 'auto' (the exit runs' average depths, rounded), "
                        "'none', or comma-separated layer counts")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle-exit ceiling")
    p.add_argument("--reference", nargs="+", default=None, metavar="RUNS",
                   help="measure consistency against another model's full-depth answers (e.g. the original of a "
                        "tuned model): eval.run --out directories or run JSON files holding its full-depth run of "
                        "each task on the same data; each run then also records consistency against this model's "
                        "own full depth (own_consistency_*) and which reference it used")
    add_mesh_arguments(p, distributed_note="Every process reads the data and computes every run; process 0 alone "
                       "holds and writes --out and prints, and the others read back the runs it holds, so --out "
                       "must be on a file system that every process sees")
    add_debug_flag(p)
    return p


def check_args(args) -> None:
    """Reject bad settings before any model is loaded (``SettingsError`` naming the flag)."""
    from dynamax_jax.exits import KINDS
    for kind in args.random_exits:
        if kind not in KINDS:
            raise SettingsError(f"--random-exits: unknown kind {kind!r}; supported: {', '.join(KINDS)}")
    check_settings(args.tasks, {"--limit": args.limit, "--max-new-tokens": args.max_new_tokens,
                                "--batch-size": args.batch_size, "--pad-multiple": args.pad_multiple},
                   args.thresholds, args.data_dir, args.exits)
    if args.static_layers not in ("auto", "none") and min(args.static_layers) < 1:
        raise SettingsError(f"--static-layers: each must be >= 1, got {min(args.static_layers)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args)
    mesh = setup_mesh(parser, args, PROG, batch_size=args.batch_size)
    args.model = model_path(args.model)
    args.split = tasks.resolve_split(args.split, args.data_dir, "evaluation")
    if args.data_dir != tasks.HUB:  # fail on bad data before loading the model
        for name in args.tasks:
            tasks.get_task(name).load(args.data_dir, args.limit, args.split)
    if not Path(args.model).exists():
        raise SettingsError(f"--model {args.model} does not exist")
    for path in args.reference or ():
        if not Path(path).exists():
            raise SettingsError(f"--reference {path} does not exist")
    # one writer per --out, for the whole sweep; an unwritable --out fails here, before the work
    with output_directory(args.out, command_line(PROG, argv)):
        inputs = run_inputs(args)
        check_out_dir(Path(args.out), inputs["data"], {"max_new_tokens": args.max_new_tokens, "dtype": args.dtype},
                      (args.model, inputs["model"]["fingerprint"]), inputs["exits"])
        backbone = load_backbone(args.model, args.dtype, not args.no_chat_template, mesh=mesh)
        # on a multi-host run every process computes every run; process 0 alone writes and logs
        main_process = is_main_process()
        sweep = Sweep(args, backbone, log=print if main_process else _quiet, inputs=inputs, write=main_process)
        if args.reference:
            sweep.find_references({name: [ex.id for ex in tasks.get_task(name).load(args.data_dir, args.limit,
                                                                                     args.split)]
                                   for name in args.tasks})
        sources = _exit_sources(args, backbone, inputs["model"]["fingerprint"], mesh)
        exit_runs = sweep.exit_runs(sources)  # exits that do not fit the model: refused before any run
        sweep.check_static_layers()
        for name in args.tasks:
            sweep.run_task(name, sources, exit_runs)
        if not main_process:
            return 0
        from dynamax_jax.eval import report
        table, plots = report.write_report(args.out)
    print(f"report: {table}; plots: {', '.join(map(str, plots))}")
    return 0


def _quiet(*args, **kwargs) -> None:
    """The log of a process other than process 0 of a multi-host run: it prints nothing."""


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
