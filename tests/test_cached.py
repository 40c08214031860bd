"""train.cached: the cached-backbone trainer equals the direct one, the closed-form adapters
are the least-squares fit, and the command line writes loadable heads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamax_jax import exits as ex
from dynamax_jax.io import DataError
from dynamax_jax.config import Mamba2Config, MistralConfig
from dynamax_jax.models import module_for
from tests.test_distill import assert_second_writer_refused, write_tiny_model
from dynamax_jax.train import cached as C
from dynamax_jax.train import distill as T
from dynamax_jax.train.distill import DistillError

ROOT = Path(__file__).resolve().parents[1]


def _model(family):
    config = MistralConfig.tiny(num_layers=4) if family == "mistral" else Mamba2Config.tiny(num_layers=4)
    return config, module_for(config).init_params(config, jax.random.key(0))


@pytest.mark.parametrize("family, kind", [("mistral", "calm"), ("mistral", "mamba"), ("mamba2", "ffn")])
def test_cached_steps_equal_direct_steps(family, kind):
    """Two training steps on the cache (float32) give the direct path's losses and params."""
    config, params = _model(family)
    settings = T.DistillSettings(exit_kind=kind, exit_layers=(2, 3), topk=2, steps=2, batch_size=2, seq_len=12,
                                 ffn_expand=1)
    ec = settings.exit_config().resolve(config)
    tx = T.make_optimizer(settings)
    batches = [jax.random.randint(jax.random.key(i), (2, 12), 0, config.vocab_size) for i in (1, 2)]
    mask = jnp.ones((2, 12), jnp.float32)
    init = ex.init_exits(config, ec, jax.random.key(7))

    direct = jax.jit(T.make_train_step(config, ec, settings, tx))
    p, o, direct_losses = init, tx.init(init), []
    for tokens in batches:
        p, o, m = direct(params, p, o, tokens, mask)
        direct_losses.append(float(m["loss"]))
    direct_params = p

    run = C.make_backbone_pass(config, ec.layers, settings.topk)
    label = C.make_labeller(config, ec)
    step = jax.jit(T.make_classifier_step(config, ec, settings, tx))
    p, o, cached_losses = init, tx.init(init), []
    for tokens in batches:
        hidden, topk_ids, _, _ = run(params, tokens)
        labels = label(params, {"unused": jnp.zeros((2,))}, hidden, topk_ids)
        p, o, m = step(p, o, hidden, labels, mask)
        cached_losses.append(float(m["loss"]))
    np.testing.assert_allclose(cached_losses, direct_losses, rtol=1e-6)
    for name in direct_params:
        np.testing.assert_allclose(np.asarray(p[name]), np.asarray(direct_params[name]), rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_labels_equal_the_direct_objective():
    config, params = _model("mistral")
    tokens = jax.random.randint(jax.random.key(3), (3, 10), 0, config.vocab_size)
    from dynamax_jax.train.objective import backbone_pass
    for topk in (1, 3):
        _, want = backbone_pass(config, params, tokens, (1, 2, 3), topk)
        hidden, topk_ids, _, _ = C.make_backbone_pass(config, (1, 2, 3), topk)(params, tokens)
        got = C.make_labeller(config, ex.ExitConfig(layers=(1, 2, 3)))(params, {"unused": jnp.zeros((3,))},
                                                                         hidden, topk_ids)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_normal_equations_are_those_of_the_hidden_states():
    config, params = _model("mistral")
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, config.vocab_size)
    _, hidden = module_for(config).forward(config, params, tokens, return_hidden=True)
    hidden = np.asarray(hidden, np.float64)
    _, _, gram, cross = C.make_backbone_pass(config, (2, 3), 1)(params, tokens)
    for e, layer in enumerate((2, 3)):
        x = hidden[layer - 1].reshape(-1, config.hidden_size)
        x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        y = hidden[-1].reshape(-1, config.hidden_size) - x
        np.testing.assert_allclose(gram[e], x1.T @ x1, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(cross[e], x1.T @ y, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("family", ["mistral", "mamba2"])
def test_layer_means_are_the_weighted_means_of_the_hidden_states(family):
    """The fill shift's layer means: every layer's output averaged over the positions each
    weighting selects, batches padded (5 rows in batches of 2); an empty weighting gives
    zeros and a zero total."""
    config, params = _model(family)
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (5, 9), 0, config.vocab_size))
    mask = np.asarray(jax.random.bernoulli(jax.random.key(5), 0.4, (5, 9)))
    weights = np.stack([mask, ~mask, np.zeros_like(mask)], axis=1)  # [R, 3, T]
    _, hidden = module_for(config).forward(config, params, jnp.asarray(tokens), return_hidden=True)
    hidden = np.asarray(hidden, np.float64)
    means, totals = C.layer_means(config, params, tokens, weights, batch_size=2, progress=False)
    np.testing.assert_allclose(means[0], hidden[:, mask].mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(means[1], hidden[:, ~mask].mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(means[2], 0.0)
    np.testing.assert_array_equal(totals, [mask.sum(), (~mask).sum(), 0])


def test_affine_fit_recovers_an_exact_linear_map():
    rng = np.random.default_rng(0)
    d, n = 6, 200
    w, b = rng.normal(size=(d, d)), rng.normal(size=d)
    x = rng.normal(size=(n, d)) * 3.0 + 1.0
    target = x + x @ w + b  # the last layer's hidden state
    x1 = np.concatenate([x, np.ones((n, 1))], axis=1)
    gram, cross = (x1.T @ x1)[None], (x1.T @ (target - x))[None]
    fit = C.fit_affine_adapters(gram, cross, ridge=0.0)
    np.testing.assert_allclose(fit["adapter_w"][0], w, atol=1e-4)
    np.testing.assert_allclose(fit["adapter_b"][0], b, atol=1e-4)
    # the exits' own adapter code maps x to the target with it
    ec = ex.ExitConfig(layers=(1,), adapter="affine")
    got = ex.adapt(ec, {k: jnp.asarray(v[0]) for k, v in fit.items()}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), target, rtol=1e-3, atol=1e-3)
    # a ridge penalty shrinks the map towards the identity (W = 0)
    shrunk = C.fit_affine_adapters(gram, cross, ridge=10.0)
    assert np.linalg.norm(shrunk["adapter_w"][0]) < np.linalg.norm(fit["adapter_w"][0])


def test_reply_mask_marks_the_positions_that_predict_a_reply():
    marker, eos = [7, 8], 0
    tokens = np.array([[5, 7, 8, 3, 4, 0, 6, 7, 8, 9],    # prompt, marker, reply 3 4, EOS; next document's reply
                       [3, 4, 0, 5, 5, 5, 5, 5, 5, 5],    # a reply under way at the row's start is left out
                       [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]])   # no chat turn
    want = np.array([[0, 0, 1, 1, 1, 0, 0, 0, 1, 1],
                     [0] * 10, [0] * 10], bool)
    np.testing.assert_array_equal(C.reply_mask(tokens, marker, eos), want)
    assert C.reply_mask(tokens, None, eos).all()


def test_training_mask_keeps_prose_sources_whole():
    tokens = np.array([[5, 7, 8, 3, 0, 5], [7, 8, 4, 4, 0, 5], [1, 2, 3, 4, 5, 6]], np.int32)
    cache = C.Cache(meta={"sources": [{"path": "answers", "rows": 2}, {"path": "prose", "rows": 1}]},
                    hidden=None, topk=None, gram=None, cross=None, tokens=tokens)
    mask = C.training_mask(cache, [7, 8], 0, "replies")
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0], [1] * 6])
    assert C.training_mask(cache, [7, 8], 0, "all").all()


