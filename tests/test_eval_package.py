"""The evaluation package's code as a whole: short functions, typed errors, no hidden state."""

import ast
from pathlib import Path

EVAL = Path(__file__).resolve().parents[1] / "eval"
MODULES = sorted(EVAL.glob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_library_code_raises_typed_errors_not_exit_codes():
    """``SystemExit`` and bare ``RuntimeError`` are for command lines: a library function raises
    one of ``eval.errors``' classes (or another ``ValueError``), which ``run_cli`` turns into
    exit status 2."""
    def raised(node: ast.Raise):
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        return exc.id if isinstance(exc, ast.Name) else None

    found = [f"{path.name}:{node.lineno} {raised(node)}" for path in MODULES for node in ast.walk(_tree(path))
             if isinstance(node, ast.Raise) and raised(node) in ("SystemExit", "RuntimeError")]
    assert not found, found


def test_every_error_is_a_value_error():
    from dynamax_jax.eval import errors
    from dynamax_jax.io import DataError

    classes = [getattr(errors, name) for name in errors.__all__]
    assert all(issubclass(c, errors.EvalError) and issubclass(c, ValueError) for c in classes)
    assert issubclass(errors.RunFileError, DataError)


def test_no_module_level_mutable_state():
    """A module-level set, list or dict that code mutates (a compile counter, say) is state that
    outlives a call; jax's own caches say what was compiled."""
    mutated = []
    for path in MODULES:
        tree = _tree(path)
        names = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                 for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(t, ast.Name) and isinstance(node.value, (ast.Set, ast.List, ast.Dict, ast.Call))}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in names
                    and node.func.attr in ("add", "append", "update", "clear", "pop", "setdefault", "extend")):
                mutated.append(f"{path.name}:{node.lineno} {node.func.value.id}.{node.func.attr}")
    assert not mutated, mutated
