"""Pretraining from scratch (train/pretrain.py, train/corpus.py) and the shipped small model.

The held-out fixture ``tests/fixtures/heldout.jsonl`` is a sample of the corpus' held-out
split (Python 3.11.7 standard library), written by
``python -m train.corpus --heldout-sample tests/fixtures/heldout.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dynamax_jax as dx
from dynamax_jax.assets import ASSET_DIR, asset_path
from dynamax_jax.train import corpus as corpus_lib
from dynamax_jax.train import pretrain

FIXTURE = Path(__file__).parent / "fixtures" / "heldout.jsonl"
SHIPPED = ASSET_DIR / "mamba2-small"


def heldout_texts() -> list[str]:
    return [doc.text for doc in corpus_lib.file_documents(FIXTURE)]


def mean_loss(config, params, windows: np.ndarray, weights: np.ndarray, batch_size: int) -> float:
    """Mean next-token cross-entropy of the full-depth model over the weighted targets."""
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch = jnp.asarray(windows[start:start + batch_size])
        logits = dx.forward(config, params, batch[:, :-1])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
        total += float(jnp.sum(losses * weights[start:start + batch_size]))
    return total / float(weights.sum())


# ----------------------------------------------------------------------------- shipped model

def test_shipped_model_beats_unigram_on_heldout_text():
    from tokenizers import Tokenizer

    path = asset_path("mamba2-small")
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 20 * 2**20, f"shipped model is {size / 2**20:.1f} MiB, over the 20 MiB budget"
    config, params = dx.load_pretrained(path, dtype=jnp.float32)
    assert config.model_type == "mamba2"
    assert config.num_layers >= 8

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == config.vocab_size
    stream = pretrain.encode_documents(tokenizer, heldout_texts())
    assert len(stream) > 4000
    results = json.loads((path / "pretrain_results.json").read_text())
    windows, weights = pretrain.pack_for_eval(stream, results["seq_len"], 8)
    loss = mean_loss(config, params, windows, weights, 8)

    counts = np.asarray(json.loads((path / "train_token_counts.json").read_text()))
    assert counts.shape == (config.vocab_size,)
    unigram = pretrain.unigram_cross_entropy(counts, stream[1:])
    print(f"held-out fixture: model {loss:.4f} nats/token, unigram {unigram:.4f}")
    # Far better than unigram, not just a little; a broken loader, scan or tokenizer gives a
    # loss at or above the unigram one. Measured values are in docs/pretrain.md.
    assert loss < unigram - 1.0, (loss, unigram)
    assert results["heldout_loss"] < results["unigram_heldout_loss"] - 1.0


def test_shipped_tokenizer_loads_with_transformers():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = asset_path("mamba2-small")
    auto = AutoTokenizer.from_pretrained(str(path))
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = heldout_texts()[0]
    ids = auto(text)["input_ids"]
    assert ids == raw.encode(text).ids
    assert auto.decode(ids) == text
    assert auto.eos_token == pretrain.EOT_TOKEN and auto.eos_token_id == raw.token_to_id(pretrain.EOT_TOKEN)


def test_asset_path_names_what_exists():
    with pytest.raises(FileNotFoundError, match="mamba2-small"):
        asset_path("no-such-model")


# ----------------------------------------------------------------------------- end to end

TINY_FLAGS = ["--layers", "2", "--d-model", "32", "--head-dim", "16", "--state-size", "16",
              "--chunk-size", "16", "--vocab-size", "300", "--no-stdlib",
              "--corpus-files", str(FIXTURE), "--heldout-percent", "20", "--steps", "30",
              "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "5",
              "--eval-every", "15", "--seed", "0", "--no-progress"]


@pytest.mark.slow  # two compiles and a 30-step training run: 30-50 s on 2 busy cores
@pytest.mark.parametrize("arch", ["mamba2", "mistral"])
def test_tiny_pretrain_writes_a_loadable_checkpoint(tmp_path, arch):
    out = tmp_path / "run"
    results = pretrain.main(["--arch", arch, "--out", str(out), *TINY_FLAGS])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary leftovers
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "train_token_counts.json", "pretrain_results.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "pretrain_results.json").read_text())["heldout_loss"] == results["heldout_loss"]
    assert results["tokens_seen"] == 30 * 4 * 32
    assert [h["step"] for h in results["history"]] == [15, 30]
    # Random init predicts ~uniformly (log 300 = 5.70 nats); 30 steps must learn something.
    assert results["heldout_loss"] < math.log(results["vocab_size"]) - 0.5

    config, params = dx.load_pretrained(out, dtype=jnp.float32)
    assert config.model_type == arch and config.num_layers == 2 and config.hidden_size == 32
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == config.vocab_size == results["vocab_size"]

    # The reloaded float32 weights reproduce the held-out loss the run reported.
    split = corpus_lib.build_corpus([FIXTURE], use_stdlib=False, heldout_percent=20)
    stream = pretrain.encode_documents(tokenizer, split.heldout)
    windows, weights = pretrain.pack_for_eval(stream, 32, 4)
    assert int(weights.sum()) == results["heldout_tokens_scored"]
    np.testing.assert_allclose(mean_loss(config, params, windows, weights, 4), results["heldout_loss"],
                               rtol=1e-5)
    train = pretrain.encode_documents(tokenizer, split.train)
    counts = json.loads((out / "train_token_counts.json").read_text())
    assert counts == np.bincount(train, minlength=config.vocab_size).tolist()
    np.testing.assert_allclose(pretrain.unigram_cross_entropy(np.asarray(counts), stream[1:]),
                               results["unigram_heldout_loss"], rtol=1e-9)


def _direct_training_loss(config, params, windows, objective, keep):
    """``training_loss`` position by position in float64: each row runs the model made of its
    kept layers alone; the prediction at 1-based layer ``l`` is the output of the last kept
    layer at or below ``l`` through the final norm and LM head."""
    import dataclasses
    from dynamax_jax.models import module_for

    module = module_for(config)
    windows = np.asarray(windows)
    layers = (config.num_layers, *objective.exit_layers)
    ce = np.zeros((len(layers),))
    for row, kept in enumerate(np.asarray(keep)):
        index = np.flatnonzero(kept)
        sub_config = dataclasses.replace(config, num_layers=len(index))
        sub = {**params, "layers": {k: v[index] for k, v in params["layers"].items()}}
        _, hidden = module.forward(sub_config, sub, jnp.asarray(windows[row:row + 1, :-1]), return_hidden=True)
        for j, layer in enumerate(layers):
            h = hidden[np.searchsorted(index, layer - 1, side="right") - 1]
            logits = np.asarray(module.head(config, params, h), np.float64)[0]  # [T, V]
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            ce[j] += -logp[np.arange(logits.shape[0]), windows[row, 1:]].mean() / len(windows)
    return ce[0] + objective.exit_weight * np.dot(objective.exit_weights, ce[1:]), ce[0]


@pytest.mark.parametrize("arch", ["mamba2", "mistral"])
def test_exit_losses_and_layer_dropout_equal_a_direct_computation(arch):
    """The early-exit-aware loss: the last layer's cross-entropy plus the weighted exits',
    with layer dropout's mask of that step; without exits and dropout, the plain loss."""
    config = (dx.Mamba2Config if arch == "mamba2" else dx.MistralConfig).tiny(num_layers=5)
    params = jax.jit(lambda key: dx.init_params(config, key))(jax.random.key(0))
    windows = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (3, 17)), jnp.int32)
    plain = pretrain.ExitObjective()
    loss, final = pretrain.training_loss(config, plain, params, windows, 0)
    direct = _direct_training_loss(config, params, windows, plain, np.ones((3, 5), bool))
    np.testing.assert_allclose([float(loss), float(final)], direct, rtol=2e-5)

    objective = pretrain.ExitObjective(exit_layers=(2, 4), exit_weights=(0.25, 0.75), exit_weight=0.7,
                                       drop_max=0.6, drop_warmup=10, seed=3)
    keep = np.asarray(objective.keep(config.num_layers, 7, 3))
    from dynamax_jax.train import ee_objective as O
    np.testing.assert_array_equal(keep, np.asarray(O.keep_mask(3, 7, 3, O.drop_probabilities(5, 0.6 * 0.7))))
    assert (~keep).any(), "the seed must drop some layer for this test to mean anything"
    loss, final = jax.jit(pretrain.training_loss, static_argnums=(0, 1))(config, objective, params, windows, 7)
    direct = _direct_training_loss(config, params, windows, objective, keep)
    np.testing.assert_allclose([float(loss), float(final)], direct, rtol=2e-5)
    assert float(loss) > float(final)


