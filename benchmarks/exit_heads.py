"""Exit heads on held-out prompts: how often each exit's prediction agrees with the final
layer (plain logit lens, and through the checkpoint's adapters), the oracle savings ceiling
with and without adapters, and early-exit generation against full depth.

    python -m benchmarks.exit_heads --exits dynamax_jax/assets/exits/smollm2-135m-instruct-mamba \\
        --questions eval/data/calibration/trivia_qa.jsonl --limit 40 --out runs/exit_heads.json

Prompts: five built-in chat prompts plus, with ``--questions``, the first ``--limit``
questions of a TriviaQA-schema jsonl file, all in the chat template. Full-depth greedy
generations (``--max-new-tokens``, stopping at EOS) are then teacher-forced through the
backbone once; at every exit the head's token (after the adapter, when there is one) is
compared with the final layer's. The oracle leaves at the first exit that agrees, so its
average layers is the ceiling of any classifier at these exits. ``--svd-ranks`` also scores
each affine adapter truncated to rank ``r`` (``dynamax_jax.exits.affine_to_lowrank``).

Generation: for each checkpoint and ``--thresholds``, the early-exit run's average layers,
FLOPs relative to full depth (classifiers, adapters and head counted) and the fraction of the
full-depth tokens reproduced at the same position.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "Explain photosynthesis in one paragraph.", "Give me three tips for learning to cook.",
                "How do airplanes fly?"]


def teacher_forced_tokens(config, params, sequences: list[list[int]], layers, exit_config=None, exit_params=None):
    """Exit tokens ``[E, B, T]`` and final tokens ``[B, T]`` of right-padded ``sequences``."""
    from dynamax_jax.exits import adapter_params
    from eval.run import _layer_tokens
    width = -(-max(map(len, sequences)) // 16) * 16
    batch = np.zeros((len(sequences), width), np.int32)
    for i, s in enumerate(sequences):
        batch[i, :len(s)] = s
    if exit_config is not None and exit_config.has_adapter:
        adapters = adapter_params(exit_params)
    else:
        exit_config, adapters = None, {}
    return map(np.asarray, _layer_tokens(config, params, tuple(layers), exit_config, adapters, batch))


def agreement(config, params, prompts, rows, layers, exit_config=None, exit_params=None, batch_size=8):
    """Per-exit agreement with the final layer and the oracle's average layers over the
    generated tokens ``rows`` (teacher-forced after their ``prompts``)."""
    matches, oracle = [], []
    for start in range(0, len(prompts), batch_size):
        ps, rs = prompts[start:start + batch_size], rows[start:start + batch_size]
        exit_tok, final_tok = teacher_forced_tokens(config, params, [p + list(r[:-1]) for p, r in zip(ps, rs)],
                                                    layers, exit_config, exit_params)
        for i, (p, r) in enumerate(zip(ps, rs)):
            sl = slice(len(p) - 1, len(p) - 1 + len(r))
            m = exit_tok[:, i, sl] == final_tok[None, i, sl]  # [E, n]
            matches.append(m)
            oracle.append(np.where(m.any(0), np.asarray(layers)[np.argmax(m, 0)], config.num_layers))
    m = np.concatenate(matches, 1)
    return {"agreement": dict(zip(map(str, layers), m.mean(1).round(4).tolist())),
            "oracle_avg_layers": round(float(np.concatenate(oracle).mean()), 3), "tokens": int(m.shape[1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.exit_heads", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--exits", nargs="+", required=True, help="exit checkpoint directories")
    p.add_argument("--questions", default=None, help="TriviaQA-schema jsonl whose questions are added as prompts")
    p.add_argument("--limit", type=int, default=40, help="questions taken from --questions")
    p.add_argument("--thresholds", default="0.5,0.7,0.9", help="comma-separated thresholds for generation")
    p.add_argument("--svd-ranks", default="", help="comma-separated ranks to truncate affine adapters to")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import dynamax_jax as dx
    from dynamax_jax.default_model import smollm2_gguf_path
    from dynamax_jax.generate import _encode_prompt, _stop_ids
    from eval.run import Generation, compute_summary
    from eval.tasks import get_task

    path = args.model or str(smollm2_gguf_path())
    config, params = dx.load_pretrained(path, dtype=jnp.float32)
    tok = dx.load_tokenizer(path)
    texts = list(CHAT_PROMPTS)
    if args.questions:
        texts += [e.prompt for e in get_task("trivia_qa").load(str(Path(args.questions).parent), args.limit)]
    prompts = [list(_encode_prompt(tok, t, True)) for t in texts]
    stops = _stop_ids(config, tok)

    def generate(**kw):
        rows, layers = [], []
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            chunk = chunk + [chunk[0]] * (args.batch_size - len(chunk))  # one compiled batch shape
            r = dx.generate(config, params, chunk, max_new_tokens=args.max_new_tokens, stop_tokens=stops, **kw)
            n = min(args.batch_size, len(prompts) - start)
            rows += [np.asarray(r.tokens[i, :r.num_generated[i]]) for i in range(n)]
            layers += [np.asarray(r.exit_layers[i, :r.num_generated[i]]) for i in range(n)]
        return rows, layers

    full_rows, _ = generate()
    out = {"model": path, "prompts": len(prompts), "full_tokens": int(sum(map(len, full_rows))), "checkpoints": {}}
    print(f"{len(prompts)} prompts, {out['full_tokens']} full-depth tokens", file=sys.stderr)
    for exits_dir in args.exits:
        ec, ep = dx.load_exits(exits_dir)
        ec = ec.resolve(config)
        res = {"kind": ec.kind, "adapter": ec.adapter, "layers": list(ec.layers),
               "logit_lens": agreement(config, params, prompts, full_rows, ec.layers, batch_size=args.batch_size)}
        if ec.has_adapter:
            res["adapted"] = agreement(config, params, prompts, full_rows, ec.layers, ec, ep, args.batch_size)
            for r in (int(x) for x in args.svd_ranks.split(",") if x.strip()):
                if ec.adapter == "affine":
                    lec, lep = dx.exits.affine_to_lowrank(ec, ep, r)
                    res[f"adapted_rank{r}"] = agreement(config, params, prompts, full_rows, ec.layers, lec, lep,
                                                        args.batch_size)
        for thr in (float(x) for x in args.thresholds.split(",") if x.strip()):
            rows, layers = generate(exit_config=dataclasses.replace(ec, threshold=thr), exit_params=ep)
            same = np.concatenate([[j < len(r) and r[j] == f[j] for j in range(len(f))] for r, f in zip(rows, full_rows)])
            all_layers = np.concatenate(layers)
            comp = compute_summary(config, dataclasses.replace(ec, threshold=thr),
                                   [Generation(list(r), list(l)) for r, l in zip(rows, layers)],
                                   [len(p_) for p_ in prompts])
            res[f"t{thr:g}"] = {"avg_layers": round(float(all_layers.mean()), 3),
                                "flops_relative": round(comp["compute"], 4),
                                "identical_tokens": round(float(same.mean()), 4)}
            print(Path(exits_dir).name, thr, res[f"t{thr:g}"], file=sys.stderr, flush=True)
        out["checkpoints"][str(exits_dir)] = res
        print(json.dumps({str(exits_dir): res}), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
