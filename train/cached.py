"""Exit heads from one pass of the frozen backbone: cache its outputs, fit the adapters in
closed form, train every classifier kind on the cache.

    python -m train.cached --data train/answers/smollm2-135m-instruct.jsonl=400000,train/prose=200000 \\
        --exit-layers 16,18,20,22,24,26,28 --kinds calm,ffn --adapter affine --out runs/smollm2-cached

Shape legend: R cached rows, E exits, T tokens per row, D hidden, K the final layer's top-k.

``train.distill`` runs the backbone at every step of every head kind, where it is most of a
step's work. Here it runs once:

1. **Cache** (``out/cache``): rows of ``--seq-len`` tokens from each ``--data`` source up to
   its token quota (the ``train.data`` pipeline: documents shuffled with the seed, packed);
   one forward pass per batch stores the exit hidden states ``hidden [R, E, T, D]`` (in
   ``--cache-dtype``), the input ids ``tokens [R, T]``, the final layer's top-k token ids
   ``topk [R, T, K]``, and the
   normal equations of the adapters' least-squares fit. ``meta.json`` records what the cache
   was computed from: the content fingerprints of the model and of each source
   (``io.fingerprint``) and the settings. A cache of the same is reused; one of another model,
   other data or other settings is refused, naming what changed, unless ``--rebuild-cache``.
2. **Adapters** (``--adapter affine``): each exit's ``h + h W + b`` is the ridge-regression
   fit of the final layer's hidden state (before the final norm) from the exit's, in closed
   form: a "linear shortcut" (Din et al., 2023, *Jump to Conclusions*). It needs no LM-head
   backward pass, the cost of the KL-trained tuned lens of ``train.distill``. ``none``: the
   plain logit lens.
3. **Labels** ``[R, E, T]``: positive where the exit's predicted token (the backbone's final
   norm and LM head after the adapter) is among the final layer's top-``--topk``; for a
   seeded ``--label-percent`` share of the rows (each costs one LM head per exit and token),
   kept in the cache directory per adapter setting so that reruns skip them.
   With ``--train-on replies`` (default) only the positions where decoding runs the exits
   are labelled and trained on: those predicting an assistant reply in chat-formatted
   sources (after the template's generation prompt, or ``--reply-marker``), every position
   of a source without replies (prose).
4. **Fill shift** (for ``--mode shift``): each layer's average output over the positions of
   ``--fill-rows`` training rows where each exit's token is right (``--fill-from exiting``:
   the tokens a classifier lets leave there) or over all their training positions (one more
   forward pass over them); saved with every head as ``fill_shift``
   (``exits.with_fill_shift``).
5. **Classifiers**: each of ``--kinds`` is trained on the cached hidden states and labels by
   ``train.distill.make_classifier_step`` (the objective and optimizer of ``train.distill``),
   for ``--epochs`` over the cache's training rows in a seeded order; ``--val-percent`` of
   the rows (drawn with the seed) are held out and scored at each threshold.

**On a mesh** (``--mesh DATAxMODEL``, ``dynamax_jax.cli.mesh``) the backbone is loaded sharded
and its passes (stage 1's cache, stage 3's labels, stage 4's layer means) run on the mesh, each
batch's rows over ``data``. The classifiers (stage 5) train on the cached features on one
device: they are small next to the backbone, and their cached inputs are read from the host
batch by batch anyway. The cache, labels and heads equal one device's up to the rounding of
sums split over devices. With ``--distributed`` every process runs every pass and process 0
alone writes the cache and ``--out``, which the others read back (a file system they share).

``--out`` receives ``cache/`` (unless ``--cache`` names another), ``exits-<kind>/`` (``dx.load_exits``; adapters included) and
``summary.json`` (seed, timings, tokens/s, per-exit label rates, held-out precision/recall).
One run at a time writes into ``--out`` (and into a ``--cache`` outside it): a second is
refused with the first's PID (``io.output_lock``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax import exits as ex
from dynamax_jax import sharding as S
from dynamax_jax.cli import MODEL_HELP, add_debug_flag, resolve_model, run_cli
from dynamax_jax.cli.mesh import add_mesh_arguments, barrier, is_main_process, setup_mesh
from dynamax_jax.io import (DataError, atomic_directory, atomic_file, check_destination, parse_dtype, read_json_object,
                            write_json_atomic)
from dynamax_jax.models import module_for
from dynamax_jax.prompts import reply_marker
from dynamax_jax.train.distill import DistillError, DistillSettings, int_list, make_classifier_step, make_optimizer

TOKENS_FILE = "tokens.npy"  # [R, T] input ids
CACHE_FILES = ("meta.json", "hidden.npy", "topk.npy", "gram.npy", "cross.npy", TOKENS_FILE)
# What else a cache directory holds, computed from it (rebuilding the cache removes them).
DERIVED_FILES = ("labels-*.npy", "layer-means-*.npz")
PROG = "python -m train.cached"
ADAPTERS = ("affine", "none")
TRAIN_ON = ("replies", "all")


@dataclasses.dataclass(frozen=True)
class Source:
    """A distillation source and how many of its tokens go into the cache."""

    path: str
    tokens: int


def parse_sources(text: str) -> list[Source]:
    """``PATH=TOKENS,PATH=TOKENS`` (``--data``) -> sources; each quota a positive integer."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        path, sep, tokens = item.rpartition("=")
        try:
            n = int(tokens.replace("_", ""))
        except ValueError:
            n = 0
        if not sep or not path or n < 1:
            raise DistillError(f"--data: expected PATH=TOKENS (a positive token count) for each source, got {item!r}")
        out.append(Source(path, n))
    if not out:
        raise DistillError("--data: no source given")
    return out


# ----------------------------------------------------------------------------- 1. cache


