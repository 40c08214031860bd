"""The library reads as named stages: no function over 80 lines in dynamax_jax/, kernels/,
convert/, train/ or eval/ (counted with ast; tests and benchmarks exempt)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80


@pytest.mark.parametrize("folder", ["dynamax_jax", "kernels", "convert", "train", "eval"])
def test_no_function_is_over_80_lines(folder):
    long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path.is_symlink() or any(p.is_symlink() for p in path.relative_to(ROOT).parents if p != Path(".")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
