"""Mamba2 decode speed: the decode engine against transformers'
``Mamba2ForCausalLM.generate`` (PyTorch, CPU) on the same weights, float32, batch 1, greedy.

    python benchmarks/mamba2_decode.py                      # all models below
    python benchmarks/mamba2_decode.py --models small --new-tokens 64

Models: ``codestral`` (the Codestral Mamba 7B layer shape: d_model 4096, 128 heads x 64,
8 groups, state 128, vocab 32768, with ``--codestral-layers`` layers instead of 64),
``small`` (random, d_model 256, 8 layers, state 64) and ``asset`` (the shipped trained
``mamba2-small``, when present). Random models are built in transformers and converted
in memory with the checkpoint table (``convert/mamba2.py``), so both sides hold the
same weights; the benchmark first checks that their prefill logits agree.

"dynamax-jax" is the decode engine (``dx.prefill`` + ``dx.decode_chunk``: per-layer weight
buffers, layers unrolled); "lax.scan over stacked layers" times a plain scan over the
stacked ``[L, ...]`` storage layout. On XLA CPU, slicing one layer out of a stacked weight
copies it before the matmul; for small layers the copy is noise, for Codestral-sized ones
(a 304 MB in_proj) it dominates the step.

Decode tokens/s excludes the prompt: ours times the compiled decode loop alone; for
transformers, ``(N - 1) / (time(generate N) - time(generate 1))``. Every number and the
ratio are measured in one run and printed.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax.convert.mamba2 import hf_table
from dynamax_jax.convert.tables import unflatten
from dynamax_jax.config import Mamba2Config
from dynamax_jax.models import mamba2

SMALL = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=8, state_size=64, expand=2, head_dim=32,
             num_heads=16, n_groups=1, conv_kernel=4, chunk_size=128)
CODESTRAL = dict(vocab_size=32768, hidden_size=4096, state_size=128, expand=2, head_dim=64, num_heads=128,
                 n_groups=8, conv_kernel=4, chunk_size=256)


def params_from_torch(model, config: Mamba2Config):
    """Our params from a transformers model's state dict, through the checkpoint table."""
    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}
    flat = {}
    for row in hf_table(config):
        if row.per_layer:
            layers = [row.to_ours(state[row.hf.format(i=i)], config) for i in range(config.num_layers)]
            flat[row.ours] = jnp.asarray(np.stack(layers))
        else:
            flat[row.ours] = jnp.asarray(row.to_ours(state[row.hf], config))
    return unflatten(flat)


def build_random(hf_kwargs: dict, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.Mamba2Config(**hf_kwargs, tie_word_embeddings=False, initializer_range=0.02)
    model = transformers.Mamba2ForCausalLM(hf_config).eval()
    config = Mamba2Config.from_hf_config(hf_config.to_dict())
    return config, params_from_torch(model, config), model


def load_asset():
    import transformers

    import dynamax_jax as dx
    from dynamax_jax.assets import asset_path

    path = asset_path("mamba2-small")
    config, params = dx.load_pretrained(path)
    return config, params, transformers.Mamba2ForCausalLM.from_pretrained(path).eval()


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(config, params, prompt):
    state = mamba2.init_state(config, prompt.shape[0])
    logits, state, _ = mamba2.apply(config, params, prompt, state)
    return logits, state


@functools.partial(jax.jit, static_argnums=(0, 4))
def _decode(config, params, state, token, steps: int):
    """``steps`` greedy decode steps from ``token [B]`` -> tokens ``[steps, B]``."""

    def step(carry, _):
        token, state = carry
        logits, state, _ = mamba2.apply(config, params, token[:, None], state)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (token, state), token

    _, tokens = jax.lax.scan(step, (token, state), None, length=steps)
    return tokens


def _best_time(fn, repeats: int):
    out = fn().block_until_ready()  # compile
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn().block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best, out


def time_ours(config, params, prompt: np.ndarray, new_tokens: int, repeats: int):
    """Decode tokens/s of a plain ``lax.scan`` over the stacked layers (the storage layout) and
    of the decode engine (``dx.prefill`` + ``dx.decode_chunk``, per-layer buffers); the
    engine's greedy tokens (first one included); prefill logits."""
    import dynamax_jax as dx

    prompt = jnp.asarray(prompt)
    logits, state = _prefill(config, params, prompt)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    best_scan, tokens_scan = _best_time(lambda: _decode(config, params, state, first, new_tokens), repeats)

    layout = dx.decode_params(params)
    settings, controls, _ = dx.configure(config, new_tokens + 1)
    lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)

    def engine():  # the prompt's last token is the engine's first decode input
        start = dx.prefill(config, settings, layout, None, prompt, lengths, cache_len=prompt.shape[1] + new_tokens + 1)
        first_step, start = dx.decode_chunk(config, settings, 1, layout, None, start, controls, jax.random.key(0))
        start.caches[0].ssm.block_until_ready()
        t0 = time.perf_counter()
        chunk, _ = dx.decode_chunk(config, settings, new_tokens, layout, None, start, controls, jax.random.key(0))
        chunk.tokens.block_until_ready()
        return time.perf_counter() - t0, jnp.concatenate([first_step.tokens, chunk.tokens], axis=1)

    engine()  # compile
    best, tokens = min((engine() for _ in range(repeats)), key=lambda r: r[0])
    assert np.array_equal(np.asarray(tokens)[:, 1:], np.asarray(tokens_scan).T)
    return new_tokens / best_scan, new_tokens / best, np.asarray(tokens), logits


