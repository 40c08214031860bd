"""Exit classifiers: config validation, classifier math, confidence measures, save/load."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax import exits as ex
from dynamax_jax.kernels.ssd.reference import ssd_chunked
from dynamax_jax.models.layers import rms_norm
from tests.conftest import file_tree


CFG = dx.MistralConfig.tiny()  # 4 layers, hidden 64


def test_default_layers_latter_half():
    assert ex.default_exit_layers(30) == (18, 21, 24, 27)
    assert ex.ExitConfig().resolve(CFG).layers == (2, 3)
    resolved = ex.ExitConfig().resolve(dataclasses.replace(CFG, num_layers=30))
    assert resolved.layers == (18, 21, 24, 27) and resolved.mode == "copy"


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=(3, 2)), "strictly increasing"),
    (dict(layers=(2, 2)), "strictly increasing"),
    (dict(layers=(0, 2)), "1-based"),
    (dict(threshold=-0.1), "threshold must be a number >= 0"),
    (dict(threshold=float("nan")), "threshold must be a number >= 0"),
    (dict(layers=(1, 2), threshold=(0.5, float("nan"))), "threshold must be a number >= 0"),
    (dict(layers=(1, 2), threshold=(0.5, 0.5, 0.5)), "3 per-exit thresholds for 2 exits"),
    (dict(kind="lstm"), "supported: calm, ffn, mamba"),
    (dict(mode="teleport"), "supported: copy|propagate"),
    (dict(confidence="vibes"), "supported: classifier, softmax, margin, saturation"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ex.ExitError, match=match):
        ex.ExitConfig(**kwargs)


def test_resolve_errors():
    with pytest.raises(ex.ExitError, match=r"exit layers \[4, 9\] out of range for a 4-layer model"):
        ex.ExitConfig(layers=(1, 4, 9)).resolve(CFG)
    with pytest.raises(ex.ExitError, match="mode 'skip' is not available for a transformer"):
        ex.ExitConfig(mode="skip").resolve(CFG)
    assert ex.ExitConfig(threshold=5.0).threshold == 5.0  # > 1 is valid: never exit


@pytest.mark.parametrize("kind", ex.KINDS)
def test_init_shapes_and_check(kind):
    ec = ex.ExitConfig(kind=kind, layers=(1, 2, 3))
    p = ex.init_exits(CFG, ec, jax.random.key(0))
    assert all(v.shape[0] == 3 for v in p.values())
    assert ex.check_exits(CFG, ec, p).layers == (1, 2, 3)
    assert ex.num_classifier_params(CFG, ec) == sum(v.size for v in p.values())
    # exits for another model (other hidden size) are refused, naming the tensor
    other = ex.init_exits(dataclasses.replace(CFG, hidden_size=32), ec, jax.random.key(0))
    with pytest.raises(ex.ExitError, match=r"exit_params\['norm'\] has shape \(3, 32\), expected \(3, 64\)"):
        ex.check_exits(CFG, ec, other)
    with pytest.raises(ex.ExitError, match="has shape"):  # 3 exits' params for a 2-exit config
        ex.check_exits(CFG, dataclasses.replace(ec, layers=(1, 2)), p)
    with pytest.raises(ex.ExitError, match="missing tensors"):
        ex.check_exits(CFG, ec, {k: v for k, v in p.items() if k != "norm"})
    with pytest.raises(ex.ExitError, match="needs exit_params"):
        ex.check_exits(CFG, ec, None)


def test_calm_and_ffn_math():
    x = jax.random.normal(jax.random.key(1), (3, 64))
    for kind in ("calm", "ffn"):
        ec = ex.ExitConfig(kind=kind, layers=(2,))
        p = jax.tree.map(lambda a: a[0], ex.init_exits(CFG, ec, jax.random.key(2)))
        p = {k: v + 0.1 for k, v in p.items()}  # non-trivial norm scale and biases
        y = np.asarray(rms_norm(x, p["norm"], 1e-5))
        if kind == "calm":
            want = y @ np.asarray(p["w"]) + np.asarray(p["b"])
        else:
            hid = np.asarray(jax.nn.gelu(y @ np.asarray(p["w_in"]) + np.asarray(p["b_in"])))
            want = hid @ np.asarray(p["w_out"]) + np.asarray(p["b_out"])
        got, _ = ex.classifier_step(ec, p, x, None)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _mamba_reference(ec, p, hidden):
    """The mamba classifier over ``hidden [B, T, D]`` from zero state, through the readable SSD
    reference (a different algorithm: chunked quadratic form) and an explicit causal conv."""
    inner, n, heads, hd, conv_dim = ex._mamba_dims(ec, hidden.shape[-1])
    b, t, _ = hidden.shape
    zxbcdt = rms_norm(hidden, p["norm"], 1e-5) @ p["in_proj"]
    z, xbc, dt = np.split(np.asarray(zxbcdt), [inner, 2 * inner + 2 * n], axis=-1)
    w = np.asarray(p["conv_w"])  # [W, C]
    padded = np.concatenate([np.zeros((b, w.shape[0] - 1, conv_dim), np.float32), xbc], axis=1)
    conv = sum(padded[:, i:i + t] * w[i] for i in range(w.shape[0])) + np.asarray(p["conv_b"])
    xbc = np.asarray(jax.nn.silu(conv))
    xs, bm, cm = np.split(xbc, [inner, inner + n], axis=-1)
    dt = np.asarray(jax.nn.softplus(dt + np.asarray(p["dt_bias"])))
    y, state = ssd_chunked(jnp.asarray(xs.reshape(b, t, heads, hd)), jnp.asarray(dt),
                           -jnp.exp(p["A_log"]), jnp.asarray(bm[:, :, None]), jnp.asarray(cm[:, :, None]),
                           p["D"], chunk_size=4)
    y = np.asarray(y).reshape(b, t, inner) * np.asarray(jax.nn.silu(z))
    y = np.asarray(rms_norm(jnp.asarray(y), p["gate_norm"], 1e-5))
    return y @ np.asarray(p["out_proj"]) + np.asarray(p["out_bias"]), np.asarray(state)


def test_mamba_classifier_matches_ssd_reference():
    ec = ex.ExitConfig(kind="mamba", layers=(2,), mamba_head_dim=16, mamba_state_size=8)
    p = jax.tree.map(lambda a: a[0], ex.init_exits(CFG, ec, jax.random.key(3)))
    p["dt_bias"] = p["dt_bias"] + 2.0  # large steps: the state really mixes tokens
    hidden = 3.0 * jax.random.normal(jax.random.key(4), (2, 11, 64))
    want, want_state = _mamba_reference(ec, p, hidden)
    st = jax.tree.map(lambda a: a[0], ex.init_exit_state(CFG, ec, 2))
    got, got_state = ex.classifier_sequence(ec, p, hidden, st)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_state.ssm), want_state, rtol=1e-4, atol=1e-5)
    # token-by-token decoding (the one-step recurrence) agrees with the chunked scan
    step_state, steps = st, []
    for i in range(hidden.shape[1]):
        lg, step_state = ex.classifier_step(ec, p, hidden[:, i], step_state)
        steps.append(lg)
    np.testing.assert_allclose(np.stack(steps, 1), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(step_state.ssm), want_state, rtol=1e-4, atol=1e-5)
    # right-padded rows: the state stops at each row's length
    _, st_len = ex.classifier_sequence(ec, p, hidden, st, lengths=jnp.array([11, 6]))
    _, st_6 = ex.classifier_sequence(ec, p, hidden[1:, :6], jax.tree.map(lambda a: a[1:], st))
    np.testing.assert_allclose(np.asarray(st_len.ssm[1]), np.asarray(st_6.ssm[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(st_len.conv[1]), np.asarray(st_6.conv[0]), rtol=1e-6, atol=1e-6)
    # all exits at once (distillation entry point) agrees with one exit at a time
    ec2 = dataclasses.replace(ec, layers=(1, 3))
    p2 = ex.init_exits(CFG, ec2, jax.random.key(5))
    h2 = jnp.stack([hidden, -hidden])
    both = ex.exit_logits(CFG, ec2, p2, h2)
    one = ex.classifier_sequence(ec2, jax.tree.map(lambda a: a[1], p2), -hidden,
                                 jax.tree.map(lambda a: a[1], ex.init_exit_state(CFG, ec2, 2)))[0]
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(one), rtol=1e-6, atol=1e-6)


def test_confidence_measures():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]))
    np.testing.assert_allclose(ex.softmax_confidence(logits), [0.7, 0.4], rtol=1e-6)
    np.testing.assert_allclose(ex.margin_confidence(logits), [0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(ex.classifier_confidence(jnp.array([[0.0, math.log(3.0)]])), [0.75], rtol=1e-6)
    h = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    g = jnp.array([[0.0, 2.0], [2.0, 2.0]])
    np.testing.assert_allclose(ex.saturation_confidence(h, g), [0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_load_roundtrip(tmp_path, dtype):
    ec = ex.ExitConfig(kind="mamba", layers=(1, 3), threshold=(0.8, 0.6), mode="propagate")
    p = ex.init_exits(CFG, ec, jax.random.key(0), dtype=dtype)
    path = tmp_path / "exits"
    ex.save_exits(ec, p, path)
    ec2, p2 = ex.load_exits(path)
    assert ec2 == ec
    assert set(p2) == set(p)
    for k in p:
        assert p2[k].dtype == p[k].dtype
        np.testing.assert_array_equal(np.asarray(p2[k], np.float32), np.asarray(p[k], np.float32))
    # overwriting replaces atomically; a failed write leaves the old checkpoint intact
    ex.save_exits(dataclasses.replace(ec, threshold=0.5), p, path)
    assert ex.load_exits(path)[0].threshold == 0.5
    from safetensors import SafetensorError
    with pytest.raises(SafetensorError, match='Unknown dtype "object"'):
        ex.save_exits(ec, {"norm": object()}, path)
    assert ex.load_exits(path)[0].threshold == 0.5
    assert sorted(q.name for q in tmp_path.iterdir()) == ["exits"]  # no temp dirs left
    with pytest.raises(ex.ExitError, match="not an exit checkpoint"):
        ex.load_exits(tmp_path / "nowhere")
    # unresolved layers (defaults) round-trip too and resolve against the model later
    ex.save_exits(ex.ExitConfig(kind="calm"), ex.init_exits(CFG, ex.ExitConfig(kind="calm"), jax.random.key(0)),
                  tmp_path / "calm")
    ec3, p3 = ex.load_exits(tmp_path / "calm")
    assert ec3.layers is None and ex.check_exits(CFG, ec3, p3).layers == (2, 3)


def test_fill_shift_from_layer_means():
    """``with_fill_shift``: exit after layer k moves its hidden state into a skipped layer j
    (0-based; its input is layer j's output ``means[j - 1]``) by ``means[j - 1] - means[k - 1]``;
    layers up to the exit get zero. Mode ``shift`` needs it; the other modes accept it."""
    ec = ex.ExitConfig(kind="calm", layers=(1, 3))
    p = ex.init_exits(CFG, ec, jax.random.key(0))
    means = np.random.default_rng(0).normal(size=(CFG.num_layers, CFG.hidden_size))
    shifted = ex.with_fill_shift(CFG, ec, p, means)
    shift = np.asarray(shifted["fill_shift"])
    assert shift.shape == (2, CFG.num_layers, CFG.hidden_size) and shift.dtype == np.float32
    np.testing.assert_allclose(shift[0, :2], 0.0)  # exit 1: layer 1 (index 1) takes h_1 itself
    np.testing.assert_allclose(shift[0, 2], means[1] - means[0], rtol=1e-6)
    np.testing.assert_allclose(shift[0, 3], means[2] - means[0], rtol=1e-6)
    np.testing.assert_allclose(shift[1, :4], 0.0)  # exit 3: only layer 4 (index 3) is skipped, input h_3
    ex.check_exits(CFG, dataclasses.replace(ec, mode="propagate"), shifted)  # optional elsewhere
    ex.check_exits(CFG, dataclasses.replace(ec, mode="shift"), shifted)
    with pytest.raises(ex.ExitError, match=r"missing tensors \['fill_shift'\].*with_fill_shift"):
        ex.check_exits(CFG, dataclasses.replace(ec, mode="shift"), p)
    with pytest.raises(ex.ExitError, match=r"exit_params\['fill_shift'\] has shape"):
        ex.check_exits(CFG, dataclasses.replace(ec, mode="shift"), {**p, "fill_shift": shift[:, :2]})
    with pytest.raises(ex.ExitError, match=r"layer_means has shape \(3, 64\), expected \(4, 64\) or \(2, 4, 64\)"):
        ex.with_fill_shift(CFG, ec, p, means[:3])
    per_exit = np.stack([means, 2 * means])  # one set of means per exit
    shift = np.asarray(ex.with_fill_shift(CFG, ec, p, per_exit)["fill_shift"])
    np.testing.assert_allclose(shift[0, 3], means[2] - means[0], rtol=1e-6)
    np.testing.assert_allclose(shift[1, 3], 2 * (means[2] - means[2]), atol=1e-6)
    with pytest.raises(ex.ExitError, match="mode='shift' needs exit_params"):
        ex.check_exits(CFG, ex.ExitConfig(confidence="softmax", mode="shift"), None)


def test_select_exits_keeps_each_exit_as_it_was():
    """``select_exits``: the kept exits' params are theirs (sliced on the exit axis), layers and
    per-exit thresholds follow them; an exit that is not in the set is named."""
    ec = ex.ExitConfig(kind="ffn", layers=(1, 2, 3), threshold=(0.5, 0.6, 0.7))
    p = ex.with_fill_shift(CFG, ec, ex.init_exits(CFG, ec, jax.random.key(0)),
                           np.random.default_rng(0).normal(size=(CFG.num_layers, CFG.hidden_size)))
    kept, kp = ex.select_exits(ec, p, [3, 1])
    assert kept.layers == (1, 3) and kept.num_exits == 2 and kept.threshold == (0.5, 0.7)
    assert set(kp) == set(p)
    for k in p:
        np.testing.assert_array_equal(np.asarray(kp[k]), np.asarray(p[k])[[0, 2]])
    ex.check_exits(CFG, dataclasses.replace(kept, mode="shift"), kp)
    with pytest.raises(ex.ExitError, match=r"not exits: \[4\]"):
        ex.select_exits(ec, p, [1, 4])
    with pytest.raises(ex.ExitError, match="distinct"):
        ex.select_exits(ec, p, [2, 2])


def test_heads_of_another_architecture_are_refused_and_other_weights_warned(tmp_path):
    """Heads record the model they were trained on. Mamba2 heads on a Llama of the same hidden
    size fit every tensor shape, so without the record they would load silently: refused,
    naming both models. The same architecture with other weights is only warned about (a
    fine-tune of the model is a fair thing to try the heads on)."""
    mamba = dx.Mamba2Config.tiny(num_layers=4, hidden_size=CFG.hidden_size, vocab_size=CFG.vocab_size)
    ec = ex.ExitConfig(kind="calm", layers=(2, 3), mode="skip", trained_on=ex.TrainedOn.of(mamba, "f" * 64))
    params = ex.init_exits(mamba, ec, jax.random.key(0))
    ex.save_exits(ec, params, tmp_path / "heads")
    loaded, loaded_params = ex.load_exits(tmp_path / "heads")
    assert loaded == ec and loaded.trained_on.fingerprint == "f" * 64
    assert ex.check_exits(mamba, loaded, loaded_params).layers == (2, 3)
    with pytest.raises(ex.ExitError, match=r"trained on a mamba2 model of 4 layers, hidden size 64 .*this model is "
                                           r"a transformer model of 4 layers, hidden size 64"):
        ex.check_exits(CFG, dataclasses.replace(loaded, mode=None), loaded_params)
    with pytest.warns(ex.OtherWeightsWarning, match="other weights"):
        ex.check_trained_on(loaded, mamba, fingerprint="0" * 64)
    ex.check_trained_on(loaded, mamba, fingerprint="f" * 64)  # the same weights: silent
    plain = ex.ExitConfig(kind="calm", layers=(2, 3))
    assert "trained_on" not in plain.to_json() and ex.check_exits(CFG, plain, ex.init_exits(CFG, plain, jax.random.key(0)))


def test_save_exits_writes_through_a_symlink(tmp_path):
    ec = ex.ExitConfig(kind="calm", layers=(2, 3))
    target, link = tmp_path / "run" / "exits", tmp_path / "latest"
    ex.save_exits(ec, ex.init_exits(CFG, ec, jax.random.key(0)), target)
    link.symlink_to(target, target_is_directory=True)
    new = ex.init_exits(CFG, ec, jax.random.key(1))
    ex.save_exits(dataclasses.replace(ec, threshold=0.5), new, link)
    assert link.is_symlink() and link.resolve() == target.resolve()
    config, params = ex.load_exits(target)  # the target holds the new heads
    assert config.threshold == 0.5
    np.testing.assert_array_equal(params["w"], new["w"])


@pytest.mark.parametrize("text, match", [
    ('[1, 2]', r"exit_config.json: expected a JSON object of exit settings, found list"),
    ('{"kind": "calm", "threshold": "high"}', r"exit_config.json: threshold must be a number .*'high'"),
    ('{"kind": "calm", "layers": [2, 3], "threshold": [0.5, "x"]}', r"exit_config.json: threshold must be a number"),
    ('{"kind": "calm", "ffn_expand": "4"}', r"exit_config.json: ffn_expand must be >= 1 \(an integer\), got '4'"),
    ('{"kind": "calm", "trained_on": {"family": "mistral"}}', r"exit_config.json: trained_on must be an object"),
])
def test_bad_exit_config_files_name_the_file_and_field(tmp_path, text, match):
    (tmp_path / ex.CONFIG_FILE).write_text(text)
    with pytest.raises(ex.ExitError, match=match):
        ex.load_exits(tmp_path)


def test_shipped_heads_record_their_model():
    """The shipped heads name the architecture they were trained on (and the mamba2-small
    heads its fingerprint: every file of that model is hashed whole, so the name is the same
    on every machine); heads of the Mamba2 model are refused on SmolLM2's architecture."""
    from dynamax_jax.io import fingerprint

    assets = __import__("pathlib").Path(dx.__file__).resolve().parent / "assets"
    smollm2 = dx.MistralConfig.tiny(num_layers=30, hidden_size=576, vocab_size=49152)
    mamba_config = dx.load_pretrained(assets / "mamba2-small")[0]
    for name in ("mamba2-small-calm", "mamba2-small-mamba"):
        config, params = ex.load_exits(assets / "exits" / name)
        assert config.trained_on == ex.TrainedOn.of(mamba_config, fingerprint(assets / "mamba2-small"))
        with pytest.raises(ex.ExitError, match="trained on a mamba2 model of 8 layers"):
            ex.check_exits(smollm2, config, params)
    config, _ = ex.load_exits(assets / "exits" / "smollm2-135m-instruct-ffn")
    assert config.trained_on == ex.TrainedOn("transformer", 30, 576, 49152, None)


def test_exit_files_follow_the_umask(exits_dir):
    modes = {p.name: p.stat().st_mode & 0o777 for p in exits_dir.iterdir()}
    assert modes == {"exit_config.json": 0o644, "exit_params.safetensors": 0o644}
    assert exits_dir.stat().st_mode & 0o777 == 0o755


def test_truncated_exit_params_name_the_file(exits_dir):
    import os

    file = exits_dir / "exit_params.safetensors"
    os.truncate(file, file.stat().st_size - 10)
    with pytest.raises(dx.ExitError, match=r"exits/exit_params\.safetensors: corrupt or truncated"):
        dx.load_exits(exits_dir)
    (exits_dir / "exit_config.json").write_text('{"layers": [2, 3')
    with pytest.raises(dx.ExitError, match=r"exits/exit_config\.json: not valid JSON"):
        dx.load_exits(exits_dir)


def test_save_exits_into_a_model_directory_deletes_nothing(tiny_checkpoint, exits_dir):
    before = file_tree(tiny_checkpoint)
    exit_config, exit_params = dx.load_exits(exits_dir)
    with pytest.raises(FileExistsError, match=r"holds files this writer did not make \(config\.json, model\."):
        dx.save_exits(exit_config, exit_params, tiny_checkpoint)
    assert file_tree(tiny_checkpoint) == before
    dx.save_exits(exit_config, exit_params, tiny_checkpoint, overwrite=True)  # beside the model, keeping it
    after = file_tree(tiny_checkpoint)
    assert {k: after[k] for k in before} == before and set(after) - set(before) == {
        "exit_config.json", "exit_params.safetensors"}
    dx.load_pretrained(tiny_checkpoint)
    assert sorted(dx.load_exits(tiny_checkpoint)[1]) == sorted(exit_params)
