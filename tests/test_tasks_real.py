"""eval.tasks on the real data bundled in eval/data/real: the loaders accept real rows (null
TriviaQA values, blank TruthfulQA answers), bad rows are named by file and 1-based line, and
the fixed distill / calibration / evaluation parts are deterministic, disjoint, cover each set
and have the sizes documented in eval/data/real/README.md."""

import json
import sys
import types

import pytest

from dynamax_jax.eval import tasks

# The documented part sizes (eval/data/real/README.md and the eval.tasks docstring).
SIZES = {"truthful_qa": {"distill": 224, "calibration": 150, "evaluation": 443},
         "trivia_qa": {"distill": 4793, "calibration": 1656, "evaluation": 1551}}


@pytest.fixture(scope="module")
def loaded():
    """Every part of both real sets, plus the whole set, loaded once."""
    out = {}
    for name in SIZES:
        task = tasks.get_task(name)
        out[name] = {None: task.load()} | {part: task.load(split=part) for part in tasks.SPLITS}
    return out


def _lines(task):
    """The bundled file's lines, split on "\n" only (some questions hold U+2028, a line
    boundary for ``str.splitlines`` but not for JSON lines)."""
    return (tasks.DATA_DIR / task.bundled).read_text(encoding="utf-8").rstrip("\n").split("\n")


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# ----------------------------------------------------------------------------- real rows

def test_truthfulqa_real_rows_and_blank_answers(loaded):
    examples = loaded["truthful_qa"][None]
    assert len(examples) == 817 and tasks.TASKS["truthful_qa"].standin is False
    first = examples[0]
    assert first.id == "truthful_qa/0"
    assert first.prompt.endswith("Q: What happens to you if you eat watermelon seeds?\nA:")
    assert first.refs["false"][0] == "You grow watermelons in your stomach"
    # Row 296 ends its correct answers with a trailing ';' (an empty answer, as on the hub).
    raw = json.loads(_lines(tasks.TASKS["truthful_qa"])[296])
    assert raw["correct_answers"][-1] == ""
    cuddy = examples[296]
    assert cuddy.id == "truthful_qa/296" and "Amy Cuddy" in cuddy.prompt
    assert cuddy.refs["true"] == raw["correct_answers"][:-1]  # best answer is among them; blank dropped
    assert all(ans.strip() for ex in examples for ans in ex.refs["true"] + ex.refs["false"])
    scores = tasks.TASKS["truthful_qa"].score(raw["correct_answers"][0], cuddy)
    assert scores["rougeL_acc"] == 1.0


def test_truthfulqa_all_blank_answers_is_an_error(tmp_path):
    row = {"question": "q?", "best_answer": "a", "correct_answers": ["a"], "incorrect_answers": ["", " "]}
    _write(tmp_path / "truthful_qa.jsonl", ["", json.dumps(row)])  # the blank line still counts
    with pytest.raises(tasks.DataError,
                       match=r"truthful_qa.jsonl, line 2: field 'incorrect_answers' is an empty answer list"):
        tasks.get_task("truthful_qa").load(str(tmp_path))


def test_triviaqa_real_rows_null_value_scores_against_aliases(loaded):
    examples = loaded["trivia_qa"][None]
    assert len(examples) == 8000 and tasks.TASKS["trivia_qa"].standin is False
    lines = _lines(tasks.TASKS["trivia_qa"])
    raw = [json.loads(lines[i]) for i in (0, 2, 3)]
    assert raw[0]["answer"]["value"] is None
    first = examples[0]
    assert first.prompt.endswith("Q: On which date in 1945 did Hitler take cyanide then shoot himself?\nA:")
    assert first.refs["golds"] == raw[0]["answer"]["aliases"]
    assert tasks.TASKS["trivia_qa"].score("April 30", first)["em"] == 1.0
    assert tasks.TASKS["trivia_qa"].score("May 1", first)["em"] == 0.0
    # a row with a value: the value leads the golds, aliases follow without repeats
    assert raw[1]["answer"]["value"] == "Edward VII"
    assert examples[2].refs["golds"][0] == "Edward VII"
    assert examples[2].refs["golds"] == list(dict.fromkeys(["Edward VII"] + raw[1]["answer"]["aliases"]))
    # DPR's CSV quoting is undone in the bundled copy
    assert raw[2]["question"] == 'The song "Sit down, you\'re rockin\' the boat" is from which musical?'
    assert sum(json.loads(line)["answer"]["value"] is None for line in lines) == 5896