def test_masked_labels_equal_the_labels_of_every_position():
    """Labels computed only at masked positions (padded, batched) equal the full labeller's."""
    config, params = _model("mistral")
    tokens = jax.random.randint(jax.random.key(5), (5, 16), 0, config.vocab_size)
    hidden, topk_ids, _, _ = C.make_backbone_pass(config, (2, 3), 2)(params, tokens)
    ec = ex.ExitConfig(layers=(2, 3))
    want = np.asarray(C.make_labeller(config, ec)(params, {"unused": jnp.zeros((2,))}, hidden, topk_ids))
    cache = C.Cache(meta={}, hidden=np.asarray(hidden).transpose(1, 0, 2, 3), topk=np.asarray(topk_ids),
                    gram=None, cross=None)
    rows = np.array([0, 2, 3, 4])
    mask = np.random.default_rng(0).random((4, 16)) < 0.4
    got = C.cache_labels(config, params, ec, {}, cache, 3, rows, mask, progress=False)  # [4, E, T]
    np.testing.assert_array_equal(got, np.where(mask[:, None], want.transpose(1, 0, 2)[rows], False))


def test_reply_marker_is_the_generation_prompt(tmp_path):
    from transformers import AutoTokenizer

    from dynamax_jax.prompts import reply_marker
    model = write_tiny_model(tmp_path / "tiny")
    assert reply_marker(AutoTokenizer.from_pretrained(model)) is None  # no chat template
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
                               "{% if add_generation_prompt %}<a>{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert reply_marker(tokenizer) == tokenizer.encode("<a>", add_special_tokens=False)


