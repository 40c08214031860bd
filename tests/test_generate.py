"""jit-compiled generation with early exits (tiny random Mistral, CPU)."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax import decoding, flops
from dynamax_jax import exits as ex
from dynamax_jax.models import mamba2, mistral, module_for
from dynamax_jax.sampling import apply_repetition_penalty, sample_token

CFG = dx.MistralConfig.tiny()  # 4 layers; default exits after layers 2 and 3
PARAMS = mistral.init_params(CFG, jax.random.key(0))
MCFG = dx.Mamba2Config.tiny()  # 4 layers
MPARAMS = mamba2.init_params(MCFG, jax.random.key(0))
MODELS = {"mistral": (CFG, PARAMS), "mamba2": (MCFG, MPARAMS)}
PROMPTS = [[5, 7, 9, 11, 3], [17, 2], [1, 2, 3, 4, 5, 6, 7, 8]]
WIDTH = 8  # every call pads prompts to this width: shapes (and compiled programs) are shared
N = 6


def _padded(prompts):
    arr = np.zeros((len(prompts), WIDTH), np.int32)
    for i, p in enumerate(prompts):
        arr[i, :len(p)] = p
    return arr, [len(p) for p in prompts]


def _gen(backbone, prompts, **kw):
    config, params = MODELS[backbone]
    arr, lengths = _padded(prompts)
    return dx.generate(config, params, arr, prompt_lengths=lengths, max_new_tokens=N, return_logits=True, **kw)


def _sharp_exits(kind="mamba", backbone="mistral", **kw):
    """Random exit heads with large output weights: p(exit) is spread over (0, 1) instead of
    sitting near 0.5, so that exit decisions are not decided by rounding."""
    ec = dx.ExitConfig(kind=kind, **kw)
    p = dx.init_exits(MODELS[backbone][0], ec, jax.random.key(1))
    out = {"mamba": "out_proj", "calm": "w", "ffn": "w_out", "hybrid": "ffn_w_out"}[kind]
    p[out] = p[out] * 40.0
    if ec.mode == "shift":  # init_exits makes it zero (= propagate): give it something to do
        p["fill_shift"] = jax.random.normal(jax.random.key(2), p["fill_shift"].shape)
    return ec, p


@functools.lru_cache(maxsize=None)
def _jit_forward(config):
    return jax.jit(lambda p, t: module_for(config).forward(config, p, t))


def _reference_greedy(config, params, prompt, n):
    """Greedy decoding by re-running the full forward (no cache) on a fixed-width buffer; the
    model is causal, so the zeros after the current token do not matter."""
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, :len(prompt)] = prompt
    logits = []
    for i in range(n):
        lg = np.asarray(_jit_forward(config)(params, jnp.asarray(buf))[0, len(prompt) - 1 + i])
        logits.append(lg)
        buf[0, len(prompt) + i] = lg.argmax()
    return buf[0, len(prompt):], np.stack(logits)


@functools.lru_cache(maxsize=None)
def _full_depth(backbone):
    return _gen(backbone, PROMPTS)


@pytest.mark.parametrize("backbone", ["mistral", "mamba2"])
def test_full_depth_matches_uncached_forward(backbone):
    config, params = MODELS[backbone]
    r = _full_depth(backbone)
    for i, prompt in enumerate(PROMPTS):
        toks, logits = _reference_greedy(config, params, prompt, N)
        np.testing.assert_array_equal(r.tokens[i], toks)
        np.testing.assert_allclose(r.logits[i], logits, rtol=1e-5, atol=1e-5)
    assert (r.exit_layers == config.num_layers).all() and r.avg_layers == config.num_layers
    assert r.flops_relative == pytest.approx(1.0)


@pytest.mark.parametrize("backbone, kind, mode", [
    ("mistral", "mamba", "copy"), ("mistral", "ffn", "propagate"), ("mamba2", "mamba", "propagate"),
    ("mamba2", "hybrid", "skip")])
def test_threshold_above_one_is_full_depth(backbone, kind, mode):
    ec, p = _sharp_exits(kind, backbone, mode=mode, threshold=1.5)
    full = _full_depth(backbone)
    r = _gen(backbone, PROMPTS, exit_config=ec, exit_params=p)
    np.testing.assert_array_equal(r.tokens, full.tokens)
    np.testing.assert_allclose(r.logits, full.logits, rtol=1e-6, atol=1e-6)
    assert (r.exit_layers == 4).all()
    assert r.flops_relative == pytest.approx(1.0)  # an exit that cannot fire runs no classifier


@pytest.mark.parametrize("confidence", ["classifier", "softmax", "saturation"])
def test_threshold_zero_exits_at_first_exit(confidence):
    ec, p = _sharp_exits("calm", threshold=0.0, confidence=confidence)
    r = _gen("mistral", PROMPTS, exit_config=ec, exit_params=p)
    assert (r.exit_layers == 2).all() and r.avg_layers == 2
    assert r.flops_relative < 1.0
    # the first exit's tokens are static pruning's at 2 (copy mode: the same caches)
    s = _gen("mistral", PROMPTS, static_exit_layer=2)
    np.testing.assert_array_equal(r.tokens, s.tokens)
    np.testing.assert_allclose(r.logits, s.logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backbone", ["mistral", "mamba2"])
def test_static_pruning_equals_truncated_model(backbone):
    config, params = MODELS[backbone]
    for k in (1, 3):
        truncated = dataclasses.replace(config, num_layers=k)
        tparams = {**params, "layers": jax.tree.map(lambda a: a[:k], params["layers"])}
        r = _gen(backbone, PROMPTS, static_exit_layer=k)
        for i, prompt in enumerate(PROMPTS):
            toks, logits = _reference_greedy(truncated, tparams, prompt, N)
            np.testing.assert_array_equal(r.tokens[i], toks)
            np.testing.assert_allclose(r.logits[i], logits, rtol=1e-5, atol=1e-5)
        assert (r.exit_layers == k).all()


@pytest.mark.parametrize("backbone, mode, kind", [
    ("mistral", "copy", "mamba"), ("mistral", "propagate", "mamba"), ("mistral", "shift", "mamba"),
    pytest.param("mamba2", "skip", "mamba", marks=pytest.mark.slow), ("mamba2", "propagate", "mamba"),
    pytest.param("mamba2", "shift", "mamba", marks=pytest.mark.slow), ("mamba2", "skip", "hybrid")])
def test_batch_rows_match_single_prompts(backbone, mode, kind):
    ec, p = _sharp_exits(kind, backbone, threshold=0.5, mode=mode)
    batch = _gen(backbone, PROMPTS, exit_config=ec, exit_params=p)
    assert len(set(batch.exit_layers.ravel().tolist())) > 1, "exits should vary for this test to bite"
    for i, prompt in enumerate(PROMPTS):
        alone = _gen(backbone, [prompt], exit_config=ec, exit_params=p)
        np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
        np.testing.assert_array_equal(batch.exit_layers[i], alone.exit_layers[0])
        np.testing.assert_allclose(batch.logits[i], alone.logits[0], rtol=1e-5, atol=1e-5)


def _one_exiting_step(backbone, mode, prompt):
    """Prefill ``prompt`` and decode one token that leaves after layer 2 (of 4); return the
    per-layer caches/states, stacked ``[L, ...]``."""
    config, params = MODELS[backbone]
    params = dx.decode_params(params)
    ec, p = _sharp_exits("calm", backbone, threshold=0.0, mode=mode)
    settings, controls, p = dx.configure(config, 1, exit_config=ec, exit_params=p)
    t = len(prompt)
    state = dx.prefill(config, settings, params, p, jnp.asarray([prompt]), jnp.asarray([t]), cache_len=t + 1)
    chunk, state = dx.decode_chunk(config, settings, 1, params, p, state, controls, jax.random.key(0))
    assert int(chunk.exit_layers[0, 0]) == 2
    return jax.tree.map(lambda *layers: np.stack(layers), *state.caches), p


def _skipped_layer_input(p, mode, exit_hidden, layer):
    """What a token that left at the first exit gives a skipped layer (0-based ``layer``)."""
    return exit_hidden + p[0]["fill_shift"][layer] if mode == "shift" else exit_hidden


@pytest.mark.parametrize("mode", ["copy", "propagate", "shift"])
def test_skipped_layer_caches_transformer(mode):
    """Layers 1-2 hold their own K/V at the new position; layers 3-4 hold layer 2's K/V
    (copy) or their K/V projected from the exit hidden state (propagate), moved by the exit's
    fill shift for that layer (shift); earlier positions are the full model's."""
    prompt = PROMPTS[0]
    t = len(prompt)
    cache, p = _one_exiting_step("mistral", mode, prompt)
    k, v = cache.k, cache.v  # [L, 1, K, S, H]
    _, full, hidden = mistral.apply(CFG, PARAMS, jnp.asarray([prompt]), mistral.KVCache.init(CFG, 1, t),
                                    jnp.zeros((1,), jnp.int32), return_hidden=True)
    fk, fv = np.asarray(full.k), np.asarray(full.v)
    np.testing.assert_allclose(k[..., :t - 1, :], fk[..., :t - 1, :], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k[:2, ..., t - 1, :], fk[:2, ..., t - 1, :], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v[:2, ..., t - 1, :], fv[:2, ..., t - 1, :], rtol=1e-5, atol=1e-6)
    for layer in (2, 3):
        if mode == "copy":
            want_k, want_v = fk[1, ..., t - 1, :], fv[1, ..., t - 1, :]
        else:
            lp = jax.tree.map(lambda a: a[layer], PARAMS["layers"])
            x = _skipped_layer_input(p, mode, hidden[1][:, t - 1:t], layer)
            wk, wv = mistral.kv_projection(CFG, lp, x, jnp.asarray([t - 1]))
            want_k, want_v = np.asarray(wk[:, 0]), np.asarray(wv[:, 0])
        np.testing.assert_allclose(k[layer, ..., t - 1, :], want_k, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v[layer, ..., t - 1, :], want_v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["skip", "propagate", "shift"])
