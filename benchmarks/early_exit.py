"""Early exit: realized speed-up over full-depth decoding against the ideal speed-up, on
SmolLM2-135M-Instruct (or ``--model``) with the shipped exit heads at several thresholds and
with static exits at several layers, at batch 1 and 8.

    python benchmarks/early_exit.py [--new-tokens 64] [--batch-sizes 1,8] [--thresholds 0.5,0.7,0.9]
    python benchmarks/early_exit.py --model dynamax_jax/assets/mamba2-small \
        --exits dynamax_jax/assets/exits/mamba2-small-mamba --thresholds 0.97 --static-layers 2,4,6

ideal speed-up = full-depth FLOPs / early-exit FLOPs per token (``dynamax_jax.flops``: layers
saved, classifiers and LM head counted; at batch 1 decoding is memory bound and FLOPs track
the bytes of weights read). realized = full-depth time / early-exit time, measured in the
same run (runs alternate; minima over repeats). Thresholds and the static exit layer are
traced, so one compilation serves a whole sweep.

Where the time goes: each row also gives milliseconds per generated token (the whole call,
prefill included, over the new tokens). A line fitted through full depth and the static exits
(no classifier runs there) splits a step into ``fixed + per_layer * layers``; a threshold
above 1 (no token leaves, every exit's classifier still runs) gives a classifier step's cost
as its time over full depth's, per exit. Those three predict each heads row's time from the
layers its batch runs (the deepest row's, at each step), next to the time measured. At batch > 1 the layer loop runs until the
deepest row of the step has left: the last columns give that row's average depth and the
ideal speed-up if every row paid it, which is what a batch can realize.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain photosynthesis in one paragraph.", "List three prime numbers.",
             "Who wrote Hamlet?", "How do airplanes fly?", "Give me a recipe for pancakes.",
             "What is 17 times 3?"]


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


def _deepest_row_ideal(config, exit_config, result, static_mode):
    """The ideal speed-up if every row paid the layers of the batch's deepest row at each step
    (what a batched layer loop runs), and that average depth."""
    from dynamax_jax import flops

    counted = result.exit_layers > 0
    deepest = np.where(counted, result.exit_layers.max(axis=0, keepdims=True), 0)
    positions = np.cumsum(counted, axis=1)  # only relative FLOPs matter: any plausible positions
    s = flops.summarize(config, exit_config, deepest, positions, counted, static_mode)
    return 1.0 / s["flops_relative"], float(deepest[counted].mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="paired timed runs per setting; minima kept")
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--model", default=None, help="checkpoint dir or .gguf file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--exits", default=None,
                    help="exit-head directory (default: the shipped SmolLM2 heads)")
    ap.add_argument("--thresholds", default="0.5,0.7,0.9", help="exit thresholds to time with the heads")
    ap.add_argument("--static-layers", default="10,15,20,25", help="static exit layers (the baseline)")
    ap.add_argument("--json", default=None,
                    help="also write every row and the time model to this file, which python -m eval.doc_tables "
                         "renders into docs/performance.md (its 'time-model' table)")
    args = ap.parse_args(argv)

    import dynamax_jax as dx
    from dynamax_jax.decoding import configure
    from dynamax_jax.default_model import smollm2_gguf_path
    from dynamax_jax.cli.generate import DEFAULT_EXITS_PATH
    from dynamax_jax.eval.doc_tables import benchmark_record, finish_benchmark, time_model_table
    from dynamax_jax.prompts import encode_prompt

    record = benchmark_record("early_exit.py", argv) | {"batches": []}
    print(f"load before: {record['load_before']:.2f}")
    path = args.model or smollm2_gguf_path()
    config, params = dx.load_pretrained(path)
    params = dx.decode_params(params, donate=True)
    tokenizer = dx.load_tokenizer(path)
    prompts = [encode_prompt(tokenizer, q, chat=True) for q in QUESTIONS]  # (plain text without a template)
    exit_config, exit_params = dx.load_exits(args.exits or DEFAULT_EXITS_PATH)
    n = args.new_tokens
    record.update(model=Path(path).name, exits=list(exit_config.resolve(config).layers), kind=exit_config.kind,
                  new_tokens=n, num_layers=config.num_layers)
    print(f"{Path(path).name} ({params['embed'].dtype}), exits {record['exits']} "
          f"kind={exit_config.kind} mode={exit_config.mode}, {n} new tokens")

    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        rows = [prompts[i % len(prompts)] for i in range(batch)]

        def run(**kw):
            return dx.generate(config, params, rows, max_new_tokens=n, **kw)

        run()  # compile full depth
        print(f"\nbatch {batch}")
        print("| setting | avg layers | ideal speed-up | realized | realized / ideal | deepest row's layers | "
              "ideal at the deepest row | realized / that | ms/token | full depth ms/token |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        measured = []  # one dict per setting: its speed-ups, depths and ms per token

        def report(name, kw):
            t_full, t, r = _paired(lambda: run(), lambda: run(**kw), args.repeats)
            ideal = 1.0 / r.flops_relative
            settings = configure(config, n, **{k: v for k, v in kw.items() if k != "exit_params"},
                                 exit_params=kw.get("exit_params"))[0]
            deep_ideal, deep_layers = _deepest_row_ideal(
                config, settings.exit_config if settings.dynamic else None, r,
                settings.mode if settings.static else None)
            measured.append({"setting": name, "static_layer": kw.get("static_exit_layer"),
                             "avg_layers": float(r.avg_layers), "ideal": ideal, "realized": t_full / t,
                             "deepest_layers": deep_layers, "deepest_ideal": deep_ideal,  # what a batch runs
                             "ms_per_token": 1e3 * t / n, "full_ms_per_token": 1e3 * t_full / n})
            print(f"| {name} | {r.avg_layers:.2f} | {ideal:.2f}x | {t_full / t:.2f}x | {t_full / t / ideal:.2f} | "
                  f"{deep_layers:.2f} | {deep_ideal:.2f}x | {t_full / t / deep_ideal:.2f} | {1e3 * t / n:.2f} "
                  f"| {1e3 * t_full / n:.2f} |")

        run(exit_config=exit_config, exit_params=exit_params)  # compile the exit program once
        for thr in [float(t) for t in args.thresholds.split(",")]:
            report(f"{exit_config.kind} heads, threshold {thr}",
                   dict(exit_config=dataclasses.replace(exit_config, threshold=thr), exit_params=exit_params))
        static = dataclasses.replace(exit_config, kind="calm")  # only its mode matters
        run(static_exit_layer=int(args.static_layers.split(",")[0]), exit_config=static)  # compile
        for k in [int(k) for k in args.static_layers.split(",")]:
            report(f"static exit {k}", dict(static_exit_layer=k, exit_config=static))
        model = _time_model(measured, config.num_layers, len(exit_config.resolve(config).layers))
        record["batches"].append({"batch": batch, "rows": measured, "time_model": model})
    finish_benchmark(record, "early_exit", args.json, time_model_table)


def _time_model(measured: list[dict], num_layers: int, num_exits: int) -> dict | None:
    """Print (and return) the fit ``ms/token = fixed + per_layer * layers`` through full depth
    and the static exits, a classifier step's cost (from a threshold above 1) and each heads
    row's predicted time at the layers its batch runs (see the module docstring)."""
    static = [(m["deepest_layers"], m["ms_per_token"]) for m in measured if m["static_layer"] is not None]
    full = float(np.mean([m["full_ms_per_token"] for m in measured]))
    if len(static) < 1:
        return None
    per_layer, fixed = np.polyfit([num_layers] + [k for k, _ in static], [full] + [ms for _, ms in static], 1)
    heads = [m for m in measured if m["static_layer"] is None]
    never = [m["ms_per_token"] for m in heads if float(m["setting"].rsplit(" ", 1)[1]) > 1]
    classifier = (never[0] - full) / num_exits if never else None
    print(f"\ntime model: {fixed:.3f} ms fixed + {per_layer:.3f} ms per layer a token "
          f"(full depth {full:.3f} ms: the fixed part is {fixed / full:.0%})"
          + (f"; a classifier step {classifier:.3f} ms ({classifier / per_layer:.2f} layers)" if never else ""))
    model = {"fixed_ms": fixed, "per_layer_ms": per_layer, "full_ms": full, "classifier_ms": classifier,
             "num_exits": num_exits, "predicted_ms": {}}
    if classifier is None:
        return model
    for m in heads:
        name, layers, ms = m["setting"], m["deepest_layers"], m["ms_per_token"]
        if float(name.rsplit(" ", 1)[1]) <= 1:
            # an upper bound with several exits: a token that leaves early runs fewer classifiers
            predicted = fixed + per_layer * layers + classifier * num_exits
            model["predicted_ms"][name] = predicted
            print(f"  {name}: predicted {predicted:.3f} ms, measured {ms:.3f} ({full / ms:.2f}x full depth); "
                  f"with free classifiers {full / (fixed + per_layer * layers):.2f}x, with no fixed part too "
                  f"{num_layers / layers:.2f}x")
    return model


if __name__ == "__main__":
    main()
