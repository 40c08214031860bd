"""What every command line shares (dynamax_jax/cli): one-line errors with exit status 2, the
--debug traceback, and the guard on every entry point."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def test_cli_errors_print_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from dynamax_jax.cli import run_cli
    from dynamax_jax.convert.__main__ import main as convert_main
    from dynamax_jax.eval.run import main as eval_main

    monkeypatch.delenv("DYNAMAX_DEBUG", raising=False)
    missing = str(tmp_path / "missing")
    assert run_cli(convert_main, [missing, str(tmp_path / "dst")], prog="python -m convert") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m convert: error: checkpoint {missing} does not exist\n")
    assert "Traceback" not in err and "--debug" in err
    assert run_cli(eval_main, ["--model", missing, "--out", str(tmp_path / "o")], prog="python -m eval.run") == 2
    assert capsys.readouterr().err.startswith(f"python -m eval.run: error: --model {missing} does not exist\n")
    with pytest.raises(FileNotFoundError):  # the traceback on demand
        run_cli(convert_main, [missing, str(tmp_path / "dst"), "--debug"])
    monkeypatch.setenv("DYNAMAX_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_cli(convert_main, [missing, str(tmp_path / "dst")])
    monkeypatch.delenv("DYNAMAX_DEBUG")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda argv: 1 / 0, [])


def test_cli_entry_points_use_the_guard(tmp_path):
    import subprocess

    for module in ("convert", "eval.run"):
        args = [str(tmp_path / "missing"), str(tmp_path / "dst")] if module == "convert" else [
            "--model", str(tmp_path / "missing")]
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"python -m {module}: error: " in proc.stderr and "missing" in proc.stderr


def test_undecodable_prompt_bytes_are_named():
    from dynamax_jax.cli import utf8_text

    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # how Python passes such argv bytes
    with pytest.raises(ValueError, match=r"--prompt is not valid UTF-8: byte\(s\) b'\\xe9' at character 3"):
        utf8_text(prompt, "--prompt")
    assert utf8_text("café", "--prompt") == "café"