def test_skipped_layer_states_mamba2(mode):
    """Layers 1-2 hold the full model's state after the whole prompt; layers 3-4 keep the
    state before the last token (skip) or take their update from the exit hidden state
    (propagate), moved by the exit's fill shift for that layer (shift)."""
    prompt = PROMPTS[0]
    t = len(prompt)
    state, p = _one_exiting_step("mamba2", mode, prompt)
    zero = mamba2.init_state(MCFG, 1)
    _, full, _ = mamba2.apply(MCFG, MPARAMS, jnp.asarray([prompt]), zero)
    _, before, _ = mamba2.apply(MCFG, MPARAMS, jnp.asarray([prompt[:-1]]), zero)
    _, hidden = mamba2.forward(MCFG, MPARAMS, jnp.asarray([prompt]), return_hidden=True)
    for name in ("conv", "ssm"):
        np.testing.assert_allclose(getattr(state, name)[:2], getattr(full, name)[:2], rtol=1e-5, atol=1e-6)
    for layer in (2, 3):
        prev = jax.tree.map(lambda a: a[layer], before)
        if mode == "skip":
            want = prev
        else:
            lp = jax.tree.map(lambda a: a[layer], MPARAMS["layers"])
            want = mamba2.decode_layer(MCFG, lp, _skipped_layer_input(p, mode, hidden[1][:, t - 1:t], layer), prev)[1]
        for name in ("conv", "ssm"):
            np.testing.assert_allclose(getattr(state, name)[layer], getattr(want, name), rtol=1e-5, atol=1e-6)


