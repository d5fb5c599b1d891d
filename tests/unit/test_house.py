"""The house's floors that a reader meets first: no product module over 350 lines, and no
function over 60 (STYLE.md). Tests are not held to them; everything else in git is."""

from __future__ import annotations

import ast
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).parents[2]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 350, 60


def _product_modules() -> list[pathlib.Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in listed.stdout.split() if not name.startswith("tests/")]


def test_no_product_module_is_over_350_lines():
    modules = _product_modules()
    assert len(modules) > 100, "the listing found the product"
    lines = {str(m.relative_to(ROOT)): len(m.read_text().splitlines()) for m in modules}
    assert {name: n for name, n in lines.items() if n > MAX_MODULE_LINES} == {}


def test_no_product_function_is_over_60_lines():
    too_long = {}
    for module in _product_modules():
        for node in ast.walk(ast.parse(module.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if (lines := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                too_long[f"{module.relative_to(ROOT)}:{node.name}"] = lines
    assert too_long == {}
