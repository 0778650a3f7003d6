"""fastsoup.io sits below merge and train: it imports nothing of fastsoup.ops, .merge or
.train (only fastsoup.kernels), and neither torch nor numpy at import time (the CPU merge
path runs without torch)."""
import ast
import os

import pytest

IO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "fastsoup", "io")
FORBIDDEN = ("fastsoup.ops", "fastsoup.merge", "fastsoup.train", "fastsoup.triton",
             "fastsoup.demo", "fastsoup.cli")
SOURCES = sorted(f for f in os.listdir(IO_DIR) if f.endswith(".py"))


def _imports(tree, package="fastsoup.io"):
    """``(module, top_level)`` for every import in ``tree``; relative imports resolved."""
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                prefix = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{prefix}.{base}" if base else prefix
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        top_level = isinstance(parents.get(node), ast.Module)
        for name in names:
            yield name, top_level


def test_io_sources_are_found():
    assert {"__init__.py", "safetensors.py", "atomic.py"} <= set(SOURCES)


@pytest.mark.parametrize("name", SOURCES)
def test_io_imports_nothing_above_it(name):
    with open(os.path.join(IO_DIR, name)) as f:
        tree = ast.parse(f.read(), filename=name)
    found = list(_imports(tree))
    upward = [m for m, _ in found if m.startswith(FORBIDDEN)]
    assert not upward, f"fastsoup/io/{name} imports {upward}"
    heavy = [m for m, top in found if top and m.split(".")[0] in ("torch", "numpy")]
    assert not heavy, f"fastsoup/io/{name} imports {heavy} at import time"


def test_the_scan_sees_relative_and_nested_imports():
    tree = ast.parse("from ..merge import x\ndef f():\n    import torch\n")
    assert sorted(_imports(tree)) == [("fastsoup.merge", True), ("fastsoup.merge.x", True),
                                      ("torch", False)]