def _segments(backbone, exit_layers, **kw):
    """The layer loop of the decode program, segment by segment: the first segment's equations
    (it runs unconditionally) and, for each later one, its ``lax.cond`` equation."""
    config, params = MODELS[backbone]
    params = dx.decode_params(params)
    ec = dx.ExitConfig(kind="calm", layers=exit_layers) if exit_layers else None
    p = dx.init_exits(config, ec, jax.random.key(1)) if ec else None
    settings, controls, p = dx.configure(config, 2, exit_config=ec, exit_params=p, **kw)
    state = dx.prefill(config, settings, params, p, jnp.zeros((1, 5), jnp.int32), jnp.asarray([5]), cache_len=7)
    jaxpr = jax.make_jaxpr(lambda s: dx.decode_chunk(config, settings, 2, params, p, s, controls,
                                                     jax.random.key(0)))(state)

    program = next(e for e in jaxpr.jaxpr.eqns if "jaxpr" in e.params).params["jaxpr"].jaxpr  # the jit
    token_loop = next(e for e in program.eqns if e.primitive.name == "while")
    body = token_loop.params["body_jaxpr"].jaxpr

    def in_segment(eqn, index):
        return f"segment{index}" in str(eqn.source_info.name_stack).split("/")

    first = [e for e in body.eqns if in_segment(e, 0)]
    later = [[e for e in body.eqns if in_segment(e, i) and e.primitive.name == "cond"]
             for i in range(1, len(settings.segments))]
    assert all(len(c) == 1 for c in later), "one conditional per later segment"
    return config, state, first, [c[0] for c in later]


