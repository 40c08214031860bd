"""Early-exit-aware fine-tuning (``train.ee_tune``, ``train.ee_objective``, ``dynamax_jax.delta``):
each loss term against a direct numpy computation, layer dropout (off: the plain forward; on:
the layers its seed drops, checked against a model built from the kept layers alone), the LoRA
merge against the unmerged factors and the merged weights, the delta loader's refusal of
another base model, and a short command-line run. Tiny random models only."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax import delta as dl
from dynamax_jax.models import module_for
from dynamax_jax.train import ee_objective as O
from dynamax_jax.train import ee_tune as E
from dynamax_jax.train.errors import DistillError
from tests.test_distill import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"mistral": lambda: dx.MistralConfig.tiny(num_layers=4), "mamba2": lambda: dx.Mamba2Config.tiny(num_layers=4)}


@functools.partial(jax.jit, static_argnums=(0, 5))
def _tuned_logits(config, params, tokens, keep, lora, spec):
    """The last layer's logits of ``ee_objective.layer_stack`` (compiled once per shape)."""
    return module_for(config).head(config, params, O.layer_stack(config, params, tokens, keep, lora, spec)[-1])


def _tokens(config, batch=2, length=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length)), jnp.int32)


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _direct_topk_kl(teacher_logits, student_logits, k, rest):
    """The top-k KL of ``ee_objective``'s docstring, position by position in float64."""
    lp, lq = _log_softmax(teacher_logits.astype(np.float64)), _log_softmax(student_logits.astype(np.float64))
    out = np.zeros(teacher_logits.shape[:-1])
    for pos in np.ndindex(out.shape):
        top = np.argsort(-lp[pos], kind="stable")[:k]
        p, q = np.exp(lp[pos][top]), np.exp(lq[pos][top])
        if rest == "renormalize":
            p = p / p.sum()
            out[pos] = np.sum(p * np.log(p / q))
            continue
        others = np.setdiff1d(np.arange(lp.shape[-1]), top)
        p_rest, q_rest = np.exp(lp[pos][others]).sum(), np.exp(lq[pos][others]).sum()
        out[pos] = np.sum(p * np.log(p / q)) + (p_rest * np.log(p_rest / q_rest) if len(others) else 0.0)
    return out


@pytest.mark.parametrize("rest", O.RESTS)
def test_topk_kl_equals_a_direct_computation(rest):
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(0, 2, (2, 3, 40)).astype(np.float32), rng.normal(0, 2, (2, 3, 40)).astype(np.float32)
    for k in (1, 5, 40):
        got = O.topk_kl(O.teacher_topk(jnp.asarray(teacher), k), jnp.asarray(student), rest)
        np.testing.assert_allclose(np.asarray(got), _direct_topk_kl(teacher, student, k, rest), rtol=1e-4, atol=1e-6)
    full = np.sum(np.exp(_log_softmax(teacher)) * (_log_softmax(teacher) - _log_softmax(student)), axis=-1)
    np.testing.assert_allclose(np.asarray(O.topk_kl(O.teacher_topk(jnp.asarray(teacher), 40), jnp.asarray(student))),
                               full, rtol=1e-4, atol=1e-6)  # K = V: the full KL
    same = O.topk_kl(O.teacher_topk(jnp.asarray(teacher), 5), jnp.asarray(teacher), rest)
    np.testing.assert_allclose(np.asarray(same), 0.0 if rest == "bucket" else _direct_topk_kl(teacher, teacher, 5, rest),
                               atol=1e-5)


def _numpy_head(config, params, h):
    p = {k: np.asarray(v, np.float64) for k, v in params.items() if k != "layers"}
    h = np.asarray(h, np.float64)
    y = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + config.rms_norm_eps) * p["final_norm"]
    return y @ (p["lm_head"] if "lm_head" in p else p["embed"].T)


