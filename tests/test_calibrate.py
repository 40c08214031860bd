"""Learn-then-Test calibration on synthetic problems whose risks are known exactly."""

import math
from pathlib import Path

import numpy as np
import pytest

from dynamax_jax.eval.calibrate import (CalibrationError, calibrate_vectors, hoeffding_bentkus_pvalue,
                                        learn_then_test, min_calibration_size, vector_path)


def _draw(risks, n, rng):
    """Monotone losses: prompt i is inconsistent at candidate j iff u_i < risk_j, so each
    candidate's true risk is exactly ``risks[j]`` and looser candidates fail on a superset."""
    u = rng.random((n, 1))
    return (u < np.asarray(risks)[None, :]).astype(np.float64)


def test_guarantee_holds_over_repeated_draws():
    delta, epsilon, n, draws = 0.1, 0.1, 150, 3000
    risks = [0.0, 0.03, 0.06, 0.08, 0.095, 0.1, 0.105, 0.12, 0.2]
    candidates = list(range(len(risks)))
    rng = np.random.default_rng(0)
    failures = naive_failures = 0
    for _ in range(draws):
        losses = _draw(risks, n, rng)
        cal = learn_then_test(losses, candidates, delta, epsilon)
        failures += cal.index is not None and risks[cal.index] > delta
        ok = np.nonzero(losses.mean(0) <= delta)[0]
        naive_failures += len(ok) and risks[ok.max()] > delta
    rate = failures / draws
    slack = 3 * math.sqrt(epsilon * (1 - epsilon) / draws)
    assert rate <= epsilon + slack, (rate, epsilon)
    # Not vacuous: picking the loosest threshold whose empirical risk is below delta fails
    # far more often than epsilon on the same draws.
    assert naive_failures / draws > 2 * epsilon


def test_picks_the_loosest_valid_threshold_with_enough_data():
    risks = [0.0, 0.02, 0.05, 0.08, 0.12, 0.2]
    losses = _draw(risks, 5000, np.random.default_rng(1))
    cal = learn_then_test(losses, [0.99, 0.9, 0.8, 0.7, 0.6, 0.5], delta=0.1, epsilon=0.05)
    assert cal.index == 3 and cal.threshold == 0.7
    assert cal.p_values[3] <= 0.05 < cal.p_values[4]


def test_stops_at_first_non_rejection():
    # A loose candidate with low empirical risk after a failing one is never reached.
    losses = np.zeros((400, 3))
    losses[:100, 1] = 1.0
    cal = learn_then_test(losses, [0.9, 0.8, 0.7], delta=0.1, epsilon=0.05)
    assert cal.index == 0


def test_pvalue_is_valid_at_the_boundary():
    # Under the null with risk exactly delta, P(p <= eps) <= eps.
    rng = np.random.default_rng(2)
    n, delta, eps = 200, 0.1, 0.1
    means = rng.binomial(n, delta, size=20000) / n
    p = np.array([hoeffding_bentkus_pvalue(m, n, delta) for m in means])
    assert np.mean(p <= eps) <= eps


def test_per_exit_vectors_use_bonferroni_and_prefer_cheaper():
    families = vector_path(num_exits=4, steps=6, slopes=(0.0, 0.5))
    assert all(len(v) == 4 for fam in families for v in fam)
    assert families[0][0] == (1.0, 1.0, 1.0, 1.0)
    rng = np.random.default_rng(3)
    risk_of = lambda v: 0.15 * (1 - np.mean(v))  # noqa: E731
    loss_fn = lambda fam: _draw([risk_of(v) for v in fam], 2000, rng)  # noqa: E731
    cost_fn = lambda fam: [10 + 20 * float(np.mean(v)) for v in fam]  # noqa: E731
    best, cost, results = calibrate_vectors(loss_fn, cost_fn, families, delta=0.05, epsilon=0.1)
    assert best is not None and best.epsilon == pytest.approx(0.05)
    assert risk_of(best.threshold) <= 0.05
    assert cost == min(cost_fn([r.threshold])[0] for r in results if r.index is not None)


@pytest.mark.parametrize("delta,epsilon", [(0.0, 0.1), (1.0, 0.1), (0.1, 0.0), (0.1, 1.5), (-1, 0.1)])
def test_levels_outside_unit_interval(delta, epsilon):
    with pytest.raises(CalibrationError, match="must be in \\(0, 1\\)"):
        learn_then_test(np.zeros((100, 2)), [0.9, 0.8], delta, epsilon)


def test_too_small_calibration_set_says_how_many_needed():
    need = min_calibration_size(0.1, 0.05)
    assert need == 29  # (0.9)^29 = 0.047 <= 0.05 < 0.9^28
    with pytest.raises(CalibrationError, match=f"fewer than {need} prompts"):
        learn_then_test(np.zeros((need - 1, 2)), [0.9, 0.8], 0.1, 0.05)
    assert learn_then_test(np.zeros((need, 2)), [0.9, 0.8], 0.1, 0.05).index == 1