def _count(eqns, primitive: str) -> int:
    n = 0
    for eqn in eqns:
        n += eqn.primitive.name == primitive
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    n += _count(sub.jaxpr.eqns, primitive)
                elif hasattr(sub, "eqns"):
                    n += _count(sub.eqns, primitive)
    return n


@pytest.mark.parametrize("backbone", ["mistral", "mamba2"])
def test_each_segment_is_one_conditional_of_its_own_layers(backbone):
    """The layer loop is straight-line code over segments (layers up to and including an
    exit): the first runs, each later one is a conditional whose taken branch holds the
    matmuls of its own layers only and whose other branch (no row reached it) none of them.
    Static pruning cuts after any layer: one layer a segment. A conditional returns its own
    layers' entries and the small loop state, never every layer's (XLA:CPU copies what a
    conditional passes through: the Mamba2 states of all layers made each segment cost a
    copy of the whole model's state)."""
    _, _, first, later = _segments(backbone, ())  # full depth: one segment
    assert later == []
    per_layer = _count(first, "dot_general") // 4
    assert per_layer > 0
    config, state, first, later = _segments(backbone, (2, 3))  # segments: layers 1-2, 3, 4
    assert len(later) == 2
    classifier = _count(first, "dot_general") - 2 * per_layer
    assert 0 < classifier < per_layer

    def branches(cond):  # lax.cond: branches[1] runs when the predicate holds
        skipped, run = cond.params["branches"]
        return _count(run.jaxpr.eqns, "dot_general"), _count(skipped.jaxpr.eqns, "dot_general")

    assert [branches(c) for c in later] == [(per_layer + classifier, 0), (per_layer, 0)]
    entry = module_for(config).read_entry(state.caches[0], state.positions)
    entry_size = sum(a.size for a in jax.tree.leaves(entry))
    b = state.positions.shape[0]
    loop_state = b * config.hidden_size + 2 * b + 1  # hidden, active, exit layer, segment
    for cond in later:  # one layer each
        assert sum(int(np.prod(v.aval.shape)) for v in cond.outvars) <= entry_size + loop_state
    _, _, first, later = _segments(backbone, (), static_exit_layer=1)
    assert _count(first, "dot_general") == per_layer
    assert [branches(c) for c in later] == [(per_layer, 0)] * 3


@pytest.mark.parametrize("exit_layers", [(), (2, 3)])
def test_kv_caches_are_updated_in_place(exit_layers):
    """The compiled token loop writes each new K/V entry into its layer's cache in place: no
    copy of a whole cache. (A layer's entry does not depend on its attention over the cache;
    until the write was ordered after the reads, XLA copied every layer's K and V twice per
    token: 2 x 2 x L copies, 190 MB per token for SmolLM2 at 2,048 cached positions.)"""
    config, params = MODELS["mistral"]
    params = dx.decode_params(params)
    ec = dx.ExitConfig(kind="calm", layers=exit_layers, mode="propagate") if exit_layers else None
    p = dx.init_exits(config, ec, jax.random.key(1)) if ec else None
    settings, controls, p = dx.configure(config, 2, exit_config=ec, exit_params=p)
    state = dx.prefill(config, settings, params, p, jnp.zeros((1, 5), jnp.int32), jnp.asarray([5]), cache_len=7)
    cache_shape = state.caches[0].k.shape
    assert all(c.k.shape == c.v.shape == cache_shape for c in state.caches)
    hlo = jax.jit(lambda s: decoding.decode_chunk(config, settings, 2, params, p, s, controls, jax.random.key(0))
                  ).lower(state).compile().as_text()
    shape = "f32[" + ",".join(map(str, cache_shape)) + "]"
    # every computation but the entry one (which copies the caches into the loop once per call)
    before, _, entry_and_after = hlo.partition("\nENTRY ")
    loop = before + entry_and_after.partition("\n}\n")[2]
    assert "dynamic-update-slice" in loop
    assert [line for line in loop.splitlines() if " copy(" in line and f"= {shape}" in line] == []


