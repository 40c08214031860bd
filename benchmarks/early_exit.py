"""Early exit: realized speed-up over full-depth decoding against the ideal speed-up, on
SmolLM2-135M-Instruct with random exit classifiers (their exit rates vary with the
threshold) and with static exits at several layers, at batch 1 and 8.

    python benchmarks/early_exit.py [--new-tokens 64] [--batch-sizes 1,8] [--kind mamba]

ideal speed-up = full-depth FLOPs / early-exit FLOPs per token (``dynamax_jax.flops``: layers
saved, classifiers and LM head counted; at batch 1 decoding is memory bound and FLOPs track
the bytes of weights read). realized = full-depth time / early-exit time, measured in the
same run. Thresholds and the static exit layer are traced, so one compilation serves a
whole sweep. At batch > 1 the layer loop runs until the last row of the batch has left,
which the ideal (per-token accounting) does not model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp


def _paired(full_fn, fn, repeats: int):
    """Alternate full-depth and early-exit runs; the minimum of each (the machine is shared:
    interference only ever adds time). Returns ``(t_full, t, result)``."""
    full_times, times, result = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        full_fn()
        full_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(full_times), min(times), result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--kind", default="mamba", choices=["calm", "ffn", "mamba"])
    ap.add_argument("--mode", default="copy", choices=["copy", "propagate"])
    ap.add_argument("--thresholds", default="0.3,0.45,0.5,0.55,0.7")
    ap.add_argument("--static-layers", default="10,15,20,25")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    import dynamax_jax as dx
    from dynamax_jax.default_model import smollm2_gguf_path

    path = smollm2_gguf_path()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    config, params = dx.load_pretrained(path, dtype=dtype)
    tokenizer = dx.load_tokenizer(path)
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Explain photosynthesis in one paragraph.", "List three prime numbers.",
                 "Who wrote Hamlet?", "How do airplanes fly?", "Give me a recipe for pancakes.",
                 "What is 17 times 3?"]
    from dynamax_jax.generate import _encode_prompt
    prompts = [_encode_prompt(tokenizer, q, chat=True) for q in questions]
    ec = dx.ExitConfig(kind=args.kind, mode=args.mode)
    exit_params = dx.init_exits(config, ec, jax.random.key(0), dtype=dtype)
    n = args.new_tokens
    print(f"SmolLM2-135M ({args.dtype}), exits {ec.resolve(config).layers} kind={args.kind} mode={args.mode}, "
          f"{n} new tokens, load {os.getloadavg()[0]:.1f}")

    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        rows = [prompts[i % len(prompts)] for i in range(batch)]

        def run(**kw):
            return dx.generate(config, params, rows, max_new_tokens=n, **kw)

        run()  # compile full depth
        print(f"\nbatch {batch}")
        print("| setting | avg layers | ideal speed-up | realized | realized / ideal | ms per step | full-depth ms per step |")
        print("|---|---|---|---|---|---|---|")
        run(exit_config=ec, exit_params=exit_params)  # compile the exit program once
        for thr in [float(t) for t in args.thresholds.split(",")]:
            t_full, t, r = _paired(run, lambda: run(exit_config=dataclasses.replace(ec, threshold=thr),
                                                    exit_params=exit_params), args.repeats)
            ideal = 1.0 / r.flops_relative
            print(f"| {args.kind} threshold {thr} | {r.avg_layers:.2f} | {ideal:.2f}x | {t_full / t:.2f}x | "
                  f"{t_full / t / ideal:.2f} | {1e3 * t / n:.1f} | {1e3 * t_full / n:.1f} |")
        static_ec = dataclasses.replace(ec)
        run(static_exit_layer=int(args.static_layers.split(",")[0]), exit_config=static_ec)  # compile
        for k in [int(k) for k in args.static_layers.split(",")]:
            t_full, t, r = _paired(run, lambda: run(static_exit_layer=k, exit_config=static_ec), args.repeats)
            ideal = 1.0 / r.flops_relative
            print(f"| static exit {k} | {r.avg_layers:.2f} | {ideal:.2f}x | {t_full / t:.2f}x | "
                  f"{t_full / t / ideal:.2f} | {1e3 * t / n:.1f} | {1e3 * t_full / n:.1f} |")
    print(f"\nload after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
