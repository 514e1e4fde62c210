"""No function outside tests is longer than MAX_LINES (issue #14: small functions that read top to bottom).

Counted from `def` to the last line of the body, docstring and comments included, as a reader sees it.
"""

import ast
import pathlib

MAX_LINES = 60
ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ("megatron_ce", "tools", "examples", "launch")


def long_functions():
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_LINES:
                        yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)"


def test_no_function_longer_than_limit():
    found = list(long_functions())
    assert not found, f"functions over {MAX_LINES} lines: " + "; ".join(found)