@pytest.mark.slow  # a 20-step training run with six exits: ~15 s
def test_early_exit_aware_pretraining_records_its_objective_and_every_layers_loss(tmp_path):
    out = tmp_path / "run"
    flags = list(TINY_FLAGS)
    flags[flags.index("--layers") + 1] = "4"
    flags[flags.index("--steps") + 1] = "20"
    results = pretrain.main(["--arch", "mamba2", "--out", str(out), *flags, "--exit-layers", "1,2,3",
                             "--exit-weights", "uniform", "--layer-dropout", "0.3"])
    written = json.loads((out / "pretrain_results.json").read_text())
    assert written["exit_objective"]["exit_layers"] == [1, 2, 3]
    assert written["exit_objective"]["drop_max"] == 0.3
    np.testing.assert_allclose(written["exit_objective"]["exit_weights"], [1 / 3] * 3, rtol=1e-6)
    by_layer = results["heldout_loss_by_layer"]
    assert len(by_layer) == 4 and by_layer[-1] == results["heldout_loss"]
    # Each layer's entry is that layer's own prediction on the held-out tokens.
    config, params = dx.load_pretrained(out, dtype=jnp.float32)
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    split = corpus_lib.build_corpus([FIXTURE], use_stdlib=False, heldout_percent=20)
    windows, weights = pretrain.pack_for_eval(pretrain.encode_documents(tokenizer, split.heldout), 32, 4)
    _, eval_step = pretrain.make_steps(config, optax.sgd(0.0))
    np.testing.assert_allclose(pretrain.heldout_losses(eval_step, params, windows, weights, 4), by_layer, rtol=1e-5)
    np.testing.assert_allclose(mean_loss(config, params, windows, weights, 4), by_layer[-1], rtol=1e-5)