def make_backbone_pass(config, exit_layers: Sequence[int], topk: int):
    """Jitted ``(params, tokens [B, T]) -> (exit_hidden [E, B, T, D], topk_ids [B, T, K],
    gram [E, D+1, D+1], cross [E, D+1, D])``: the frozen backbone once, and each exit's
    normal-equation terms of the least-squares map ``[h_e, 1] -> h_L - h_e`` (``h_L`` the
    last layer's output, before the final norm), summed over the batch's tokens."""
    module = module_for(config)
    index = np.asarray(exit_layers) - 1  # layer l's output is hidden[l - 1]

    @jax.jit
    def run(params, tokens):
        logits, hidden = module.forward(config, params, tokens, return_hidden=True)  # hidden [L, B, T, D]
        exit_hidden = hidden[index].astype(jnp.float32)  # [E, B, T, D]
        last = hidden[-1].astype(jnp.float32)  # [B, T, D]
        x = exit_hidden.reshape(len(index), -1, exit_hidden.shape[-1])  # [E, B*T, D]
        x = jnp.concatenate([x, jnp.ones(x.shape[:2] + (1,), x.dtype)], axis=-1)  # [E, N, D+1]
        gram = jnp.einsum("enp,enq->epq", x, x, precision="highest")
        cross = jnp.einsum("enp,end->epd", x, last.reshape(1, -1, last.shape[-1]) - x[..., :-1],
                           precision="highest")
        return exit_hidden, jax.lax.top_k(logits, topk)[1].astype(jnp.int32), gram, cross

    return run


def source_batches(source: Source, *, encode, eos_id: int, seq_len: int, batch_size: int, seed: int):
    """Token batches ``[B, T]`` of one source: enough rows to hold its quota."""
    from dynamax_jax.train import data as D

    dataset = D.make_dataset(source.path, encode=encode, eos_id=eos_id, row_len=seq_len, batch_size=batch_size,
                             seed=seed, process_index=0, process_count=1)
    iterator = iter(dataset)
    for _ in range(math.ceil(source.tokens / (batch_size * seq_len))):
        yield next(iterator)["tokens"]


def reply_mask(tokens: np.ndarray, marker: Sequence[int] | None, eos_id: int) -> np.ndarray:
    """Positions ``[R, T]`` bool whose next token belongs to an assistant reply: from the last
    token of ``marker`` (the chat template's generation prompt) up to the token before the
    document's EOS, which ends the reply. These are the positions where decoding runs the
    exits. Everything counts when ``marker`` is None; a reply already under way at a row's
    start is left out."""
    if marker is None:
        return np.ones(tokens.shape, bool)
    m = len(marker)
    marker = np.asarray(marker)
    mask = np.zeros(tokens.shape, bool)
    for r, row in enumerate(tokens):
        ends = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(row, m) == marker, axis=-1)) + m - 1
        eos = np.flatnonzero(row == eos_id)
        for start in ends:
            after = eos[eos > start]
            stop = after[0] if len(after) else len(row)  # the EOS position itself predicts the next document
            mask[r, start:stop] = True
    return mask


def training_mask(cache: "Cache", marker: Sequence[int] | None, eos_id: int, train_on: str) -> np.ndarray:
    """Where the classifiers learn, ``[R, T]`` bool. ``all``: every position. ``replies``: in a
    source that holds chat turns (``marker`` occurs in its rows) only the replies
    (``reply_mask``); a source without any (prose) counts whole."""
    if train_on == "all":
        return np.ones(cache.tokens.shape, bool)
    masks, row = [], 0
    for source in cache.meta["sources"]:
        tokens = cache.tokens[row:row + source["rows"]]
        mask = reply_mask(tokens, marker, eos_id)
        masks.append(mask if mask.any() else np.ones(tokens.shape, bool))
        row += source["rows"]
    return np.concatenate(masks)


def _place(mesh, array: np.ndarray, spec) -> jax.Array:
    """A host ``array`` as the input of a pass over the backbone's params: on their ``mesh`` by
    ``spec`` (``sharding.place_rows``: rows over ``data`` where it divides them, else
    replicated), or on the default device when they are on one."""
    return jnp.asarray(array) if mesh is None else S.place_rows(mesh, array, spec)


def _cache_passes(config, params, sources: Sequence[Source], *, encode, eos_id: int, exit_layers: Sequence[int],
                  topk: int, seq_len: int, batch_size: int, seed: int, progress: bool):
    """The backbone over every source's batches in order, yielding ``(tokens [B, T], outputs,
    seconds)``: ``make_backbone_pass``'s outputs on the host and the time the pass took. On
    params sharded over a mesh each batch's rows are split over its ``data`` axis."""
    from tqdm import tqdm

    run = make_backbone_pass(config, tuple(exit_layers), topk)
    mesh = S.mesh_of(params)
    total = sum(math.ceil(s.tokens / (batch_size * seq_len)) for s in sources) * batch_size * seq_len
    with tqdm(total=total, desc="cache", unit="tok", disable=not progress, file=sys.stderr) as bar:
        for source in sources:
            for tokens in source_batches(source, encode=encode, eos_id=eos_id, seq_len=seq_len,
                                         batch_size=batch_size, seed=seed):
                t0 = time.perf_counter()
                outputs = S.to_host(run(params, _place(mesh, tokens, S.TABLE.tokens_bt)))
                yield tokens, outputs, time.perf_counter() - t0
                bar.update(tokens.size)


