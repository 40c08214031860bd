"""Could the LM head be cheaper? A vocabulary shortlist with a bound on the rest, offline.

    python benchmarks/head_shortlist.py --cache runs/smollm2-cached/cache --train-rows 300

SmolLM2-135M's LM head is a fifth of every token's multiply-adds and bytes, and every token
pays it, exited or not. The idea measured here: compute the logits of the ``n`` tokens the
model predicts most often (counted on the cache's training rows: reply positions of the
answer source and every prose position), bound the logits of the rest by a rank-``r``
projection, and compute the full head only when the bound says the top-1 might be outside
the shortlist. With ``U`` the top ``r`` right singular vectors of the head inputs ``x`` of
the training rows, a tail token's logit is ``x.w = (U'x).(U'w) + x_perp.w_perp`` and
``|x_perp.w_perp| <= |x_perp| |w_perp|``: the bound ``(U'x).(U'w) + kappa |x_perp| |w_perp|``
is exact for ``kappa = 1`` (Cauchy-Schwarz), an estimate below it.

Printed for the reply positions of held-out answer rows (a seeded tenth of them; the counts
and the projection come from the other rows): the shortlist's coverage of the final top-1,
and per ``(n, r, kappa)`` the *miss* rate (the top-1 is outside the shortlist and the bound
did not call the full head: a wrong token) and the *fallback* rate (full head computed),
with the head's multiply-adds relative to the
full head: ``(n + r (V - n) / D + fallback (V - n)) / V``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a train.cached cache of the model (tokens.npy, topk.npy, meta.json)")
    ap.add_argument("--model", default=None, help="the cache's model (default: its meta.json's)")
    ap.add_argument("--train-rows", type=int, default=300,
                    help="answer rows whose head inputs fit the projection (one forward pass each; default 300)")
    ap.add_argument("--shortlists", default="4096,8192,16384", help="shortlist sizes n")
    ap.add_argument("--ranks", default="64,128", help="projection ranks r")
    ap.add_argument("--kappas", default="0,0.1,0.2,0.3,1", help="bound scales (1: exact)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import dynamax_jax as dx
    from dynamax_jax.prompts import reply_marker
    from dynamax_jax.train.cached import reply_mask

    meta = json.loads((Path(args.cache) / "meta.json").read_text())
    model = args.model or meta["model"]
    config, params = dx.load_pretrained(model)
    tokenizer = dx.load_tokenizer(model)
    tokens = np.load(Path(args.cache) / "tokens.npy")
    top1 = np.load(Path(args.cache) / "topk.npy")[..., 0]
    answers = meta["sources"][0]["rows"]  # the first source holds the chat-formatted answers
    replies = reply_mask(tokens[:answers], reply_marker(tokenizer), tokenizer.eos_token_id)
    order = np.random.default_rng(args.seed).permutation(answers)
    held_out, train = order[:answers // 10], order[answers // 10:]

    counts = (np.bincount(top1[train][replies[train]], minlength=config.vocab_size)
              + np.bincount(top1[answers:].ravel(), minlength=config.vocab_size))
    by_count = np.argsort(-counts, kind="stable")

    from dynamax_jax.models import mistral
    from dynamax_jax.models.layers import rms_norm

    # the LM head's input: the last layer's output after the final norm
    head_input = jax.jit(lambda p, t: rms_norm(mistral.forward(config, p, t, return_hidden=True)[1][-1],
                                               p["final_norm"], config.rms_norm_eps))

    def head_inputs(rows):  # x at the reply positions of ``rows``, and their cached top-1
        xs, ys = [], []
        for i in range(0, len(rows), 8):
            block = rows[i:i + 8]
            x = np.asarray(head_input(params, jnp.asarray(tokens[block])), np.float32)
            r, t = np.nonzero(replies[block])
            xs.append(x[r, t])
            ys.append(top1[block][r, t])
        return np.concatenate(xs), np.concatenate(ys)

    x_fit, _ = head_inputs(train[:args.train_rows])
    x, y = head_inputs(held_out)
    w = (np.asarray(params["embed"]).T if config.tie_word_embeddings else np.asarray(params["lm_head"]))
    w = w.astype(np.float32)  # [D, V]
    argmax = (x @ w).argmax(-1)
    print(f"{len(x)} held-out reply positions ({len(held_out)} rows); head inputs of {len(x_fit)} positions "
          f"fit the projection; float32 argmax = cached top-1 at {np.mean(argmax == y):.4f}")
    d, v = w.shape
    kappas = [float(k) for k in args.kappas.split(",")]
    print("\n| shortlist n | coverage | rank r | kappa | miss | fallback | head multiply-adds |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    basis = np.linalg.svd(x_fit, full_matrices=False)[2]
    for n in (int(s) for s in args.shortlists.split(",")):
        short, tail = by_count[:n], by_count[n:]
        inside = np.isin(argmax, short)
        best_short = (x @ w[:, short]).max(-1)
        for r in (int(s) for s in args.ranks.split(",")):
            u = basis[:r].T  # [D, r]
            c = u.T @ w[:, tail]
            w_perp = np.linalg.norm(w[:, tail] - u @ c, axis=0)
            x_r = x @ u
            x_perp = np.linalg.norm(x - x_r @ u.T, axis=-1)
            estimate = x_r @ c
            for kappa in kappas:
                fallback = (estimate + kappa * x_perp[:, None] * w_perp[None]).max(-1) >= best_short
                miss = np.mean(~fallback & ~inside)
                cost = (n + r * (v - n) / d + fallback.mean() * (v - n)) / v
                print(f"| {n} | {inside.mean():.4f} | {r} | {kappa:g} | {miss:.4f} | {fallback.mean():.3f} | "
                      f"{cost:.2f} |", flush=True)


if __name__ == "__main__":
    main()
