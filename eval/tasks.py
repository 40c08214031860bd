"""The evaluation tasks: TruthfulQA (generation), CoQA and TriviaQA (unfiltered.nocontext).

Sources. ``Task.load(data_dir)`` reads rows in each data set's Hugging Face schema from
  * ``None`` (the default): the data bundled in ``eval/data`` (see its README): the real
    TruthfulQA generation set (all 817 rows) and 8,000 real TriviaQA unfiltered-nocontext
    validation questions in ``eval/data/real``, and for CoQA a STAND-IN of 8 stories written
    for this project (no real CoQA copy is reachable offline; its numbers mean nothing);
  * ``"hub"`` (``HUB``): the data sets through ``datasets`` (needs a network), real CoQA included;
  * any other string: a directory holding one ``<task>.jsonl`` per task (e.g. the small
    stand-in fixtures of ``eval/data`` that the tests use).
Every field used is checked and rows become ``Example``s: a prompt (plain text; the runner
adds the chat template when the tokenizer has one) and the references the task's metric
needs. A row that lacks a field, or has no non-empty answer, raises ``DataError`` naming the
file and its 1-based line (hub rows: the 0-based row index).

Fields used (the rest of each row is ignored):
  truthful_qa  question, best_answer, correct_answers, incorrect_answers (blank answers, such
               as the one a trailing ';' leaves in 29 real rows, are dropped)
  coqa         story, questions, answers.input_text  (one example per question turn)
  trivia_qa    question, answer.aliases, answer.value (null in most real rows: the aliases
               are the golds then)

Parts (``split``). Each data set is split once, by a fixed rule, into a ``distill`` part
(prompts for distilling exit heads), a ``calibration`` part (threshold calibration) and an
``evaluation`` part that nothing is tuned on. The rule: the row's key text (TruthfulQA and
TriviaQA: the question; CoQA: the story), whitespace collapsed to single spaces, is hashed
with SHA-256; its first 8 bytes as a big-endian integer over 2**64 give u in [0, 1); the row
is ``distill`` if u < d, ``calibration`` if u < d + c, else ``evaluation``, with (d, c) =
(0.6, 0.2) for TriviaQA and (0.3, 0.2) for TruthfulQA and CoQA. The rule depends on the text
alone, so the hub copy splits the same way and reordering rows changes nothing; repeated
questions share a part. Sizes of the bundled data (rows):
  truthful_qa  distill 224, calibration 150, evaluation 443 (of 817)
  trivia_qa    distill 4795, calibration 1662, evaluation 1543 (of 8000)
  coqa         stand-in: distill 4 stories, calibration 0, evaluation 4 (16 turns)
``split=None`` loads every row. Example ids (``task/row[/turn]``, the row's index in the
whole file) do not depend on the part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from dynamax_jax.io import DataError, read_jsonl
from dynamax_jax.eval import metrics

DATA_DIR = Path(__file__).resolve().with_name("data")  # the bundled data (inside the package)
HUB = "hub"  # the data_dir value that loads through ``datasets``
SPLITS = ("distill", "calibration", "evaluation")
ALL = "all"  # the command lines' name for split=None

@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt to answer. ``id`` is stable across runs (task/row[/turn]) so answers of
    different runs can be matched; ``refs`` holds what ``Task.score`` needs."""

    id: str
    prompt: str
    refs: Mapping[str, Any]


# ----------------------------------------------------------------------------- field checks

def _get(row: Mapping[str, Any], field: str, where: str) -> Any:
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value or value[part] is None:
            raise DataError(f"{where}: missing field '{field}'")
        value = value[part]
    return value


def _text(row, field: str, where: str) -> str:
    value = _get(row, field, where)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{field}' must be a non-empty string, found {value!r}")
    return value


def _text_list(row, field: str, where: str) -> list[str]:
    value = _get(row, field, where)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field '{field}' must be a list of strings, found {type(value).__name__}")
    value = [v for v in value if v.strip()]
    if not value:
        raise DataError(f"{where}: field '{field}' is an empty answer list")
    return value


# ----------------------------------------------------------------------------- tasks

def _truthfulqa_examples(row, index: int, where: str) -> list[Example]:
    question = _text(row, "question", where)
    best = _text(row, "best_answer", where)
    correct = _text_list(row, "correct_answers", where)
    incorrect = _text_list(row, "incorrect_answers", where)
    if best not in correct:  # the original scripts score against best + correct answers
        correct = [best] + correct
    prompt = ("Answer the question truthfully in one short sentence.\n\n"
              f"Q: {question.strip()}\nA:")
    return [Example(f"truthful_qa/{index}", prompt, {"true": correct, "false": incorrect})]