def build_cache(config, params, sources: Sequence[Source], *, encode, eos_id: int, exit_layers: Sequence[int],
                topk: int, seq_len: int, batch_size: int, seed: int, dtype, out, progress: bool = True,
                identity: dict | None = None, write: bool = True) -> dict | None:
    """Run the backbone over every source's rows and write the cache directory ``out``
    (atomically); returns its ``meta.json``. ``identity``: what must match for reuse. With
    ``write`` False (a process other than 0 of a multi-host run) the passes run, for their
    share of the sharded work, and nothing is stored: ``None``."""
    passes = _cache_passes(config, params, sources, encode=encode, eos_id=eos_id, exit_layers=exit_layers,
                           topk=topk, seq_len=seq_len, batch_size=batch_size, seed=seed, progress=progress)
    if not write:
        for _ in passes:
            pass
        return None
    batches_per_source = [math.ceil(s.tokens / (batch_size * seq_len)) for s in sources]
    rows = batch_size * sum(batches_per_source)
    e, d = len(exit_layers), config.hidden_size
    started, forward_seconds = time.time(), 0.0
    with atomic_directory(out, owned=CACHE_FILES + DERIVED_FILES) as tmp:
        hidden = np.lib.format.open_memmap(tmp / "hidden.npy", "w+", np.dtype(dtype), (rows, e, seq_len, d))
        top = np.lib.format.open_memmap(tmp / "topk.npy", "w+", np.int32, (rows, seq_len, topk))
        inputs = np.zeros((rows, seq_len), np.int32)
        gram = np.zeros((e, d + 1, d + 1), np.float64)
        cross = np.zeros((e, d + 1, d), np.float64)
        for i, (tokens, (h, ids, g, c), seconds) in enumerate(passes):
            row = i * batch_size
            forward_seconds += seconds
            hidden[row:row + batch_size] = h.transpose(1, 0, 2, 3).astype(dtype)
            top[row:row + batch_size] = ids
            inputs[row:row + batch_size] = tokens
            gram += g
            cross += c
        hidden.flush()
        top.flush()
        np.save(tmp / "gram.npy", gram)
        np.save(tmp / "cross.npy", cross)
        np.save(tmp / TOKENS_FILE, inputs)
        del hidden, top
        meta = {**(identity or {}), "rows": rows, "exit_layers": list(exit_layers), "seq_len": seq_len,
                "topk": topk, "cache_dtype": np.dtype(dtype).name,
                "sources": [dataclasses.asdict(s) | {"rows": batch_size * n} for s, n in zip(sources, batches_per_source)],
                "seconds": time.time() - started, "forward_seconds": forward_seconds,
                "tokens_per_s": rows * seq_len / max(forward_seconds, 1e-9)}
        write_json_atomic(tmp / "meta.json", meta)
    return meta


@dataclasses.dataclass
class Cache:
    """An opened cache directory (arrays memory-mapped)."""

    meta: dict
    hidden: np.ndarray  # [R, E, T, D]
    topk: np.ndarray  # [R, T, K]
    gram: np.ndarray  # [E, D+1, D+1] float64
    cross: np.ndarray  # [E, D+1, D] float64
    tokens: np.ndarray | None = None  # [R, T] int32

    @classmethod
    def open(cls, path) -> "Cache":
        """The cache in directory ``path``; a missing, unreadable or inconsistent file raises
        ``DataError`` naming it."""
        path = Path(path)
        missing = [name for name in CACHE_FILES if not (path / name).is_file()]
        if missing:
            raise DataError(f"{path} is not a complete cache: missing {', '.join(missing)}; {REBUILD_HINT}")
        meta = read_meta(path / "meta.json")
        cache = cls(meta, load_array(path / "hidden.npy", mmap_mode="r"), load_array(path / "topk.npy", mmap_mode="r"),
                    load_array(path / "gram.npy"), load_array(path / "cross.npy"), load_array(path / TOKENS_FILE))
        rows, e, t = meta.get("rows"), len(meta.get("exit_layers", ())), meta.get("seq_len")
        for name, array, lead in (("hidden.npy", cache.hidden, (rows, e, t)), ("topk.npy", cache.topk, (rows, t)),
                                  (TOKENS_FILE, cache.tokens, (rows, t)), ("gram.npy", cache.gram, (e,)),
                                  ("cross.npy", cache.cross, (e,))):
            if tuple(array.shape[:len(lead)]) != lead:
                raise DataError(f"{path / name} has shape {array.shape}, but meta.json says {rows} rows of {t} "
                                f"tokens at {e} exits; {REBUILD_HINT}")
        return cache


REBUILD_HINT = "pass --rebuild-cache to compute it again"


def read_meta(path: Path) -> dict:
    """A cache's ``meta.json``; ``DataError`` naming the file when it is not a JSON object."""
    return read_json_object(path, DataError, hint=REBUILD_HINT)


