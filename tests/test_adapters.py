"""Per-exit adapters ("tuned lens"): config, math, save/load, what generate predicts at an
exit, FLOP accounting, distillation (labels and KL), and the eval oracle."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax import exits as ex
from dynamax_jax import flops
from dynamax_jax.models import mistral, module_for
from dynamax_jax.models.layers import stack_index
from dynamax_jax.train import distill as T
from dynamax_jax.train import objective as O

CFG = dx.MistralConfig.tiny()  # 4 layers, hidden 64
PARAMS = mistral.init_params(CFG, jax.random.key(0))


def _with_random_adapter(ec, key=7, scale=0.3):
    """Exit params whose adapters are far from the identity."""
    p = ex.init_exits(CFG, ec, jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(key), 4))
    for name in ("adapter_w", "adapter_down", "adapter_up", "adapter_b"):
        if name in p:
            p[name] = scale * jax.random.normal(next(keys), p[name].shape)
    return p


@pytest.mark.parametrize("adapter, names", [("affine", {"adapter_w", "adapter_b"}),
                                            ("lowrank", {"adapter_down", "adapter_up", "adapter_b"})])
def test_adapter_starts_as_identity_and_computes_its_map(adapter, names):
    ec = ex.ExitConfig(kind="calm", adapter=adapter, adapter_rank=8).resolve(CFG)
    p = ex.init_exits(CFG, ec, jax.random.key(0))
    assert set(ex.adapter_params(p)) == names
    h = jax.random.normal(jax.random.key(2), (3, 5, CFG.hidden_size))
    one = stack_index(p, 0)
    np.testing.assert_array_equal(ex.adapt(ec, one, h), h)  # zero init: the plain logit lens
    one = stack_index(_with_random_adapter(ec), 1)
    hn = np.asarray(h, np.float64)
    if adapter == "affine":
        expected = hn + hn @ np.asarray(one["adapter_w"]) + np.asarray(one["adapter_b"])
    else:
        expected = hn + hn @ np.asarray(one["adapter_down"]) @ np.asarray(one["adapter_up"]) + np.asarray(one["adapter_b"])
    np.testing.assert_allclose(ex.adapt(ec, one, h), expected, rtol=1e-5, atol=1e-5)
    # without an adapter, adapt is the identity and no adapter tensors exist
    plain = ex.ExitConfig(kind="calm").resolve(CFG)
    assert ex.adapter_params(ex.init_exits(CFG, plain, jax.random.key(0))) == {}
    assert ex.adapt(plain, {}, h) is h


def test_adapter_config_errors_and_json():
    with pytest.raises(ex.ExitError, match="unknown adapter 'mlp'; supported: none, affine, lowrank"):
        ex.ExitConfig(adapter="mlp")
    with pytest.raises(ex.ExitError, match="adapter_rank must be >= 1"):
        ex.ExitConfig(adapter="lowrank", adapter_rank=0)
    with pytest.raises(ex.ExitError, match="adapter_rank 64 is not below the hidden size 64: use adapter='affine'"):
        ex.ExitConfig(adapter="lowrank", adapter_rank=64).resolve(CFG)
    ec = ex.ExitConfig(adapter="lowrank", adapter_rank=4)
    assert ex.ExitConfig.from_json(ec.to_json()) == ec
    # a checkpoint without an adapter keeps the format older readers know
    assert "adapter" not in ex.ExitConfig().to_json()


def test_save_load_and_check_name_missing_adapter(tmp_path):
    ec = ex.ExitConfig(kind="ffn", adapter="affine", ffn_expand=1).resolve(CFG)
    p = _with_random_adapter(ec)
    assert p["w_in"].shape == (2, 64, 64)  # ffn_expand=1
    ex.save_exits(ec, p, tmp_path / "e")
    ec2, p2 = ex.load_exits(tmp_path / "e")
    assert ec2 == ec
    for k in p:
        np.testing.assert_array_equal(p2[k], p[k])
    broken = {k: v for k, v in p.items() if k != "adapter_w"}
    with pytest.raises(ex.ExitError, match=r"missing tensors \['adapter_w'\]"):
        ex.check_exits(CFG, ec, broken)
    # a training-free confidence with an adapter still needs the adapter's params
    with pytest.raises(ex.ExitError, match="adapter='affine' needs exit_params"):
        ex.check_exits(CFG, dataclasses.replace(ec, confidence="softmax"), None)


def _prompt():
    return np.array([[5, 7, 9, 11, 3]], np.int32)


@pytest.mark.parametrize("confidence", ["classifier", "softmax"])
def test_generate_predicts_through_the_adapter_at_an_exit(confidence):
    """Threshold 0: every token leaves at the first exit (layer 2). The first new token's
    logits are the head on the *adapted* layer-2 hidden state of the last prompt token."""
    ec = ex.ExitConfig(kind="calm", adapter="affine", threshold=0.0, confidence=confidence).resolve(CFG)
    p = _with_random_adapter(ec)
    prompt = _prompt()
    r = dx.generate(CFG, PARAMS, prompt, max_new_tokens=3, exit_config=ec, exit_params=p, return_logits=True)
    assert (r.exit_layers == 2).all()
    _, hidden = mistral.forward(CFG, PARAMS, jnp.asarray(prompt), return_hidden=True)
    h = hidden[1, 0, -1]  # after layer 2, last prompt token
    expected = mistral.head(CFG, PARAMS, ex.adapt(ec, stack_index(p, 0), h))
    np.testing.assert_allclose(r.logits[0, 0], expected, rtol=1e-5, atol=1e-5)
    plain = mistral.head(CFG, PARAMS, h)
    assert float(jnp.max(jnp.abs(expected - plain))) > 1e-2, "the adapter must change the prediction"
    # identity adapters give exactly the run without adapters
    p0 = {**p, "adapter_w": jnp.zeros_like(p["adapter_w"]), "adapter_b": jnp.zeros_like(p["adapter_b"])}
    r0 = dx.generate(CFG, PARAMS, prompt, max_new_tokens=3, exit_config=ec, exit_params=p0, return_logits=True)
    plain_ec = dataclasses.replace(ec, adapter="none")
    plain_p = {k: v for k, v in p.items() if not k.startswith("adapter_")}
    rp = dx.generate(CFG, PARAMS, prompt, max_new_tokens=3, exit_config=plain_ec, exit_params=plain_p,
                     return_logits=True)
    np.testing.assert_array_equal(r0.tokens, rp.tokens)
    np.testing.assert_allclose(r0.logits, rp.logits, rtol=1e-6, atol=1e-6)


def test_rows_that_run_to_the_end_are_not_adapted():
    """Threshold above 1: no row leaves, so an adapter, however large, changes nothing."""
    ec = ex.ExitConfig(kind="calm", adapter="affine", threshold=1.5).resolve(CFG)
    p = _with_random_adapter(ec, scale=3.0)
    full = dx.generate(CFG, PARAMS, _prompt(), max_new_tokens=4, return_logits=True)
    r = dx.generate(CFG, PARAMS, _prompt(), max_new_tokens=4, exit_config=ec, exit_params=p, return_logits=True)
    np.testing.assert_array_equal(r.tokens, full.tokens)
    np.testing.assert_allclose(r.logits, full.logits, rtol=1e-6, atol=1e-6)


def test_adapter_flops_paid_once_per_exited_token():
    ec = ex.ExitConfig(kind="calm", adapter="affine").resolve(CFG)
    plain = dataclasses.replace(ec, adapter="none")
    d = CFG.hidden_size
    layers, pos = np.array([2, 3, 4]), np.array([5, 5, 5])
    diff = flops.token_flops(CFG, ec, layers, pos) - flops.token_flops(CFG, plain, layers, pos)
    np.testing.assert_allclose(diff, [2 * d * d, 2 * d * d, 0])
    low = dataclasses.replace(ec, adapter="lowrank", adapter_rank=8)
    assert flops.adapter_flops(CFG, low) == 2 * 2 * d * 8
    # softmax confidence: the head (and adapter) run at every exit reached
    soft = dataclasses.replace(ec, confidence="softmax")
    diff = flops.token_flops(CFG, soft, layers, pos) - flops.token_flops(CFG, dataclasses.replace(soft, adapter="none"),
                                                                         layers, pos)
    np.testing.assert_allclose(diff, [2 * d * d, 2 * 2 * d * d, 2 * 2 * d * d])


# ----------------------------------------------------------------------------- distillation

def _tokens():
    return jax.random.randint(jax.random.key(4), (2, 9), 0, CFG.vocab_size)


def test_adapted_labels_and_kl_equal_a_hand_computation():
    layers = (1, 2, 3)
    ec = ex.ExitConfig(kind="calm", layers=layers, adapter="affine").resolve(CFG)
    p = _with_random_adapter(ec, scale=0.2)
    tokens = _tokens()
    mask = jnp.ones(tokens.shape).at[1, 6:].set(0.0)
    exit_hidden, final = O.backbone_outputs(CFG, PARAMS, tokens, layers)
    labels, kl = O.adapted_exits(CFG, PARAMS, ec, ex.adapter_params(p), exit_hidden, final, mask, topk=2)
    final64 = np.asarray(final, np.float64)
    logp_final = final64 - np.log(np.sum(np.exp(final64), -1, keepdims=True))
    m = np.asarray(mask)
    for e in range(len(layers)):
        lg = np.asarray(mistral.head(CFG, PARAMS, ex.adapt(ec, stack_index(p, e), exit_hidden[e])), np.float64)
        logq = lg - np.log(np.sum(np.exp(lg), -1, keepdims=True))
        expected_kl = np.sum(np.exp(logp_final) * (logp_final - logq), -1)
        np.testing.assert_allclose(float(kl[e]), np.sum(expected_kl * m) / m.sum(), rtol=1e-4)
        own = np.take_along_axis(final64, lg.argmax(-1)[..., None], -1)
        np.testing.assert_array_equal(np.asarray(labels[e]), np.sum(final64 > own, -1) < 2)
    # identity adapters give the plain logit-lens labels
    p0 = ex.init_exits(CFG, ec, jax.random.key(0))
    labels0, _ = O.adapted_exits(CFG, PARAMS, ec, ex.adapter_params(p0), exit_hidden, final, mask, topk=2)
    np.testing.assert_array_equal(labels0, O.backbone_pass(CFG, PARAMS, tokens, layers, 2)[1])


def test_training_adapters_lowers_kl_and_raises_agreement():
    """A few hundred steps on one batch: the adapters learn to predict the final layer (the
    KL falls and the exit tokens agree more often), and the classifier keeps learning."""
    layers = (1, 2)
    settings = T.DistillSettings(exit_kind="calm", exit_layers=layers, steps=150, lr=1e-2, warmup_steps=0,
                                 adapter="affine")
    ec = settings.exit_config().resolve(CFG)
    tx = T.make_optimizer(settings)
    p = ex.init_exits(CFG, ec, jax.random.key(0))
    step = jax.jit(T.make_train_step(CFG, ec, settings, tx))
    tokens = jax.random.randint(jax.random.key(5), (4, 16), 0, CFG.vocab_size)
    mask = jnp.ones(tokens.shape)
    opt = tx.init(p)
    first = None
    for _ in range(settings.steps):
        p, opt, metrics = step(PARAMS, p, opt, tokens, mask)
        first = first or jax.device_get(metrics)
    last = jax.device_get(metrics)
    assert np.all(last["kl"] < 0.5 * first["kl"]), (first["kl"], last["kl"])
    assert np.all(last["positives"] > first["positives"]), (first["positives"], last["positives"])
    assert float(jnp.max(jnp.abs(p["adapter_w"]))) > 0


def test_cli_flags_reach_the_exit_config():
    args = T.build_parser().parse_args(["--adapter", "lowrank", "--adapter-rank", "16", "--kl-weight", "0.5",
                                        "--ffn-expand", "2", "--exit-kind", "ffn"])
    s = T.settings_from_args(args)
    ec = s.exit_config()
    assert (ec.adapter, ec.adapter_rank, ec.ffn_expand, s.kl_weight) == ("lowrank", 16, 2, 0.5)
    with pytest.raises(T.DistillError, match="--kl-weight must be a positive number"):
        dataclasses.replace(s, kl_weight=0.0).check()


# ----------------------------------------------------------------------------- eval oracle

def test_oracle_uses_the_adapted_exit_tokens():
    from dynamax_jax.eval import harness

    layers = (1, 2, 3)
    ec = ex.ExitConfig(kind="calm", layers=layers, adapter="affine").resolve(CFG)
    p = _with_random_adapter(ec, scale=0.2)
    backbone = harness.Backbone("tiny", CFG, PARAMS, tokenizer=None, chat_template=False)
    prompts = [[5, 9, 17], [3, 4, 5, 6, 7]]
    gens = [harness.Generation([11, 12, 13, 14, 15], [4] * 5), harness.Generation([40, 2, 2, 90], [4] * 4)]
    per_token, agreement, _ = harness.oracle_layers(backbone, layers, prompts, gens, 2, 8, ec, p)
    plain, plain_agreement, _ = harness.oracle_layers(backbone, layers, prompts, gens, 2, 8)
    for prompt, gen, got in zip(prompts, gens, per_token):
        start = len(prompt) - 1
        seq = jnp.asarray([prompt + gen.tokens[:-1]])
        logits, hidden = mistral.forward(CFG, PARAMS, seq, return_hidden=True)
        final = np.argmax(np.asarray(logits[0]), -1)[start:]
        toks = [np.argmax(np.asarray(module_for(CFG).head(CFG, PARAMS, ex.adapt(ec, stack_index(p, e),
                                                                                  hidden[l - 1, 0]))), -1)[start:]
                for e, l in enumerate(layers)]
        expected = [next((l for l, t in zip(layers, toks) if t[i] == final[i]), 4) for i in range(len(gen.tokens))]
        assert got == expected
    assert per_token != plain or agreement != plain_agreement, "the adapters should change something here"


def test_affine_to_lowrank_is_the_truncated_svd():
    ec = ex.ExitConfig(kind="calm", adapter="affine").resolve(CFG)
    p = _with_random_adapter(ec)
    lec, lp = ex.affine_to_lowrank(ec, p, 8)
    assert (lec.adapter, lec.adapter_rank) == ("lowrank", 8)
    assert ex.check_exits(CFG, lec, lp) == lec
    w = np.asarray(p["adapter_w"][0], np.float64)
    approx = np.asarray(lp["adapter_down"][0], np.float64) @ np.asarray(lp["adapter_up"][0], np.float64)
    sv = np.linalg.svd(w, compute_uv=False)
    # Eckart-Young: the error of the best rank-8 approximation is the tail of the spectrum
    np.testing.assert_allclose(np.linalg.norm(w - approx), np.sqrt(np.sum(sv[8:] ** 2)), rtol=1e-4)
    full_rank = ex.affine_to_lowrank(ec, p, CFG.hidden_size - 1)[1]
    h = jax.random.normal(jax.random.key(3), (4, CFG.hidden_size))
    np.testing.assert_allclose(ex.adapt(dataclasses.replace(lec, adapter_rank=CFG.hidden_size - 1),
                                        stack_index(full_rank, 0), h),
                               ex.adapt(ec, stack_index(p, 0), h), atol=0.05)
    with pytest.raises(ex.ExitError, match="needs affine adapters"):
        ex.affine_to_lowrank(lec, lp, 4)
