"""Compile time of the decode engine: ``prefill`` and ``decode_chunk`` on SmolLM2-135M (30
layers; full depth, the shipped exit heads, static pruning), and the time to lower a
64-layer Codestral-Mamba-shaped decode with exits (abstract weights, nothing allocated).

    python benchmarks/compile_time.py [--chunk 8] [--json compile-time.json]

The decode program holds one branch per exit segment with that segment's layers unrolled,
so it grows with depth; this prints how long that takes to trace, lower and compile.
``--json FILE`` writes the rows with the command, the date and the load (section
``compile_time``), which ``python -m eval.doc_tables`` renders into docs/performance.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def lower_and_compile(config, params, exit_config, exit_params, chunk: int, prompt_len: int = 40, **kw):
    """Seconds to lower and to compile ``prefill`` and ``decode_chunk`` (abstract inputs ok)."""
    import dynamax_jax as dx

    settings, controls, exit_params = dx.configure(config, chunk, exit_config=exit_config,
                                                   exit_params=exit_params, **kw)
    prompt, lengths = jnp.zeros((1, prompt_len), jnp.int32), jnp.asarray([prompt_len], jnp.int32)
    cache_len = prompt_len + chunk
    pre, t_lower_pre = _timed(lambda: dx.prefill.lower(config, settings, params, exit_params, prompt, lengths,
                                                       cache_len=cache_len))
    state = jax.eval_shape(lambda p, e: dx.prefill(config, settings, p, e, prompt, lengths, cache_len=cache_len),
                           params, exit_params)
    dec, t_lower_dec = _timed(lambda: dx.decode_chunk.lower(config, settings, chunk, params, exit_params, state,
                                                            controls, jax.random.key(0)))
    return dict(lower_prefill=t_lower_pre, lower_decode=t_lower_dec, compile=(pre, dec))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=8, help="tokens per decode_chunk call (default 8)")
    ap.add_argument("--json", default=None, metavar="FILE",
                    help="also write the rows, the command, the date and the load to FILE (for eval.doc_tables)")
    args = ap.parse_args(argv)

    import dynamax_jax as dx
    from dynamax_jax.default_model import smollm2_gguf_path
    from dynamax_jax.cli.generate import DEFAULT_EXITS_PATH
    from dynamax_jax.eval.doc_tables import benchmark_record, finish_benchmark
    from dynamax_jax.models import module_for

    record = benchmark_record("compile_time.py", argv) | {"jax": jax.__version__, "chunk": args.chunk, "programs": []}
    print(f"load before: {record['load_before']:.2f}; jax {jax.__version__}")
    config, params = dx.load_pretrained(smollm2_gguf_path())
    params = dx.decode_params(params, donate=True)
    heads, head_params = dx.load_exits(DEFAULT_EXITS_PATH)
    print("\n| program | lower prefill (s) | compile prefill (s) | lower decode (s) | compile decode (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, ec, ep, kw in [("SmolLM2 full depth", None, None, {}),
                             ("SmolLM2 shipped heads", heads, head_params, {}),
                             ("SmolLM2 static pruning", None, None, dict(static_exit_layer=15))]:
        r = lower_and_compile(config, params, ec, ep, args.chunk, **kw)
        _, t_pre = _timed(lambda: r["compile"][0].compile())
        _, t_dec = _timed(lambda: r["compile"][1].compile())
        print(f"| {name} | {r['lower_prefill']:.2f} | {t_pre:.2f} | {r['lower_decode']:.2f} | {t_dec:.2f} |")
        record["programs"].append(dict(program=name, lower_prefill_s=r["lower_prefill"], compile_prefill_s=t_pre,
                                       lower_decode_s=r["lower_decode"], compile_decode_s=t_dec))

    codestral = dx.Mamba2Config(vocab_size=32768, hidden_size=4096, num_layers=64, state_size=128, expand=2,
                                head_dim=64, n_groups=8, conv_kernel=4, chunk_size=256, tie_word_embeddings=False)
    abstract = jax.eval_shape(lambda: dx.decode_params(module_for(codestral).init_params(codestral, jax.random.key(0),
                                                                                         jnp.float32)))
    ec = dx.ExitConfig(kind="mamba")
    exit_params = dx.init_exits(codestral, ec, jax.random.key(1), dtype=jnp.float32)
    r = lower_and_compile(codestral, abstract, ec, exit_params, args.chunk)
    layers = list(ec.resolve(codestral).layers)
    print(f"\n64-layer Codestral-shaped decode with exits at {layers}: lowered in "
          f"{r['lower_decode']:.2f} s (prefill {r['lower_prefill']:.2f} s)")
    record["codestral"] = dict(layers=codestral.num_layers, kind=ec.kind, exits=layers,
                               lower_decode_s=r["lower_decode"], lower_prefill_s=r["lower_prefill"])
    finish_benchmark(record, "compile_time", args.json)


if __name__ == "__main__":
    main()