def test_token_disagreement():
    from dynamax_jax.eval.metrics import token_disagreement
    assert token_disagreement([1, 2, 3], [1, 2, 3]) == 0.0
    assert token_disagreement([1, 9, 3, 4], [1, 2, 3]) == 0.5  # one differs, one extra, over 4
    assert token_disagreement([], []) == 0.0


def test_cli_rejects_bad_settings_before_loading_a_model(capsys):
    from dynamax_jax.eval.calibrate import main
    assert main(["--exits", "unused", "--delta", "1.5"]) == 2
    assert "delta must be in (0, 1)" in capsys.readouterr().err
    assert main(["--exits", "unused", "--delta", "0.01", "--epsilon", "0.01", "--data", str(Path(__file__).parent.parent / "eval" / "data")]) == 2
    err = capsys.readouterr().err
    assert "too few" in err and f"at least {min_calibration_size(0.01, 0.01)} are needed" in err


def test_candidate_thresholds_are_ordered_strict_to_loose(capsys):
    from dynamax_jax.eval.calibrate import main, parse_thresholds
    assert parse_thresholds("0.5,0.9,0.7,0.9") == [0.9, 0.7, 0.5]
    with pytest.raises(CalibrationError, match="numbers >= 0"):
        parse_thresholds("0.5,-1")
    with pytest.raises(CalibrationError, match="comma-separated numbers"):
        parse_thresholds("0.5,high")
    assert main(["--exits", "unused", "--thresholds", "x"]) == 2
    assert "--thresholds must be comma-separated numbers" in capsys.readouterr().err