def test_final_and_exit_terms_equal_a_direct_computation():
    config = dx.MistralConfig.tiny(num_layers=4)
    original = dx.init_params(config, jax.random.key(0))
    noise = dx.init_params(config, jax.random.key(1))
    tuned = jax.tree.map(lambda a, b: a + 0.5 * b, original, noise)
    tokens = _tokens(config)
    mask = jnp.asarray(np.random.default_rng(3).random(tokens.shape) < 0.7, jnp.float32)
    objective = O.Objective(exit_layers=(1, 3), exit_weights=(0.25, 0.75), final_weight=0.7, exit_weight=1.3, topk=6)
    teacher = jax.jit(O.original_topk, static_argnums=(0, 3))(config, original, tokens, objective.topk)
    tuned_loss = jax.jit(O.tuned_loss, static_argnums=(0, 1))
    loss, terms = tuned_loss(config, objective, tuned, tokens, mask, teacher)

    teacher_logits = np.asarray(dx.forward(config, original, tokens), np.float64)
    forward = jax.jit(module_for(config).forward, static_argnums=(0, 3))
    _, hidden = forward(config, tuned, tokens, True)  # the model's own scan over its layers
    m = np.asarray(mask, np.float64)
    mean = lambda x: np.sum(x * m) / m.sum()  # noqa: E731
    direct = {}
    for name, layer in (("final", 4), ("exit1", 1), ("exit3", 3)):
        logits = _numpy_head(config, tuned, hidden[layer - 1])
        direct[name] = (mean(_direct_topk_kl(teacher_logits, logits, 6, "bucket")),
                        mean(np.argmax(logits, -1) == np.argmax(teacher_logits, -1)))
    np.testing.assert_allclose(float(terms["final_kl"]), direct["final"][0], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(terms["exit_kl"]), [direct["exit1"][0], direct["exit3"][0]], rtol=1e-4)
    np.testing.assert_allclose(float(terms["final_agree"]), direct["final"][1])
    np.testing.assert_allclose(np.asarray(terms["exit_agree"]), [direct["exit1"][1], direct["exit3"][1]])
    expected = 0.7 * direct["final"][0] + 1.3 * (0.25 * direct["exit1"][0] + 0.75 * direct["exit3"][0])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    assert direct["final"][0] > 1e-3 and direct["exit1"][0] > 1e-3  # the terms are not trivially zero here

    off = O.Objective(exit_layers=(1, 3), exit_weights=(0.25, 0.75), final_weight=1.0, exit_weight=0.0, topk=6)
    loss_off, terms_off = tuned_loss(config, off, tuned, tokens, mask, teacher)
    assert "exit_kl" not in terms_off
    np.testing.assert_allclose(float(loss_off), direct["final"][0], rtol=1e-4)


