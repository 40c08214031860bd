"""train.answers: the destination is checked before any answer is generated."""

from __future__ import annotations

import pytest

from dynamax_jax.train import answers as A


@pytest.fixture
def no_generation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the destination was checked")
    monkeypatch.setattr(A, "load_backbone", refuse)


def test_an_existing_meta_file_is_not_replaced_without_overwrite(tmp_path, no_generation):
    out = tmp_path / "answers.jsonl"
    (tmp_path / "answers.meta.json").write_text('{"model": "earlier"}\n')
    with pytest.raises(ValueError, match=r"answers.meta.json exists; pass --overwrite"):
        A.main(["--out", str(out), "--limit", "1"])
    assert (tmp_path / "answers.meta.json").read_text() == '{"model": "earlier"}\n'


def test_an_unwritable_destination_is_refused_before_the_work(tmp_path, no_generation):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match=r"--out .*file/answers.jsonl: cannot write into"):
        A.main(["--out", str(tmp_path / "file" / "answers.jsonl"), "--limit", "1"])
    with pytest.raises(ValueError, match=r"expected a .jsonl file"):
        A.main(["--out", str(tmp_path / "answers.txt"), "--limit", "1"])