def test_failed_write_keeps_the_previous_run(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    config = dx.MistralConfig.tiny()
    params = jax.jit(lambda key: dx.init_params(config, key))(jax.random.key(0))
    tokenizer = pretrain.train_tokenizer(heldout_texts(), 300)
    counts = np.zeros(config.vocab_size, np.int64)
    out = tmp_path / "run"
    pretrain.write_output(out, config, params, tokenizer, counts, {"run": 1}, "bfloat16", False)
    assert json.loads((out / "pretrain_results.json").read_text()) == {"run": 1}
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == 300
    loaded_config, loaded = dx.load_pretrained(out)
    assert loaded_config == config and loaded["embed"].shape == params["embed"].shape

    with pytest.raises(FileExistsError, match="--overwrite"):
        pretrain.write_output(out, config, params, tokenizer, counts, {"run": 2}, "float32", False)

    def broken_save(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(dx, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain.write_output(out, config, params, tokenizer, counts, {"run": 3}, "float32", True)
    assert json.loads((out / "pretrain_results.json").read_text()) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, message", [
    (["--arch", "gpt2"], ("invalid choice: 'gpt2'", "mamba2", "mistral")),
    (["--steps", "0"], "--steps: expected a positive integer, got 0"),
    (["--lr", "fast"], "--lr: expected a positive number, got 'fast'"),
    (["--save-dtype", "int8"], ("invalid choice: 'int8'", "float32", "bfloat16")),
    (["--vocab-size", "100"], "--vocab-size must be at least 258"),
    (["--arch", "mamba2", "--d-model", "80", "--head-dim", "64"], "--head-dim 64 must divide expand*d-model = 160"),
    (["--arch", "mistral", "--d-model", "96", "--head-dim", "64"], "--head-dim 64 must divide --d-model 96"),
    (["--arch", "mistral", "--kv-heads", "3"], "--kv-heads 3 must divide the 4 query heads"),
    (["--no-stdlib"], "--no-stdlib needs --corpus-files"),
    (["--corpus-files", "/nonexistent/book.txt"], "'/nonexistent/book.txt' does not exist"),
    (["--corpus-files", __file__], "is not a .txt or .jsonl file"),
    (["--heldout-percent", "100"], "--heldout-percent must be below 100"),
    (["--exit-layers", "8"], "--exit-layers must lie below the last layer (8), got 8"),
    (["--exit-layers", "3,2"], "--exit-layers: expected distinct positive layers in increasing order, got '3,2'"),
    (["--exit-layers", "2,x"], "--exit-layers: expected comma-separated layer numbers, got '2,x'"),
    (["--exit-layers", "2,3", "--exit-weights", "1"], "--exit-weights:"),
    (["--layer-dropout", "1"], "--layer-dropout must be in [0, 1), got 1.0"),
    (["--exit-weight", "-1"], "--exit-weight must be a non-negative number, got -1.0"),
])
def test_bad_flags_fail_clearly(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        pretrain.main([*flags, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # argparse quotes choices differently across Python versions: check the pieces.
    for piece in (message,) if isinstance(message, str) else message:
        assert piece in err
    assert not (tmp_path / "run").exists()


def test_existing_out_needs_overwrite(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit):
        pretrain.main(["--out", str(tmp_path / "run")])
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_missing_out_is_named(capsys):
    with pytest.raises(SystemExit):
        pretrain.main([])
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        pretrain.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in pretrain.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
            assert action.option_strings[0] in text


# ----------------------------------------------------------------------------- data

def test_pack_covers_every_target_once():
    stream = np.arange(23, dtype=np.int32)
    windows = pretrain.pack(stream, 5)
    assert windows.shape == (4, 6)
    np.testing.assert_array_equal(windows[:, 1:].ravel(), np.arange(1, 21))
    windows, weights = pretrain.pack_for_eval(stream, 5, 4)
    assert windows.shape == (8, 6) and weights.shape == (8, 5)
    targets = windows[:, 1:][weights > 0]
    np.testing.assert_array_equal(targets, np.arange(1, 23))
    with pytest.raises(ValueError, match="too short for --seq-len 30"):
        pretrain.pack(stream, 30)


def test_unigram_cross_entropy_is_add_one_smoothed():
    counts = np.array([3, 1, 0])
    # p = (c + 1) / (N + V) = [4/7, 2/7, 1/7]
    expected = -(math.log(4 / 7) + math.log(1 / 7)) / 2
    assert pretrain.unigram_cross_entropy(counts, np.array([0, 2])) == pytest.approx(expected, rel=1e-12)


def test_batches_are_seeded_and_cover_an_epoch():
    windows = np.arange(10)[:, None] * np.ones((1, 3), np.int32)
    first = [b[:, 0].tolist() for b, _ in zip(pretrain.batches(windows, 5, seed=1), range(2))]
    again = [b[:, 0].tolist() for b, _ in zip(pretrain.batches(windows, 5, seed=1), range(2))]
    assert first == again and sorted(first[0] + first[1]) == list(range(10))
    with pytest.raises(ValueError, match="only 10 training windows for --batch-size 11"):
        next(pretrain.batches(windows, 11, seed=0))


def test_tokenizer_round_trips_and_ends_documents():
    tokenizer = pretrain.train_tokenizer(heldout_texts(), 400)
    assert tokenizer.get_vocab_size() == 400 and tokenizer.token_to_id(pretrain.EOT_TOKEN) == 0
    text = "Return the number of bytes read, or None.\n\tÉtat: 100%"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    stream = pretrain.encode_documents(tokenizer, ["one two", "three"])
    assert stream.dtype == np.int32 and (stream == 0).sum() == 2 and stream[-1] == 0


# ----------------------------------------------------------------------------- corpus

def test_split_is_stable_filtered_and_deduplicated():
    prose = "This function returns the number of items that the container holds right now. " * 2
    docs = [corpus_lib.Document(f"mod{i}.py", prose + str(i)) for i in range(200)]
    docs += [corpus_lib.Document("dup.py", prose + "0"),            # duplicate text
             corpus_lib.Document("short.py", "Return x."),          # too short
             corpus_lib.Document("table.py", "| 1 | 2 | 3 |\n" * 20)]  # not prose
    first = corpus_lib.split(docs, heldout_percent=10)
    again = corpus_lib.split(list(reversed(docs[:200])) + docs[200:], heldout_percent=10)
    assert len(first.train) + len(first.heldout) == 200
    assert set(first.heldout) == set(again.heldout)  # decided by unit, not by order
    assert 8 <= len(first.heldout) <= 35
    assert set(first.heldout) == {d.text for d in docs[:200] if corpus_lib.is_heldout(d.unit, 10)}
    with pytest.raises(ValueError, match="heldout_percent must be in"):
        corpus_lib.split(docs, heldout_percent=0)


def test_docstrings_and_comments_are_collected_in_order():
    source = '''"""Module doc."""
# first comment line
#   indented continuation
x = 1


class A:
    """Class doc.

    Detail:
        indented more.
    """

    def f(self):
        """Method doc."""
'''
    assert corpus_lib.docstrings(source) == ["Module doc.", "Class doc.\n\nDetail:\n    indented more.", "Method doc."]
    assert corpus_lib.comment_blocks(source) == ["first comment line\n  indented continuation"]
    assert corpus_lib.docstrings("def broken(:\n") == []


def test_local_files(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("First paragraph\nstill first.\n\n\nSecond paragraph.\n")
    assert [d.text for d in corpus_lib.file_documents(book)] == ["First paragraph\nstill first.",
                                                                 "Second paragraph."]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [d.text for d in corpus_lib.file_documents(rows)] == ["a", "b"]
    rows.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl, line 2: expected an object with a string field 'text'"):
        corpus_lib.file_documents(rows)
    rows.write_text('{"text": "a"\n')
    with pytest.raises(ValueError, match=r"rows.jsonl, line 1: not valid JSON"):
        corpus_lib.file_documents(rows)
    with pytest.raises(ValueError, match=r"expected a \.jsonl/\.json/\.parquet/\.txt file"):
        corpus_lib.file_documents(Path(__file__))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus_lib.file_documents(tmp_path / "missing.txt")


def test_fixture_is_a_heldout_sample():
    texts = heldout_texts()
    assert 40 <= len(texts) and sum(map(len, texts)) <= 20000
    assert all(corpus_lib.is_prose(t) for t in texts)