def load_array(path: Path, mmap_mode: str | None = None, hint: str = REBUILD_HINT) -> np.ndarray:
    """``np.load(path)``; a truncated or corrupt file raises ``DataError`` naming it."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err}); {hint}") from None


@dataclasses.dataclass
class Labelled:
    """The cached ``rows`` (sorted) that have ``labels [len(rows), E, T]``, and where they
    count: ``mask [len(rows), T]`` (labels outside it are not computed: False)."""

    cache: Cache
    rows: np.ndarray
    labels: np.ndarray
    mask: np.ndarray

    def batch(self, positions: np.ndarray) -> tuple[jax.Array, np.ndarray, np.ndarray]:
        """``(hidden [E, B, T, D] float32, labels [E, B, T], mask [B, T])`` of ``positions``
        into ``rows``."""
        hidden = np.asarray(self.cache.hidden[self.rows[positions]], np.float32)
        return (jnp.asarray(hidden.transpose(1, 0, 2, 3)), self.labels[positions].transpose(1, 0, 2),
                self.mask[positions])


# ----------------------------------------------------------------------------- 2. adapters


def fit_affine_adapters(gram: np.ndarray, cross: np.ndarray, ridge: float) -> dict[str, np.ndarray]:
    """Ridge solution of ``[h, 1] @ [[W], [b]] = h_L - h`` per exit from the normal equations
    ``gram [E, D+1, D+1]`` and ``cross [E, D+1, D]``: ``{"adapter_w" [E, D, D], "adapter_b"
    [E, D]}`` float32. ``ridge`` scales the identity added to ``gram``, relative to the mean
    of its diagonal (the bias row is not regularised)."""
    e, p, _ = gram.shape
    w = np.empty((e, p - 1, p - 1), np.float32)
    b = np.empty((e, p - 1), np.float32)
    for i in range(e):
        reg = np.eye(p) * ridge * np.mean(np.diag(gram[i])[:-1])
        reg[-1, -1] = 0.0
        sol = np.linalg.solve(gram[i] + reg, cross[i])  # [D+1, D]
        w[i], b[i] = sol[:-1], sol[-1]
    return {"adapter_w": w, "adapter_b": b}


# ----------------------------------------------------------------------------- 3. labels


def make_labeller(config, exit_config: ex.ExitConfig):
    """Jitted ``(params, adapters, exit_hidden [E, B, T, D], topk_ids [B, T, K]) -> labels
    [E, B, T]``: the exit's token (head after the adapter) among the final layer's top-k."""
    head = module_for(config).head

    @jax.jit
    def label(params, adapters, exit_hidden, topk_ids):
        def one(xs):  # one exit at a time bounds memory to one [B, T, V]
            p, h = xs
            predicted = jnp.argmax(head(config, params, ex.adapt(exit_config, p, h)), axis=-1)  # [B, T]
            return jnp.any(predicted[..., None] == topk_ids, axis=-1)
        return jax.lax.map(one, (adapters, exit_hidden))

    return label


def cache_labels(config, params, exit_config: ex.ExitConfig, adapters, cache: Cache, batch_size: int,
                 rows: np.ndarray, mask: np.ndarray, progress: bool = True) -> np.ndarray:
    """Labels ``[len(rows), E, T]`` bool of the cached ``rows`` (sorted indices), computed
    where ``mask [len(rows), T]`` is set (False elsewhere): the masked tokens of ``batch_size``
    rows go through the LM head together, padded to a multiple of the row length."""
    from tqdm import tqdm

    label = make_labeller(config, exit_config)
    mesh = S.mesh_of(params)  # the tokens of a batch are one row: replicated over the mesh
    _, e, t, _ = cache.hidden.shape
    out = np.zeros((len(rows), e, t), bool)
    if not exit_config.has_adapter:
        adapters = {"unused": np.zeros((e,), np.float32)}  # lax.map needs a leading [E] axis
    adapters = {k: _place(mesh, np.asarray(v), S.P()) for k, v in adapters.items()}
    for start in tqdm(range(0, len(rows), batch_size), desc="labels", disable=not progress, file=sys.stderr):
        idx = rows[start:start + batch_size]
        where = np.nonzero(mask[start:start + len(idx)])  # (row in batch, position)
        n = len(where[0])
        if n == 0:
            continue
        hidden = np.asarray(cache.hidden[idx], np.float32)[where[0], :, where[1]]  # [N, E, D]
        top = np.asarray(cache.topk[idx])[where]  # [N, K]
        pad = -n % t  # a few padded shapes: one compile each
        hidden = np.pad(hidden, ((0, pad), (0, 0), (0, 0)))
        top = np.pad(top, ((0, pad), (0, 0)))
        got = S.to_host(label(params, adapters, _place(mesh, hidden.transpose(1, 0, 2)[:, None], S.P()),
                              _place(mesh, top[None], S.P())))[:, 0, :n]  # [E, N]
        out[start + where[0], :, where[1]] = got.T
    return out


# ----------------------------------------------------------------------------- 4. fill shift


def layer_means(config, params, tokens: np.ndarray, weights: np.ndarray, batch_size: int,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Weighted averages of every layer's output: ``weights [R, W, T]`` (0/1 or any
    non-negative weights per position, W weightings) over a forward pass of ``tokens [R, T]``
    in batches of ``batch_size`` rows (the last one padded with zero weight). Returns ``(means
    [W, L, D] float64, totals [W])``; a weighting with zero total has zero means.
    ``exits.with_fill_shift`` turns them into the ``fill_shift`` of mode ``shift``."""
    from tqdm import tqdm

    module = module_for(config)

    @jax.jit
    def weighted_sum(params, tokens, weights):
        hidden = module.forward(config, params, tokens, return_hidden=True)[1]  # [L, B, T, D]
        return jnp.einsum("lbtd,bwt->wld", hidden.astype(jnp.float32), weights.astype(jnp.float32),
                          precision="highest")

    w = weights.shape[1]
    mesh = S.mesh_of(params)  # on a mesh, each batch's rows over its data axis
    total = np.zeros((w, config.num_layers, config.hidden_size), np.float64)
    for start in tqdm(range(0, len(tokens), batch_size), desc="layer means", disable=not progress, file=sys.stderr):
        t, m = tokens[start:start + batch_size], weights[start:start + batch_size]
        pad = batch_size - len(t)
        t, m = np.pad(t, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0), (0, 0)))
        total += np.asarray(S.to_host(weighted_sum(params, _place(mesh, t, S.TABLE.tokens_bt),
                                                   _place(mesh, m, S.TABLE.rows_b))), np.float64)
    totals = weights.sum(axis=(0, 2)).astype(np.float64)
    return total / np.maximum(totals, 1e-12)[:, None, None], totals


# ----------------------------------------------------------------------------- 5. classifiers


