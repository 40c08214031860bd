"""The ``hybrid`` exit classifier: the ``mamba`` classifier's mixer (output width D, added to
the exit hidden state) followed by the ``ffn`` classifier, with the ``mamba`` kind's state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax import exits as ex
from dynamax_jax import flops
from dynamax_jax.models import mamba2, mistral, module_for
from dynamax_jax.models.layers import rms_norm
from tests.test_exits import _mamba_reference

CFG = dx.MistralConfig.tiny()  # 4 layers, hidden 64
EC = ex.ExitConfig(kind="hybrid", layers=(2,), mamba_head_dim=16, mamba_state_size=8, ffn_expand=2)


def _one_exit(key=3):
    """One hybrid exit's params, with large steps (the state really mixes tokens), a mixer
    output as large as its input and non-zero biases, so that every part shows in the logits."""
    p = jax.tree.map(lambda a: a[0], ex.init_exits(CFG, EC, jax.random.key(key)))
    p["dt_bias"] = p["dt_bias"] + 2.0
    p["out_proj"] = p["out_proj"] * 50.0
    for name in ("ffn_b_in", "ffn_b_out", "conv_b"):
        p[name] = p[name] + 0.1
    return p


def _hidden(b=2, t=11, key=4):
    return 3.0 * jax.random.normal(jax.random.key(key), (b, t, CFG.hidden_size))


def _zero_state(b):
    return jax.tree.map(lambda a: a[0], ex.init_exit_state(CFG, EC, b))


def test_params_are_the_mamba_mixer_and_the_ffn_classifier():
    hybrid = ex.init_exits(CFG, EC, jax.random.key(0))
    mamba = ex.init_exits(CFG, dataclasses.replace(EC, kind="mamba"), jax.random.key(0))
    ffn = ex.init_exits(CFG, dataclasses.replace(EC, kind="ffn"), jax.random.key(0))
    d, inner = CFG.hidden_size, hybrid["gate_norm"].shape[-1]
    want = {k: v.shape for k, v in mamba.items() if k != "out_bias"}
    want["out_proj"] = (1, inner, d)  # the mixer gives D values: the FFN's input width
    want.update({"ffn_" + k: v.shape for k, v in ffn.items()})
    assert {k: v.shape for k, v in hybrid.items()} == want
    assert EC.stateful and dataclasses.replace(EC, confidence="softmax").stateful is False
    np.testing.assert_array_equal(hybrid["ffn_norm"], 1.0)  # the ffn part starts as the ffn kind
    np.testing.assert_array_equal(hybrid["ffn_b_in"], 0.0)
    assert float(jnp.std(hybrid["ffn_w_in"])) == pytest.approx(0.02, rel=0.1)
    assert ex.num_classifier_params(CFG, EC) == sum(v.size for v in hybrid.values())
    with pytest.raises(ex.ExitError, match="hybrid classifier: inner width 64 is not a multiple of "
                                           "mamba_head_dim 48"):
        dataclasses.replace(EC, mamba_head_dim=48).resolve(CFG)


def test_logits_are_the_mixer_then_the_ffn():
    """Against an independent composition: the SSD reference mixer of the mamba tests (its
    readout through the hybrid's ``out_proj`` to D, no bias), added to the hidden state, then
    the ffn classifier written out in numpy."""
    p = _one_exit()
    hidden = _hidden()
    mixed, want_state = _mamba_reference(EC, {**p, "out_bias": jnp.zeros(CFG.hidden_size)}, hidden)
    x = np.asarray(hidden) + mixed
    y = np.asarray(rms_norm(jnp.asarray(x), p["ffn_norm"], 1e-5))
    hid = np.asarray(jax.nn.gelu(y @ np.asarray(p["ffn_w_in"]) + np.asarray(p["ffn_b_in"])))
    want = hid @ np.asarray(p["ffn_w_out"]) + np.asarray(p["ffn_b_out"])
    got, state = ex.classifier_sequence(EC, p, hidden, _zero_state(2))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(state.ssm), want_state, rtol=1e-4, atol=1e-5)
    # the library's own parts, composed directly: the backbone's mixer, then ffn_logits
    st = _zero_state(2)
    u = rms_norm(hidden, p["norm"], 1e-5)
    out, conv, ssm = mamba2.mixer(ex.mamba_config(EC, CFG.hidden_size), p, u, st.conv, st.ssm)
    ffn = {k[len("ffn_"):]: v for k, v in p.items() if k.startswith("ffn_")}
    np.testing.assert_allclose(np.asarray(got), np.asarray(ex.ffn_logits(ffn, hidden + out)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.conv), np.asarray(conv), rtol=1e-6, atol=1e-6)
    assert float(jnp.std(out)) > 0.3 * float(jnp.std(hidden))  # the mixer's share is not negligible


def test_sequence_mode_equals_step_mode():
    p = _one_exit()
    hidden = _hidden()
    st = _zero_state(2)
    want, want_state = ex.classifier_sequence(EC, p, hidden, st)
    step_state, steps = st, []
    for i in range(hidden.shape[1]):
        lg, step_state = ex.classifier_step(EC, p, hidden[:, i], step_state)
        steps.append(lg)
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(want), rtol=1e-4, atol=1e-5)
    for name in ("conv", "ssm"):
        np.testing.assert_allclose(getattr(step_state, name), getattr(want_state, name), rtol=1e-4, atol=1e-5)
    # right-padded rows: the state stops at each row's length
    _, st_len = ex.classifier_sequence(EC, p, hidden, st, lengths=jnp.array([11, 6]))
    _, st_6 = ex.classifier_sequence(EC, p, hidden[1:, :6], jax.tree.map(lambda a: a[1:], st))
    for name in ("conv", "ssm"):
        np.testing.assert_allclose(getattr(st_len, name)[1], getattr(st_6, name)[0], rtol=1e-6, atol=1e-6)
    # all exits at once (the distillation entry point) agrees with one exit at a time
    ec2 = dataclasses.replace(EC, layers=(1, 3))
    p2 = ex.init_exits(CFG, ec2, jax.random.key(5))
    both = ex.exit_logits(CFG, ec2, p2, jnp.stack([hidden, -hidden]))
    one = ex.classifier_sequence(ec2, jax.tree.map(lambda a: a[1], p2), -hidden, st)[0]
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(one), rtol=1e-6, atol=1e-6)


def test_flops_are_the_sum_of_the_parts():
    config = dataclasses.replace(CFG, num_layers=30, hidden_size=576)
    ec = ex.ExitConfig(kind="hybrid", layers=(18, 24), ffn_expand=1).resolve(config)
    inner, n, heads, head_dim, conv_dim = ex._mamba_dims(ec, 576)
    mixer = (2 * 576 * (2 * inner + 2 * n + heads) + 2 * conv_dim * ec.mamba_conv_kernel
             + 5 * heads * head_dim * n + 2 * inner * 576)
    ffn = flops.classifier_flops(config, dataclasses.replace(ec, kind="ffn"))
    mamba = flops.classifier_flops(config, dataclasses.replace(ec, kind="mamba"))
    assert ffn == 2 * 576 * 576 + 2 * 576 * 2
    assert flops.classifier_flops(config, ec) == mixer + ffn
    assert flops.classifier_flops(config, ec) == mamba - 2 * inner * 2 + 2 * inner * 576 + ffn
    # stateful: a token that leaves at the first exit still steps the second exit's state
    total = flops.token_flops(config, ec, np.array([18]), np.array([0]))
    assert total[0] == 18 * flops.layer_flops(config, 1) + flops.head_flops(config) + 2 * (mixer + ffn)


def test_save_load_round_trip(tmp_path):
    ec = dataclasses.replace(EC, layers=(1, 3), threshold=(0.8, 0.6), mode="propagate")
    p = ex.init_exits(CFG, ec, jax.random.key(6))
    ex.save_exits(ec, p, tmp_path / "heads")
    ec2, p2 = ex.load_exits(tmp_path / "heads")
    assert ec2 == ec
    assert ex.check_exits(CFG, ec2, p2).kind == "hybrid"
    assert set(p2) == set(p)
    for k in p:
        np.testing.assert_array_equal(np.asarray(p2[k]), np.asarray(p[k]))


MCFG = dx.Mamba2Config.tiny()
MODELS = {"mistral": (CFG, mistral.init_params(CFG, jax.random.key(0))),
          "mamba2": (MCFG, mamba2.init_params(MCFG, jax.random.key(0)))}


@pytest.mark.parametrize("backbone, kind", [("mistral", "hybrid"), ("mistral", "mamba"), ("mamba2", "hybrid")])
def test_decode_steps_every_exit_on_the_hidden_state_the_token_left_with(backbone, kind):
    """Every token leaves at the first exit (threshold 0). After prefill and decoding, each
    exit's classifier state equals its sequence mode over: the prompt's hidden states at that
    exit's layer (all but the last prompt token, which is decoding's first input), then the
    decoded inputs' hidden states at the FIRST exit, where they left (``exits.py``)."""
    config, params = MODELS[backbone]
    prompt, n = [5, 7, 9, 11, 3], 4
    ec = ex.ExitConfig(kind=kind, layers=(2, 3), threshold=0.0, mamba_head_dim=16)
    p = ex.init_exits(config, ec, jax.random.key(1))
    settings, controls, pe = dx.configure(config, 1, exit_config=ec, exit_params=p)
    dparams = dx.decode_params(params)
    t = len(prompt)
    state = dx.prefill(config, settings, dparams, pe, jnp.asarray([prompt]), jnp.asarray([t]), cache_len=t + n)
    chunk, state = dx.decode_chunk(config, settings, n, dparams, pe, state, controls, jax.random.key(0))
    assert (np.asarray(chunk.exit_layers) == 2).all()
    tokens = jnp.asarray([prompt + np.asarray(chunk.tokens[0, :n - 1]).tolist()])  # the decoded inputs
    model = module_for(config)
    _, full_hidden = model.forward(config, params, tokens, return_hidden=True)
    truncated = dataclasses.replace(config, num_layers=2)  # layers 1-2 always run: their states are full
    tparams = {**params, "layers": jax.tree.map(lambda a: a[:2], params["layers"])}
    _, exit_hidden = model.forward(truncated, tparams, tokens, return_hidden=True)
    ec = ec.resolve(config)
    for e, layer in enumerate(ec.layers):
        seq = jnp.concatenate([full_hidden[layer - 1][:, :t - 1], exit_hidden[1][:, t - 1:]], axis=1)  # [l]: after l + 1
        pe_e = jax.tree.map(lambda a: a[e], p)
        _, want = ex.classifier_sequence(ec, pe_e, seq, jax.tree.map(lambda a: a[e], ex.init_exit_state(config, ec, 1)))
        for name in ("conv", "ssm"):
            np.testing.assert_allclose(getattr(state.exit_state[e], name), getattr(want, name), rtol=1e-4, atol=1e-5)