@pytest.mark.parametrize("text, message", [
    ("a.jsonl", "expected PATH=TOKENS"), ("a.jsonl=0", "expected PATH=TOKENS"), ("a.jsonl=x", "expected PATH=TOKENS"),
    (",", "no source given")])
def test_bad_sources_are_refused(text, message):
    with pytest.raises(T.DistillError, match=message):
        C.parse_sources(text)
    assert C.parse_sources("a=1_000,b/c=5") == [C.Source("a", 1000), C.Source("b/c", 5)]


def _write_corpus(path, rows: int):
    """A JSON-lines corpus of ``rows`` short numbered sentences."""
    path.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog"}) + "\n"
                            for i in range(rows)))
    return path


@pytest.mark.slow
def test_cli_writes_loadable_heads_and_reuses_its_cache(tmp_path):
    model = write_tiny_model(tmp_path / "tiny")
    corpus = _write_corpus(tmp_path / "corpus.jsonl", 40)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dynamax_jax.train.cached", "--model", str(model), "--data", f"{corpus}=1200",
           "--exit-layers", "2,3", "--kinds", "calm,ffn", "--ffn-expand", "1", "--batch-size", "4",
           "--seq-len", "32", "--epochs", "2", "--out", str(out), "--no-progress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache"]["rows"] == 40 and summary["cache"]["sources"][0]["rows"] == 40  # ceil(1200 / 128) * 4
    for kind in ("calm", "ffn"):
        ec, params = ex.load_exits(out / f"exits-{kind}")
        assert ec.kind == kind and ec.layers == (2, 3) and ec.adapter == "affine"
        assert params["adapter_w"].shape == (2, 64, 64) and params["fill_shift"].shape == (2, 4, 64)
        np.testing.assert_array_equal(params["fill_shift"][:, :2], 0.0)  # layers up to the first exit
        assert summary["kinds"][kind]["tokens_seen"] == 2 * 9 * 4 * 32  # 38 training rows, 2 held out
    tokens = np.load(out / "cache" / C.TOKENS_FILE)  # the input ids, as the pipeline rebuilds them
    assert tokens.shape == (40, 32) and summary["top1_is_next_token"] is not None
    assert summary["train_on"] == "replies" and summary["labelled_tokens"] == 40 * 32  # no chat template: all
    labels = np.load(out / "cache" / "labels-affine-ridge0.001-rows40-seed0.npy")  # [rows, E, T]
    assert labels.shape == (40, 2, 32)
    assert [summary["label_rate"][k] for k in ("2", "3")] == pytest.approx(labels.mean(axis=(0, 2)).tolist())
    with np.load(out / "cache" / "layer-means-rows38-seed0.npz") as f:  # the 38 training rows (< 256)
        means, totals = f["means"], f["totals"]  # all positions, then where each exit is right
    assert means.shape == (3, 4, 64) and totals[0] == 38 * 32 and summary["fill_from"] == "exiting"
    e = 1 if totals[1] > 0 else 0  # exit 2's own means (all positions if it is never right)
    np.testing.assert_allclose(ex.load_exits(out / "exits-calm")[1]["fill_shift"][0, 3], means[e, 2] - means[e, 1],
                               rtol=1e-5, atol=1e-6)
    cache_mtime = (out / "cache" / "hidden.npy").stat().st_mtime
    again = subprocess.run(cmd + ["--kinds", "calm", "--overwrite"], cwd=ROOT, env=env, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr
    assert "reusing" in again.stderr and (out / "cache" / "hidden.npy").stat().st_mtime == cache_mtime
    assert json.loads((out / "summary.json").read_text())["seed"] == 0
    other = subprocess.run(cmd + ["--seq-len", "16", "--overwrite"], cwd=ROOT, env=env, capture_output=True,
                           text=True)
    assert other.returncode == 2 and "seq_len: 32 -> 16" in other.stderr and "--rebuild-cache" in other.stderr


@pytest.mark.slow
def test_a_cache_of_other_weights_or_data_is_refused_naming_what_changed(tmp_path):
    """meta.json records the contents of the model and the data, not only their paths: new
    weights or an edited data file under the same names are refused, naming what changed and
    the flag that starts over; --rebuild-cache computes the cache (and its labels) again."""
    model = write_tiny_model(tmp_path / "tiny")
    corpus = _write_corpus(tmp_path / "corpus.jsonl", 24)
    out = tmp_path / "run"
    argv = ["--model", str(model), "--data", f"{corpus}=512", "--exit-layers", "2,3", "--batch-size", "4",
            "--seq-len", "32", "--epochs", "1", "--fill-rows", "4", "--out", str(out), "--no-progress", "--overwrite"]
    assert C.main(argv) == 0
    first = json.loads((out / "summary.json").read_text())
    write_tiny_model(tmp_path / "tiny", seed=1)  # other weights, same path and architecture
    with pytest.raises(DistillError, match=r"the model's files .*--rebuild-cache") as err:
        C.main(argv)
    assert "the data's content" not in str(err.value)
    assert C.main(argv + ["--rebuild-cache"]) == 0
    rebuilt = json.loads((out / "summary.json").read_text())
    assert rebuilt["cache"]["model_fingerprint"] != first["cache"]["model_fingerprint"]
    assert rebuilt["label_rate"] != first["label_rate"]  # trained on the new model's states
    assert len(list((out / "cache").glob("labels-*.npy"))) == 1  # the old model's labels went with the cache
    ec, _ = ex.load_exits(out / "exits-calm")
    assert ec.trained_on == ex.TrainedOn("transformer", 4, 64, ec.trained_on.vocab_size,
                                         rebuilt["cache"]["model_fingerprint"])
    with corpus.open("a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(DistillError, match=rf"the data's content \({corpus}\)"):
        C.main(argv)


@pytest.mark.slow
def test_a_second_writer_on_one_output_is_refused_with_the_first_pid(tmp_path):
    model = write_tiny_model(tmp_path / "tiny")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog"}) + "\n")
    out = tmp_path / "run"
    argv = ["--model", str(model), "--data", f"{corpus}=256", "--exit-layers", "2,3", "--batch-size", "4",
            "--seq-len", "32", "--out", str(out), "--no-progress"]
    assert_second_writer_refused([sys.executable, "-m", "dynamax_jax.train.cached", *argv, "--seed", "0"], out,
                                 lambda: C.main(argv + ["--seed", "1"]), "train.cached")


def test_damaged_cache_files_are_named(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    meta = {"rows": 2, "exit_layers": [2], "seq_len": 4}
    (cache / "meta.json").write_text(json.dumps(meta))
    for name, array in (("hidden.npy", np.zeros((2, 1, 4, 8), np.float16)), ("topk.npy", np.zeros((2, 4, 1), np.int32)),
                        ("gram.npy", np.zeros((1, 9, 9))), ("cross.npy", np.zeros((1, 9, 8))),
                        (C.TOKENS_FILE, np.zeros((2, 4), np.int32))):
        np.save(cache / name, array)
    assert C.Cache.open(cache).hidden.shape == (2, 1, 4, 8)
    hidden = (cache / "hidden.npy").read_bytes()
    (cache / "hidden.npy").write_bytes(hidden[:-10])  # truncated
    with pytest.raises(DataError, match=rf"{cache / 'hidden.npy'}: not a readable .npy array .*--rebuild-cache"):
        C.Cache.open(cache)
    (cache / "hidden.npy").write_bytes(hidden)
    (cache / "meta.json").write_text('{"rows": 2, "exit_')
    with pytest.raises(DataError, match=rf"{cache / 'meta.json'}: not valid JSON"):
        C.Cache.open(cache)
    (cache / "meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=rf"{cache / 'meta.json'}: expected a JSON object"):
        C.Cache.open(cache)
    labels = tmp_path / "labels-none-rows2-seed0.npy"
    np.save(labels, np.zeros((2, 1, 4), bool))
    labels.write_bytes(labels.read_bytes()[:-3])
    with pytest.raises(DataError, match=rf"{labels}: not a readable .npy array"):
        C.load_array(labels)


@pytest.mark.slow
def test_cli_trains_on_replies_after_a_reply_marker(tmp_path):
    """--reply-marker: in a source of question-answer documents the classifiers learn at the
    answers only (labels elsewhere are not computed); a source without the marker counts whole."""
    model = write_tiny_model(tmp_path / "tiny")
    answers, prose = tmp_path / "answers.jsonl", tmp_path / "prose.jsonl"
    answers.write_text("".join(json.dumps({"text": f"Q: where is the fox {i}?\nA: over the lazy dog"}) + "\n"
                               for i in range(30)))
    prose.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps"}) + "\n" for i in range(30)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dynamax_jax.train.cached", "--model", str(model), "--data", f"{answers}=512,{prose}=256",
           "--exit-layers", "2,3", "--kinds", "calm", "--batch-size", "4", "--seq-len", "32", "--epochs", "1",
           "--reply-marker", "\\nA:", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    tokens = np.load(out / "cache" / C.TOKENS_FILE)
    from transformers import AutoTokenizer
    from dynamax_jax.train import data as D
    encode, eos = D.encoder_from_tokenizer(AutoTokenizer.from_pretrained(model))
    assert summary["reply_marker"] == encode("\nA:")
    mask = C.training_mask(C.Cache(summary["cache"], None, None, None, None, tokens), summary["reply_marker"], eos,
                           "replies")
    assert mask[:16].any() and not mask[:16].all() and mask[16:].all()  # answers: 16 rows; prose: 8, whole
    assert summary["labelled_tokens"] == mask.sum()
    labels = np.load(next((out / "cache").glob("labels-*-mask*.npy")))  # [labelled rows, E, T]
    rows = np.flatnonzero(mask.any(axis=1))
    assert labels.shape == (len(rows), 2, 32)
    assert not labels[~np.broadcast_to(mask[rows][:, None], labels.shape)].any()


def test_recall_at_precision_of_the_exit_features_study():
    # benchmarks/exit_features.py: the share the top scores can take at a running precision >= p.
    from dynamax_jax.eval.metrics import recall_at_precision

    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    label = np.array([1, 1, 0, 1, 0])
    assert recall_at_precision(score, label, 0.99) == pytest.approx(2 / 5)
    assert recall_at_precision(score, label, 0.75) == pytest.approx(4 / 5)
    assert recall_at_precision(score, label, 0.5) == pytest.approx(1.0)
    assert recall_at_precision(-score, label, 0.99) == 0.0