def _coqa_examples(row, index: int, where: str) -> list[Example]:
    story = _text(row, "story", where)
    questions = _text_list(row, "questions", where)
    answers = _get(row, "answers.input_text", where)
    if not isinstance(answers, list) or not answers:
        raise DataError(f"{where}: field 'answers.input_text' is an empty answer list")
    if len(answers) != len(questions):
        raise DataError(f"{where}: field 'answers.input_text' has {len(answers)} answers for "
                        f"{len(questions)} questions (expected one per question)")
    for turn, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{where}: field 'answers.input_text' item {turn} must be a non-empty "
                            f"string, found {answer!r}")
    out = []
    header = ("Read the story and answer the last question with a short phrase.\n\n"
              f"{story.strip()}\n\n")
    for turn, question in enumerate(questions):
        # The conversation history uses the gold answers of earlier turns, as CoQA prescribes.
        history = "".join(f"Q: {q.strip()}\nA: {a.strip()}\n\n"
                          for q, a in zip(questions[:turn], answers[:turn]))
        prompt = f"{header}{history}Q: {question.strip()}\nA:"
        out.append(Example(f"coqa/{index}/{turn}", prompt, {"golds": [answers[turn]]}))
    return out


def _triviaqa_examples(row, index: int, where: str) -> list[Example]:
    question = _text(row, "question", where)
    aliases = _text_list(row, "answer.aliases", where)
    value = _get(row, "answer", where).get("value")  # null in most real rows
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field 'answer.value' must be a string or null, found {value!r}")
    golds = list(dict.fromkeys(([value] if value and value.strip() else []) + aliases))
    prompt = f"Answer the trivia question with just the answer.\n\nQ: {question.strip()}\nA:"
    return [Example(f"trivia_qa/{index}", prompt, {"golds": golds})]


def _truthfulqa_score(answer: str, example: Example) -> dict[str, float]:
    return metrics.truthfulqa_scores(answer, example.refs["true"], example.refs["false"])


def _em_f1_score(answer: str, example: Example) -> dict[str, float]:
    return metrics.em_f1(answer, example.refs["golds"])


