"""Training data: documents -> tokens -> packed fixed-length rows -> batches, with grain.

Shape legend: B rows per batch on this process, R tokens per row.

The pipeline (every stage deterministic given the seed)::

    documents   local .jsonl/.json/.parquet/.txt files or the embedded default corpus
                (``train.corpus.read_documents``), or a Hugging Face dataset streamed
                from the Hub (FineWeb-Edu by default)
    -> shuffled by document with the seed (a new order each epoch), repeated forever
    -> sharded by process: process p of P takes every P-th document
    -> tokenized, with the EOS id appended to each document as a separator
    -> packed: concatenated and cut into rows of exactly R tokens (no padding; a long
       document continues in the next row)
    -> rows shuffled within a window of ``row_shuffle_window`` rows (seeded), so that
       the rows of one long document do not land in the same batch
    -> batched: {"tokens", "segment_ids", "positions"}, each int32 [B, R]

Row length: distillation needs no targets (its labels come from the backbone), so it
uses R = seq_len. Next-token training should ask for R = seq_len + 1 and use
``tokens[:, :-1]`` as inputs and ``tokens[:, 1:]`` as targets. ``segment_ids`` number
the documents inside a row from 1 and ``positions`` count tokens within each document;
a model that must not attend across documents can mask with them.

Resuming: ``iter(dataset)`` is a grain ``DatasetIterator``; ``encode_state(iterator.get_state())``
is a small JSON-serialisable dict, and a fresh iterator of the same dataset given
``decode_state`` of it with ``set_state`` yields exactly the batches the first one would have yielded
next (for Hub streams: as exactly as the ``datasets`` stream can resume, which is
exact for unshuffled parquet/json shards). Bad inputs (missing or unreadable files,
an empty corpus, an unreachable Hub) raise ``DataError`` when the dataset is built,
before any training work.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from dynamax_jax.io import DataError
from dynamax_jax.train.corpus import LOCAL_SUFFIXES, read_documents

# Hub datasets whose useful config is not the default one.
_DEFAULT_HUB_CONFIGS = {"HuggingFaceFW/fineweb-edu": "sample-10BT"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")

Encode = Callable[[str], Sequence[int]]


# ----------------------------------------------------------------------------- sources


def _is_hub_id(data: str) -> bool:
    if data.startswith("hf:"):
        return True
    looks_local = data.startswith(("/", ".", "~")) or data.endswith(LOCAL_SUFFIXES)
    return not looks_local and not os.path.exists(data) and bool(_HUB_ID.match(data))


def _split_hub_id(data: str) -> tuple[str, str | None]:
    name = data.removeprefix("hf:")
    name, _, config = name.partition(":")
    return name, config or _DEFAULT_HUB_CONFIGS.get(name)


class _HubStreamIterator(grain.DatasetIterator):
    """Iterates a ``datasets.IterableDataset`` forever (one epoch after another), with its
    ``state_dict`` as the grain state."""

    def __init__(self, stream, text_field: str):
        super().__init__()
        self._stream, self._text_field = stream, text_field
        self._epoch = 0
        self._stream.set_epoch(0)
        self._it = iter(self._stream)

    def __next__(self) -> str:
        for _ in range(2):
            for record in self._it:
                text = record.get(self._text_field)
                if isinstance(text, str) and text.strip():
                    return text
            self._epoch += 1  # this epoch is done (or empty): start the next one
            self._stream.set_epoch(self._epoch)
            self._it = iter(self._stream)
        raise DataError(f"the streamed dataset has no non-empty {self._text_field!r} field in a whole epoch")

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "stream": copy.deepcopy(self._stream.state_dict())}

    def set_state(self, state: dict[str, Any]) -> None:
        self._epoch = state["epoch"]
        self._stream.set_epoch(self._epoch)
        self._stream.load_state_dict(state["stream"])
        self._it = iter(self._stream)


class _HubStream(grain.IterDataset):
    def __init__(self, stream, text_field: str):
        super().__init__()
        self._stream, self._text_field = stream, text_field

    def __iter__(self) -> grain.DatasetIterator:
        return _HubStreamIterator(self._stream, self._text_field)


def open_hub_stream(data: str, text_field: str, process_index: int, process_count: int):
    """A streamed Hugging Face dataset split across processes (``datasets``' own sharding:
    whole files per process when their number divides evenly, else every P-th record)."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    name, config = _split_hub_id(data)
    try:
        stream = datasets.load_dataset(name, config, split="train", streaming=True)
    except Exception as e:  # noqa: BLE001 -- any failure here means "no usable stream"
        raise DataError(
            f"cannot stream the Hugging Face dataset {name!r} (config {config!r}): {type(e).__name__}: {e}. "
            "Without a network, pass local .jsonl/.parquet/.txt files with --data, or omit --data "
            "to use the embedded default corpus.") from e
    return split_dataset_by_node(stream, rank=process_index, world_size=process_count)


