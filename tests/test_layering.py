"""The house's one-way data flow (DESIGN.md, "The house"): no module imports from a layer
above it, and the launch layer's torch-free modules import neither torch nor triton.

    kernels → nothing of fastsoup above it
    io      → nothing of ops, merge or train
    ops     → kernels (and _backend), never merge or train
    merge   → ops, io, kernels; never train
    train   → ops, io and only the public face of merge (``fastsoup.merge`` itself)
"""
import ast
import os

import pytest

from tests.io.test_layering import _imports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fastsoup")
ABOVE = ("fastsoup.ops", "fastsoup.merge", "fastsoup.train", "fastsoup.io", "fastsoup.demo",
         "fastsoup.cli", "fastsoup._backend")
RULES = {
    "kernels": ABOVE,
    "io": ("fastsoup.ops", "fastsoup.merge", "fastsoup.train", "fastsoup.demo", "fastsoup.cli",
           "fastsoup._backend"),
    "ops": ("fastsoup.merge", "fastsoup.train", "fastsoup.io", "fastsoup.demo", "fastsoup.cli"),
    "merge": ("fastsoup.train", "fastsoup.demo", "fastsoup.cli"),
    "train": ("fastsoup.merge.", "fastsoup.demo", "fastsoup.cli"),
}
TORCH_FREE = ("kernels/abi.py", "kernels/_ext.py", "kernels/cpu.py", "kernels/__init__.py")


def _modules():
    for layer in RULES:
        for dirpath, _, files in os.walk(os.path.join(PKG, layer)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    rel = os.path.relpath(path, PKG)
                    yield layer, rel


MODULES = list(_modules())


def _package_of(rel):
    """The package a module's relative imports resolve against."""
    return ".".join(["fastsoup"] + rel.split(os.sep)[:-1])


def test_relative_imports_resolve_against_the_package():
    tree = ast.parse("from ..ops import mse\nfrom . import layout\n")
    found = [m for m, _ in _imports(tree, _package_of(os.path.join("kernels", "cuda.py")))]
    assert "fastsoup.ops.mse" in found and "fastsoup.kernels.layout" in found


def test_every_layer_is_scanned():
    assert {layer for layer, _ in MODULES} == set(RULES)
    assert len(MODULES) > 30


@pytest.mark.parametrize("layer,rel", MODULES, ids=[m[1] for m in MODULES])
def test_no_upward_import(layer, rel):
    with open(os.path.join(PKG, rel)) as f:
        tree = ast.parse(f.read(), filename=rel)
    found = [m for m, _ in _imports(tree, _package_of(rel))]
    bad = [m for m in found if m.startswith(RULES[layer]) or
           (layer == "train" and m.startswith("fastsoup.merge.") and m != "fastsoup.merge.merge")]
    assert not bad, f"fastsoup/{rel} ({layer}) imports {sorted(set(bad))}"


@pytest.mark.parametrize("rel", TORCH_FREE)
def test_launch_layer_core_is_torch_free(rel):
    with open(os.path.join(PKG, rel)) as f:
        tree = ast.parse(f.read(), filename=rel)
    heavy = [m for m, top in _imports(tree, _package_of(rel))
             if top and m.split(".")[0] in ("torch", "triton", "numpy")]
    assert not heavy, f"fastsoup/{rel} imports {heavy} at module level"
