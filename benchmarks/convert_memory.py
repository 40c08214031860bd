"""Peak host memory of ``python -m convert`` on a >= 1 GB sharded checkpoint.

Builds a synthetic Llama checkpoint (~267M float32 params, 4 shards + index), written
tensor by tensor so building it needs only one tensor in memory, then runs in child
processes, one after the other:

1. baseline: ``python -c "import jax, jax.numpy as jnp, convert; jnp.zeros(1).block_until_ready()"``
   (an interpreter that imported jax and the converter and started the CPU backend);
2. conversion: ``python -m convert SRC DST --quiet`` (load into jax params, write HF format).

Peak RSS of each is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` read after it exits
(the maximum over finished children, so after step 2 it is step 2's peak, as step 1 is
smaller). Prints ``ratio = (conversion peak - baseline peak) / param bytes``; the target is
below 1.5 (the output params plus at most half of them in transient buffers).

    python benchmarks/convert_memory.py [--layers 12] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamax_jax.convert import safetensors_io  # noqa: E402
from dynamax_jax.config import MistralConfig  # noqa: E402


def synthetic_config(layers: int) -> MistralConfig:
    return MistralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_layers=layers,
                         num_heads=16, num_kv_heads=16, head_dim=64, model_type="llama",
                         max_position_embeddings=2048)


def hf_specs(config: MistralConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    f32 = np.dtype(np.float32)
    specs = {"model.embed_tokens.weight": ((v, d), f32)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        specs.update({
            p + "input_layernorm.weight": ((d,), f32), p + "self_attn.q_proj.weight": ((q, d), f32),
            p + "self_attn.k_proj.weight": ((kv, d), f32), p + "self_attn.v_proj.weight": ((kv, d), f32),
            p + "self_attn.o_proj.weight": ((d, q), f32), p + "post_attention_layernorm.weight": ((d,), f32),
            p + "mlp.gate_proj.weight": ((f, d), f32), p + "mlp.up_proj.weight": ((f, d), f32),
            p + "mlp.down_proj.weight": ((d, f), f32),
        })
    specs["model.norm.weight"] = ((d,), f32)
    specs["lm_head.weight"] = ((v, d), f32)
    return specs


def build_checkpoint(directory: Path, config: MistralConfig) -> int:
    """Write the checkpoint (4+ shards); returns the param bytes."""
    specs = hf_specs(config)
    total = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in specs.values())

    def tensor(name: str) -> np.ndarray:
        shape, dtype = specs[name]
        rng = np.random.default_rng(abs(hash(name)) % 2**32)
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    (directory / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
    files = safetensors_io.write_sharded(directory, specs, tensor, max_shard_bytes=total // 4 + 1)
    assert len(files) >= 4, files
    return total


def peak_rss_bytes(args: list[str]) -> int:
    subprocess.run(args, check=True, cwd=REPO)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (12 gives ~267M params)")
    parser.add_argument("--keep", type=Path, default=None, help="build the checkpoint here and keep it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="convert_memory_") as tmp:
        root = args.keep or Path(tmp)
        src, dst = root / "src", root / "dst"
        src.mkdir(parents=True, exist_ok=True)
        config = synthetic_config(args.layers)
        start = time.perf_counter()
        param_bytes = build_checkpoint(src, config)
        print(f"checkpoint: {param_bytes / 1e9:.3f} GB float32 "
              f"({param_bytes // 4:,} params) in {len(list(src.glob('*.safetensors')))} shards, "
              f"written in {time.perf_counter() - start:.1f}s")

        baseline = peak_rss_bytes([sys.executable, "-c", "import jax, jax.numpy as jnp, convert; "
                                   "jnp.zeros(1).block_until_ready()"])
        start = time.perf_counter()
        peak = peak_rss_bytes([sys.executable, "-m", "convert", str(src), str(dst), "--quiet"])
        seconds = time.perf_counter() - start

        with safetensors_io.CheckpointReader(src) as a, safetensors_io.CheckpointReader(dst) as b:
            for name in ("model.layers.3.self_attn.q_proj.weight", "lm_head.weight"):
                assert np.array_equal(a.read(name), b.read(name)), f"{name} changed in conversion"

    print(f"baseline peak RSS (python -c 'import jax, jax.numpy as jnp, convert; jnp.zeros(1)'): "
          f"{baseline / 1e9:.3f} GB")
    print(f"conversion peak RSS (python -m convert SRC DST: load + write): {peak / 1e9:.3f} GB in {seconds:.1f}s")
    print(f"conversion peak - baseline: {(peak - baseline) / 1e9:.3f} GB for {param_bytes / 1e9:.3f} GB of params")
    print(f"without subtracting the baseline, peak / param bytes = {peak / param_bytes:.3f}")
    print(f"ratio {(peak - baseline) / param_bytes:.3f}")


if __name__ == "__main__":
    main()