def time_transformers(model, prompt: np.ndarray, new_tokens: int, repeats: int):
    import torch

    ids = torch.as_tensor(prompt, dtype=torch.long)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n):
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            return time.perf_counter() - start, out

    run(2)  # warm up
    one = min(run(1)[0] for _ in range(repeats))
    full, out = min((run(new_tokens + 1) for _ in range(repeats)), key=lambda r: r[0])
    with torch.inference_mode():
        logits = model(ids, use_cache=False).logits.float().numpy()
    return new_tokens / (full - one), out[:, prompt.shape[1]:].numpy(), logits


def bench(name: str, config, params, model, args) -> dict:
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt_len)).astype(np.int32)
    scan_tps, ours_tps, ours_tokens, ours_logits = time_ours(config, params, prompt, args.new_tokens,
                                                                 args.repeats)
    hf_tps, hf_tokens, hf_logits = time_transformers(model, prompt, args.new_tokens, args.repeats)
    diff = float(np.abs(np.asarray(ours_logits) - hf_logits).max())
    same = int((ours_tokens[:, :hf_tokens.shape[1]] == hf_tokens).sum())
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(f"{name:10s} {config.num_layers:3d} layers d={config.hidden_size:5d} {n_params / 1e6:8.1f}M params | "
          f"dynamax-jax {ours_tps:7.1f} tok/s (lax.scan over stacked layers {scan_tps:7.1f}) | transformers "
          f"{hf_tps:7.1f} tok/s | ratio {ours_tps / hf_tps:5.2f}x ({scan_tps / hf_tps:5.2f}x) | "
          f"prefill max|dlogit| {diff:.1e} | same greedy tokens {same}/{hf_tokens.size}", flush=True)
    return {"model": name, "layers": config.num_layers, "hidden_size": config.hidden_size, "params_m": n_params / 1e6,
            "dynamax_jax": ours_tps, "scan": scan_tps, "transformers": hf_tps, "max_logit_diff": diff,
            "same_tokens": same, "tokens": int(hf_tokens.size)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small,codestral,asset",
                        help="comma-separated: small, codestral, asset (skipped when not shipped)")
    parser.add_argument("--codestral-layers", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                        help="torch intra-op threads (default: the number of cores, as XLA:CPU uses; "
                             "run alone: on a busy CPU torch's spinning workers slow it down badly)")
    parser.add_argument("--json", default=None,
                        help="also write the results to this file, which python -m eval.doc_tables renders into "
                             "docs/performance.md (its 'mamba2' table)")
    args = parser.parse_args(argv)

    import torch

    from dynamax_jax.eval.doc_tables import benchmark_record, finish_benchmark, mamba2_table

    record = benchmark_record("mamba2_decode.py", argv) | {
        "jax": jax.__version__, "torch": torch.__version__.split("+")[0], "threads": args.torch_threads,
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_len, "rows": []}

    torch.set_num_threads(args.torch_threads)

    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32, batch 1, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, best of {args.repeats}", flush=True)
    for name in args.models.split(","):
        if name == "small":
            record["rows"].append(bench(name, *build_random({**SMALL}), args))
        elif name == "codestral":
            record["rows"].append(bench(name, *build_random({**CODESTRAL, "num_hidden_layers": args.codestral_layers}),
                                        args))
        elif name == "asset":
            try:
                config, params, model = load_asset()
            except FileNotFoundError as err:
                print(f"asset      skipped: {err}")
                continue
            record["rows"].append(bench("asset", config, params, model, args))
        else:
            parser.error(f"unknown model {name!r}; choose from small, codestral, asset")
    finish_benchmark(record, "mamba2_decode", args.json, mamba2_table)


if __name__ == "__main__":
    main()