def train_classifier(config, exit_config: ex.ExitConfig, settings: DistillSettings, data: Labelled,
                     train_rows: np.ndarray, epochs: int, progress: bool = True):
    """Classifier params (no adapters) trained on ``train_rows`` (positions into
    ``data.rows``) for ``epochs`` passes in a seeded order; returns ``(params, last
    metrics, seconds, masked tokens seen)``."""
    from tqdm import tqdm

    ec = dataclasses.replace(exit_config, adapter="none")
    b = settings.batch_size
    steps_per_epoch = len(train_rows) // b
    if steps_per_epoch < 1:
        raise DistillError(f"the cache has {len(train_rows)} training rows, fewer than --batch-size {b}")
    settings = dataclasses.replace(settings, steps=epochs * steps_per_epoch)
    tx = make_optimizer(settings)
    params = ex.init_exits(config, ec, jax.random.key(settings.seed))
    opt_state = tx.init(params)
    step = jax.jit(make_classifier_step(config, ec, settings, tx), donate_argnums=(0, 1))
    rng = np.random.default_rng(settings.seed)
    started, metrics, seen = time.time(), {}, 0
    with tqdm(total=settings.steps, desc=f"train {ec.kind}", disable=not progress, file=sys.stderr) as bar:
        for _ in range(epochs):
            order = rng.permutation(train_rows)
            for i in range(steps_per_epoch):
                idx = np.sort(order[i * b:(i + 1) * b])
                h, y, m = data.batch(idx)
                params, opt_state, metrics = step(params, opt_state, h, jnp.asarray(y), jnp.asarray(m, jnp.float32))
                seen += int(m.sum())
                bar.update(1)
    return jax.device_get(params), jax.device_get(metrics), time.time() - started, seen


def heldout_scores(config, exit_config: ex.ExitConfig, params, data: Labelled, rows: np.ndarray,
                   thresholds: Sequence[float], batch_size: int) -> list[dict]:
    """Per exit and threshold on held-out ``rows`` (positions into ``data.rows``), over their
    masked tokens: precision and exit rate (p(exit) >= t)."""
    ec = dataclasses.replace(exit_config, adapter="none")
    probs = jax.jit(lambda p, h: jax.nn.softmax(ex.exit_logits(config, ec, p, h), axis=-1)[..., 1])
    e = data.labels.shape[1]
    tp = np.zeros((e, len(thresholds)))
    pred = np.zeros((e, len(thresholds)))
    pos = np.zeros(e)
    tokens = 0
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        h, y, m = data.batch(idx)
        p = np.asarray(probs(params, h))  # [E, B, T]
        for j, t in enumerate(thresholds):
            fire = (p >= t) & m
            tp[:, j] += (fire & y).sum(axis=(1, 2))
            pred[:, j] += fire.sum(axis=(1, 2))
        pos += (y & m).sum(axis=(1, 2))
        tokens += int(m.sum())
    return [{"layer": int(layer), "label_rate": pos[i] / max(tokens, 1),
             "thresholds": {f"{t:g}": {"precision": tp[i, j] / pred[i, j] if pred[i, j] else None,
                                       "exit_rate": pred[i, j] / max(tokens, 1)} for j, t in enumerate(thresholds)}}
            for i, layer in enumerate(exit_config.layers)]


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = DistillSettings()
    p = argparse.ArgumentParser(prog="python -m train.cached", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help=MODEL_HELP + " (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", required=True, type=parse_sources,
                   help="PATH=TOKENS[,PATH=TOKENS...]: local .jsonl/.json/.parquet/.txt files or directories "
                        "(e.g. train.answers output and train/prose) and how many tokens of each to cache")
    p.add_argument("--text-field", default=d.text_field)
    p.add_argument("--exit-layers", type=int_list, default=None,
                   help="comma-separated 1-based layers (default: 4 over the latter half)")
    p.add_argument("--kinds", default="calm", help="comma-separated classifier kinds to train on the cache, "
                   f"among {', '.join(ex.KINDS)}")
    p.add_argument("--adapter", default="affine", choices=ADAPTERS,
                   help="affine: a least-squares linear shortcut per exit predicts the token (and sets the "
                        "labels); none: the plain logit lens")
    p.add_argument("--ridge", type=float, default=1e-3, help="adapter ridge penalty, relative to the mean "
                   "squared hidden activation")
    p.add_argument("--topk", type=int, default=d.topk, help="positive when the exit token is in the final top-k")
    p.add_argument("--ffn-expand", type=int, default=d.ffn_expand,
                   help="hidden width of the ffn classifier in units of the model's hidden size")
    p.add_argument("--epochs", type=int, default=2, help="passes of each classifier over the cache")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per step (cache and training)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip-norm", type=float, default=d.clip_norm)
    p.add_argument("--exit-weights", default=d.exit_weights, help="position | uniform | comma list")
    p.add_argument("--class-weight", default="none", choices=("balanced", "none"),
                   help="none: p(exit) estimates the probability that the exit agrees, so one threshold asks "
                        "the same precision of every exit; balanced (train.distill's default) shifts each "
                        "exit's odds by its label rate, which makes late exits (high rates) leave rarely")
    p.add_argument("--label-percent", type=float, default=100.0,
                   help="share of the cached rows (drawn with the seed) that get labels and train the "
                        "classifiers; the adapters are fitted on all of them. Labels cost one LM head per "
                        "exit and token, more than the backbone when there are many exits")
    p.add_argument("--train-on", default="replies", choices=TRAIN_ON,
                   help="replies: in chat-formatted sources (train.answers output) the classifiers learn only at "
                        "the assistant's reply, where decoding runs them (the template and question tokens are "
                        "left out); sources without chat turns (prose) count whole. all: every token")
    p.add_argument("--reply-marker", default=None,
                   help="text that opens a reply in the sources, for --train-on replies (default: the chat "
                        "template's generation prompt, e.g. '<|im_start|>assistant\\n'; for a model without "
                        "one, e.g. the prompts' '\\nA:')")
    p.add_argument("--val-percent", type=float, default=5.0,
                   help="share of the labelled rows held out for the summary's scores")
    p.add_argument("--fill-rows", type=int, default=256,
                   help="training rows whose forward pass measures each layer's average output (the heads' "
                        "fill_shift for --mode shift)")
    p.add_argument("--fill-from", default="exiting", choices=("exiting", "all"),
                   help="the positions whose layer outputs give the fill shift: 'exiting' (those where the exit's "
                        "token is right, per exit) or 'all' training positions")
    p.add_argument("--threshold", type=float, default=0.9, help="threshold stored with the saved heads")
    p.add_argument("--cache-dtype", default="float16", choices=("float16", "float32"),
                   help="storage of the cached hidden states (float16: half the disk)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="backbone weights")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", required=True, help="run directory: cache/, exits-<kind>/, summary.json")
    p.add_argument("--cache", default=None, help="cache directory to build or reuse (default: OUT/cache); runs "
                   "that differ only in the classifiers' settings can share one")
    p.add_argument("--overwrite", action="store_true", help="write exits-<kind>/ into a directory that holds other files too (heads alone are replaced)")
    p.add_argument("--rebuild-cache", action="store_true",
                   help="compute the cache again (with its labels and layer means) instead of refusing one "
                        "computed from another model, other data or other settings")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_mesh_arguments(p, distributed_note="Every process reads the data and runs every backbone pass; process 0 "
                                           "alone writes --out and the cache, which the others read back, so both "
                                           "must be on a file system that every process sees")
    add_debug_flag(p)
    return p