# ----------------------------------------------------------------------------- pipeline


def _process_index_and_count(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is out of range for process_count {process_count}")
    return process_index, process_count


def _tokenizer(encode: Encode, eos_id: int):
    def tokenize(text: str) -> dict[str, np.ndarray]:
        ids = list(encode(text))
        ids.append(eos_id)
        return {"tokens": np.asarray(ids, dtype=np.int32)}
    return tokenize


def _rename(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": packed["tokens"], "segment_ids": packed["tokens_segment_ids"].astype(np.int32),
            "positions": packed["tokens_positions"].astype(np.int32)}


def make_dataset(data: str | None, *, encode: Encode, eos_id: int, row_len: int, batch_size: int,
                 seed: int = 0, process_index: int | None = None, process_count: int | None = None,
                 text_field: str = "text", row_shuffle_window: int = 256,
                 hub_stream=None) -> grain.IterDataset:
    """The batch pipeline described in the module docstring, as a grain ``IterDataset``.

    data: ``None`` (embedded corpus), a local file or directory, or a Hub dataset id
        (``NAME`` or ``NAME:CONFIG``, optionally prefixed ``hf:``; ``train.corpus.FINEWEB_EDU`` streams
        FineWeb-Edu sample-10BT).
    encode: text -> token ids (no special tokens); eos_id: appended after each document.
    row_len: R, tokens per row; batch_size: B, rows per batch on this process.
    process_index / process_count: this process's shard (default: from jax).
    hub_stream: an already opened ``datasets.IterableDataset`` to use instead of opening
        ``data`` on the Hub (tests; callers that build their own stream). It is used as
        given: shard it by process yourself.
    Everything that can be checked (paths, readability, emptiness, sizes) is checked here.
    """
    for name, value in (("row_len", row_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(eos_id, (int, np.integer)) or eos_id < 0:
        raise DataError(f"eos_id must be a non-negative token id (the document separator), got {eos_id!r}")
    if not 0 <= seed < 2**32:
        raise DataError(f"seed must be in [0, 2**32), got {seed}")
    process_index, process_count = _process_index_and_count(process_index, process_count)

    if hub_stream is None and (data is None or not _is_hub_id(data)):
        docs = read_documents(data, text_field)
        # Shuffle before repeat: each epoch is a fresh permutation of whole documents.
        ds = grain.MapDataset.source(docs).shuffle(seed=seed).repeat()
        ds = ds[process_index::process_count].to_iter_dataset()
    else:
        stream = hub_stream if hub_stream is not None else open_hub_stream(
            data, text_field, process_index, process_count)
        # A stream has no random access: shuffle documents within a window instead.
        ds = grain.experimental.WindowShuffleIterDataset(_HubStream(stream, text_field),
                                                         window_size=1024, seed=seed)
    ds = ds.map(_tokenizer(encode, int(eos_id)))
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": row_len})
    if row_shuffle_window > 1:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=row_shuffle_window,
                                                         seed=(seed + 1) % 2**32)
    return ds.map(_rename).batch(batch_size, drop_remainder=True)


def encoder_from_tokenizer(tokenizer) -> tuple[Encode, int]:
    """``(encode, eos_id)`` from a ``tokenizers.Tokenizer`` or a transformers tokenizer.
    ``encode`` adds no special tokens; the EOS id separates documents."""
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None and hasattr(tokenizer, "token_to_id"):
        for name in ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"):
            if tokenizer.token_to_id(name) is not None:
                eos_id = tokenizer.token_to_id(name)
                break
    if eos_id is None:
        raise DataError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token to separate documents")

    def encode(text: str) -> list[int]:
        out = tokenizer.encode(text, add_special_tokens=False)
        return out.ids if hasattr(out, "ids") else list(out)

    return encode, int(eos_id)


def encode_state(state: Any) -> Any:
    """A JSON-safe copy of an iterator state. grain compares some state entries with
    tuples (e.g. packing's empty-slice sentinel), so tuples are tagged to survive JSON."""
    if isinstance(state, tuple):
        return {"__tuple__": [encode_state(v) for v in state]}
    if isinstance(state, list):
        return [encode_state(v) for v in state]
    if isinstance(state, dict):
        return {str(k): encode_state(v) for k, v in state.items()}
    if isinstance(state, np.integer):
        return int(state)
    return state


def decode_state(state: Any) -> Any:
    """Inverse of ``encode_state``."""
    if isinstance(state, dict):
        if set(state) == {"__tuple__"}:
            return tuple(decode_state(v) for v in state["__tuple__"])
        return {k: decode_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [decode_state(v) for v in state]
    return state


def take(iterator: Iterator[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """The next ``n`` batches (a small helper for tests and benchmarks)."""
    return [next(iterator) for _ in range(n)]
