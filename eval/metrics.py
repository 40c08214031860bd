"""Answer-quality metrics for the evaluation tasks, plus degeneration and consistency.

All scores are per example; the runner averages them. BLEU and ROUGE come from
``sacrebleu`` and ``rouge-score`` (0-100 scale, as the TruthfulQA scripts report them);
exact match and F1 follow the official SQuAD / CoQA scripts (0-1 scale).

- TruthfulQA (generation): for each of BLEU, ROUGE-1, ROUGE-2 and ROUGE-L the answer is
  scored against every true and every false reference; ``max`` is the best true score,
  ``diff`` is best true minus best false, ``acc`` is 1 when best true > best false.
  As in the original scripts, "I have no comment." counts as a true reference.
- CoQA: exact match and token-bag F1 after normalisation (lowercase, strip punctuation,
  drop a/an/the, collapse whitespace).
- TriviaQA: the same, maximised over the answer value and all its aliases.
- Repetition rate (``seq-rep-n`` of Welleck et al., 2019): the fraction of word n-grams in
  one generation that repeat an n-gram seen earlier in it, ``1 - unique / total``; 0 for a
  generation shorter than n words. A model stuck in a loop approaches 1.
- Consistency: exact match (normalised) and ROUGE-L F1 of an early-exit answer against
  the full-depth answer to the same prompt; as losses in [0, 1] (calibration, budget),
  token disagreement with the full-depth tokens and 1 - ROUGE-L against its text.
"""

from __future__ import annotations

import collections
import functools
import re
import string
from typing import Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
TRUTHFULQA_MEASURES = ("bleu",) + ROUGE_TYPES
NO_COMMENT = "I have no comment."
REPETITION_N = 4

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ----------------------------------------------------------------------------- BLEU / ROUGE

def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU (0-100) of ``prediction`` against one reference, computed as the
    TruthfulQA scripts do: a one-segment ``corpus_bleu`` with exponential smoothing."""
    return sacrebleu.corpus_bleu([prediction], [[reference]], smooth_method="exp", smooth_value=0.0,
                                 force=False, lowercase=False, tokenize="intl",
                                 use_effective_order=False).score


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES))


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (0-100) of ``prediction`` against one reference. For one-line
    answers ROUGE-L equals the ``rougeLsum`` of the original scripts."""
    scores = _rouge_scorer().score(reference, prediction)  # rouge-score takes (target, prediction)
    return {name: 100.0 * scores[name].fmeasure for name in ROUGE_TYPES}


def truthfulqa_scores(prediction: str, true_refs: Sequence[str], false_refs: Sequence[str]) -> dict[str, float]:
    """``{measure}_{max,diff,acc}`` for measure in bleu, rouge1, rouge2, rougeL.

    ``true_refs`` gets "I have no comment." appended when absent (as in the original
    scripts); both lists must be non-empty."""
    if not false_refs:
        raise ValueError("truthfulqa_scores needs at least one false reference")
    true_refs = list(true_refs)
    if NO_COMMENT not in true_refs:
        true_refs.append(NO_COMMENT)

    def per_ref(ref: str) -> dict[str, float]:
        return {"bleu": bleu(prediction, ref), **rouge(prediction, ref)}

    true_scores = [per_ref(r) for r in true_refs]
    false_scores = [per_ref(r) for r in false_refs]
    out = {}
    for m in TRUTHFULQA_MEASURES:
        best_true = max(s[m] for s in true_scores)
        best_false = max(s[m] for s in false_scores)
        out[f"{m}_max"] = best_true
        out[f"{m}_diff"] = best_true - best_false
        out[f"{m}_acc"] = float(best_true > best_false)
    return out


# ----------------------------------------------------------------------------- EM / F1

def normalize_answer(text: str) -> str:
    """Official SQuAD/CoQA normalisation: lowercase, strip punctuation, drop articles,
    collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-bag F1 of the normalised strings (CoQA convention: 1.0 when both are empty,
    0.0 when only one is)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def em_f1(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """``{"em", "f1"}``, each maximised over ``golds`` (TriviaQA: value and all aliases;
    CoQA: the one gold answer)."""
    if not golds:
        raise ValueError("em_f1 needs at least one gold answer")
    return {"em": max(exact_match(prediction, g) for g in golds),
            "f1": max(f1(prediction, g) for g in golds)}


# ----------------------------------------------------------------------------- degeneration

def repetition_rate(text: str, n: int = REPETITION_N) -> float:
    """seq-rep-n: fraction of the word n-grams of ``text`` that repeat an earlier one
    (``1 - unique / total``); 0.0 when ``text`` has fewer than ``n`` words."""
    words = text.lower().split()
    ngrams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not ngrams:
        return 0.0
    return 1.0 - len(set(ngrams)) / len(ngrams)


def consistency(early_exit_answer: str, full_answer: str) -> dict[str, float]:
    """Agreement of an early-exit answer with the full-depth answer to the same prompt:
    ``{"consistency_em" (0-1), "consistency_rougeL" (0-100)}``. Identical answers score 100
    (ROUGE scores two texts without a word, such as ``"'"``, 0)."""
    same = early_exit_answer == full_answer
    return {"consistency_em": exact_match(early_exit_answer, full_answer),
            "consistency_rougeL": 100.0 if same else rouge(early_exit_answer, full_answer)["rougeL"]}


def token_disagreement(early: list[int], full: list[int]) -> float:
    """Fraction of positions where the early-exit tokens differ from the full model's greedy
    tokens, over the longer of the two (a missing token counts as a difference); in [0, 1]."""
    n = max(len(early), len(full))
    if n == 0:
        return 0.0
    same = sum(a == b for a, b in zip(early, full))
    return 1.0 - same / n


def first_divergence(tokens: list[int], exit_layers: list[int], full_tokens: list[int],
                     num_layers: int) -> dict[str, float]:
    """Where a generation first leaves the full-depth one, token by token: ``diverged_at_exit``
    is 1.0 when the first differing token left early (the exit predicted another token), and
    ``diverged_after_exit`` when it ran every layer: every token before it was the full
    model's, so the change came through the cache entries that earlier exits approximated
    (``propagate`` / ``copy``). Both 0.0 for identical generations."""
    n = min(len(tokens), len(full_tokens))
    first = next((i for i in range(n) if tokens[i] != full_tokens[i]),
                 None if len(tokens) == len(full_tokens) else n)
    if first is None:
        return {"diverged_at_exit": 0.0, "diverged_after_exit": 0.0}
    early = bool(tokens) and exit_layers[min(first, len(tokens) - 1)] < num_layers
    return {"diverged_at_exit": float(early), "diverged_after_exit": float(not early)}


def rouge_inconsistency(early_text: str, full_text: str) -> float:
    """1 - ROUGE-L F1 of the early-exit answer against the full-depth answer, in [0, 1]; 0 for
    identical texts (ROUGE scores two empty texts 0)."""
    if early_text == full_text:
        return 0.0
    return 1.0 - rouge(early_text, full_text)["rougeL"] / 100.0


def recall_at_precision(score: np.ndarray, label: np.ndarray, precision: float) -> float:
    """Largest share of tokens an exit classifier can let leave with running precision >=
    ``precision``: tokens taken in order of ``score``, ``label`` 1 where leaving is right."""
    ordered = label[np.argsort(-score, kind="stable")]
    running = np.cumsum(ordered) / np.arange(1, len(ordered) + 1)
    ok = np.flatnonzero(running >= precision)
    return (ok.max() + 1) / len(ordered) if len(ok) else 0.0
