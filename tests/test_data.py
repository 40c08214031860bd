"""The grain data pipeline: packing, seeded shuffling, process sharding, exact resume, and
clear errors for bad inputs. No network: Hub streams are replaced by local ``datasets``
iterables."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dynamax_jax.train import corpus
from dynamax_jax.train import data as D

EOS = 0


def encode(text: str) -> list[int]:
    """Bytes as token ids; the documents below never contain byte 0 (the EOS id)."""
    return list(text.encode("utf-8"))


def make_docs(n: int = 24) -> list[str]:
    return [f"document {i}: " + "word " * (i % 9 + 1) for i in range(n)]


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return str(path)


def json_roundtrip(state):
    return D.decode_state(json.loads(json.dumps(D.encode_state(state))))


def build(source, **kw):
    args = dict(encode=encode, eos_id=EOS, row_len=32, batch_size=4, seed=7, process_index=0, process_count=1)
    args.update(kw)
    return D.make_dataset(source, **args)


def stream_of_documents(dataset, n_rows: int) -> list[list[int]]:
    """Concatenate the first ``n_rows`` rows (in order) and split at EOS into documents."""
    it = iter(dataset)
    rows = []
    while len(rows) < n_rows:
        rows.extend(next(it)["tokens"])
    flat = np.concatenate(rows[:n_rows]).tolist()
    docs, current = [], []
    for t in flat:
        if t == EOS:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs


def test_packing_is_lossless_and_the_first_epoch_is_a_permutation(tmp_path):
    docs = make_docs()
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    total = sum(len(encode(d)) + 1 for d in docs)
    ds = build(path, row_shuffle_window=1)  # rows in packing order
    batch = next(iter(ds))
    assert batch["tokens"].shape == (4, 32) and batch["tokens"].dtype == np.int32
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    pieces = stream_of_documents(ds, total // 32 + 1)[:len(docs)]
    assert sorted(map(tuple, pieces)) == sorted(tuple(encode(d)) for d in docs)
    assert [tuple(p) for p in pieces] != [tuple(encode(d)) for d in docs], "documents were not shuffled"


def test_segment_ids_and_positions_mark_documents():
    ds = build(None, row_len=64, batch_size=2, row_shuffle_window=1)
    batch = next(iter(ds))
    for tokens, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(seg >= 1)
        starts = np.flatnonzero(np.diff(seg)) + 1
        assert np.all(pos[starts] == 0)
        # a document ends with EOS right before the next segment starts
        assert np.all(tokens[starts - 1] == EOS)


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", make_docs())
    a = D.take(iter(build(path, seed=3)), 6)
    b = D.take(iter(build(path, seed=3)), 6)
    c = D.take(iter(build(path, seed=4)), 6)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_two_processes_get_disjoint_halves_of_each_epoch(tmp_path):
    docs = make_docs(24)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    per_process = []
    for p in range(2):
        ds = build(path, process_index=p, process_count=2, row_shuffle_window=1)
        per_process.append(stream_of_documents(ds, 16)[:12])
    seen0, seen1 = ({tuple(d) for d in docs_p} for docs_p in per_process)
    assert len(seen0) == len(seen1) == 12
    assert not seen0 & seen1
    assert seen0 | seen1 == {tuple(encode(d)) for d in docs}


@pytest.mark.parametrize("skip", [0, 5, 37])
def test_restored_iterator_yields_exactly_the_remaining_batches(skip):
    ds = build(None, row_len=48, batch_size=3, seed=11, row_shuffle_window=16)
    it = iter(ds)
    D.take(it, skip)
    state = json_roundtrip(it.get_state())
    expected = D.take(it, 12)
    resumed = iter(build(None, row_len=48, batch_size=3, seed=11, row_shuffle_window=16))
    resumed.set_state(state)
    got = D.take(resumed, 12)
    for x, y in zip(expected, got):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_stream_source_restores_exactly_across_epochs():
    datasets = pytest.importorskip("datasets")
    docs = make_docs(30)

    def stream():
        return datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset(num_shards=3)

    ds = build("hf:unused/name", hub_stream=stream(), row_len=16, batch_size=2, row_shuffle_window=4)
    it = iter(ds)
    D.take(it, 40)  # one epoch is about 23 batches: the state is taken in the second epoch
    state = json_roundtrip(it.get_state())
    expected = D.take(it, 40)
    resumed = iter(build("hf:unused/name", hub_stream=stream(), row_len=16, batch_size=2, row_shuffle_window=4))
    resumed.set_state(state)
    got = D.take(resumed, 40)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(expected, got))


def test_default_corpus_is_embedded_small_and_english():
    assert os.path.getsize(corpus.DEFAULT_CORPUS) <= 1_000_000
    docs = corpus.read_documents(None)
    assert len(docs) >= 100 and sum(map(len, docs)) >= 300_000
    assert docs[0].startswith("argparse")


def test_local_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["from parquet", None, "second parquet"], "id": [1, 2, 3]}),
                   folder / "a.parquet")
    write_jsonl(folder / "b.jsonl", ["from jsonl", "  "])
    (folder / "c.txt").write_text("a whole text file is one document\n\nwith paragraphs")
    (folder / "ignored.csv").write_text("x,y")
    docs = corpus.read_documents(str(folder))
    assert docs == ["from parquet", "second parquet", "from jsonl",
                    "a whole text file is one document\n\nwith paragraphs"]


def test_bad_inputs_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(D.DataError, match="does not exist"):
        build(str(tmp_path / "missing.jsonl"))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl.*line 2.*not valid JSON"):
        build(str(bad_json))
    wrong_field = write_jsonl(tmp_path / "field.jsonl", ["x"], field="content")
    with pytest.raises(D.DataError, match="string field 'text'"):
        build(wrong_field)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    with pytest.raises(D.DataError, match=r"cannot read data file .*binary.txt.*UnicodeDecodeError"):
        build(str(binary))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet")
    with pytest.raises(D.DataError, match=r"cannot read data file .*corrupt.parquet"):
        build(str(corrupt))
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "   ", "\n"])
    with pytest.raises(D.DataError, match="is empty"):
        build(empty)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(D.DataError, match="holds no"):
        build(str(tmp_path / "empty_dir"))
    csv = tmp_path / "x.csv"
    csv.write_text("a,b")
    with pytest.raises(D.DataError, match="unsupported type"):
        build(str(csv))
    with pytest.raises(D.DataError, match="row_len must be a positive integer"):
        build(None, row_len=0)
    with pytest.raises(D.DataError, match="process_index 2 is out of range"):
        build(None, process_index=2, process_count=2)

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(D.DataError, match=r"cannot stream .*fineweb-edu.*sample-10BT.*ConnectionError"):
        build(corpus.FINEWEB_EDU)


def test_hub_ids_and_local_paths_are_told_apart(tmp_path):
    assert D._is_hub_id("HuggingFaceFW/fineweb-edu")
    assert D._is_hub_id("hf:org/name:config")
    assert not D._is_hub_id("data/train.jsonl")
    assert not D._is_hub_id("./org/name")
    assert D._split_hub_id("HuggingFaceFW/fineweb-edu") == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
    assert D._split_hub_id("hf:a/b:c") == ("a/b", "c")