def _compiled():
    """Programs in jax's own caches of the two jitted engine functions."""
    return decoding.prefill._cache_size(), decoding.decode_chunk._cache_size()


def test_compiled_once_per_shape_and_setting():
    ec, p = _sharp_exits("calm", threshold=0.5)
    _gen("mistral", PROMPTS, exit_config=ec, exit_params=p)
    before = _compiled()
    # other tokens, lengths, thresholds, stop tokens: the same compiled programs
    _gen("mistral", [[4, 5, 6], [9], [1, 1]], exit_config=ec, exit_params=p)
    _gen("mistral", PROMPTS[::-1], exit_config=dataclasses.replace(ec, threshold=0.9), exit_params=p,
         stop_tokens=(7, 9))
    assert _compiled() == before
    _gen("mistral", PROMPTS, exit_config=ec, exit_params=p, temperature=0.5)  # a static setting: one more each
    assert _compiled() == (before[0] + 1, before[1] + 1)


def test_sampling_reproducible_and_topk1_is_greedy():
    kw = dict(temperature=1.0, top_p=0.9)
    a = _gen("mistral", PROMPTS, key=jax.random.key(3), **kw)
    b = _gen("mistral", PROMPTS, key=jax.random.key(3), **kw)
    c = _gen("mistral", PROMPTS, key=jax.random.key(4), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    top1 = _gen("mistral", PROMPTS, temperature=0.7, top_k=1, key=jax.random.key(5))
    np.testing.assert_array_equal(_full_depth("mistral").tokens, top1.tokens)


def test_sample_token_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.key(0)
    top2 = np.asarray(sample_token(logits, keys, 1.0, 2, 1.0, False))
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.asarray(sample_token(logits, keys, 1.0, 0, 0.7, True))  # 0.5 + 0.3 reaches 0.7
    assert set(nucleus.tolist()) == {0, 1}
    assert abs((nucleus == 0).mean() - 0.5 / 0.8) < 0.05


def test_repetition_penalty():
    logits = jnp.array([[2.0, -1.0, 0.5]])
    seen = jnp.array([[True, True, False]])
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -2.0, 0.5]])
    greedy = _full_depth("mistral")
    r = _gen("mistral", PROMPTS, repetition_penalty=1e4)
    distinct = lambda toks, prompt: len(set(toks.tolist()) | set(prompt)) == N + len(prompt)  # noqa: E731
    # the random tiny model repeats itself ...
    assert not all(distinct(greedy.tokens[i], prompt) for i, prompt in enumerate(PROMPTS))
    # ... but not when penalised
    assert all(distinct(r.tokens[i], prompt) for i, prompt in enumerate(PROMPTS))


def test_stop_tokens_stop():
    full = _full_depth("mistral")
    stop = int(full.tokens[0, 2])
    r = _gen("mistral", PROMPTS, stop_tokens=[stop], pad_token=127)
    first = int(np.argmax(full.tokens[0] == stop))
    np.testing.assert_array_equal(r.tokens[0, :first + 1], full.tokens[0, :first + 1])
    assert (r.tokens[0, first + 1:] == 127).all() and (r.exit_layers[0, first + 1:] == 0).all()
    assert r.num_generated[0] == first + 1
    for i in (1, 2):  # other rows go on unless they emit the stop token too
        hits = np.flatnonzero(full.tokens[i] == stop)
        n = hits[0] + 1 if hits.size else N
        np.testing.assert_array_equal(r.tokens[i, :n], full.tokens[i, :n])
        assert r.num_generated[i] == n