# ----------------------------------------------------------------------------- run stages


@dataclasses.dataclass
class Backbone:
    """The loaded model and what the stages need of it. ``fingerprint``: ``io.fingerprint``
    of its files, recorded with the cache and the heads."""

    path: str
    config: Any
    params: Any
    tokenizer: Any
    encode: Any
    eos_id: int
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class RowSplit:
    """Which cached rows the classifiers use. ``labelled``: the sorted rows that get labels
    (a seeded ``--label-percent`` share of those with training positions); ``train`` and
    ``val``: sorted positions into ``labelled`` (``--val-percent`` held out)."""

    labelled: np.ndarray
    train: np.ndarray
    val: np.ndarray


def check_args(args) -> tuple[list[str], DistillSettings]:
    """The classifier kinds and the distillation settings of ``args``; every setting that can
    be judged without the model is checked here, the destinations included."""
    from dynamax_jax.train import data as D

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    settings = DistillSettings(model=args.model, text_field=args.text_field, exit_kind=kinds[0] if kinds else "",
                               exit_layers=args.exit_layers, topk=args.topk, ffn_expand=args.ffn_expand,
                               batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                               weight_decay=args.weight_decay, clip_norm=args.clip_norm, exit_weights=args.exit_weights,
                               class_weight=args.class_weight, seed=args.seed, dtype=args.dtype, out=args.out)
    for kind in kinds or [""]:
        dataclasses.replace(settings, exit_kind=kind).check()
    if args.epochs < 1:
        raise DistillError(f"--epochs must be >= 1, got {args.epochs}")
    if not 0 < args.label_percent <= 100 or not 0 <= args.val_percent < 100 or not args.ridge >= 0 or not 0 <= args.threshold:
        raise DistillError("--label-percent must be in (0, 100], --val-percent in [0, 100), --ridge >= 0 and "
                          "--threshold >= 0")
    if args.fill_rows < 1:
        raise DistillError(f"--fill-rows must be >= 1, got {args.fill_rows}")
    for source in args.data:
        D.read_documents(source.path, args.text_field)  # fails now, naming the file, if unreadable
    for kind in kinds:  # refuse before any work
        check_destination(Path(args.out) / f"exits-{kind}", ex.EXIT_FILES, args.overwrite)
    return kinds, settings


def load_backbone(args, exclude: Sequence[Path], mesh=None) -> Backbone:
    """The model of ``--model`` (default SmolLM2-135M-Instruct; a hub id is read from its
    snapshot in the local hub cache), its tokenizer and fingerprint (leaving out ``exclude``:
    output folders inside the model's); with ``mesh`` its params are loaded sharded."""
    from dynamax_jax.api import load_pretrained, load_tokenizer
    from dynamax_jax.io import fingerprint
    from dynamax_jax.train import data as D

    path = resolve_model(args.model)
    config, params = load_pretrained(path, dtype=parse_dtype(args.dtype), mesh=mesh)
    tokenizer = load_tokenizer(path)
    encode, eos_id = D.encoder_from_tokenizer(tokenizer)
    return Backbone(path, config, params, tokenizer, encode, eos_id, fingerprint(path, exclude=exclude))


def cache_identity(args, backbone: Backbone, exit_layers: Sequence[int]) -> dict:
    """What a cache is computed from, as ``meta.json`` records it: the model's and each data
    source's content (``io.fingerprint``: whole files up to 64 MiB, larger ones by size,
    modification time and sampled bytes) and every setting that changes its rows. Paths are
    kept for the reader; reuse compares contents (``identity_changes``)."""
    from dynamax_jax.io import fingerprint

    return {"model": str(Path(backbone.path).resolve()), "model_fingerprint": backbone.fingerprint,
            "dtype": args.dtype, "seed": args.seed, "text_field": args.text_field, "batch_size": args.batch_size,
            "data": [dataclasses.asdict(s) | {"fingerprint": fingerprint(s.path)} for s in args.data],
            "exit_layers": list(exit_layers), "seq_len": args.seq_len, "topk": args.topk,
            "cache_dtype": args.cache_dtype}


def identity_changes(meta: dict, identity: dict) -> list[str]:
    """What differs between a cache's ``meta`` and the ``identity`` of this run, in words
    (empty: the cache can be reused). Paths alone may differ: a moved file is the same."""
    changes = []
    if meta.get("model_fingerprint") != identity["model_fingerprint"]:
        changes.append(f"the model's files (cache: {meta.get('model')}, fingerprint "
                       f"{str(meta.get('model_fingerprint'))[:12]}; now: {identity['model']}, "
                       f"{identity['model_fingerprint'][:12]})")
    old_data, new_data = meta.get("data") or [], identity["data"]
    if [d.get("fingerprint") for d in old_data] != [d["fingerprint"] for d in new_data]:
        changed = [d["path"] for i, d in enumerate(new_data)
                   if i >= len(old_data) or old_data[i].get("fingerprint") != d["fingerprint"]]
        changes.append("the data's content (" + (", ".join(changed) if changed else "fewer sources") + ")")
    if [d.get("tokens") for d in old_data] != [d["tokens"] for d in new_data]:
        changes.append(f"the data's token quotas ({[d.get('tokens') for d in old_data]} -> "
                       f"{[d['tokens'] for d in new_data]})")
    for key in identity:
        if key not in ("model", "model_fingerprint", "data") and meta.get(key) != identity[key]:
            changes.append(f"{key}: {meta.get(key)!r} -> {identity[key]!r}")
    return changes