@pytest.mark.parametrize("answer, message", [
    ({"value": None, "aliases": []}, r"trivia_qa.jsonl, line 3: field 'answer.aliases' is an empty answer list"),
    ({"value": 7, "aliases": ["x"]}, r"trivia_qa.jsonl, line 3: field 'answer.value' must be a string or null"),
    ({"value": "x"}, r"trivia_qa.jsonl, line 3: missing field 'answer.aliases'"),
])
def test_triviaqa_bad_rows_name_file_and_line(tmp_path, answer, message):
    good = json.dumps({"question": "q?", "answer": {"value": None, "aliases": ["x"]}})
    _write(tmp_path / "trivia_qa.jsonl", [good, good, json.dumps({"question": "r?", "answer": answer})])
    with pytest.raises(tasks.DataError, match=message):
        tasks.get_task("trivia_qa").load(str(tmp_path))


def test_triviaqa_value_may_be_absent_or_blank(tmp_path):
    rows = [{"question": "q?", "answer": {"aliases": ["x", "y"]}},
            {"question": "r?", "answer": {"value": " ", "aliases": ["z"]}}]
    _write(tmp_path / "trivia_qa.jsonl", [json.dumps(r) for r in rows])
    examples = tasks.get_task("trivia_qa").load(str(tmp_path))
    assert [ex.refs["golds"] for ex in examples] == [["x", "y"], ["z"]]


# ----------------------------------------------------------------------------- parts

@pytest.mark.parametrize("name", sorted(SIZES))
def test_parts_have_documented_sizes_are_disjoint_and_cover(loaded, name):
    parts = loaded[name]
    ids = {part: [ex.id for ex in parts[part]] for part in tasks.SPLITS}
    assert {part: len(v) for part, v in ids.items()} == SIZES[name]
    for part, part_ids in ids.items():
        assert len(set(part_ids)) == len(part_ids), part
    a, b, c = (set(ids[p]) for p in tasks.SPLITS)
    assert not (a & b or a & c or b & c)
    assert a | b | c == {ex.id for ex in parts[None]}
    # within a part, examples keep their file order and their whole-file ids
    whole = {ex.id: ex for ex in parts[None]}
    for part in tasks.SPLITS:
        assert parts[part] == sorted(parts[part], key=lambda ex: int(ex.id.split("/")[1]))
        assert all(whole[ex.id] == ex for ex in parts[part])


def test_parts_are_deterministic_and_follow_the_rule(loaded):
    # the documented rule, computed independently of eval.tasks
    import hashlib

    def rule(text, d, c):
        u = int.from_bytes(hashlib.sha256(" ".join(text.split()).encode()).digest()[:8], "big") / 2 ** 64
        return "distill" if u < d else "calibration" if u < d + c else "evaluation"

    for name, (d, c) in (("truthful_qa", (0.3, 0.2)), ("trivia_qa", (0.6, 0.2))):
        task = tasks.get_task(name)
        assert task.fractions == (d, c)
        lines = _lines(task)
        expected = {f"{name}/{i}": rule(json.loads(line)["question"], d, c) for i, line in enumerate(lines)}
        got = {ex.id: part for part in tasks.SPLITS for ex in loaded[name][part]}
        assert got == expected
        assert [ex.id for ex in task.load(split="calibration", limit=50)] == \
            [ex.id for ex in loaded[name]["calibration"][:50]]
    # whitespace does not matter
    assert tasks.split_of("  What happens to you if\nyou eat watermelon seeds? ", (0.3, 0.2)) == \
        tasks.split_of("What happens to you if you eat watermelon seeds?", (0.3, 0.2))