def test_cli_calibrates_writes_the_checkpoint_and_checks_the_holdout(tiny_llama_dir, tmp_path, capsys):
    """End to end on a tiny random Llama: the losses are measured once for every candidate
    on the calibration and hold-out prompts, every level is reported, and the chosen
    threshold goes into the checkpoint with its guarantee and savings."""
    import json

    import jax

    import dynamax_jax as dx
    from dynamax_jax.eval.calibrate import main

    config = dx.load_pretrained(tiny_llama_dir)[0]
    ec = dx.ExitConfig(kind="calm")
    p = dx.init_exits(config, ec, jax.random.key(0))
    p["w"] = p["w"] * 60.0  # p(exit) spread over (0, 1)
    exits = tmp_path / "exits"
    dx.save_exits(ec, p, exits)
    data = str(Path(__file__).parent.parent / "eval" / "data")
    code = main(["--model", str(tiny_llama_dir), "--exits", str(exits), "--data", data,
                 "--tasks", "trivia_qa,truthful_qa", "--holdout", "0.3", "--max-new-tokens", "4",
                 "--thresholds", "1.01,0.9,0.5,0.0", "--delta", "0.6", "--epsilon", "0.2",
                 "--also", "0.4:0.2,0.05:0.2"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration_prompts"] == 12  # 17 prompts, 5 held out
    assert report["distinct_calibration_prompts"] == 12 and report["seed"] == 0
    assert [c["threshold"] for c in report["candidates"]] == [1.01, 0.9, 0.5, 0.0]
    never = report["candidates"][0]
    assert never["mean_loss"] == 0.0 and never["avg_layers"] == 4.0 and never["holdout_mean_loss"] == 0.0
    assert [(lv["delta"], lv["epsilon"]) for lv in report["levels"]] == [(0.6, 0.2), (0.4, 0.2), (0.05, 0.2)]
    assert "fewer than 32 prompts" in report["levels"][2]["error"]  # reported, not fatal
    chosen = report["chosen"]
    # the loosest candidate whose p-value passed, with the hold-out measured at it
    passed = [c["p_value"] <= 0.2 for c in report["candidates"]]
    assert chosen["threshold"] == report["candidates"][passed.index(False) - 1 if False in passed else -1]["threshold"]
    assert chosen["holdout"]["prompts"] == 5
    saved_config, _ = dx.load_exits(exits)
    assert saved_config.threshold == chosen["threshold"]
    meta = json.loads((exits / "calibration.json").read_text())
    assert {"delta", "epsilon", "calibration_size", "avg_layers", "compute", "holdout"} <= set(meta)
    assert (meta["delta"], meta["epsilon"], meta["calibration_size"]) == (0.6, 0.2, 12)
    assert (meta["seed"], meta["distinct_calibration_prompts"]) == (0, 12)


def test_rouge_loss_scores_the_answers_that_eval_run_scores():
    from dynamax_jax.eval.calibrate import answer_inconsistency
    from dynamax_jax.eval.metrics import consistency
    from dynamax_jax.eval.tasks import answer_from_generation
    assert answer_inconsistency("Paris\nQ: what next", "\nParis\nQ: something else") == 0.0
    early, full = "The capital is Paris, France.\nmore", "Paris is the capital.\nQ:"
    want = 1 - consistency(answer_from_generation(early), answer_from_generation(full))["consistency_rougeL"] / 100
    assert answer_inconsistency(early, full) == pytest.approx(want) and 0 < want < 1


def test_rouge_inconsistency_is_in_the_unit_interval():
    from dynamax_jax.eval.metrics import rouge_inconsistency
    assert rouge_inconsistency("the cat sat", "the cat sat") == 0.0
    assert rouge_inconsistency("", "") == 0.0
    assert rouge_inconsistency("dog", "the cat sat") == 1.0
    assert 0.0 < rouge_inconsistency("the cat", "the cat sat") < 1.0


def test_vector_path_on_given_bases():
    fams = vector_path(num_exits=3, slopes=(0.0, 0.5), bases=[0.5, 1.01, 0.9])
    assert fams[0] == [(1.01, 1.01, 1.01), (0.9, 0.9, 0.9), (0.5, 0.5, 0.5)]  # strict to loose
    assert fams[1][1] == pytest.approx((0.95, 0.925, 0.9))  # the first exit stays strictest


def test_cli_errors_name_the_command_and_offer_the_traceback(capsys, monkeypatch):
    from dynamax_jax.eval.calibrate import main
    monkeypatch.delenv("DYNAMAX_DEBUG", raising=False)
    assert main(["--exits", "unused", "--delta", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m eval.calibrate: error: delta must be in (0, 1)") and "--debug" in err
    with pytest.raises(CalibrationError, match="delta must be in"):
        main(["--exits", "unused", "--delta", "1.5", "--debug"])


def test_repeated_calibration_prompts_are_counted_and_warned_about(tmp_path, capsys):
    """40 copies of one prompt are one piece of evidence, not 40: the command says so before
    any model loads, and counts the distinct prompts."""
    import json

    from dynamax_jax.eval.calibrate import _parser, main, plan_calibration

    row = {"question": "What is the capital of France?", "answer": {"value": "Paris", "aliases": ["Paris"]}}
    (tmp_path / "trivia_qa.jsonl").write_text((json.dumps(row) + "\n") * 40)
    argv = ["--exits", str(tmp_path / "exits"), "--data", str(tmp_path), "--tasks", "trivia_qa", "--no-write"]
    warnings = []
    plan = plan_calibration(_parser().parse_args(argv), log=warnings.append)
    assert (len(plan.calib), plan.distinct) == (40, 1)
    assert warnings == ["warning: the 40 calibration prompts hold only 1 distinct ones, fewer than the 29 that "
                        "delta=0.1, epsilon=0.05 needs; the guarantee assumes independent prompts and a repeated "
                        "prompt adds no evidence: deduplicate the data"]
    assert main(argv) == 2  # then stops at the missing checkpoint, before any model
    err = capsys.readouterr().err
    assert err.startswith(warnings[0]) and "is not an exit checkpoint" in err
    distinct = [dict(row, question=f"Question {i}?") for i in range(40)]
    (tmp_path / "trivia_qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in distinct))
    warnings.clear()
    assert plan_calibration(_parser().parse_args(argv), log=warnings.append).distinct == 40 and not warnings


def test_a_second_writer_on_the_checkpoint_is_refused(tmp_path, capsys):
    import os

    import jax

    import dynamax_jax as dx
    from dynamax_jax.eval.calibrate import main
    from dynamax_jax.io import output_lock

    config = dx.MistralConfig.tiny(num_layers=4)
    ec = dx.ExitConfig(kind="calm")
    exits = tmp_path / "exits"
    dx.save_exits(ec, dx.init_exits(config, ec, jax.random.key(0)), exits)
    data = str(Path(__file__).parent.parent / "eval" / "data")
    argv = ["--model", str(tmp_path / "unused"), "--exits", str(exits), "--data", data, "--tasks",
            "trivia_qa,truthful_qa", "--delta", "0.6", "--epsilon", "0.2"]
    with output_lock(exits, command="another calibration"):
        assert main(argv) == 2  # refused before the model is looked for
    err = capsys.readouterr().err
    assert err.startswith(f"python -m eval.calibrate: error: {exits} is in use by PID {os.getpid()} "), err
    assert "(another calibration)" in err


def test_calibrate_refuses_foreign_files_before_any_work(exits_dir, capsys):
    from dynamax_jax.eval.calibrate import main as calibrate_main

    (exits_dir / "model.safetensors").write_text("not exits")
    # --model does not exist: the refusal comes before loading anything
    assert calibrate_main(["--exits", str(exits_dir), "--model", "/nonexistent", "--tasks", "trivia_qa"]) == 2
    assert "holds files this writer did not make (model.safetensors)" in capsys.readouterr().err


def test_calibrate_names_its_own_data_flag(tmp_path, capsys):
    from dynamax_jax.eval.calibrate import main as calibrate_main

    assert calibrate_main(["--exits", str(tmp_path), "--data", str(tmp_path), "--tasks", "trivia_qa"]) == 2
    err = capsys.readouterr().err
    assert "data file not found" in err and "--data-dir" not in err