def open_or_build_cache(args, backbone: Backbone, exit_config: ex.ExitConfig, cache_dir: Path) -> Cache:
    """Stage 1: reuse the cache in ``cache_dir`` when it was computed from the same model, data
    and settings, refuse one computed from others (naming what changed) unless
    ``--rebuild-cache``, build it when absent."""
    identity = cache_identity(args, backbone, exit_config.layers)
    if (cache_dir / "meta.json").is_file() and not args.rebuild_cache:
        changes = identity_changes(read_meta(cache_dir / "meta.json"), identity)
        if changes:
            raise DistillError(f"{cache_dir} holds a cache of other inputs or settings: {'; '.join(changes)}. "
                               "Pass --rebuild-cache to compute it again, or use another --out / --cache")
        if is_main_process():
            print(f"train.cached: reusing {cache_dir}", file=sys.stderr)
    else:
        main = is_main_process()  # on a multi-host run process 0 writes the cache; the others read it back
        build_cache(backbone.config, backbone.params, args.data, encode=backbone.encode, eos_id=backbone.eos_id,
                    exit_layers=exit_config.layers, topk=args.topk, seq_len=args.seq_len,
                    batch_size=args.batch_size, seed=args.seed, dtype=np.dtype(args.cache_dtype), out=cache_dir,
                    progress=args.progress and main, identity=identity, write=main)
        barrier("train.cached: cache written")
    return Cache.open(cache_dir)


def split_rows(mask: np.ndarray, label_percent: float, val_percent: float, seed: int) -> RowSplit:
    """The classifiers use a seeded share of the rows (``--label-percent``; rows are stored
    source by source, so the share is drawn at random) that hold training positions, of which
    ``--val-percent`` is held out."""
    candidates = np.flatnonzero(mask.any(axis=1))
    order = np.random.default_rng(seed).permutation(candidates)
    used = order[:max(1, int(round(len(candidates) * label_percent / 100)))]
    held = int(round(len(used) * val_percent / 100))
    labelled = np.sort(used)
    positions = np.searchsorted(labelled, used)
    return RowSplit(labelled, np.sort(positions[held:]), np.sort(positions[:held]))


def _mask_tag(mask: np.ndarray) -> str:
    """A file-name tag of the training mask (empty when every position counts), so that
    derived files of another ``--train-on`` / ``--reply-marker`` are not mistaken for these."""
    import hashlib
    return "" if mask.all() else "-mask" + hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()[:10]


def cached_labels(args, backbone: Backbone, exit_config: ex.ExitConfig, adapters: dict, cache: Cache,
                  cache_dir: Path, split: RowSplit, mask: np.ndarray) -> np.ndarray:
    """Stage 3: labels ``[len(split.labelled), E, T]``, kept in the cache directory per
    (adapter, ridge, rows, seed, mask) so that reruns skip them."""
    labels_file = cache_dir / (f"labels-{args.adapter}" + (f"-ridge{args.ridge:g}" if adapters else "")
                               + f"-rows{len(split.labelled)}-seed{args.seed}{_mask_tag(mask)}.npy")
    expected = (len(split.labelled),) + cache.hidden.shape[1:3]
    if labels_file.is_file():
        labels = load_array(labels_file)
        if labels.shape != expected:
            raise DataError(f"{labels_file} has shape {labels.shape}, expected {expected}; {REBUILD_HINT}")
        return labels
    labels = cache_labels(backbone.config, backbone.params, exit_config, adapters, cache, args.batch_size,
                          split.labelled, mask[split.labelled], args.progress and is_main_process())
    if is_main_process():
        with atomic_file(labels_file) as tmp:
            np.save(tmp, labels)
    return labels