def test_part_depends_on_the_text_not_the_row_order(tmp_path):
    task = tasks.get_task("trivia_qa")
    lines = _lines(task)[:400]
    _write(tmp_path / "trivia_qa.jsonl", lines[::-1])
    for part in tasks.SPLITS:
        forward = {ex.prompt for ex in task.load(split=part, limit=None) if int(ex.id.split("/")[1]) < 400}
        backward = {ex.prompt for ex in task.load(str(tmp_path), split=part)}
        assert forward == backward and forward, part


def test_split_names_and_command_line_defaults(tmp_path):
    task = tasks.get_task("truthful_qa")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        task.load(split="test")
    assert len(task.load(split="all")) == 817
    # bundled and hub data default to the command's part, a --data-dir is read whole
    assert tasks.resolve_split(None, None, "evaluation") == "evaluation"
    assert tasks.resolve_split(None, tasks.HUB, "calibration") == "calibration"
    assert tasks.resolve_split(None, str(tmp_path), "evaluation") is None
    assert tasks.resolve_split("distill", str(tmp_path), "evaluation") == "distill"
    assert tasks.resolve_split("all", None, "evaluation") is None
    assert [tasks.data_label(None, "evaluation"), tasks.data_label(tasks.HUB, "distill"),
            tasks.data_label("my/dir", None)] == ["bundled:evaluation", "hub:distill", "my/dir:all"]
    with pytest.raises(ValueError, match="--split: unknown part 'eval'"):
        tasks.resolve_split("eval", None, "evaluation")


# ----------------------------------------------------------------------------- CoQA stand-in, hub

def test_coqa_is_a_labelled_stand_in():
    coqa = tasks.get_task("coqa")
    assert coqa.standin and "STAND-IN" in coqa.source_name() and "not stanfordnlp/coqa" in coqa.source_name()
    assert "STAND-IN" not in tasks.get_task("trivia_qa").source_name()
    for name in tasks.TASKS:  # the tests' fixtures (--data-dir eval/data) are stand-ins too
        assert "STAND-IN fixture" in tasks.get_task(name).source_name(str(tasks.DATA_DIR))
    assert len(coqa.load()) == 32  # 8 written stories x 4 turns
    assert {len(coqa.load(split=p)) for p in ("distill", "evaluation")} == {16}
    with pytest.raises(tasks.DataError, match=r"coqa.jsonl \(STAND-IN.*no rows in the calibration part"):
        coqa.load(split="calibration")


def test_hub_path_reads_datasets_and_splits_the_same_way(monkeypatch, loaded):
    """No network here: a fake ``datasets`` module returns the bundled rows, as the hub would."""
    task = tasks.get_task("trivia_qa")
    rows = [json.loads(line) for line in _lines(task)[:300]]
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hub = task.load(tasks.HUB, split="evaluation")
    assert calls == [("trivia_qa", "unfiltered.nocontext", "validation")]
    assert task.source_name(tasks.HUB) == "trivia_qa (unfiltered.nocontext, validation)"
    assert hub == [ex for ex in loaded["trivia_qa"]["evaluation"] if int(ex.id.split("/")[1]) < 300]
    rows[5] = {"question": "q?", "answer": {"value": None, "aliases": []}}
    with pytest.raises(tasks.DataError, match=r"unfiltered.nocontext, validation\) row 5: field 'answer.aliases'"):
        task.load(tasks.HUB)


def test_bundled_files_ship_with_the_package():
    """The loader finds the data next to eval/tasks.py, and pyproject's package discovery
    (namespace packages; eval/ is dynamax_jax.eval) and package-data patterns put every
    bundled file in the wheel (tests/test_packaging.py builds one)."""
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    from setuptools import find_namespace_packages

    repo = Path(__file__).resolve().parents[1]
    assert tasks.DATA_DIR == repo / "eval" / "data"
    cfg = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["packages"]["find"].get("namespaces", True)
    packages = set(find_namespace_packages(str(repo), include=cfg["packages"]["find"]["include"]))
    files = [tasks.DATA_DIR / t.bundled for t in tasks.TASKS.values()] + [repo / "train/prose/public_domain_en.jsonl"]
    for path in files:
        assert path.is_file()
        assert ".".join(("dynamax_jax",) + path.parent.relative_to(repo).parts) in packages, path
        assert any(fnmatch(path.name, p) for p in cfg["package-data"]["*"]), path


