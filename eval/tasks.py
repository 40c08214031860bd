"""The evaluation tasks: TruthfulQA (generation), CoQA and TriviaQA (rc.nocontext).

Each task reads rows in its Hugging Face schema, either through ``datasets`` (the standard
ids below) or from a local JSON-lines file in the same schema (``--data-dir``), checks
every field it uses, and turns rows into ``Example``s: a prompt (plain text; the runner
adds the chat template when the tokenizer has one) and the references the task's metric
needs. A row that lacks a field, or has an empty answer list, raises ``DataError`` naming
the source, the row index and the field.

Fields used (the rest of each row is ignored):
  truthful_qa  question, best_answer, correct_answers, incorrect_answers
  coqa         story, questions, answers.input_text  (one example per question turn)
  trivia_qa    question, answer.value, answer.aliases
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from eval import metrics


class DataError(ValueError):
    """A data-set row lacks a field the task needs or holds an unusable value."""


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
    value = _text(row, "answer.value", where)
    aliases = _text_list(row, "answer.aliases", where)
    golds = list(dict.fromkeys([value] + aliases))
    prompt = f"Answer the trivia question with just the answer.\n\nQ: {question.strip()}\nA:"
    return [Example(f"trivia_qa/{index}", prompt, {"golds": golds})]


def _truthfulqa_score(answer: str, example: Example) -> dict[str, float]:
    return metrics.truthfulqa_scores(answer, example.refs["true"], example.refs["false"])


def _em_f1_score(answer: str, example: Example) -> dict[str, float]:
    return metrics.em_f1(answer, example.refs["golds"])


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: where its rows come from, how a row becomes examples, how an answer is scored.
    ``primary`` is the metric the plots put on the quality axis."""

    name: str
    hf_id: str
    hf_config: str | None
    split: str
    make_examples: Callable[[Mapping[str, Any], int, str], list[Example]]
    score: Callable[[str, Example], dict[str, float]]
    primary: str

    @property
    def fixture_file(self) -> str:
        return f"{self.name}.jsonl"

    def source_name(self, data_dir: str | None) -> str:
        if data_dir is not None:
            return os.path.join(data_dir, self.fixture_file)
        return f"{self.hf_id} ({self.hf_config or 'default'}, {self.split})"

    def load(self, data_dir: str | None = None, limit: int | None = None) -> list[Example]:
        """The task's examples, from ``data_dir/<name>.jsonl`` when given, else through
        ``datasets``; at most ``limit`` examples (CoQA counts question turns)."""
        source = self.source_name(data_dir)
        rows = _read_jsonl(source) if data_dir is not None else self._hub_rows()
        return examples_from_rows(self, rows, source, limit)

    def _hub_rows(self) -> Iterable[Mapping[str, Any]]:
        import datasets  # imported lazily: offline runs with --data-dir never need the hub
        return datasets.load_dataset(self.hf_id, self.hf_config, split=self.split)


def examples_from_rows(task: Task, rows: Iterable[Mapping[str, Any]], source: str,
                       limit: int | None = None) -> list[Example]:
    """Check and convert ``rows`` (``source`` names them in errors)."""
    out: list[Example] = []
    for index, row in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        where = f"{source} row {index}"
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected a JSON object, found {type(row).__name__}")
        out.extend(task.make_examples(row, index, where))
    if not out:
        raise DataError(f"{source}: no rows")
    return out[:limit] if limit is not None else out


def _read_jsonl(path: str) -> Iterator[Mapping[str, Any]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path} (--data-dir needs one <task>.jsonl per task)")
    with open(path, encoding="utf-8") as f:
        index = 0
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} row {index}: invalid JSON ({err.msg})") from None
            index += 1


TASKS: dict[str, Task] = {
    "truthful_qa": Task("truthful_qa", "truthful_qa", "generation", "validation",
                        _truthfulqa_examples, _truthfulqa_score, "rougeL_max"),
    "coqa": Task("coqa", "stanfordnlp/coqa", None, "validation", _coqa_examples, _em_f1_score, "f1"),
    "trivia_qa": Task("trivia_qa", "trivia_qa", "rc.nocontext", "validation",
                      _triviaqa_examples, _em_f1_score, "f1"),
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


__all__: Sequence[str] = ("DataError", "Example", "TASKS", "Task", "answer_from_generation",
                          "examples_from_rows", "get_task")
