"""The README's Python examples run as written: every name a block uses is defined in it, and each block runs
in a scratch folder beside the bundled sample volumes (issue 14, item 19)."""
import ast
import builtins
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
SAMPLES = os.path.abspath(os.path.join(os.path.dirname(README), "sample_volumes"))


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(pytest.param(match.group(1), id=f"README.md:{line}"))
    return blocks


BLOCKS = python_blocks()


def undefined_names(source):
    """Names a block reads but never binds (imports, assignments, for/with targets, defs) and Python lacks."""
    tree = ast.parse(source)
    bound, used = set(dir(builtins)), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (bound.add if isinstance(node.ctx, (ast.Store, ast.Del)) else used.append)(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return sorted(set(used) - bound)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("source", BLOCKS)
def test_block_defines_every_name(source):
    assert undefined_names(source) == []


@pytest.mark.parametrize("source", BLOCKS)
def test_block_runs(source, tmp_path, monkeypatch):
    if "torch.compile" in source:
        pytest.skip("compiling a model takes minutes on 2 cores; tests/test_compile.py covers it")
    monkeypatch.chdir(tmp_path)
    os.symlink(SAMPLES, tmp_path / "sample_volumes")
    exec(compile(source, README, "exec"), {"__name__": "__readme__"})
