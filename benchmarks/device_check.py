"""The device check: one short script for the day a GPU (or TPU) is at hand. No network and no
downloaded weights: random weights of the real shapes. Three checks, each timed on the device:

1. the Pallas SSD kernel (Mamba2), compiled, against the jnp reference at Codestral shapes:
   max error of y, the final state and the gradients, and the time of each;
2. decode of a Mistral-7B-shaped model with random bfloat16 weights (4,096-token cache) at
   batch 1 and 8: tokens/s against the limit set by the memory bandwidth this device
   measures (bytes of weights and cache read per step / bandwidth);
3. early exit, realized against ideal: decode at static exits (every token leaves after k
   layers) against full depth, time ratio next to the FLOPs ratio.

    python benchmarks/device_check.py --out $OUT/device_check.json    # on the device (< 8 min, H100)
    python benchmarks/device_check.py --tiny                          # tiny shapes, any CPU (a test runs it)

Prints one table per check and writes every number to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssd import make_inputs  # noqa: E402  (benchmarks/ssd.py: the kernel benchmark's inputs)

import dynamax_jax as dx  # noqa: E402
from dynamax_jax.config import MistralConfig  # noqa: E402
from dynamax_jax.kernels.ssd import ops  # noqa: E402

MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                  num_kv_heads=8, head_dim=128, rope_theta=10000.0, sliding_window=4096, max_position_embeddings=32768)
SIZES = {  # ssd: (b, l, h, p, g, n, chunk); decode: prompt, new tokens, cache slots, static exits
    "full": dict(ssd=(1, 2048, 128, 64, 8, 128, 256), prompt=128, new_tokens=128, cache_len=4096,
                 static_exits=(8, 16, 24), batches=(1, 8), repeats=3),
    "tiny": dict(ssd=(1, 64, 4, 16, 2, 16, 16), prompt=8, new_tokens=8, cache_len=32,
                 static_exits=(1, 2, 3), batches=(1, 2), repeats=2),
}


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``fn()`` (its result blocked on) over ``repeats`` runs after one
    warm-up run (which compiles); returns ``(seconds, last result)``."""
    result = jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def check_ssd(size: dict, impl: str, repeats: int) -> dict:
    """The kernel (``impl``: pallas on a device, interpret on CPU) against the reference."""
    b, l, h, p, g, n, chunk = size["ssd"]
    inputs = make_inputs(b, l, h, p, g, n, jnp.float32)

    def forward(which):
        return jax.jit(lambda i: ops.ssd(**i, chunk_size=chunk, impl=which))

    def grads(which):
        def loss(x, B, C):
            y, final = ops.ssd(**{**inputs, "x": x, "B": B, "C": C}, chunk_size=chunk, impl=which)
            return jnp.sum(y * y) + jnp.sum(final)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    fwd_kernel, fwd_ref, grad_kernel, grad_ref = forward(impl), forward("reference"), grads(impl), grads("reference")
    args = (inputs["x"], inputs["B"], inputs["C"])
    t_kernel, (y, final) = timed(lambda: fwd_kernel(inputs), repeats)
    t_ref, (y_ref, final_ref) = timed(lambda: fwd_ref(inputs), repeats)
    t_grad, g_kernel = timed(lambda: grad_kernel(*args), repeats)
    t_grad_ref, g_ref = timed(lambda: grad_ref(*args), repeats)
    scale = float(jnp.max(jnp.abs(y_ref)))
    result = {"shape": dict(zip("blhpgnq", size["ssd"])), "impl": impl,
              "max_err_y": float(jnp.max(jnp.abs(y - y_ref))), "max_abs_y": scale,
              "max_err_final": float(jnp.max(jnp.abs(final - final_ref))),
              "max_rel_err_grads": max(float(jnp.max(jnp.abs(a - r)) / (jnp.max(jnp.abs(r)) + 1e-30))
                                       for a, r in zip(g_kernel, g_ref)),
              "seconds_kernel": t_kernel, "seconds_reference": t_ref,
              "seconds_grad_kernel": t_grad, "seconds_grad_reference": t_grad_ref}
    # Same sanity bound as the interpret-mode tests: float32 chunked scans agree to ~1e-4.
    result["ok"] = result["max_err_y"] <= 1e-4 * max(scale, 1.0) and result["max_rel_err_grads"] <= 1e-3
    return result


def measured_bandwidth(repeats: int, tiny: bool) -> float:
    """Bytes per second this device reads in a large reduction (the read-dominated pattern of
    decode at batch 1)."""
    n = (1 << 20) if tiny else (1 << 31)  # 2 GiB of bfloat16 on a device
    x = jnp.ones((n,), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    seconds, _ = timed(lambda: total(x), repeats)
    return x.size * x.dtype.itemsize / seconds


def decode_bytes_per_step(config, params, batch: int, position: int) -> int:
    """Bytes one decode step reads: every decode weight but the embedding table (one row per
    token), plus the K/V cache up to ``position`` for each row."""
    weights = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    embed = params["embed"].size * params["embed"].dtype.itemsize
    head_shared = config.tie_word_embeddings  # then the table is read whole, as the LM head
    itemsize = params["embed"].dtype.itemsize  # the caches take the weights' dtype
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize * position * batch
    return weights - (0 if head_shared else embed) + kv


def decode_rate(config, params, batch: int, size: dict, key, **configure_kw) -> tuple[float, dict]:
    """Tokens per second of ``decode_chunk`` after a prefill (prefill not timed), and the
    FLOPs summary of the tokens decoded."""
    n = size["new_tokens"]
    rng = np.random.default_rng(batch)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, (batch, size["prompt"])), jnp.int32)
    lengths = jnp.full((batch,), size["prompt"], jnp.int32)
    settings, controls, exit_params = dx.configure(config, n, dtype=params["embed"].dtype, **configure_kw)

    def run():
        state = dx.prefill(config, settings, params, exit_params, prompt, lengths, cache_len=size["cache_len"])
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        chunk, _ = dx.decode_chunk(config, settings, n, params, exit_params, state, controls, key)
        jax.block_until_ready(chunk)
        return time.perf_counter() - t0, chunk

    run()  # compile
    times, chunk = [], None
    for _ in range(size["repeats"]):
        seconds, chunk = run()
        times.append(seconds)
    summary = dx.decoding.summarize(config, settings, controls, np.asarray(chunk.exit_layers),
                                    np.asarray(chunk.positions))
    return batch * n / statistics.median(times), summary


