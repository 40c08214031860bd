"""Exit heads on held-out prompts: how often each exit's prediction agrees with the final
layer (plain logit lens, and through the checkpoint's adapters), the oracle savings ceiling
with and without adapters, and early-exit generation against full depth.

    python -m benchmarks.exit_heads --exits dynamax_jax/assets/exits/smollm2-135m-instruct-mamba \\
        --questions 40 --out runs/exit_heads.json

Prompts: five built-in chat prompts plus the first ``--questions`` questions of the
calibration part of the bundled TriviaQA (``eval/data/real``; never the evaluation part),
all in the chat template. Full-depth greedy
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

import numpy as np

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "Explain photosynthesis in one paragraph.", "Give me three tips for learning to cook.",
                "How do airplanes fly?"]


def agreement(backbone, prompts, generations, layers, exit_config=None, exit_params=None, batch_size=8):
    """Per-exit agreement with the final layer and the oracle's average layers over the
    full-depth ``generations`` (``eval.harness.oracle_layers``; adapted when ``exit_config``
    has adapters)."""
    from dynamax_jax.eval.harness import oracle_layers
    per_token, agree, _ = oracle_layers(backbone, tuple(layers), prompts, generations, batch_size, 16,
                                        exit_config, exit_params)
    oracle = np.concatenate([np.asarray(t, np.float64) for t in per_token])
    return {"agreement": dict(zip(map(str, layers), np.round(agree, 4).tolist())),
            "oracle_avg_layers": round(float(oracle.mean()), 3), "tokens": int(oracle.size)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.exit_heads", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--exits", nargs="+", required=True, help="exit checkpoint directories")
    p.add_argument("--questions", type=int, default=40,
                   help="questions of the bundled TriviaQA's calibration part added as prompts")
    p.add_argument("--thresholds", default="0.5,0.7,0.9", help="comma-separated thresholds for generation")
    p.add_argument("--svd-ranks", default="", help="comma-separated ranks to truncate affine adapters to")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import dynamax_jax as dx
    from dynamax_jax.default_model import smollm2_gguf_path
    from dynamax_jax.eval.harness import compute_summary, generate_all, load_backbone
    from dynamax_jax.eval.tasks import get_task

    path = args.model or str(smollm2_gguf_path())
    backbone = load_backbone(path, "float32", use_chat_template=True)
    config = backbone.config
    texts = list(CHAT_PROMPTS)
    if args.questions:
        texts += [e.prompt for e in get_task("trivia_qa").load(None, args.questions, split="calibration")]
    prompts = [backbone.encode(t) for t in texts]

    def generate(**kw):
        return generate_all(backbone, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            pad_multiple=16, **kw)[0]

    full = generate()
    out = {"model": path, "prompts": len(prompts), "full_tokens": sum(len(g.tokens) for g in full),
           "checkpoints": {}}
    print(f"{len(prompts)} prompts, {out['full_tokens']} full-depth tokens", file=sys.stderr)
    for exits_dir in args.exits:
        ec, ep = dx.load_exits(exits_dir)
        ec = ec.resolve(config)
        res = {"kind": ec.kind, "adapter": ec.adapter, "layers": list(ec.layers),
               "logit_lens": agreement(backbone, prompts, full, ec.layers, batch_size=args.batch_size)}
        if ec.has_adapter:
            res["adapted"] = agreement(backbone, prompts, full, ec.layers, ec, ep, args.batch_size)
            for r in (int(x) for x in args.svd_ranks.split(",") if x.strip()):
                if ec.adapter == "affine":
                    lec, lep = dx.exits.affine_to_lowrank(ec, ep, r)
                    res[f"adapted_rank{r}"] = agreement(backbone, prompts, full, ec.layers, lec, lep,
                                                        args.batch_size)
        for thr in (float(x) for x in args.thresholds.split(",") if x.strip()):
            gens = generate(exit_config=dataclasses.replace(ec, threshold=thr), exit_params=ep)
            # position-wise agreement with the full-depth tokens, over the full-depth length
            same = np.concatenate([[j < len(g.tokens) and g.tokens[j] == f.tokens[j] for j in range(len(f.tokens))]
                                   for g, f in zip(gens, full)])
            comp = compute_summary(config, dataclasses.replace(ec, threshold=thr), gens, [len(p_) for p_ in prompts])
            res[f"t{thr:g}"] = {"avg_layers": round(comp["avg_layers"], 3),
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
