"""Pretrain a small Mamba2 or Mistral from scratch on a local English corpus.

    python -m train.pretrain --arch mamba2 --layers 8 --d-model 256 --steps 2000 \\
        --batch-size 16 --seq-len 256 --lr 2e-3 --out runs/mamba2-small --seed 0

The corpus (``train/corpus.py``) is the English prose shipped with the Python standard
library, optionally plus local ``.txt``/``.jsonl`` files. A byte-level BPE tokenizer is
trained on the training split, documents are joined with an end-of-text token and the
token stream is packed into fixed-length sequences. Training uses AdamW with linear
warm-up, cosine decay and global-norm clipping in one jit-compiled step; with
``--exit-layers`` / ``--layer-dropout`` the loss is early-exit-aware (``ExitObjective``:
exit cross-entropies through the shared head, layer dropout). ``--out`` gets,
atomically, a Hugging Face checkpoint (``config.json``, ``model.safetensors``) that
``dx.load_pretrained`` reads, the tokenizer (``tokenizer.json``, ``tokenizer_config.json``),
``train_token_counts.json`` (unigram counts of the training tokens) and
``pretrain_results.json`` (training time, tokens seen, held-out loss and perplexity next
to an add-one smoothed unigram baseline, and the held-out loss at every layer).

Shape legend: B batch, T sequence length, V vocabulary, N tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dynamax_jax.io import atomic_directory, parse_dtype
from dynamax_jax.train import optim

EOT_TOKEN = "<|endoftext|>"
ARCHS = ("mamba2", "mistral")
SAVE_DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries (fewer when the
    corpus runs out of merges); id 0 is the end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """``tokenizer.json`` plus a ``tokenizer_config.json`` that makes
    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` return a fast tokenizer. No
    ``model_max_length``: the training length is no limit for a recurrent model."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN,
              "pad_token": EOT_TOKEN, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_documents(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Token stream ``[N] int32``: every document followed by the end-of-text token."""
    eot = tokenizer.token_to_id(EOT_TOKEN)
    pieces = []
    for encoding in tokenizer.encode_batch(list(texts)):
        pieces.append(np.asarray(encoding.ids, np.int32))
        pieces.append(np.asarray([eot], np.int32))
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


# ----------------------------------------------------------------------------- data

def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows ``[num, T + 1]`` with stride ``T``: window ``i`` predicts
    tokens ``i*T + 1 .. (i+1)*T`` so that every token after the first is a target once."""
    num = (len(stream) - 1) // seq_len
    if num <= 0:
        raise ValueError(f"token stream of {len(stream)} tokens is too short for --seq-len {seq_len}")
    index = np.arange(num)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[index]


def pack_for_eval(stream: np.ndarray, seq_len: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All of ``stream`` as windows ``[num, T + 1]`` plus target weights ``[num, T]``: the
    last window is padded (weight 0) and ``num`` is a multiple of ``batch_size``, so one
    compiled shape scores every target token exactly once."""
    targets = len(stream) - 1
    num = max(1, -(-targets // seq_len))
    num = -(-num // batch_size) * batch_size
    padded = np.zeros(num * seq_len + 1, np.int32)
    padded[:len(stream)] = stream
    weights = np.zeros(num * seq_len, np.float32)
    weights[:targets] = 1.0
    index = np.arange(num)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return padded[index], weights.reshape(num, seq_len)


def batches(windows: np.ndarray, batch_size: int, seed: int):
    """Endless batches ``[B, T + 1]``: a fresh permutation of the windows every epoch."""
    rng = np.random.default_rng(seed)
    if len(windows) < batch_size:
        raise ValueError(f"only {len(windows)} training windows for --batch-size {batch_size}; "
                         "lower --batch-size or --seq-len")
    while True:
        order = rng.permutation(len(windows))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield windows[order[start:start + batch_size]]


def unigram_counts(stream: np.ndarray, vocab_size: int) -> np.ndarray:
    return np.bincount(stream, minlength=vocab_size).astype(np.int64)


def unigram_cross_entropy(train_counts: np.ndarray, targets: np.ndarray) -> float:
    """Cross-entropy (nats/token) on ``targets`` of an add-one smoothed unigram model fit on
    ``train_counts [V]``: ``p(v) = (c_v + 1) / (N + V)``."""
    counts = np.asarray(train_counts, np.float64)
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + len(counts))
    return float(-log_p[np.asarray(targets)].mean())


# ----------------------------------------------------------------------------- model

def model_config(args: argparse.Namespace, vocab_size: int, eot_id: int):
    """The backbone config the flags describe."""
    from dynamax_jax.config import Mamba2Config, MistralConfig

    if args.arch == "mamba2":
        return Mamba2Config(
            vocab_size=vocab_size, hidden_size=args.d_model, num_layers=args.layers,
            state_size=args.state_size, expand=args.expand, head_dim=args.head_dim, n_groups=1,
            conv_kernel=4, chunk_size=min(args.chunk_size, args.seq_len),
            tie_word_embeddings=args.tie_embeddings, bos_token_id=eot_id, eos_token_id=eot_id)
    return MistralConfig(
        vocab_size=vocab_size, hidden_size=args.d_model, intermediate_size=args.mlp_ratio * args.d_model,
        num_layers=args.layers, num_heads=args.d_model // args.head_dim,
        num_kv_heads=args.kv_heads or args.d_model // args.head_dim, head_dim=args.head_dim,
        sliding_window=None, tie_word_embeddings=args.tie_embeddings,
        max_position_embeddings=max(args.seq_len, 2048), model_type="mistral",
        bos_token_id=eot_id, eos_token_id=eot_id)


def count_params(params) -> int:
    import jax
    return int(sum(leaf.size for leaf in jax.tree.leaves(params)))


def decay_mask(params):
    """Weight decay on matrices only: leaves under ``layers`` carry a stacked ``[L]`` axis, so
    a per-layer matrix has ndim >= 3 there; norms, biases, ``A_log``, ``D`` are not decayed."""
    import jax
    return {name: jax.tree.map(lambda leaf: leaf.ndim >= (3 if name == "layers" else 2), sub)
            for name, sub in params.items()}


def make_optimizer(args: argparse.Namespace, params):
    """``train.optim.adamw`` (b2 0.95) with warm-up and cosine decay to ``--min-lr-ratio``;
    returns the optimizer and its schedule."""
    schedule = optim.warmup_cosine(args.lr, args.warmup_steps, args.steps, end_ratio=args.min_lr_ratio)
    optimizer = optim.adamw(schedule, weight_decay=args.weight_decay, clip_norm=args.clip_norm,
                            decay_mask=decay_mask(params), b2=0.95)
    return optimizer, schedule


@dataclasses.dataclass(frozen=True)
class ExitObjective:
    """Early-exit-aware pretraining (LayerSkip, Elhoushi et al., 2024): next-token
    cross-entropy at each exit layer ``l_e`` (its hidden state through the shared final norm
    and LM head) added to the last layer's, ``loss = CE_L + exit_weight * sum_e w_e CE_e``, and
    layer dropout: layer ``l`` of ``L`` is an identity for a whole row with probability
    ``p_max * min(1, step / warmup) * (l - 1) / (L - 1)`` (``train.ee_objective``)."""

    exit_layers: tuple[int, ...] = ()
    exit_weights: tuple[float, ...] = ()
    exit_weight: float = 1.0
    drop_max: float = 0.0
    drop_warmup: int = 0
    seed: int = 0

    @property
    def plain(self) -> bool:
        return not self.exit_layers and self.drop_max <= 0

    def keep(self, num_layers: int, step, batch: int):
        """The layer-dropout mask ``[B, L]`` of ``step`` (``None`` without dropout)."""
        from dynamax_jax.train import ee_objective as O

        return O.dropout_keep(self, num_layers, step, batch)


def layer_cross_entropies(config, params, hidden, targets, layers: Sequence[int]):
    """Next-token cross-entropy ``[len(layers), B, T]`` of the prediction at each 1-based layer
    of ``hidden [L, B, T, D]`` (its state through the shared final norm and LM head)."""
    import jax.numpy as jnp
    import optax
    from dynamax_jax.models import module_for

    head = module_for(config).head
    return jnp.stack([optax.softmax_cross_entropy_with_integer_labels(head(config, params, hidden[l - 1]), targets)
                      for l in layers])


def training_loss(config, objective: ExitObjective, params, windows, step):
    """``(loss, the last layer's mean cross-entropy)`` of ``params`` on ``windows [B, T+1]``
    at optimizer step ``step`` (it draws the layer-dropout mask). Plain: the two are equal."""
    import jax.numpy as jnp
    import optax
    from dynamax_jax.models import module_for
    from dynamax_jax.train import ee_objective as O

    inputs, targets = windows[:, :-1], windows[:, 1:]
    if objective.plain:
        logits = module_for(config).forward(config, params, inputs)  # [B, T, V] float32
        final = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
        return final, final
    hidden = O.layer_stack(config, params, inputs, objective.keep(config.num_layers, step, windows.shape[0]))
    ce = jnp.mean(layer_cross_entropies(config, params, hidden, targets,
                                        (config.num_layers, *objective.exit_layers)), axis=(1, 2))
    return ce[0] + objective.exit_weight * jnp.sum(jnp.asarray(objective.exit_weights) * ce[1:]), ce[0]


def make_steps(config, optimizer, objective: ExitObjective = ExitObjective()):
    """``train_step(params, opt_state, windows [B, T+1], step) -> (params, opt_state, loss)``
    (``loss``: the last layer's mean cross-entropy) and ``eval_step(params, windows [B, T+1],
    weights [B, T]) -> summed loss [L]`` at every layer (the last one is the model's), both
    jit-compiled. An ``objective`` that is not plain adds its exit losses and layer dropout
    to training (``training_loss``)."""
    import jax
    import jax.numpy as jnp
    import optax
    from dynamax_jax.models import module_for

    model = module_for(config)
    every_layer = tuple(range(1, config.num_layers + 1))
    loss_fn = functools.partial(training_loss, config, objective)

    @jax.jit
    def train_step(params, opt_state, windows, step):
        (_, final), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, windows, step)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, final

    @jax.jit
    def eval_step(params, windows, weights):
        _, hidden = model.forward(config, params, windows[:, :-1], return_hidden=True)
        ce = layer_cross_entropies(config, params, hidden, windows[:, 1:], every_layer)
        return jnp.sum(ce * weights, axis=(1, 2))

    return train_step, eval_step


def heldout_losses(eval_step, params, windows: np.ndarray, weights: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean cross-entropy (nats/token) over every weighted target token at each layer ``[L]``
    (the last entry is the model's own loss)."""
    total = 0.0
    for start in range(0, len(windows), batch_size):
        total = total + np.asarray(eval_step(params, windows[start:start + batch_size],
                                             weights[start:start + batch_size]), np.float64)
    return total / float(weights.sum())


# ----------------------------------------------------------------------------- output

def write_output(out: Path, config, params, tokenizer, train_counts: np.ndarray, results: dict,
                 save_dtype: str, overwrite: bool) -> None:
    """Write everything into ``out`` atomically (``dynamax_jax.io.atomic_directory``):
    ``out`` is either absent, the old run or the complete new run. ``overwrite`` replaces
    a run's files in an existing ``out`` and keeps any other file there."""
    import jax
    import dynamax_jax as dx
    from dynamax_jax.convert.checkpoint import HF_FILES

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    owned = HF_FILES + ("tokenizer.json", "tokenizer_config.json", "train_token_counts.json", "pretrain_results.json")
    with atomic_directory(out, owned=owned, overwrite=True) as tmp:
        dtype = parse_dtype(save_dtype)
        dx.save_pretrained(config, jax.tree.map(lambda a: a.astype(dtype), params), tmp)
        save_tokenizer(tokenizer, tmp)
        (tmp / "train_token_counts.json").write_text(json.dumps(train_counts.tolist()) + "\n")
        (tmp / "pretrain_results.json").write_text(json.dumps(results, indent=2) + "\n")


# ----------------------------------------------------------------------------- command line

def _checked(cast, what: str, ok):
    """An argparse type: ``cast(text)``, refused with "expected ``what``" unless ``ok``."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


_positive_int = _checked(int, "a positive integer", lambda v: v > 0)
_nonnegative_int = _checked(int, "a non-negative integer", lambda v: v >= 0)
_positive_float = _checked(float, "a positive number", lambda v: v > 0 and math.isfinite(v))


def _layer_list(text: str) -> tuple[int, ...]:
    """``"2,3,4"`` -> ``(2, 3, 4)``: distinct positive layers in increasing order."""
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None
    if any(l <= 0 for l in layers) or list(layers) != sorted(set(layers)):
        raise argparse.ArgumentTypeError(f"expected distinct positive layers in increasing order, got {text!r}")
    return layers


def exit_objective(args: argparse.Namespace, num_layers: int) -> ExitObjective:
    """The ``ExitObjective`` the flags describe (flags checked by ``validate``)."""
    from dynamax_jax.train import ee_objective as O

    layers = tuple(args.exit_layers or ())
    weights = O.exit_weight_vector(args.exit_weights, layers) if layers else ()
    return ExitObjective(layers, weights, args.exit_weight, args.layer_dropout,
                         args.dropout_warmup, args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.pretrain", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--arch", choices=ARCHS, default="mamba2", help="backbone architecture")
    model.add_argument("--layers", type=_positive_int, default=8, help="number of decoder layers")
    model.add_argument("--d-model", type=_positive_int, default=256, help="hidden size")
    model.add_argument("--head-dim", type=_positive_int, default=64,
                       help="Mamba2 SSM head dim / Mistral attention head dim (must divide "
                            "expand*d-model for mamba2, d-model for mistral)")
    model.add_argument("--state-size", type=_positive_int, default=64, help="Mamba2 SSM state size")
    model.add_argument("--expand", type=_positive_int, default=2, help="Mamba2 d_inner = expand * d-model")
    model.add_argument("--chunk-size", type=_positive_int, default=64,
                       help="Mamba2 SSD chunk length (capped at --seq-len)")
    model.add_argument("--mlp-ratio", type=_positive_int, default=4, help="Mistral MLP width / d-model")
    model.add_argument("--kv-heads", type=_nonnegative_int, default=0,
                       help="Mistral key/value heads (0: as many as query heads)")
    model.add_argument("--tie-embeddings", action="store_true", help="share embedding and LM head")
    model.add_argument("--vocab-size", type=_positive_int, default=4096,
                       help="BPE vocabulary size, end-of-text token included (>= 258)")

    data = parser.add_argument_group("data")
    data.add_argument("--corpus-files", nargs="*", default=[],
                      help="local .txt / .jsonl files added to the corpus")
    data.add_argument("--no-stdlib", action="store_true",
                      help="train only on --corpus-files, not the standard-library corpus")
    data.add_argument("--heldout-percent", type=_positive_float, default=5.0,
                      help="share of corpus units (modules, files) held out for evaluation")
    data.add_argument("--max-heldout-tokens", type=_positive_int, default=65536,
                      help="cap on held-out tokens scored by the final evaluation")
    data.add_argument("--eval-tokens", type=_positive_int, default=8192,
                      help="held-out tokens scored by each periodic evaluation (the first ones)")

    early = parser.add_argument_group("early-exit-aware training (LayerSkip; all off: plain pretraining)")
    early.add_argument("--exit-layers", type=_layer_list, default=None,
                       help="comma-separated 1-based layers whose hidden state, through the shared final norm "
                            "and LM head, gets a next-token cross-entropy term (e.g. 2,3,4,5,6,7; none: no exit "
                            "losses)")
    early.add_argument("--exit-weight", type=float, default=1.0,
                       help="weight of the exits' cross-entropy next to the last layer's (weight 1)")
    early.add_argument("--exit-weights", default="position",
                       help="position | uniform | a comma list: how the exits share --exit-weight "
                            "(position: l / sum l, rising with depth)")
    early.add_argument("--layer-dropout", type=float, default=0.0,
                       help="p_max: layer l of L is an identity for a whole row with probability "
                            "p_max (l-1)/(L-1) (0: off)")
    early.add_argument("--dropout-warmup", type=_nonnegative_int, default=0,
                       help="steps over which p_max ramps up linearly from 0 (0: from the start)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=_positive_int, default=2000, help="optimizer steps")
    optim.add_argument("--batch-size", type=_positive_int, default=16, help="sequences per step")
    optim.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per sequence")
    optim.add_argument("--lr", type=_positive_float, default=2e-3, help="peak learning rate")
    optim.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    optim.add_argument("--warmup-steps", type=_nonnegative_int, default=100, help="linear warm-up steps")
    optim.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay")
    optim.add_argument("--clip-norm", type=_positive_float, default=1.0, help="global gradient-norm clip")
    optim.add_argument("--seed", type=int, default=0, help="seed for init and batch order")
    optim.add_argument("--max-train-minutes", type=_positive_float, default=None,
                       help="stop early (and record it) when training takes longer than this")

    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="output directory (written atomically)")
    output.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    output.add_argument("--save-dtype", choices=SAVE_DTYPES, default="float32",
                        help="dtype of the saved weights (training is float32)")
    output.add_argument("--eval-every", type=_nonnegative_int, default=250,
                        help="held-out evaluation period in steps (0: only at the end)")
    output.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-flag checks, reported through ``parser.error`` (exit status 2)."""
    if args.vocab_size < 258:
        parser.error(f"--vocab-size must be at least 258 (256 bytes + end-of-text + 1 merge), got {args.vocab_size}")
    if args.no_stdlib and not args.corpus_files:
        parser.error("--no-stdlib needs --corpus-files")
    if args.heldout_percent >= 100:
        parser.error(f"--heldout-percent must be below 100, got {args.heldout_percent}")
    if not 0 <= args.min_lr_ratio <= 1:
        parser.error(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.weight_decay < 0:
        parser.error(f"--weight-decay must be non-negative, got {args.weight_decay}")
    if args.arch == "mamba2" and (args.expand * args.d_model) % args.head_dim:
        parser.error(f"--arch mamba2: --head-dim {args.head_dim} must divide expand*d-model "
                     f"= {args.expand * args.d_model}")
    if args.arch == "mistral":
        if args.d_model % args.head_dim:
            parser.error(f"--arch mistral: --head-dim {args.head_dim} must divide --d-model {args.d_model}")
        if args.head_dim % 2:
            parser.error(f"--arch mistral: --head-dim must be even for RoPE, got {args.head_dim}")
        heads = args.d_model // args.head_dim
        if args.kv_heads and heads % args.kv_heads:
            parser.error(f"--arch mistral: --kv-heads {args.kv_heads} must divide the {heads} query heads")
    if args.exit_layers and args.exit_layers[-1] >= args.layers:
        parser.error(f"--exit-layers must lie below the last layer ({args.layers}), got "
                     f"{','.join(map(str, args.exit_layers))}")
    if not 0 <= args.layer_dropout < 1:
        parser.error(f"--layer-dropout must be in [0, 1), got {args.layer_dropout}")
    if args.exit_weight < 0 or not math.isfinite(args.exit_weight):
        parser.error(f"--exit-weight must be a non-negative number, got {args.exit_weight}")
    if args.exit_layers:
        try:
            exit_objective(args, args.layers)
        except ValueError as error:
            parser.error(f"--exit-weights: {error}")
    for path in args.corpus_files:
        if not Path(path).is_file():
            parser.error(f"--corpus-files: {path!r} does not exist")
        if Path(path).suffix not in (".txt", ".jsonl"):
            parser.error(f"--corpus-files: {path!r} is not a .txt or .jsonl file")
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out!r} exists; pass --overwrite to replace it")


def train_loop(args, params, opt_state, train_step, eval_step, schedule, windows, eval_windows, eval_weights,
               unigram: float):
    """Up to ``--steps`` optimizer steps (fewer past ``--max-train-minutes``) with periodic
    held-out scores; returns ``(params, opt_state, last train loss, steps done, history,
    start time)``."""
    from tqdm import tqdm

    # Periodic evaluations score a prefix of the held-out windows; the final one scores all.
    periodic = min(len(eval_windows), -(-args.eval_tokens // args.seq_len // args.batch_size) * args.batch_size)
    history = []
    data = batches(windows, args.batch_size, args.seed)
    steps_done = 0
    train_started = time.time()
    bar = tqdm(range(1, args.steps + 1), disable=args.no_progress, desc=f"pretrain {args.arch}",
               dynamic_ncols=True, file=sys.stdout)
    loss = float("nan")
    for step in bar:
        params, opt_state, loss_array = train_step(params, opt_state, next(data), step)
        evaluate = args.eval_every and step % args.eval_every == 0 and step != args.steps
        # Reading the loss waits for the step; every 10th is enough for the progress bar.
        if step % 10 == 0 or step == args.steps or evaluate:
            loss = float(loss_array)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {step}; lower --lr")
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{float(schedule(step)):.2e}")
        steps_done = step
        if evaluate:
            value = float(heldout_losses(eval_step, params, eval_windows[:periodic], eval_weights[:periodic],
                                         args.batch_size)[-1])
            history.append({"step": step, "train_loss": loss, "heldout_loss": value,
                            "seconds": time.time() - train_started})
            bar.write(f"step {step}: train loss {loss:.4f}, held-out loss {value:.4f} on the first "
                      f"{int(eval_weights[:periodic].sum())} tokens (unigram on all: {unigram:.4f})")
        if args.max_train_minutes and time.time() - train_started > 60 * args.max_train_minutes:
            loss = float(loss_array)
            bar.write(f"stopping at step {step}: over --max-train-minutes {args.max_train_minutes}")
            break
    bar.close()
    return params, opt_state, loss, steps_done, history, train_started


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)

    import jax
    from dynamax_jax.train.corpus import build_corpus

    started = time.time()
    corpus = build_corpus(args.corpus_files, not args.no_stdlib, args.heldout_percent)
    tokenizer = train_tokenizer(corpus.train, args.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    train_stream = encode_documents(tokenizer, corpus.train)
    heldout_stream = encode_documents(tokenizer, corpus.heldout)[:args.max_heldout_tokens + 1]
    windows = pack(train_stream, args.seq_len)
    eval_windows, eval_weights = pack_for_eval(heldout_stream, args.seq_len, args.batch_size)
    train_counts = unigram_counts(train_stream, vocab_size)
    unigram = unigram_cross_entropy(train_counts, heldout_stream[1:])
    print(json.dumps({**corpus.sizes(), "vocab_size": vocab_size, "train_tokens": len(train_stream),
                      "heldout_tokens": len(heldout_stream), "train_windows": len(windows),
                      "unigram_heldout_loss": round(unigram, 4)}), flush=True)
    data_seconds = time.time() - started

    config = model_config(args, vocab_size, eot_id)
    import dynamax_jax as dx
    # One compiled init instead of hundreds of small eager ops (minutes on a busy CPU).
    params = jax.jit(functools.partial(dx.init_params, config))(jax.random.key(args.seed))
    optimizer, schedule = make_optimizer(args, params)
    opt_state = jax.jit(optimizer.init)(params)
    objective = exit_objective(args, config.num_layers)
    train_step, eval_step = make_steps(config, optimizer, objective)
    print(f"{args.arch}: {count_params(params):,} parameters", flush=True)

    params, opt_state, loss, steps_done, history, train_started = train_loop(
        args, params, opt_state, train_step, eval_step, schedule, windows, eval_windows, eval_weights, unigram)
    jax.block_until_ready(params)
    train_seconds = time.time() - train_started
    # Score the weights as they are saved (rounded to --save-dtype), i.e. what a user loads.
    save_dtype = parse_dtype(args.save_dtype)
    params = jax.tree.map(lambda a: a.astype(save_dtype).astype(a.dtype), params)
    per_layer = heldout_losses(eval_step, params, eval_windows, eval_weights, args.batch_size)
    final = float(per_layer[-1])
    history.append({"step": steps_done, "train_loss": loss, "heldout_loss": final,
                    "seconds": train_seconds})

    results = {
        "arch": args.arch, "parameters": count_params(params), "vocab_size": vocab_size,
        "steps": steps_done, "stopped_early": steps_done < args.steps,
        "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens_seen": steps_done * args.batch_size * args.seq_len,
        "train_tokens": int(len(train_stream)), "heldout_tokens_scored": int(eval_weights.sum()),
        "train_seconds": round(train_seconds, 1), "data_seconds": round(data_seconds, 1),
        "heldout_loss": final, "heldout_perplexity": math.exp(final), "save_dtype": args.save_dtype,
        "heldout_loss_by_layer": [float(v) for v in per_layer], "exit_objective": dataclasses.asdict(objective),
        "unigram_heldout_loss": unigram, "unigram_heldout_perplexity": math.exp(unigram),
        "final_train_loss": loss, "history": history, "corpus": corpus.sizes(),
        "args": {k: v for k, v in vars(args).items() if k not in ("no_progress", "overwrite")},
        "python": sys.version.split()[0], "jax": jax.__version__,
    }
    write_output(Path(args.out), config, params, tokenizer, train_counts, results,
                 args.save_dtype, args.overwrite)
    print(f"held-out loss {final:.4f} (perplexity {math.exp(final):.1f}) vs unigram {unigram:.4f} "
          f"(perplexity {math.exp(unigram):.1f}); {train_seconds:.0f} s training; wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