def check_decode(config, params, size: dict, bandwidth: float) -> list[dict]:
    rows = []
    key = jax.random.key(0)
    for batch in size["batches"]:
        rate, summary = decode_rate(config, params, batch, size, key)
        position = size["prompt"] + size["new_tokens"] // 2
        limit = batch * bandwidth / decode_bytes_per_step(config, params, batch, position)
        row = {"batch": batch, "tokens_per_s": rate, "bandwidth_limit_tokens_per_s": limit,
               "fraction_of_limit": rate / limit, "avg_layers": summary["avg_layers"]}
        for k in size["static_exits"]:
            static_rate, s = decode_rate(config, params, batch, size, key, static_exit_layer=k)
            row[f"static_{k}"] = {"tokens_per_s": static_rate, "realized_speedup": static_rate / rate,
                                  "ideal_speedup": 1.0 / s["flops_relative"],
                                  "realized_over_ideal": static_rate / rate * s["flops_relative"]}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes and the interpreted kernel: runs on any CPU in seconds (the test of this script)")
    ap.add_argument("--out", default=None, help="write every number to this JSON file")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="decode weight dtype (default: bfloat16 on a device, float32 with --tiny)")
    args = ap.parse_args(argv)

    size = SIZES["tiny" if args.tiny else "full"]
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    if on_cpu and not args.tiny:
        ap.error("no accelerator: the full-size check needs a GPU or TPU (use --tiny on a CPU)")
    dtype = jnp.dtype(args.dtype or ("float32" if args.tiny else "bfloat16"))
    report = {"jax": jax.__version__, "backend": jax.default_backend(), "device": device.device_kind,
              "devices": jax.device_count(), "tiny": args.tiny, "load_before": os.getloadavg()[0]}
    print(f"jax {jax.__version__} on {jax.device_count()} x {device.device_kind} ({jax.default_backend()})")
    started = time.perf_counter()

    report["ssd"] = check_ssd(size, "interpret" if on_cpu else "pallas", size["repeats"])
    s = report["ssd"]
    print(f"\nSSD kernel ({s['impl']}) vs reference, {s['shape']}: max|dy| {s['max_err_y']:.2e} (|y| {s['max_abs_y']:.1f}), "
          f"max|dfinal| {s['max_err_final']:.2e}, grads rel {s['max_rel_err_grads']:.2e}; forward "
          f"{s['seconds_kernel'] * 1e3:.2f} ms vs {s['seconds_reference'] * 1e3:.2f} ms, backward "
          f"{s['seconds_grad_kernel'] * 1e3:.2f} ms vs {s['seconds_grad_reference'] * 1e3:.2f} ms"
          f"{'' if s['ok'] else '  <-- ERRORS ABOVE THE BOUND'}")

    config = MistralConfig.tiny() if args.tiny else MistralConfig(**MISTRAL_7B)
    t0 = time.perf_counter()
    params = jax.jit(lambda k: dx.init_params(config, k, dtype))(jax.random.key(0))
    params = jax.block_until_ready(dx.decode_params(params, donate=True))
    report["init_seconds"] = time.perf_counter() - t0
    report["param_bytes"] = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    report["bandwidth_bytes_per_s"] = measured_bandwidth(size["repeats"], args.tiny)
    print(f"\nMistral-7B-shaped decode{' (tiny)' if args.tiny else ''}, {dtype.name}, "
          f"{report['param_bytes'] / 2**30:.2f} GiB of weights, measured read bandwidth "
          f"{report['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, cache {size['cache_len']} slots")
    report["decode"] = check_decode(config, params, size, report["bandwidth_bytes_per_s"])
    static_cols = " | ".join(f"exit {k}: realized / ideal" for k in size["static_exits"])
    print(f"| batch | tokens/s | bandwidth limit | fraction | {static_cols} |")
    print("|---:|---:|---:|---:|" + "---:|" * len(size["static_exits"]))
    for row in report["decode"]:
        statics = " | ".join(f"{row[f'static_{k}']['realized_speedup']:.2f}x / {row[f'static_{k}']['ideal_speedup']:.2f}x"
                             for k in size["static_exits"])
        print(f"| {row['batch']} | {row['tokens_per_s']:.1f} | {row['bandwidth_limit_tokens_per_s']:.1f} | "
              f"{row['fraction_of_limit']:.2f} | {statics} |")
    report["seconds"] = time.perf_counter() - started
    report["load_after"] = os.getloadavg()[0]
    print(f"\n{report['seconds']:.0f} s in all; load {report['load_before']:.2f} before, {report['load_after']:.2f} after")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ssd"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
