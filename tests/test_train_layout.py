"""train/ reads as named stages: no function over 80 lines (counted with ast)."""

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "train"


def test_no_function_in_train_is_over_80_lines():
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(TRAIN.glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long
