"""eval.tasks and eval.run: fixtures load, bad rows are named, a full ``python -m eval.run``
sweep on a tiny random Llama writes JSON + markdown + PNG, and a second run resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax.eval import harness, report, run, tasks

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