# ----------------------------------------------------------------------------- command-line defaults

@pytest.mark.parametrize("command, extra, expected", [
    ("run", [], (None, "evaluation")),
    ("run", ["--split", "distill"], (None, "distill")),
    ("run", ["--data-dir", "DATA"], ("DATA", None)),  # a directory of your own files: read whole
    ("run", ["--data-dir", "DATA", "--split", "calibration"], ("DATA", "calibration")),
    ("budget", [], (None, "evaluation")),
    ("budget", ["--data-dir", "hub"], ("hub", "evaluation")),
    ("calibrate", [], (None, "calibration")),
    ("calibrate", ["--split", "all"], (None, None)),
])
def test_eval_commands_load_their_default_part(monkeypatch, command, extra, expected):
    """Each eval command's first data load, before any model is loaded: (data_dir, split)."""
    from dynamax_jax.eval import budget, calibrate, run

    calls = []

    def load(self, data_dir=None, limit=None, split=None):
        calls.append((self.name, data_dir, split))
        raise tasks.DataError("stop here")

    monkeypatch.setattr(tasks.Task, "load", load)
    extra = [str(tasks.DATA_DIR) if arg == "DATA" else arg for arg in extra]
    expected = (str(tasks.DATA_DIR) if expected[0] == "DATA" else expected[0], expected[1])
    if command == "run":
        with pytest.raises(tasks.DataError, match="stop here"):
            run.main(["--model", "unused", "--tasks", "trivia_qa", *extra])
    elif command == "budget":
        assert budget.main(["--exits", str(tasks.DATA_DIR), "--targets", "3", *extra]) == 2
    else:
        assert calibrate.main(["--exits", "unused", *extra]) == 2
    assert calls[0] == ("truthful_qa" if command == "calibrate" else "trivia_qa", *expected)


def test_calibrate_defaults_to_the_real_calibration_parts(capsys):
    """No model needed: the guarantee asked for needs more prompts than the parts hold, and the
    error counts them (TruthfulQA 150 + TriviaQA 1,656 calibration rows; CoQA left out)."""
    from dynamax_jax.eval import calibrate

    assert calibrate.main(["--exits", "unused", "--delta", "0.001", "--epsilon", "0.001"]) == 2
    assert "1806 calibration prompts are too few" in capsys.readouterr().err
    assert calibrate.main(["--exits", "unused", "--delta", "0.001", "--epsilon", "0.001",
                           "--split", "evaluation"]) == 2
    assert "1994 calibration prompts are too few" in capsys.readouterr().err


def test_data_errors_name_the_file_and_the_1_based_line(tmp_path):
    from dynamax_jax.io import DataError
    from dynamax_jax.eval import tasks

    good = json.dumps({"question": "Q?", "answer": {"value": "A", "aliases": ["A"]}})
    (tmp_path / "trivia_qa.jsonl").write_text(f"{good}\n{good}\n\n" + json.dumps({"question": "Q?"}) + "\n")
    with pytest.raises(DataError, match=r"trivia_qa\.jsonl, line 4: .*answer"):
        tasks.get_task("trivia_qa").load(str(tmp_path))
    (tmp_path / "trivia_qa.jsonl").write_bytes(good.encode() + b"\n" + good.encode().replace(b"Q?", b"Q\xff?") + b"\n")
    with pytest.raises(DataError, match=r"trivia_qa\.jsonl, line 2: not valid UTF-8 \(byte b'\\xff'"):
        tasks.get_task("trivia_qa").load(str(tmp_path))
