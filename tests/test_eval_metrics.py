"""eval.metrics: EM/F1 against hand-computed values, BLEU/ROUGE logic against direct
sacrebleu / rouge-score calls, repetition and consistency."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from dynamax_jax.eval import metrics


@pytest.mark.parametrize("text, expected", [
    ("The  Cat, sat on a MAT!", "cat sat on mat"),
    ("An apple's core.", "apples core"),
    ("theatre and the atheist", "theatre and atheist"),  # articles only as whole words
    ("  ", ""),
])
def test_normalize_answer(text, expected):
    assert metrics.normalize_answer(text) == expected


@pytest.mark.parametrize("pred, gold, em, f1", [
    ("The Eiffel Tower.", "eiffel tower", 1.0, 1.0),
    # pred {brown, hen}, gold {brown, hen, laid}: P = 1, R = 2/3, F1 = 0.8
    ("the brown hen", "brown hen laid", 0.0, 0.8),
    # pred {fox, ran, away}, gold {fox}: P = 1/3, R = 1, F1 = 0.5
    ("a fox ran away", "the fox", 0.0, 0.5),
    # bag intersection counts "paris" once: P = R = 1/2
    ("paris paris", "Paris, France", 0.0, 0.5),
    ("blue", "red", 0.0, 0.0),
    # CoQA rule: both empty after normalisation -> 1, only one empty -> 0
    ("the", "a", 1.0, 1.0),
    ("", "red", 0.0, 0.0),
])
def test_exact_match_and_f1_hand_checked(pred, gold, em, f1):
    assert metrics.exact_match(pred, gold) == em
    assert metrics.f1(pred, gold) == pytest.approx(f1, abs=1e-12)


def test_triviaqa_max_over_aliases():
    golds = ["Ottawa", "Ottawa, Ontario", "City of Ottawa"]
    # F1 vs each alias: 1/2 ({it,is,ottawa} vs {ottawa}), 2/5 (P 1/3, R 1/2), 1/3 (P = R = 1/3)
    assert metrics.em_f1("It is Ottawa.", golds) == pytest.approx({"em": 0.0, "f1": 0.5})
    assert metrics.em_f1("ottawa", golds) == {"em": 1.0, "f1": 1.0}
    with pytest.raises(ValueError, match="at least one gold"):
        metrics.em_f1("x", [])


def _direct(pred, ref):
    bleu = sacrebleu.corpus_bleu([pred], [[ref]], smooth_method="exp", smooth_value=0.0, force=False,
                                 lowercase=False, tokenize="intl", use_effective_order=False).score
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(ref, pred)
    return {"bleu": bleu, **{k: 100 * v.fmeasure for k, v in rouge.items()}}


def test_truthfulqa_max_diff_acc_match_direct_library_calls():
    pred = "No, lightning can strike the same tall building many times."
    true_refs = ["Yes, lightning often strikes the same place more than once.",
                 "Yes, tall buildings are struck many times a year."]
    false_refs = ["No, lightning never strikes the same place twice."]
    got = metrics.truthfulqa_scores(pred, true_refs, false_refs)
    true_scores = [_direct(pred, r) for r in true_refs + [metrics.NO_COMMENT]]
    false_scores = [_direct(pred, r) for r in false_refs]
    for m in ("bleu", "rouge1", "rouge2", "rougeL"):
        best_true = max(s[m] for s in true_scores)
        best_false = max(s[m] for s in false_scores)
        assert got[f"{m}_max"] == pytest.approx(best_true, abs=1e-9)
        assert got[f"{m}_diff"] == pytest.approx(best_true - best_false, abs=1e-9)
        assert got[f"{m}_acc"] == float(best_true > best_false)
    # The answer shares more words with the false reference: ROUGE-1 prefers it.
    assert got["rouge1_acc"] == 0.0 and got["rouge1_diff"] < 0


def test_truthfulqa_exact_true_answer_and_no_comment():
    got = metrics.truthfulqa_scores("The sun looks white.", ["The sun looks white."], ["The sun is yellow."])
    assert got["bleu_max"] == pytest.approx(100.0) and got["rougeL_max"] == pytest.approx(100.0)
    assert all(got[f"{m}_acc"] == 1.0 for m in metrics.TRUTHFULQA_MEASURES)
    # "I have no comment." counts as true even when the data set does not list it.
    got = metrics.truthfulqa_scores("I have no comment.", ["Paris."], ["London."])
    assert got["bleu_max"] == pytest.approx(100.0) and got["bleu_acc"] == 1.0
    with pytest.raises(ValueError, match="false reference"):
        metrics.truthfulqa_scores("x", ["y"], [])


def test_repetition_rate():
    # bigrams: (the cat)(cat the)(the cat)(cat the)(the cat): 2 unique of 5
    assert metrics.repetition_rate("the cat the cat the cat", n=2) == pytest.approx(0.6)
    # 4-grams: 3, of which 2 unique
    assert metrics.repetition_rate("The cat the cat the cat", n=4) == pytest.approx(1 / 3)
    assert metrics.repetition_rate("Paris is the capital of France.") == 0.0
    assert metrics.repetition_rate("too short") == 0.0


def test_consistency():
    assert metrics.consistency("Paris.", "paris") == {"consistency_em": 1.0, "consistency_rougeL": 100.0}
    got = metrics.consistency("the capital is Paris", "Paris is the capital")
    direct = rouge_scorer.RougeScorer(["rougeL"]).score("Paris is the capital", "the capital is Paris")
    assert got["consistency_em"] == 0.0
    assert got["consistency_rougeL"] == pytest.approx(100 * direct["rougeL"].fmeasure)
    # ROUGE finds no word in "'" (0 against itself); an identical answer is consistent.
    assert rouge_scorer.RougeScorer(["rougeL"]).score("'", "'")["rougeL"].fmeasure == 0.0
    assert metrics.consistency("'", "'") == {"consistency_em": 1.0, "consistency_rougeL": 100.0}
    assert metrics.consistency("'", "''")["consistency_rougeL"] == 0.0


def test_first_divergence_names_the_token_that_changed_the_answer():
    full = [5, 6, 7, 8, 2]
    same = metrics.first_divergence([5, 6, 7, 8, 2], [30, 12, 30, 30, 30], full, num_layers=30)
    assert same == {"diverged_at_exit": 0.0, "diverged_after_exit": 0.0}
    # the exit at token 2 predicted another token
    assert metrics.first_divergence([5, 6, 9, 8], [30, 30, 12, 30], full, 30) == {
        "diverged_at_exit": 1.0, "diverged_after_exit": 0.0}
    # token 1 left early but was right; token 3 ran every layer and still changed
    assert metrics.first_divergence([5, 6, 7, 9], [30, 12, 30, 30], full, 30) == {
        "diverged_at_exit": 0.0, "diverged_after_exit": 1.0}
    # a generation that stops early (the stop token itself differs) counts at that token
    assert metrics.first_divergence([5, 2], [30, 20], full, 30)["diverged_at_exit"] == 1.0