def test_bad_input_errors():
    ec, p = _sharp_exits("calm")
    with pytest.raises(dx.GenerateError, match="the cache has 6 slots but the longest prompt"):
        dx.generate(CFG, PARAMS, [PROMPTS[0]], max_new_tokens=4, cache_len=6)
    with pytest.raises(ex.ExitError, match="out of range for a 4-layer model"):
        dx.generate(CFG, PARAMS, [PROMPTS[0]], max_new_tokens=2, exit_config=dx.ExitConfig(layers=(2, 5)),
                    exit_params=p)
    with pytest.raises(ex.ExitError, match="strictly increasing"):
        dx.ExitConfig(layers=(3, 2))
    with pytest.raises(ex.ExitError, match="threshold must be a number >= 0"):
        dx.ExitConfig(threshold=float("nan"))
    with pytest.raises(ex.ExitError, match="threshold must be a number >= 0"):
        dx.ExitConfig(threshold=-1.0)
    other = dx.init_exits(dataclasses.replace(CFG, hidden_size=32), ec, jax.random.key(0))
    with pytest.raises(ex.ExitError, match="hidden size 64"):
        dx.generate(CFG, PARAMS, [PROMPTS[0]], max_new_tokens=2, exit_config=ec, exit_params=other)
    with pytest.raises(ex.ExitError, match="needs exit_params"):
        dx.generate(CFG, PARAMS, [PROMPTS[0]], max_new_tokens=2, exit_config=ec)
    with pytest.raises(dx.GenerateError, match="prompt_lengths must be in"):
        dx.generate(CFG, PARAMS, np.asarray([PROMPTS[0]]), prompt_lengths=[9], max_new_tokens=2)
    with pytest.raises(dx.GenerateError, match=r"prompt token ids must be in \[0, 128\)"):
        dx.generate(CFG, PARAMS, [[1, 500]], max_new_tokens=2)
    with pytest.raises(dx.GenerateError, match="static_exit_layer must be in"):
        dx.generate(CFG, PARAMS, [PROMPTS[0]], max_new_tokens=2, static_exit_layer=5)
    with pytest.raises(dx.GenerateError, match="top_p"):
        dx.generate(CFG, PARAMS, [PROMPTS[0]], max_new_tokens=2, temperature=1.0, top_p=0.0)