def test_exit_adapters_are_the_ridge_fit_and_the_exit_terms_read_through_them():
    config = dx.MistralConfig.tiny(num_layers=4)
    params = dx.init_params(config, jax.random.key(0))
    batches = [_tokens(config, batch=3, length=16, seed=s) for s in range(3)]
    adapters = O.fit_exit_adapters(config, params, batches, (1, 3), ridge=1e-6)
    forward = jax.jit(module_for(config).forward, static_argnums=(0, 3))
    hidden = [np.asarray(forward(config, params, t, True)[1], np.float64) for t in batches]
    for e, layer in enumerate((1, 3)):  # least squares of h_L - h on [h, 1]
        x = np.concatenate([h[layer - 1].reshape(-1, h.shape[-1]) for h in hidden])
        y = np.concatenate([h[-1].reshape(-1, h.shape[-1]) for h in hidden]) - x
        sol = np.linalg.lstsq(np.concatenate([x, np.ones((len(x), 1))], axis=1), y, rcond=None)[0]
        np.testing.assert_allclose(adapters["adapter_w"][e], sol[:-1], atol=2e-3)
        np.testing.assert_allclose(adapters["adapter_b"][e], sol[-1], atol=2e-3)

    tokens = _tokens(config, seed=7)
    mask = jnp.ones(tokens.shape, jnp.float32)
    objective = O.Objective(exit_layers=(1, 3), exit_weights=(0.5, 0.5), topk=6)
    teacher = O.original_topk(config, params, tokens, 6)
    adapters = {k: jnp.asarray(v) for k, v in adapters.items()}
    _, terms = O.tuned_loss(config, objective, params, tokens, mask, teacher, adapters=adapters)
    h = np.asarray(forward(config, params, tokens, True)[1], np.float64)
    teacher_logits = np.asarray(dx.forward(config, params, tokens), np.float64)
    for e, layer in enumerate((1, 3)):
        adapted = h[layer - 1] + h[layer - 1] @ np.asarray(adapters["adapter_w"][e]) + np.asarray(adapters["adapter_b"][e])
        direct = _direct_topk_kl(teacher_logits, _numpy_head(config, params, adapted), 6, "bucket").mean()
        np.testing.assert_allclose(float(terms["exit_kl"][e]), direct, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", CONFIGS)
def test_layer_dropout_off_is_the_plain_forward(family):
    config = CONFIGS[family]()
    params = dx.init_params(config, jax.random.key(0))
    tokens = _tokens(config)
    plain = np.asarray(dx.forward(config, params, tokens))
    assert O.Objective(exit_layers=(2,), exit_weights=(1.0,), drop_max=0.0).keep(config.num_layers, 5, 2) is None
    keep = O.keep_mask(0, 5, 2, O.drop_probabilities(config.num_layers, 0.0))
    assert bool(jnp.all(keep))
    for k in (None, keep):
        np.testing.assert_allclose(np.asarray(_tuned_logits(config, params, tokens, k, None, None)), plain,
                                   rtol=1e-5, atol=1e-5)


def test_layer_dropout_drops_the_expected_layers():
    np.testing.assert_allclose(np.asarray(O.drop_probabilities(5, 0.4)), [0.0, 0.1, 0.2, 0.3, 0.4], atol=1e-7)
    np.testing.assert_allclose(float(O.curriculum(25, 100)), 0.25)
    assert float(O.curriculum(250, 100)) == 1.0 and float(O.curriculum(3, 0)) == 1.0
    probabilities = O.drop_probabilities(5, 0.4)
    first = np.asarray(O.keep_mask(7, 3, 20000, probabilities))
    np.testing.assert_array_equal(first, np.asarray(O.keep_mask(7, 3, 20000, probabilities)))  # seeded
    assert not np.array_equal(first, np.asarray(O.keep_mask(7, 4, 20000, probabilities)))  # each step its own
    assert first[:, 0].all()  # p = 0 at the first layer
    np.testing.assert_allclose(1 - first.mean(axis=0), np.asarray(probabilities), atol=0.015)
    ramp = jnp.asarray([0.0, 0.0, 0.0, 1.0])  # the last layer is always dropped
    assert not np.asarray(O.keep_mask(0, 0, 8, ramp))[:, 3].any()

    config = dx.MistralConfig.tiny(num_layers=4)
    params = dx.init_params(config, jax.random.key(0))
    tokens = _tokens(config, batch=4)
    objective = O.Objective(exit_layers=(2,), exit_weights=(1.0,), drop_max=0.9, seed=11)
    keep = np.asarray(objective.keep(config.num_layers, 2, 4))
    np.testing.assert_array_equal(keep, np.asarray(O.keep_mask(11, 2, 4, O.drop_probabilities(4, 0.9))))
    assert (~keep).any() and keep.any(axis=1).all()
    logits = np.asarray(_tuned_logits(config, params, tokens, jnp.asarray(keep), None, None))
    for row, kept in enumerate(keep):  # a row equals the model made of its kept layers alone
        layers = np.flatnonzero(kept)
        sub_config = dx.MistralConfig.tiny(num_layers=len(layers))
        sub = {**params, "layers": {k: v[layers] for k, v in params["layers"].items()}}
        np.testing.assert_allclose(logits[row], np.asarray(dx.forward(sub_config, sub, tokens[row:row + 1]))[0],
                                   rtol=1e-5, atol=1e-5)


def _random_lora(config, spec, seed=1):
    lora = dl.init_lora(config, spec, jax.random.key(seed))
    return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(seed + 1), a.shape), lora)