def split_of(key: str, fractions: tuple[float, float]) -> str:
    """The part (one of ``SPLITS``) of the row whose key text is ``key``, for the
    ``(distill, calibration)`` fractions ``fractions`` (the rule in the module docstring)."""
    digest = hashlib.sha256(" ".join(key.split()).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    distill, calibration = fractions
    return "distill" if u < distill else "calibration" if u < distill + calibration else "evaluation"


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: where its rows come from, how a row becomes examples, how an answer is scored,
    and how its rows are split into parts. ``primary`` is the metric the plots put on the
    quality axis; ``bundled`` is its file under ``eval/data`` (``standin``: written for this
    project, not the real data set); ``split_key`` is the field whose text decides a row's
    part and ``fractions`` the (distill, calibration) shares (evaluation gets the rest)."""

    name: str
    hf_id: str
    hf_config: str | None
    hf_split: str
    make_examples: Callable[[Mapping[str, Any], int, str], list[Example]]
    score: Callable[[str, Example], dict[str, float]]
    primary: str
    bundled: str
    standin: bool
    split_key: str
    fractions: tuple[float, float]

    @property
    def fixture_file(self) -> str:
        return f"{self.name}.jsonl"

    def source_name(self, data_dir: str | None = None) -> str:
        """Where ``load(data_dir)`` reads (for logs and errors; a stand-in says so)."""
        if data_dir is None:
            path = str(DATA_DIR / self.bundled)
            return f"{path} (STAND-IN written for this project, not {self.hf_id})" if self.standin else path
        if data_dir == HUB:
            return f"{self.hf_id} ({self.hf_config or 'default'}, {self.hf_split})"
        path = os.path.join(data_dir, self.fixture_file)
        if Path(data_dir).resolve() == DATA_DIR:  # the tests' fixtures: all written for this project
            return f"{path} (STAND-IN fixture written for this project, not {self.hf_id})"
        return path

    def load(self, data_dir: str | None = None, limit: int | None = None,
             split: str | None = None) -> list[Example]:
        """The task's examples from ``data_dir`` (``None``: the bundled data; ``HUB``: through
        ``datasets``; else ``data_dir/<name>.jsonl``), only those of part ``split`` (one of
        ``SPLITS``; ``None`` or ``"all"``: every row), at most ``limit`` of them (CoQA counts
        question turns). Every row up to the limit is checked, in or out of the part."""
        if split == ALL:
            split = None
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS + (ALL,))}")
        source = self.source_name(data_dir)
        if data_dir == HUB:
            rows = ((f"{source} row {i}", row) for i, row in enumerate(self._hub_rows()))
        else:
            path = DATA_DIR / self.bundled if data_dir is None else Path(data_dir) / self.fixture_file
            if not path.is_file():
                raise FileNotFoundError(f"data file not found: {path}"
                                        + ("" if data_dir is None else " (a data directory needs one <task>.jsonl "
                                                                       "per task)"))
            rows = ((f"{path}, line {line}", row) for line, row in read_jsonl(path))
        return examples_from_rows(self, rows, source, limit, split)

    def _hub_rows(self) -> Iterable[Mapping[str, Any]]:
        import datasets  # imported lazily: offline runs never need the hub
        return datasets.load_dataset(self.hf_id, self.hf_config, split=self.hf_split)


def examples_from_rows(task: Task, rows: Iterable[tuple[str, Any]], source: str,
                       limit: int | None = None, split: str | None = None) -> list[Example]:
    """Check and convert ``rows``, ``(where, row)`` pairs (``where`` names the row in errors,
    ``source`` the whole set), keeping the examples of part ``split`` (``None``: all)."""
    out: list[Example] = []
    for index, (where, row) in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected a JSON object, found {type(row).__name__}")
        examples = task.make_examples(row, index, where)
        if split is None or split_of(_text(row, task.split_key, where), task.fractions) == split:
            out.extend(examples)
    if not out:
        part = "" if split is None else f" in the {split} part"
        raise DataError(f"{source}: no rows{part}")
    return out[:limit] if limit is not None else out


def resolve_split(split: str | None, data_dir: str | None, default: str) -> str | None:
    """The part a command line loads: ``split`` when given (``"all"``: ``None``); otherwise
    ``default`` for the bundled and hub data, and every row (``None``) of a ``--data-dir``
    directory of the user's own files."""
    if split is not None:
        if split != ALL and split not in SPLITS:
            raise ValueError(f"--split: unknown part {split!r}; choose one of {', '.join(SPLITS + (ALL,))}")
        return None if split == ALL else split
    return default if data_dir is None or data_dir == HUB else None


def data_label(data_dir: str | None, split: str | None) -> str:
    """A short name for a source and part, recorded with results: ``bundled:evaluation``,
    ``hub:calibration``, ``<dir>:all``."""
    return f"{'bundled' if data_dir is None else data_dir}:{split or ALL}"


def split_help(default: str) -> str:
    """The ``--split`` help text of a command line whose default part is ``default``."""
    return (f"which fixed part of each data set to use: {', '.join(SPLITS)} or {ALL} (rule and sizes: "
            f"eval/data/README.md). Default: {default} for the bundled and hub data, all rows of "
            f"--data-dir files")


TASKS: dict[str, Task] = {
    "truthful_qa": Task("truthful_qa", "truthful_qa", "generation", "validation",
                        _truthfulqa_examples, _truthfulqa_score, "rougeL_max",
                        bundled="real/truthful_qa_generation_validation.jsonl", standin=False,
                        split_key="question", fractions=(0.3, 0.2)),
    "coqa": Task("coqa", "stanfordnlp/coqa", None, "validation", _coqa_examples, _em_f1_score, "f1",
                 bundled="coqa.jsonl", standin=True, split_key="story", fractions=(0.3, 0.2)),
    "trivia_qa": Task("trivia_qa", "trivia_qa", "unfiltered.nocontext", "validation",
                      _triviaqa_examples, _em_f1_score, "f1",
                      bundled="real/trivia_qa_unfiltered_nocontext_validation_8000.jsonl", standin=False,
                      split_key="question", fractions=(0.6, 0.2)),
}


def get_task(name: str) -> Task:
    """The task called ``name``; the error lists the supported ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; supported: {', '.join(TASKS)}")
    return TASKS[name]


def answer_from_generation(text: str) -> str:
    """The answer part of a generation: its first non-empty line, stripped. Models often
    go on with a new "Q:"; metrics score only the answer (repetition uses all of it)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


__all__: Sequence[str] = ("ALL", "DATA_DIR", "DataError", "Example", "HUB", "SPLITS", "TASKS", "Task",
                          "answer_from_generation", "data_label", "examples_from_rows", "get_task", "resolve_split",
                          "split_help", "split_of")
