"""``python -m convert SRC DST [--dtype float32|bfloat16|float16]``: any supported checkpoint
(Hugging Face directory, Codestral Mamba directory, .gguf file) -> Hugging Face format.

DST is written under a temporary name and renamed when complete: after a failure it does
not exist.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynamax_jax.cli import add_debug_flag, run_cli
from dynamax_jax.io import DTYPES, atomic_directory, parse_dtype


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a checkpoint to Hugging Face format (config.json + safetensors), "
                    "loadable with transformers.AutoModelForCausalLM.from_pretrained and dynamax_jax.load_pretrained.")
    parser.add_argument("src", metavar="SRC",
                        help="source checkpoint: a Hugging Face directory (config.json + model.safetensors or "
                             "model.safetensors.index.json; model_type mistral, llama or mamba2), a Codestral "
                             "Mamba directory (params.json + consolidated.safetensors) or a .gguf file")
    parser.add_argument("dst", metavar="DST", help="output directory (must not exist, or be empty, unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of the written weights (default: float32; GGUF quantised tensors are "
                             "dequantised to it)")
    parser.add_argument("--max-shard-gb", type=_positive_float, default=5.0,
                        help="largest safetensors shard in GiB; bigger models are split into shards listed in "
                             "model.safetensors.index.json (default: 5)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing DST: replace the weights, config and tokenizer files of a "
                             "checkpoint there and keep any other file")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="do not copy (or, from .gguf, rebuild) the tokenizer files into DST")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from dynamax_jax.convert.checkpoint import HF_FILES, TOKENIZER_FILES, copy_tokenizer, load_checkpoint, write_hf_dir

    dst = Path(args.dst)
    if dst.exists() and not args.overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace a converted checkpoint in it "
                              "(other files there are kept)")
    dtype = parse_dtype(args.dtype)
    progress = not args.quiet
    config, params = load_checkpoint(args.src, dtype=dtype, progress=progress)
    with atomic_directory(dst, owned=HF_FILES + TOKENIZER_FILES, overwrite=True) as tmp:
        write_hf_dir(config, params, tmp, max_shard_bytes=int(args.max_shard_gb * 2**30), progress=progress)
        tokenizer_files = [] if args.no_tokenizer else copy_tokenizer(args.src, tmp)
    n_params = sum(int(leaf.size) for leaf in jax.tree.leaves(params))
    print(f"wrote {args.dst}: {type(config).__name__} ({getattr(config, 'model_type', config.family)}), "
          f"{n_params:,} params as {args.dtype}"
          + (f", tokenizer files: {', '.join(tokenizer_files)}" if tokenizer_files else ", no tokenizer"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m convert"))