@pytest.mark.parametrize("backbone", ["mistral", "mamba2"])
def test_recompute_keeps_the_full_cache_and_takes_the_exit_token(backbone):
    """``recompute``: every token leaves at the first exit (threshold 0), yet the skipped
    layers still run, so the cache is the full model's: each token is the exit's logit lens
    on a full forward over the prompt and the tokens generated before it. No compute is
    saved: full depth's FLOPs plus the classifiers'."""
    config, params = MODELS[backbone]
    module = module_for(config)
    ec, p = _sharp_exits("calm", backbone, threshold=0.0, mode="recompute")
    r = _gen(backbone, PROMPTS, exit_config=ec, exit_params=p)
    assert (r.exit_layers == 2).all() and r.flops_relative > 1.0
    forward = jax.jit(lambda prm, t: module.forward(config, prm, t, return_hidden=True)[1])
    for i, prompt in enumerate(PROMPTS):
        buf = np.zeros((1, len(prompt) + N), np.int32)
        buf[0, :len(prompt)], buf[0, len(prompt):] = prompt, r.tokens[i]
        at_exit = forward(params, jnp.asarray(buf))[1][0, len(prompt) - 1:len(prompt) - 1 + N]  # layer 2's output
        logits = np.asarray(module.head(config, params, at_exit))
        np.testing.assert_array_equal(r.tokens[i], logits.argmax(-1))
        np.testing.assert_allclose(r.logits[i], logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(dx.GenerateError, match="recompute"):
        _gen(backbone, PROMPTS, exit_config=dx.ExitConfig(mode="recompute"), static_exit_layer=2)


def test_shift_needs_exit_heads_and_costs_one_add_more():
    with pytest.raises(dx.GenerateError, match="mode 'shift' needs exit heads"):
        _gen("mistral", PROMPTS, exit_config=dx.ExitConfig(mode="shift"), static_exit_layer=2)
    for config in (CFG, MCFG):
        assert flops.skipped_layer_flops(config, "shift") == flops.skipped_layer_flops(config, "propagate") + \
            config.hidden_size


# ----------------------------------------------------------------------------- the backbone protocol

def test_a_backbone_missing_a_protocol_function_is_refused_by_name():
    import types

    from dynamax_jax import models

    assert models.check_backbone(mistral) is mistral and models.check_backbone(mamba2) is mamba2
    partial = types.ModuleType("dynamax_jax.models.partial")
    for name in models.protocol_members():
        if name not in ("decode_layer", "cache_capacity"):
            setattr(partial, name, getattr(mistral, name))
    with pytest.raises(models.BackboneError, match=r"dynamax_jax.models.partial .* lacks cache_capacity, decode_layer"):
        models.check_backbone(partial)
    assert {"SKIPPED_LAYER_MODES", "decode_layout", "decode_layer", "write_entry"} <= set(models.protocol_members())


def test_skipped_layer_modes_are_listed_once_per_backbone():
    """Every list of modes (ExitConfig, the CLI's --mode, the evaluation sweeps) derives from
    the backbones' ``SKIPPED_LAYER_MODES``."""
    from dynamax_jax.cli import generate as cli
    from dynamax_jax.eval import harness
    from dynamax_jax.models import skipped_layer_modes

    union = skipped_layer_modes()
    assert set(union) == set(mistral.SKIPPED_LAYER_MODES) | set(mamba2.SKIPPED_LAYER_MODES)
    assert skipped_layer_modes("transformer") == mistral.SKIPPED_LAYER_MODES
    mode_flag = next(a for a in cli._parser()._actions if a.dest == "mode")
    assert tuple(mode_flag.choices) == union
    assert harness.MODES == {"transformer": ("copy", "propagate"), "mamba2": ("skip", "propagate")}
    with pytest.raises(ex.ExitError, match=re.escape("transformer: copy|propagate|shift|recompute; mamba2: skip|")):
        dx.ExitConfig(mode="teleport")
    for config in (CFG, MCFG):
        assert dx.ExitConfig().resolve(config).mode == module_for(config).SKIPPED_LAYER_MODES[0]


def test_each_backbone_owns_its_decode_layout():
    assert set(dx.decode_params(PARAMS)["layers"][0]) == set(mistral.decode_layout(
        jax.tree.map(lambda a: a[0], PARAMS["layers"])))
    assert dx.decode_params(MPARAMS, config=MCFG)["layers"][0].keys() == MPARAMS["layers"].keys()
    with pytest.raises(dx.GenerateError, match=r"params: the layers lack .*in_proj, out_proj, which every "
                                               r"layer of dynamax_jax.models.mamba2 has"):
        dx.decode_params({**PARAMS, "layers": {**PARAMS["layers"], "norm": 0}}, config=MCFG)


# ----------------------------------------------------------------------------- refusing what it cannot do right

def _prefilled(backbone="mistral", cache_len=8, max_new_tokens=4):
    config, params = MODELS[backbone]
    params = dx.decode_params(params)
    settings, controls, p = dx.configure(config, max_new_tokens)
    prompt = jnp.asarray([[5, 7, 9, 11, 3]], jnp.int32)
    state = dx.prefill(config, settings, params, p, prompt, jnp.asarray([5]), cache_len=cache_len)
    return config, params, settings, controls, p, state


def test_decode_chunk_past_the_cache_is_refused():
    """5 prompt tokens and cache_len 8: the loop's inputs sit at positions 4..7, so four steps fit
    and a fifth would write past the cache: refused, not decoded into wrong tokens."""
    config, params, settings, controls, p, state = _prefilled()
    chunk, state = dx.decode_chunk(config, settings, 3, params, p, state, controls, jax.random.key(0))
    assert chunk.positions.tolist() == [[4, 5, 6]]
    with pytest.raises(RuntimeError, match=r"decode_chunk: 2 steps from positions \[7\] write up to position 8, "
                                           r"past the cache of 8 slots \(prefill's cache_len\)"):
        jax.block_until_ready(dx.decode_chunk(config, settings, 2, params, p, state, controls, jax.random.key(0)))
    config, params, settings, controls, p, state = _prefilled("mamba2")  # a recurrent state has no end
    chunk, _ = dx.decode_chunk(config, settings, 6, params, p, state, controls, jax.random.key(0))
    assert chunk.positions.tolist() == [[4, 5, 6, 7, 8, 9]]


def test_prefill_refuses_what_does_not_fit():
    config, params = MODELS["mistral"]
    params = dx.decode_params(params)
    settings, _, p = dx.configure(config, 2)
    prompt = jnp.asarray([[5, 7, 9, 11, 3]], jnp.int32)
    with pytest.raises(dx.GenerateError, match=r"cache_len \(4\) is smaller than the prompt width \(5 tokens\)"):
        dx.prefill(config, settings, params, p, prompt, jnp.asarray([5]), cache_len=4)
    with pytest.raises(RuntimeError, match=r"prompt token ids must be in \[0, 128\) \(the vocabulary\)"):
        jax.block_until_ready(dx.prefill(config, settings, params, p, prompt.at[0, 2].set(128), jnp.asarray([5]),
                                         cache_len=8))
    dx.prefill(config, settings, params, p, prompt.at[0, 4].set(128), jnp.asarray([4]), cache_len=8)  # padding
    with pytest.raises(RuntimeError, match=r"lengths must be in \[1, 5\], got \[0\]"):
        jax.block_until_ready(dx.prefill(config, settings, params, p, prompt, jnp.asarray([0]), cache_len=8))
    with pytest.raises(dx.GenerateError, match=r"prompt must be \[B, T\] with B, T >= 1"):
        dx.prefill(config, settings, params, p, jnp.zeros((1, 0), jnp.int32), jnp.asarray([0]), cache_len=8)
    with pytest.raises(dx.GenerateError, match=r"params: pass the decode layout"):
        dx.prefill(config, settings, MODELS["mistral"][1], p, prompt, jnp.asarray([5]), cache_len=8)


def test_decode_chunk_refuses_another_configs_state():
    config, params, settings, controls, p, state = _prefilled("mistral")
    mconfig, mparams, msettings, mcontrols, mp, mstate = _prefilled("mamba2")
    with pytest.raises(dx.GenerateError, match=r"state: its caches \(4 x KVCache\) are not those of this config "
                                               r"\(4 x Mamba2State, a mamba2 backbone\)"):
        dx.decode_chunk(mconfig, msettings, 2, mparams, mp, state, mcontrols, jax.random.key(0))
    wider = dataclasses.replace(CFG, num_kv_heads=4)
    with pytest.raises(dx.GenerateError, match="state: a cache of shape"):
        dx.decode_chunk(wider, settings, 2, params, p, state, controls, jax.random.key(0))
    penalised, _, _ = dx.configure(config, 2, repetition_penalty=1.3)
    with pytest.raises(dx.GenerateError, match="state: seen is missing for these settings"):
        dx.decode_chunk(config, penalised, 2, params, p, state, controls, jax.random.key(0))


def test_static_exit_layer_must_be_an_integer():
    for bad in (2.7, 2.0, True, "2"):
        with pytest.raises(dx.GenerateError, match=r"static_exit_layer must be in \[1, 4\] \(an integer\)"):
            dx.generate(CFG, PARAMS, [PROMPTS[0]], max_new_tokens=2, static_exit_layer=bad)
    assert dx.generate(CFG, PARAMS, [PROMPTS[0]], max_new_tokens=2, static_exit_layer=np.int64(2)).avg_layers == 2


@pytest.mark.parametrize("backbone", ["mistral", "mamba2"])
def test_a_nan_in_the_weights_is_reported(backbone):
    config, params = MODELS[backbone]
    first = "wo" if backbone == "mistral" else "out_proj"
    broken = {**params, "layers": {**params["layers"], first: params["layers"][first].at[1, 0, 0].set(jnp.nan)}}
    with pytest.raises(decoding.NonFiniteError, match=r"logits of prompt row\(s\) \[0, 1, 2\] were not finite"):
        dx.generate(config, broken, *_padded(PROMPTS)[:1], prompt_lengths=_padded(PROMPTS)[1], max_new_tokens=N)
