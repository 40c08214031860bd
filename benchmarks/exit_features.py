"""How much could a better exit classifier let leave? Offline, on a ``train.cached`` cache.

    python benchmarks/exit_features.py --cache runs/smollm2-cached/cache \\
        --labels runs/smollm2-cached/cache/labels-affine-ridge0.001-rows2424-seed0-replies.npy \\
        --exits 24,26 --features base,wide,depth2,depth4,previous

For each exit and each input set, a one-hidden-layer GELU classifier (the ``ffn`` kind's
shape) is trained on the cached hidden states of the labelled positions (the cache's
``--train-on`` mask: reply tokens and prose) with Adam and a cosine schedule, and scored on
``--holdout`` of the rows, drawn with the seed. Printed: the label rate (the share of held-out
tokens whose exit prediction is the final top-1, the recall a perfect classifier reaches) and
the *recall at precision p*: the largest share of held-out tokens that the classifier's
highest scores can let leave while the share of them that are right stays >= p, for p =
0.98, 0.99, 0.995 (consistency with full depth needs about 0.99, docs/results.md).

Input sets (each hidden state RMS-normalized): ``base`` the exit's hidden state ``h_e``
(width D, the shipped ``ffn`` head); ``wide`` the same at width 4D; ``depth2`` ``h_e`` and
``h_(e-2)``; ``depth4`` ``h_e``, ``h_(e-2)`` and ``h_(e-4)``; ``previous`` ``h_e`` and the
previous token's ``h_e``. Needs the cache to hold the exits ``e-2`` and ``e-4`` for the depth sets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynamax_jax.eval.metrics import recall_at_precision

FEATURES = ("base", "wide", "depth2", "depth4", "previous")
PRECISIONS = (0.98, 0.99, 0.995)


def rms(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)


def train_classifier(x, y, x_val, width: int, epochs: int, lr: float, batch: int, seed: int) -> np.ndarray:
    """Scores on ``x_val`` of a GELU MLP ``[din] -> width -> 1`` trained on ``(x, y)``."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    din = x.shape[1]
    params = {"w1": jax.random.normal(k1, (din, width)) / np.sqrt(din), "b1": jnp.zeros(width),
              "w2": jax.random.normal(k2, (width,)) / np.sqrt(width) * 0.1, "b2": jnp.zeros(())}

    def score(p, x):
        return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    steps_per_epoch = len(x) // batch
    tx = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch))
    state = tx.init(params)

    @jax.jit
    def step(p, s, xb, yb):
        loss, g = jax.value_and_grad(lambda p: optax.sigmoid_binary_cross_entropy(score(p, xb), yb).mean())(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(steps_per_epoch):
            b = order[i * batch:(i + 1) * batch]
            params, state, _ = step(params, state, jnp.asarray(x[b]), jnp.asarray(y[b], jnp.float32))
    f = jax.jit(score)
    return np.concatenate([np.asarray(f(params, jnp.asarray(x_val[i:i + 8192]))) for i in range(0, len(x_val), 8192)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a train.cached cache directory (hidden.npy, meta.json, tokens.npy)")
    ap.add_argument("--labels", required=True, help="its labels file [R, E, T] (written by train.cached)")
    ap.add_argument("--exits", default="24,26", help="exit layers to study (default 24,26)")
    ap.add_argument("--features", default=",".join(FEATURES), help=f"input sets among {', '.join(FEATURES)}")
    ap.add_argument("--reply-marker", default="1,520,9531,198",
                    help="token ids before an assistant reply (SmolLM2's '<|im_start|>assistant\\n')")
    ap.add_argument("--eos", type=int, default=2, help="end-of-sequence id (SmolLM2: 2)")
    ap.add_argument("--holdout", type=float, default=0.1, help="share of rows held out (default 0.1)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from dynamax_jax.train.cached import Cache, training_mask

    cache = Cache.open(args.cache)
    layers = list(json.loads((Path(args.cache) / "meta.json").read_text())["exit_layers"])
    labels = np.load(args.labels, mmap_mode="r")
    marker = [int(t) for t in args.reply_marker.split(",")]
    mask = training_mask(cache, marker, args.eos, "replies")
    exits = [int(e) for e in args.exits.split(",")]
    features = args.features.split(",")
    need = sorted({layers.index(e - d) for e in exits for d in (0, 2, 4)
                   if e - d in layers and (d == 0 or any(f.startswith("depth") for f in features))})
    for e in exits:
        if e not in layers:
            raise SystemExit(f"exit {e} is not in the cache (its exits: {layers})")

    rows, positions = np.nonzero(mask)
    hidden = {i: [] for i in need}
    y = []
    for start in range(0, mask.shape[0], 16):  # read the memory-mapped cache in row blocks
        block = np.arange(start, min(start + 16, mask.shape[0]))
        h = np.asarray(cache.hidden[block])  # [b, E, T, D]
        r, t = np.nonzero(mask[block])
        for i in need:
            hidden[i].append(h[r, i, t])
        y.append(np.asarray(labels[block])[r, :, t])
    hidden = {i: rms(np.concatenate(v)) for i, v in hidden.items()}
    y = np.concatenate(y)
    rng = np.random.default_rng(args.seed)
    all_rows = np.unique(rows)
    val = np.isin(rows, rng.permutation(all_rows)[:int(len(all_rows) * args.holdout)])
    previous_ok = np.r_[False, (rows[1:] == rows[:-1]) & (positions[1:] == positions[:-1] + 1)]
    print(f"{len(y)} labelled positions, {val.sum()} held out ({args.holdout:.0%} of {len(all_rows)} rows)")

    print("\n| exit | inputs | label rate | " + " | ".join(f"recall at precision {p}" for p in PRECISIONS)
          + " |")
    print("|---:|---|---:|" + "---:|" * len(PRECISIONS))
    d = cache.hidden.shape[-1]
    for e in exits:
        i = layers.index(e)
        label = y[:, i]
        for name in features:
            h = hidden[i]
            width = d
            if name == "wide":
                x, width = h, 4 * d
            elif name in ("depth2", "depth4"):
                depth = [e - 2] if name == "depth2" else [e - 2, e - 4]
                missing = [l for l in depth if l not in layers]
                if missing:
                    print(f"| {e} | {name} | - | exits {missing} not cached |")
                    continue
                x = np.concatenate([h] + [hidden[layers.index(l)] for l in depth], axis=1)
            elif name == "previous":
                prev = np.zeros_like(h)
                prev[1:] = h[:-1]
                prev[~previous_ok] = 0.0
                x = np.concatenate([h, prev], axis=1)
            else:
                x = h
            score = train_classifier(x[~val], label[~val], x[val], width, args.epochs, args.lr, args.batch_size,
                                     args.seed)
            recalls = [recall_at_precision(score, label[val], p) for p in PRECISIONS]
            print(f"| {e} | {name} | {label[val].mean():.3f} | " + " | ".join(f"{r:.3f}" for r in recalls) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
