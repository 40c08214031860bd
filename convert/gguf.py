"""GGUF (llama.cpp) files -> ``(MistralConfig, params)`` and their embedded tokenizer.

    config, params = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", dtype=jnp.float32)
    tokenizer = load_gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")

A GGUF file is a header of typed key/value metadata (``llama.block_count``, ...), a table of
tensors (name, dims, quantization type, offset) and the tensor data; numpy shapes are the
GGUF dims reversed, i.e. ``[out, in]`` like a Hugging Face ``nn.Linear``. The file is
read through the ``gguf`` package's memory-mapped ``GGUFReader``.

Conversion is a table of (GGUF name, Hugging Face name, transform) rows: ``GGUFTensors``
presents each GGUF tensor under its Hugging Face name, dequantized to float32
(``gguf.quants.dequantize``: F32/F16/BF16, Q4_0/Q4_1/Q8_0, K-quants, ...) and with
llama.cpp's q/k row permutation undone, so the generic table loader
(``convert.tables.load_params`` with the Mistral/Llama table) maps it to our layout and
fills the stacked ``[L, ...]`` params layer by layer (one dequantized tensor in flight).

llama.cpp's converter permutes the rows of each q/k head from the rotate-half layout
``[2, H/2]`` to the interleaved one ``[H/2, 2]``; we read them back as ``[H/2, 2]`` and
swap, per head (key/value head count for k).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import gguf
import jax.numpy as jnp
import numpy as np

from dynamax_jax.convert.errors import (CheckpointError, CorruptFileError, MissingTensorError, ShapeMismatchError,
                                        UnsupportedModelError)
from dynamax_jax.config import ConfigError, MistralConfig
from dynamax_jax.io import atomic_file

SUPPORTED_ARCHITECTURES = ("llama",)
GGUF_MAGIC = b"GGUF"
# Tensors whose presence means math our Llama model does not do (biases, Llama 3 RoPE
# frequency scaling, mixture of experts): refuse rather than silently ignore them.
_UNSUPPORTED_TENSOR_MARKERS = (".bias", "rope_freqs.", "ffn_gate_inp.", "_exps.")
# Stale buffers some old conversions carry; harmless.
_IGNORED_TENSOR_SUFFIXES = ("attn_rot_embd.weight",)
# Rows dequantized per call (in elements): bounds gguf's temporaries to a few MB.
_DEQUANT_CHUNK_ELEMENTS = 1 << 20


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: rows ``[heads * H, D]`` stored per head as
    ``[H/2, 2]`` (interleaved pairs) -> ``[2, H/2]`` (rotate-half, Hugging Face layout)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation (the inverse of ``unpermute_rows``); used to write GGUF files."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _plain(w: np.ndarray, config: MistralConfig) -> np.ndarray:
    return w


# (GGUF name, Hugging Face name, transform of the dequantized [out, in] float32 tensor).
# "{i}" is the 0-based layer index.
GGUF_TABLE: list[tuple[str, str, Callable[[np.ndarray, MistralConfig], np.ndarray]]] = [
    ("token_embd.weight", "model.embed_tokens.weight", _plain),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", _plain),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight",
     lambda w, c: unpermute_rows(w, c.num_heads)),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight",
     lambda w, c: unpermute_rows(w, c.num_kv_heads)),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight", _plain),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight", _plain),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", _plain),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight", _plain),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight", _plain),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight", _plain),
    ("output_norm.weight", "model.norm.weight", _plain),
    ("output.weight", "lm_head.weight", _plain),
]


# --------------------------------------------------------------------------- reading


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CorruptFileError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")


def open_gguf(path) -> Any:
    """A ``gguf.GGUFReader`` for ``path``, with every tensor's data checked to lie inside the
    file. Raises ``CorruptFileError`` naming the file if it is not GGUF, truncated or corrupt."""
    path = Path(path)
    _check_magic(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader fails in many ways on a damaged header
        raise CorruptFileError(f"{path}: truncated or corrupt GGUF file, cannot parse its header "
                               f"({type(err).__name__}: {err})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise CorruptFileError(f"{path}: truncated GGUF file: tensor '{tensor.name}' needs bytes up to "
                                   f"{end}, the file has {size}")
    return reader


def field_value(reader, key: str, default: Any = None) -> Any:
    """The value of metadata ``key`` (int/float/bool/str, list for arrays), or ``default``."""
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):
        return field.contents()
    if not field.data:
        return []
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        item = field.types[-1]
        if item == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def _array_length(reader, key: str) -> int | None:
    field = reader.fields.get(key)
    return None if field is None else len(field.data)  # no decoding of 49k strings


def _float32_value(value) -> float:
    """GGUF stores floats as float32: 1e-5 arrives as 9.9999997e-06. Take the shortest decimal
    that rounds to the same float32, as the source config wrote it."""
    return float(str(np.float32(value)))


def config_from_gguf(reader, path="<gguf>") -> MistralConfig:
    """``MistralConfig`` (model_type ``llama``) from a GGUF file's metadata.

    Raises ``UnsupportedModelError`` listing the supported architectures for anything but
    ``general.architecture = llama``, ``CheckpointError`` naming a missing key, and
    ``UnsupportedModelError`` for features the model lacks (RoPE scaling, partial rotary,
    mixture of experts)."""
    arch = field_value(reader, "general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: GGUF metadata has no 'general.architecture'")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {arch!r}; "
                                    f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def required(key: str):
        value = field_value(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata is missing the required key '{arch}.{key}'")
        return value

    hidden = int(required("embedding_length"))
    heads = int(required("attention.head_count"))
    kv_heads = int(field_value(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(field_value(reader, f"{arch}.attention.key_length", hidden // heads))
    value_dim = int(field_value(reader, f"{arch}.attention.value_length", head_dim))
    rope_dim = int(field_value(reader, f"{arch}.rope.dimension_count", head_dim))
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{path}: key_length {head_dim} != value_length {value_dim} is not supported")
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dim} "
                                    f"< head_dim {head_dim}) are not supported")
    scaling = field_value(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedModelError(f"{path}: RoPE scaling {scaling!r} is not supported (only plain RoPE)")
    if int(field_value(reader, f"{arch}.expert_count", 0) or 0) > 0:
        raise UnsupportedModelError(f"{path}: mixture-of-experts models are not supported")

    tensor_shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    vocab = field_value(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = _array_length(reader, "tokenizer.ggml.tokens")
    if vocab is None and "token_embd.weight" in tensor_shapes:
        vocab = tensor_shapes["token_embd.weight"][0]
    if vocab is None:
        raise CheckpointError(f"{path}: cannot tell the vocabulary size (no '{arch}.vocab_size', "
                              f"no tokenizer.ggml.tokens, no token_embd.weight)")

    sliding = field_value(reader, f"{arch}.attention.sliding_window")
    try:
        return MistralConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(required("feed_forward_length")),
            num_layers=int(required("block_count")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=_float32_value(field_value(reader, f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=_float32_value(field_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            sliding_window=int(sliding) if sliding else None,
            tie_word_embeddings="output.weight" not in tensor_shapes,
            max_position_embeddings=int(field_value(reader, f"{arch}.context_length", 4096)),
            model_type="llama",
            bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        )
    except ConfigError as err:
        raise CheckpointError(f"{path}: inconsistent GGUF metadata: {err}") from None


class GGUFTensors:
    """The tensors of a GGUF file under their Hugging Face names, dequantized to float32 with
    q/k unpermuted: the reader interface ``convert.tables.load_params`` expects (``path``,
    ``in``, ``names()``, ``shape(name)``, ``read(name)``). Unmapped GGUF tensors keep their
    GGUF names."""

    def __init__(self, reader, config: MistralConfig, path):
        self.path = Path(path)
        self.config = config
        self._tensors = {t.name: t for t in reader.tensors}
        self._source: dict[str, tuple[str, Callable]] = {}  # HF name -> (GGUF name, transform)
        for gguf_name, hf_name, transform in GGUF_TABLE:
            layers = range(config.num_layers) if "{i}" in gguf_name else [None]
            for i in layers:
                src = gguf_name.format(i=i) if i is not None else gguf_name
                if src in self._tensors:
                    dst = hf_name.format(i=i) if i is not None else hf_name
                    self._source[dst] = (src, transform)
        mapped = {src for src, _ in self._source.values()}
        for name in self._tensors:
            if name not in mapped:
                self._source.setdefault(name, (name, _plain))

    def __contains__(self, name: str) -> bool:
        return name in self._source

    def names(self) -> list[str]:
        return [name for name, (src, _) in self._source.items() if not src.endswith(_IGNORED_TENSOR_SUFFIXES)]

    def gguf_name(self, name: str) -> str:
        return self._source[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._source:
            raise MissingTensorError(f"{self.path}: GGUF file has no tensor for '{name}'")
        tensor = self._tensors[self._source[name][0]]
        return tuple(int(d) for d in reversed(tensor.shape))  # GGUF dims are innermost first

    def read(self, name: str) -> np.ndarray:
        """Dequantized float32 ``[out, in]`` tensor (q/k unpermuted)."""
        src, transform = self._source[name]
        tensor = self._tensors[src]
        shape = self.shape(name)
        out = np.empty(shape, np.float32)
        # Dequantize a block of rows at a time: gguf's dequantize makes several temporaries
        # the size of its output, which for a whole embedding would double the peak memory.
        step = len(out) if len(shape) < 2 else max(1, _DEQUANT_CHUNK_ELEMENTS // int(np.prod(shape[1:])))
        try:
            for begin in range(0, len(out), step):
                rows = gguf.quants.dequantize(tensor.data[begin:begin + step], tensor.tensor_type)
                out[begin:begin + step] = np.asarray(rows, np.float32).reshape(out[begin:begin + step].shape)
        except NotImplementedError as err:
            raise CheckpointError(f"{self.path}: tensor '{src}' has quantization type "
                                  f"{tensor.tensor_type.name}, which gguf cannot dequantize ({err})") from None
        return transform(out, self.config)


def _check_supported_tensors(reader, path) -> None:
    odd = [t.name for t in reader.tensors if any(m in t.name for m in _UNSUPPORTED_TENSOR_MARKERS)]
    if odd:
        raise UnsupportedModelError(f"{path}: GGUF file has tensors this Llama model does not support "
                                    f"(biases, RoPE frequency scaling or experts), e.g. {odd[:5]}")


def load_gguf(path, dtype=jnp.float32, progress: bool = False, mesh=None):
    """Load ``(MistralConfig, params)`` from a llama-architecture GGUF file, params cast to
    ``dtype`` and laid out as in ``dynamax_jax/models/mistral.py`` (stacked ``[L, ...]``).

    With ``mesh`` every param is created sharded by the sharding table
    (``convert.tables.load_params``). Quantized blocks do not line up with shards, so each
    tensor is dequantized whole, once for every distinct shard that needs part of it:
    the host holds one dequantized float32 tensor at a time, and loading takes about as
    many dequantizations as there are distinct shards per param.

    Raises ``CorruptFileError`` for a truncated/corrupt file, ``UnsupportedModelError``
    listing the supported architectures, ``MissingTensorError`` / ``ShapeMismatchError``
    naming the GGUF tensor at fault (with expected and found shapes)."""
    from dynamax_jax.convert.mistral import MISTRAL
    from dynamax_jax.convert.tables import load_params

    path = Path(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    _check_supported_tensors(reader, path)
    tensors = GGUFTensors(reader, config, path)
    try:
        params = load_params(tensors, config, MISTRAL, dtype=dtype, progress=progress, mesh=mesh)
    except (MissingTensorError, ShapeMismatchError) as err:
        raise type(err)(_gguf_names(str(err), tensors)) from None
    return config, params


def _gguf_names(message: str, tensors: GGUFTensors) -> str:
    """Rewrite Hugging Face tensor names in a loader message to the GGUF names the user sees."""
    for gguf_name, hf_name, _ in GGUF_TABLE:
        for i in range(tensors.config.num_layers) if "{i}" in gguf_name else [None]:
            hf = hf_name.format(i=i) if i is not None else hf_name
            if f"'{hf}'" in message:
                message = message.replace(f"'{hf}'", f"'{gguf_name.format(i=i) if i is not None else gguf_name}'")
    return message


# --------------------------------------------------------------------------- tokenizer


def default_cache_dir() -> Path:
    """Where converted tokenizers are cached: ``$DYNAMAX_CACHE``, else
    ``$XDG_CACHE_HOME/dynamax_jax``, else ``~/.cache/dynamax_jax``."""
    if os.environ.get("DYNAMAX_CACHE"):
        return Path(os.environ["DYNAMAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dynamax_jax"


def _cache_key(path: Path) -> str:
    """The file (path, size, mtime) and the versions of the libraries that converted and will
    read the tokenizer: another transformers may convert the same file differently, and its
    saved tokenizer need not read back under another version."""
    import tokenizers
    import transformers

    stat = path.stat()
    ident = (f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|transformers {transformers.__version__}"
             f"|tokenizers {tokenizers.__version__}")
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _convert_tokenizer(path: Path):
    """transformers' own GGUF tokenizer conversion, with the GGUF chat template enforced.
    transformers reads a GGUF file through PyTorch, even for its tokenizer alone."""
    import importlib.util

    from transformers import AutoTokenizer

    if importlib.util.find_spec("torch") is None:
        raise CheckpointError(f"{path}: transformers needs PyTorch to read the tokenizer of a GGUF file, and torch is "
                              "not installed; install it (the CPU build is enough: pip install torch)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # transformers fails with assorted types on odd GGUF tokenizers
        reader = open_gguf(path)  # a clearer message when the file itself is at fault
        if field_value(reader, "tokenizer.ggml.model") is None:
            raise CheckpointError(f"{path}: GGUF file has no embedded tokenizer (no 'tokenizer.ggml.model')") from None
        raise CheckpointError(f"{path}: transformers cannot build a tokenizer from this GGUF file "
                              f"({type(err).__name__}: {err})") from None
    if not tokenizer.chat_template:
        # transformers copies tokenizer.chat_template; parse the header again only if it did not.
        template = field_value(open_gguf(path), "tokenizer.chat_template")
        if template:
            tokenizer.chat_template = template
    return tokenizer


def load_gguf_tokenizer(path, cache_dir=None, use_cache: bool = True):
    """A transformers tokenizer rebuilt from the tokenizer embedded in a GGUF file, with the
    file's ``tokenizer.chat_template`` set.

    Conversion takes ~15 s for a 49k-token vocabulary, so the result is saved under
    ``cache_dir`` (default ``default_cache_dir()/tokenizers``), keyed by the file's path,
    size and modification time and the transformers and tokenizers versions, and reloaded from there next time. The cache is written to
    a temporary directory and renamed when complete; if it cannot be written, the
    tokenizer is still returned."""
    from transformers import AutoTokenizer

    path = Path(path)
    _check_magic(path)
    if not use_cache:
        return _convert_tokenizer(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenizers"
    target = root / _cache_key(path)
    if (target / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(target))
        except (ValueError, OSError) as err:  # a damaged cache entry: rebuild it
            warnings.warn(f"ignoring unreadable tokenizer cache {target} ({err})", stacklevel=2)
            shutil.rmtree(target, ignore_errors=True)
    tokenizer = _convert_tokenizer(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            tokenizer.save_pretrained(str(tmp))
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (target / "tokenizer.json").exists():  # not a lost race with another process
                raise
    except OSError as err:
        warnings.warn(f"could not cache the converted tokenizer in {root} ({err})", stacklevel=2)
    return tokenizer


__all__ = ["GGUF_TABLE", "GGUFTensors", "SUPPORTED_ARCHITECTURES", "config_from_gguf", "default_cache_dir",
           "field_value", "load_gguf", "load_gguf_tokenizer", "open_gguf", "permute_rows", "unpermute_rows"]


def finish_gguf(writer) -> None:
    """Write out and close a ``gguf.GGUFWriter`` whose fields and tensors are all added."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_float32_gguf(src, dst) -> Path:
    """Write ``src`` (a GGUF file) to ``dst`` with every tensor stored as float32 (metadata
    copied unchanged), for engines that should stream the same float32 weights as ours
    (``benchmarks/decode.py --llama-cpp``); returns ``dst``. Kept when it exists already."""
    dst = Path(dst)
    if dst.exists():
        return dst
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    with atomic_file(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        for tensor in reader.tensors:
            data = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
            writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
        finish_gguf(writer)
    return dst