@pytest.mark.parametrize("family", CONFIGS)
def test_lora_merge_equals_the_unmerged_factors_and_the_merged_weights(family):
    config = CONFIGS[family]()
    params = dx.init_params(config, jax.random.key(0))
    spec = dl.LoraSpec.for_model(config, rank=3, alpha=5.0, layers=(2, 4))
    untouched = dl.merge_lora(params, dl.init_lora(config, spec, jax.random.key(1)), spec)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(untouched), jax.tree.leaves(params)))  # B = 0
    lora = _random_lora(config, spec)
    merged = dl.merge_lora(params, lora, spec)
    for target in spec.targets:
        w, got = np.asarray(params["layers"][target]), np.asarray(merged["layers"][target])
        a, b = np.asarray(lora[target]["a"], np.float64), np.asarray(lora[target]["b"], np.float64)
        np.testing.assert_array_equal(got[[0, 2]], w[[0, 2]])  # layers without factors
        expected = w[[1, 3]] + (5.0 / 3) * np.einsum("nir,nro->nio", a, b).reshape(w[[1, 3]].shape)
        np.testing.assert_allclose(got[[1, 3]], expected, rtol=1e-5, atol=1e-6)
    tokens = _tokens(config)
    with_factors = _tuned_logits(config, params, tokens, None, lora, spec)
    np.testing.assert_allclose(np.asarray(with_factors), np.asarray(dx.forward(config, merged, tokens)),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(dx.forward(config, merged, tokens)), np.asarray(dx.forward(config, params, tokens)))


def test_delta_round_trip_and_refusal_of_another_base_model(tmp_path):
    config = dx.MistralConfig.tiny(num_layers=2)
    params = dx.init_params(config, jax.random.key(0))
    dx.save_pretrained(config, params, tmp_path / "base")
    dx.save_pretrained(config, dx.init_params(config, jax.random.key(1)), tmp_path / "other-weights")
    other = dx.MistralConfig.tiny(num_layers=3)
    dx.save_pretrained(other, dx.init_params(other, jax.random.key(0)), tmp_path / "other-config")
    spec = dl.LoraSpec.for_model(config, rank=2, targets=("wq", "wo", "w_down"), layers=(2,))
    lora = _random_lora(config, spec)
    _, loaded = dx.load_pretrained(tmp_path / "base")
    dl.save_delta(tmp_path / "delta", "lora", dl.lora_tensors(lora), dl.base_record(config, loaded, tmp_path / "base"), spec)
    _, tuned = dl.load_tuned(tmp_path / "base", tmp_path / "delta")
    expected = dl.merge_lora(loaded, lora, spec)
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    with pytest.raises(dl.OtherBaseModelError, match=r"other-weights.*fingerprint") as err:
        dl.load_tuned(tmp_path / "other-weights", tmp_path / "delta")
    assert str(tmp_path / "base") in str(err.value) and str(tmp_path / "delta") in str(err.value)
    with pytest.raises(dl.OtherBaseModelError, match=r"configs differ \(num_hidden_layers: 2 vs 3"):
        dl.load_tuned(tmp_path / "other-config", tmp_path / "delta")

    # a full delta: every param replaced, and refused over the size limit
    full = jax.tree.map(lambda a: a * 1.5, loaded)
    tensors = {k: np.asarray(v) for k, v in dl.flatten_params(full).items()}
    dl.save_delta(tmp_path / "full", "full", tensors, dl.base_record(config, loaded))
    _, tuned = dl.load_tuned(tmp_path / "base", tmp_path / "full")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(full)))
    with pytest.raises(dl.DeltaError, match="over the 20 MB"):
        dl.check_delta_size(dl.MAX_DELTA_BYTES + 1, "full")


def test_a_delta_of_the_default_model_finds_it_wherever_it_is_installed(tmp_path):
    from dynamax_jax.default_model import smollm2_gguf_path
    assert dl.base_source(None) == dl.DEFAULT_BASE == dl.base_source(str(smollm2_gguf_path()))
    assert dl.base_source("owner/name") == "owner/name"
    meta = {"base": {"source": dl.DEFAULT_BASE, "path": "/elsewhere/model.gguf"}}
    assert dl.base_location(meta, tmp_path) == smollm2_gguf_path()
    assert dl.base_location({"base": {"path": "/elsewhere/model.gguf"}}, tmp_path) == "/elsewhere/model.gguf"
    with pytest.raises(dl.DeltaError, match="records no base model"):
        dl.base_location({"base": {}}, tmp_path)


def test_smollm2_lora_delta_at_rank_8_on_every_matrix_of_every_layer_fits_in_20_mb():
    smollm2 = dx.MistralConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                               num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
                               model_type="llama")
    spec = dl.LoraSpec.for_model(smollm2, rank=8)
    assert spec.targets == ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down") and len(spec.layers) == 30
    nbytes = dl.lora_num_bytes(smollm2, spec)
    print(f"SmolLM2-135M LoRA delta, rank 8, 7 matrices x 30 layers: {nbytes / 1e6:.2f} MB")
    assert nbytes == 4 * 8 * 30 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)) <= dl.MAX_DELTA_BYTES


