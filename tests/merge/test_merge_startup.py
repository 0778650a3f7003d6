"""The CPU merge path does not import torch (DESIGN, "Merge engine"), and
``fastsoup-merge --help`` imports neither torch nor numpy: each checked through
``sys.modules`` in a fresh interpreter, and by an import scan of the merge-path sources.
The public API keeps every name (``fs.per_sample_mse`` ... ``fs.train``), loaded on use.
(``--help`` wall time is measured in ``benchmarks/bench_merge.py``, not here.)"""
import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.helpers import make_state, save_file_layout, save_sharded

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("torch", "numpy", "triton", "safetensors", "tqdm")


def _modules_after(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter (cwd: the repository) and return which heavy
    top-level modules it left loaded, plus whatever ``code`` put in ``RESULT``."""
    wrapper = (
        "import sys, json\nRESULT = {}\n" + code +
        "\nloaded = sorted({m.split('.')[0] for m in sys.modules} & set(%r))\n"
        "print('@@' + json.dumps({'loaded': loaded, 'result': RESULT}))\n" % (HEAVY,))
    env = dict(os.environ, OMP_NUM_THREADS="1", CI="1")
    res = subprocess.run([sys.executable, "-c", wrapper, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("@@")][-1]
    return json.loads(line[2:])


def test_import_fastsoup_loads_no_torch_and_no_numpy():
    got = _modules_after("import fastsoup as fs\nRESULT['version'] = fs.__version__\n"
                         "fs.MergeError, fs.PlanError, fs.HeaderError, fs.MergeReport, fs.merge")
    assert got["loaded"] == []
    assert got["result"]["version"]


def test_merge_help_loads_no_torch_and_no_numpy():
    code = ("from fastsoup.merge.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    RESULT['rc'] = e.code\n")
    got = _modules_after(code)
    assert got["result"]["rc"] == 0
    assert got["loaded"] == []


@pytest.mark.parametrize("layout", ["file", "sharded"])
@pytest.mark.parametrize("how", ["cli", "api"])
def test_cpu_merge_of_safetensors_loads_no_torch(tmp_path, how, layout):
    """A whole CPU merge (sha256 digests computed, manifest, commit) through the command
    and through ``fs.merge``: torch is never imported, and the result is the average."""
    states = [make_state(s) for s in (1, 2)]
    if layout == "file":
        paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), st)
                 for i, st in enumerate(states)]
        out = str(tmp_path / "soup.safetensors")
    else:
        paths = [save_sharded(str(tmp_path / f"m{i}"), st) for i, st in enumerate(states)]
        out = str(tmp_path / "soup")
    if how == "cli":
        code = ("import sys\nfrom fastsoup.merge.cli import main\n"
                "RESULT['rc'] = main(sys.argv[1:3] + ['-o', sys.argv[3], '-q'])")
    else:
        code = ("import sys, fastsoup as fs\n"
                "r = fs.merge(sys.argv[1:3], sys.argv[3], quiet=True)\n"
                "RESULT['rc'] = 0; RESULT['hashed'] = bool(r.manifest['constituents'][0]['sha256'])")
    env_cache = {"FASTSOUP_CACHE_DIR": str(tmp_path / "cache")}
    os.environ.update(env_cache)  # the isolated_hash_cache fixture resets it afterwards
    got = _modules_after(code, *paths, out)
    assert got["result"]["rc"] == 0
    assert "torch" not in got["loaded"], got["loaded"]
    if how == "api":
        assert got["result"]["hashed"]
    files = ([out] if layout == "file" else
             [os.path.join(out, f) for f in sorted(os.listdir(out)) if f.endswith(".safetensors")])
    merged = {}
    for f in files:
        merged.update(load_file(f))
    for k, t in states[0].items():
        if t.is_floating_point() and t.numel():
            want = (t.double() + states[1][k].double()) / 2
            np.testing.assert_allclose(merged[k].double().numpy(), want.numpy(),
                                       rtol=1e-2, atol=1e-2, err_msg=k)


def test_public_api_names_resolve_as_before():
    """Every name of ``fastsoup.__all__`` resolves (the torch-backed ones on first use),
    to the object its home module defines; ``fs.merge`` is callable and a package."""
    import fastsoup as fs
    import fastsoup.merge
    import fastsoup.ops
    import fastsoup.ops.weighted_sum
    import fastsoup._backend

    for name in fs.__all__:
        assert getattr(fs, name) is not None, name
    assert fs.per_sample_mse is fastsoup.ops.per_sample_mse
    assert fs.weighted_sum_ is fastsoup.ops.weighted_sum.weighted_sum_
    assert fs.use_backend is fastsoup._backend.use_backend
    assert fs.MergeError is fastsoup.merge.MergeError
    assert fs.merge is fastsoup.merge and callable(fs.merge)
    assert fs.train.__name__ == "fastsoup.train"
    assert set(fs.__all__) <= set(dir(fs))
    with pytest.raises(AttributeError):
        fs.no_such_name
    from fastsoup import demo  # submodules stay importable with ``from fastsoup import``
    assert demo.__name__ == "fastsoup.demo"


# modules of the CPU merge path: none may import torch (or triton) at module level
CPU_PATH = ([os.path.join("fastsoup", "merge", f) for f in
             sorted(os.listdir(os.path.join(ROOT, "fastsoup", "merge"))) if f.endswith(".py")]
            + [os.path.join("fastsoup", "io", f) for f in
               sorted(os.listdir(os.path.join(ROOT, "fastsoup", "io"))) if f.endswith(".py")]
            + [os.path.join("fastsoup", "kernels", f) for f in
               ("__init__.py", "abi.py", "_ext.py", "cpu.py")]
            + [os.path.join("fastsoup", "__init__.py"), os.path.join("fastsoup", "_version.py")])


@pytest.mark.parametrize("rel", CPU_PATH)
def test_cpu_merge_path_sources_import_no_torch_at_module_level(rel):
    with open(os.path.join(ROOT, rel)) as f:
        tree = ast.parse(f.read(), filename=rel)
    top = []

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return  # imports inside functions run on use (pickle inputs, --device cuda)
        if isinstance(node, ast.Import):
            top.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            top.append(node.module or "")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    bad = [m for m in top if m.split(".")[0] in ("torch", "triton")]
    assert not bad, f"{rel} imports {bad} at module level"
