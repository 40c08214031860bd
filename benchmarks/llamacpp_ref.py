"""llama.cpp on the same model, for benchmarks/decode.py: the fastest float32 engine measured
on this machine (docs/performance.md), timed in the same run as ours.

Needs ``llama-cpp-python`` (not a dependency of the project: an sdist compiled locally in about
five minutes). Its default native build crashed in decode on this machine; this one works:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF \\
        -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install llama-cpp-python==0.3.36

The shipped GGUF is Q4_1; ``dynamax_jax.convert.gguf.write_float32_gguf`` rewrites it with every tensor dequantized to float32,
so that both engines stream the same 538 MB of weights per token.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class LlamaCpp:
    """A float32 llama.cpp model: ``generate(ids, n)`` returns exactly ``n`` greedy tokens
    (no stop token) after the prompt ``ids``, prefill included, like ``dx.generate``."""

    def __init__(self, gguf_path, threads: int, context: int):
        from llama_cpp import Llama  # decode.py checks that it is installed before loading anything

        self.model = Llama(model_path=str(gguf_path), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, verbose=False)

    def generate(self, ids: list[int], n: int) -> np.ndarray:
        out = []
        # Forget the previous call's tokens: generate(reset=True) alone reuses the cache of a
        # matching prefix, which skipped the prefill of a repeated prompt (2,048 tokens: 25
        # instead of 11 tokens/s).
        self.model.reset()
        for token in self.model.generate(ids, top_k=1, temp=0.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return np.asarray(out)

    def close(self) -> None:
        """Free the model now (llama-cpp-python's own finalizer fails at interpreter exit)."""
        self.model.close()

    @property
    def version(self) -> str:
        import llama_cpp
        return llama_cpp.__version__


def default_f32_path(src) -> Path:
    """Where decode.py keeps the float32 rewrite of ``src``: ``$XDG_CACHE_HOME/dynamax_jax``
    (default ``~/.cache/dynamax_jax``)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dynamax_jax"
    root.mkdir(parents=True, exist_ok=True)
    return root / (Path(src).stem + ".F32.gguf")
