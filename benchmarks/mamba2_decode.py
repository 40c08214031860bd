"""Mamba2 decode speed: ours (one jit-compiled loop of decode steps) against transformers'
``Mamba2ForCausalLM.generate`` (PyTorch, CPU) on the same weights, float32, batch 1, greedy.

    python benchmarks/mamba2_decode.py                      # all models below
    python benchmarks/mamba2_decode.py --models small --new-tokens 64

Models: ``codestral`` (the Codestral Mamba 7B layer shape: d_model 4096, 128 heads x 64,
8 groups, state 128, vocab 32768, with ``--codestral-layers`` layers instead of 64),
``small`` (random, d_model 256, 8 layers, state 64) and ``asset`` (the shipped trained
``mamba2-small``, when present). Random models are built in transformers and converted
in memory with the checkpoint table (``convert/mamba2.py``), so both sides hold the
same weights; the benchmark first checks that their prefill logits agree.

"per-layer buffers" times the same decode step with the layers unrolled over separate
per-layer weight arrays. On XLA CPU, slicing one layer out of a stacked ``[L, ...]`` weight
(``lax.scan`` or ``dynamic_index_in_dim``) copies it before the matmul; for small layers
the copy is noise, for Codestral-sized ones (a 304 MB in_proj) it dominates the step
(measured here: ~5x). GPU/TPU backends are not measured by this script.

Decode tokens/s excludes the prompt: ours times the compiled decode loop alone; for
transformers, ``(N - 1) / (time(generate N) - time(generate 1))``. Every number and the
ratio are measured in one run and printed.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from convert.mamba2 import hf_table
from convert.tables import unflatten
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


@functools.partial(jax.jit, static_argnums=(0, 4))
def _decode_unstacked(config, params, state, token, steps: int):
    """As ``_decode``, with ``params["layers"]`` given as a list of per-layer dicts and the
    layers unrolled: no slicing of stacked weights (a diagnostic, see ``main``)."""

    def step(carry, _):
        token, state = carry
        x = mamba2.embed(config, params, token[:, None])
        new = []
        for i, layer_params in enumerate(params["layers"]):
            x, layer_state = mamba2.prefill_layer(config, layer_params, x, jax.tree.map(lambda a: a[i], state))
            new.append(layer_state)
        state = jax.tree.map(lambda *a: jnp.stack(a), *new)
        token = jnp.argmax(mamba2.head(config, params, x)[:, -1], axis=-1).astype(jnp.int32)
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
    """Decode tokens/s of the model as shipped (lax.scan over stacked layers) and of the
    same step with per-layer weight buffers; greedy tokens; prefill logits."""
    prompt = jnp.asarray(prompt)
    logits, state = _prefill(config, params, prompt)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    best, tokens = _best_time(lambda: _decode(config, params, state, first, new_tokens), repeats)
    unstacked = {**params, "layers": [jax.tree.map(lambda a: a[i], params["layers"])
                                      for i in range(config.num_layers)]}
    best_unstacked, tokens_unstacked = _best_time(
        lambda: _decode_unstacked(config, unstacked, state, first, new_tokens), repeats)
    assert np.array_equal(np.asarray(tokens), np.asarray(tokens_unstacked))
    tokens = np.concatenate([np.asarray(first)[:, None], np.asarray(tokens).T], axis=1)
    return new_tokens / best, new_tokens / best_unstacked, tokens, logits


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


def bench(name: str, config, params, model, args) -> None:
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt_len)).astype(np.int32)
    ours_tps, unstacked_tps, ours_tokens, ours_logits = time_ours(config, params, prompt, args.new_tokens,
                                                                 args.repeats)
    hf_tps, hf_tokens, hf_logits = time_transformers(model, prompt, args.new_tokens, args.repeats)
    diff = float(np.abs(np.asarray(ours_logits) - hf_logits).max())
    same = int((ours_tokens[:, :hf_tokens.shape[1]] == hf_tokens).sum())
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(f"{name:10s} {config.num_layers:3d} layers d={config.hidden_size:5d} {n_params / 1e6:8.1f}M params | "
          f"ours {ours_tps:7.1f} tok/s (per-layer buffers {unstacked_tps:7.1f}) | transformers {hf_tps:7.1f} "
          f"tok/s | ratio {ours_tps / hf_tps:5.2f}x ({unstacked_tps / hf_tps:5.2f}x) | "
          f"prefill max|dlogit| {diff:.1e} | same greedy tokens {same}/{hf_tokens.size}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small,codestral,asset",
                        help="comma-separated: small, codestral, asset (skipped when not shipped)")
    parser.add_argument("--codestral-layers", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a CPU shared with other jobs, "
                             "torch's spinning worker threads slow it down by an order of magnitude)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)

    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32, batch 1, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, best of {args.repeats}", flush=True)
    for name in args.models.split(","):
        if name == "small":
            bench(name, *build_random({**SMALL}), args)
        elif name == "codestral":
            bench(name, *build_random({**CODESTRAL, "num_hidden_layers": args.codestral_layers}), args)
        elif name == "asset":
            try:
                config, params, model = load_asset()
            except FileNotFoundError as err:
                print(f"asset      skipped: {err}")
                continue
            bench("asset", config, params, model, args)
        else:
            parser.error(f"unknown model {name!r}; choose from small, codestral, asset")


if __name__ == "__main__":
    main()