def test_source_schedule_follows_the_token_shares():
    order = E.source_schedule([300, 100], 40)
    assert order == E.source_schedule([300, 100], 40) and order.count(0) == 30 and order[:4] == [0, 0, 1, 0]
    assert all(abs(order[:n].count(1) - n / 4) <= 1 for n in range(1, 41))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ee_tune")
    model = write_tiny_model(root / "model")
    data = root / "prose.jsonl"
    data.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog"}) + "\n"
                            for i in range(40)))
    argv = ["--model", str(model), "--data", f"{data}=4000", "--out", str(root / "out"), "--batch-size", "2",
            "--seq-len", "16", "--exit-layers", "2,3", "--topk", "8", "--layer-dropout", "0.3", "--save-every", "1",
            "--log-every", "1", "--no-progress"]
    assert E.main(argv + ["--steps", "2"]) == 0
    return root, model, argv


def test_cli_writes_a_delta_the_loader_reads_and_a_summary(tiny_run, capsys):
    root, model, argv = tiny_run
    out = root / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens_this_run"] == 2 * 2 * 16 and summary["tokens_per_s"] > 0
    assert summary["delta"]["kind"] == "lora" and summary["delta"]["file_bytes"] < dl.MAX_DELTA_BYTES
    assert summary["monitor"]["before"]["prose.jsonl"]["final_kl"] == pytest.approx(0.0, abs=1e-6)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(np.isfinite(line["loss"]) for line in lines)
    config, tuned = dl.load_tuned(model, out / "delta")
    meta, tensors = dl.read_delta(out / "delta")
    _, base = dx.load_pretrained(model)
    expected = dl.apply_delta(config, base, meta, tensors)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(expected)))
    assert not np.array_equal(np.asarray(tuned["layers"]["wq"]), np.asarray(base["layers"]["wq"]))
    # the delta directory is a model: load_pretrained finds its recorded base and merges it
    assert meta["base"]["source"] == str(model)
    _, as_model = dx.load_pretrained(out / "delta")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(as_model), jax.tree.leaves(tuned)))
    assert dx.load_tokenizer(out / "delta").encode("the fox") == dx.load_tokenizer(model).encode("the fox")

    with pytest.raises(DistillError, match="--resume.*--overwrite"):  # refused before any work
        E.main(argv + ["--steps", "3"])
    assert E.main(argv + ["--steps", "3", "--resume"]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 3 and resumed["tokens_seen"] == 3 * 2 * 16
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    with pytest.raises(DistillError, match="topk: 8 -> 4"):
        E.main(argv + ["--steps", "4", "--resume", "--topk", "4"])


def test_cli_trains_through_exit_adapters(tiny_run):
    root, model, argv = tiny_run
    out = root / "adapter-out"
    argv = [a if a != str(root / "out") else str(out) for a in argv]
    assert E.main(argv + ["--steps", "2", "--exit-head", "adapter", "--adapter-fit-batches", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and set(dl.read_delta(out / "delta")[1]) == set(dl.read_delta(root / "out" / "delta")[1])
    before = summary["monitor"]["before"]["prose.jsonl"]
    assert before["final_kl"] == pytest.approx(0.0, abs=1e-6) and len(before["exits"]) == 2


def test_bad_settings_fail_before_any_work(tmp_path):
    for extra, message in ((["--mode", "full", "--lora-rank", "0"], "--lora-rank"),
                           (["--final-weight", "0", "--exit-weight", "0"], "nothing to train"),
                           (["--layer-dropout", "1.0"], "--layer-dropout"),
                           (["--resume", "--overwrite"], "give one"),
                           (["--model", str(tmp_path)], "--data is required")):
        with pytest.raises(DistillError, match=message):
            E.main(["--out", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("module", ["train.ee_tune", "dynamax_jax.train.ee_tune"])
def test_help_explains_the_flags(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--mode", "--lora-rank", "--lora-targets", "--final-weight", "--exit-weight", "--topk", "--kl-rest",
                 "--layer-dropout", "--resume", "--overwrite"):
        assert flag in proc.stdout