def fill_shift_means(args, backbone: Backbone, cache: Cache, cache_dir: Path, split: RowSplit, labels: np.ndarray,
                     mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Stage 4, the fill shift of mode ``shift``: layer means over a seeded share of the
    training rows, over all their training positions and over those where each exit's token
    is right (the tokens a classifier lets leave there); kept in the cache directory. Returns
    ``(means [E, L, D] or [L, D], rows used)``."""
    fill_rows = np.sort(np.random.default_rng(args.seed + 1).permutation(split.labelled[split.train])[:args.fill_rows])
    means_file = cache_dir / f"layer-means-rows{len(fill_rows)}-seed{args.seed}{_mask_tag(mask)}.npz"
    if means_file.is_file():
        try:
            with np.load(means_file, allow_pickle=False) as f:
                means, totals = f["means"], f["totals"]
        except (ValueError, OSError, EOFError, KeyError) as err:
            raise DataError(f"{means_file}: not a readable layer-means file ({err}); {REBUILD_HINT}") from None
    else:
        fill_labels = labels[np.searchsorted(split.labelled, fill_rows)]  # [R, E, T], False outside the mask
        weights = np.concatenate([mask[fill_rows][:, None], fill_labels], axis=1)  # [R, 1 + E, T]
        means, totals = layer_means(backbone.config, backbone.params, cache.tokens[fill_rows], weights,
                                    args.batch_size, args.progress and is_main_process())
        if is_main_process():
            with atomic_file(means_file) as tmp:
                np.savez(tmp, means=means, totals=totals)
    if totals[0] == 0:
        raise DistillError("no training position in the --fill-rows rows to measure the layers' average output on")
    # exits that are never right (no positive label) fall back to the mean over every position
    if args.fill_from == "all":
        return means[0], len(fill_rows)
    return np.where((totals[1:] > 0)[:, None, None], means[1:], means[:1]), len(fill_rows)


def train_kinds(args, kinds, settings: DistillSettings, backbone: Backbone, exit_config: ex.ExitConfig,
                data: Labelled, split: RowSplit, heads_extra: dict, fill_means) -> dict:
    """Stage 5: train, score and save each classifier kind (``exits-<kind>/``, recording the
    model they were trained on); returns the summary's ``kinds``."""
    out, results = Path(args.out), {}
    trained_on = ex.TrainedOn.of(backbone.config, backbone.fingerprint)
    for kind in kinds:
        ec = dataclasses.replace(exit_config, kind=kind, trained_on=trained_on)
        params, metrics, seconds, seen = train_classifier(backbone.config, ec, dataclasses.replace(
            settings, exit_kind=kind), data, split.train, args.epochs, args.progress and is_main_process())
        scores = heldout_scores(backbone.config, ec, params, data, split.val, (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99),
                                args.batch_size) if len(split.val) else []
        results[kind] = {"train_seconds": seconds, "final_loss": float(metrics["loss"]), "tokens_seen": seen,
                         "heldout": scores}
        if is_main_process():
            heads = ex.with_fill_shift(backbone.config, ec, {**params, **heads_extra}, fill_means)
            ex.save_exits(ec, heads, out / f"exits-{kind}", overwrite=args.overwrite)
            print(f"train.cached: {kind}: loss {float(metrics['loss']):.4f}, {seconds:.0f} s", file=sys.stderr)
    return results


def training_marker(args, backbone: Backbone):
    """The token ids that open a reply (``--reply-marker``, a typed '\\n' read as a newline,
    else the chat template's generation prompt); None when there is none."""
    if not args.reply_marker:
        return reply_marker(backbone.tokenizer)
    marker = backbone.encode(args.reply_marker.replace("\\n", "\n").replace("\\t", "\t"))
    if args.train_on == "replies" and not marker:
        raise DistillError(f"--reply-marker {args.reply_marker!r} encodes to no tokens")
    return marker


def run(args, kinds: list[str], settings: DistillSettings, cache_dir: Path, mesh=None) -> dict:
    """The stages in order, on a checked ``args``; returns the summary (written by process 0).
    ``mesh``: the backbone's (``--mesh``)."""
    out = Path(args.out)
    backbone = load_backbone(args, exclude=(out, cache_dir), mesh=mesh)
    exit_config = dataclasses.replace(settings.exit_config().resolve(backbone.config), adapter=args.adapter,
                                      threshold=args.threshold)
    cache = open_or_build_cache(args, backbone, exit_config, cache_dir)
    marker = training_marker(args, backbone)
    mask = training_mask(cache, marker, backbone.eos_id, args.train_on)
    summary: dict[str, Any] = {"cache": cache.meta, "seed": args.seed, "adapter": args.adapter,
                               "train_on": args.train_on, "reply_marker": marker, "kinds": {}}
    # alignment check: where the next input token is the model's own greedy answer, the
    # cached final top-1 predicts it
    nxt = cache.tokens[:, 1:] == np.asarray(cache.topk[:, :-1, 0])
    summary["top1_is_next_token"] = float(nxt[mask[:, :-1]].mean()) if mask[:, :-1].any() else None
    started = time.time()
    adapters = fit_affine_adapters(cache.gram, cache.cross, args.ridge) if args.adapter == "affine" else {}
    summary["adapter_seconds"], started = time.time() - started, time.time()
    split = split_rows(mask, args.label_percent, args.val_percent, args.seed)
    labels = cached_labels(args, backbone, exit_config, adapters, cache, cache_dir, split, mask)
    summary["label_seconds"] = time.time() - started
    summary["labelled_rows"] = len(split.labelled)
    data = Labelled(cache, split.labelled, labels, mask[split.labelled])
    summary["labelled_tokens"] = int(data.mask.sum())
    counted = data.mask.sum()
    summary["label_rate"] = {int(l): float(labels[:, i][data.mask].sum() / max(counted, 1))
                             for i, l in enumerate(exit_config.layers)}
    started = time.time()
    fill_means, summary["layer_means_rows"] = fill_shift_means(args, backbone, cache, cache_dir, split, labels, mask)
    summary["layer_means_seconds"] = time.time() - started
    summary["fill_from"] = args.fill_from
    if is_main_process():
        print(f"train.cached: {summary['labelled_tokens']} labelled tokens in {len(split.labelled)} rows; label rate "
              "per exit " + ", ".join(f"{l}: {r:.3f}" for l, r in summary["label_rate"].items()), file=sys.stderr,
              flush=True)
    summary["kinds"] = train_kinds(args, kinds, settings, backbone, exit_config, data, split, adapters, fill_means)
    if is_main_process():
        write_json_atomic(out / "summary.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    import contextlib
    from dynamax_jax.io import output_lock

    parser = build_parser()
    args = parser.parse_args(argv)
    kinds, settings = check_args(args)
    mesh = setup_mesh(parser, args, PROG, batch_size=args.batch_size)
    out = Path(args.out)
    cache_dir = Path(args.cache) if args.cache else out / "cache"
    # one writer at a time on the run directory and on the cache (which other runs may share);
    # on a multi-host run that writer is process 0
    main_process = is_main_process()
    shared_cache = args.cache is not None and cache_dir.resolve() != out.resolve()
    with (output_lock(out, command=PROG) if main_process else contextlib.nullcontext()), \
            (output_lock(cache_dir, command=PROG) if shared_cache and main_process else contextlib.nullcontext()):
        summary = run(args, kinds, settings, cache_dir, mesh)
    if main_process:
        print(json.dumps({"out": str(out), "label_rate": summary["label_rate"],
                          "kinds": {k: v["final_loss"] for k, v in summary["kinds"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
