"""fastsoup-merge through main(argv), and once through a real subprocess."""
import json
import os
import subprocess
import sys

import torch

from fastsoup import cli as fastsoup_cli
from fastsoup.merge import cli
from tests.helpers import check_merged, load_any, make_state, save_file_layout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def inputs(tmp_path, n=3):
    states = [make_state(200 + i) for i in range(n)]
    return [save_file_layout(str(tmp_path / f"m{i}.safetensors"), s) for i, s in enumerate(states)], states


def test_main_weighted_json(tmp_path, capsys):
    paths, states = inputs(tmp_path)
    out = tmp_path / "o.safetensors"
    code = cli.main([*paths, "-o", str(out), "--weights", "0.5,0.3,0.2", "--json"])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["coefficients"] == [0.5, 0.3, 0.2] and rep["kind"] == "file"
    assert rep["manifest"]["operation"] == "weighted" and rep["peak_rss"] > 0
    check_merged(load_any(str(out)), states, [0.5, 0.3, 0.2])


def test_main_base_no_normalize_and_dtype(tmp_path, capsys):
    paths, states = inputs(tmp_path)
    out = tmp_path / "o.safetensors"
    code = cli.main([paths[1], paths[2], "--base", paths[0], "--weights", "0.5,0.25",
                     "-o", str(out), "--dtype", "fp32", "-q"])
    assert code == 0 and capsys.readouterr().out == ""
    merged = load_any(str(out))
    assert merged["down.0.weight"].dtype == torch.float32
    check_merged(merged, [states[1], states[2], states[0]], [0.5, 0.25, 0.25])


def test_dry_run_prints_plan_and_estimates(tmp_path, capsys):
    paths, _ = inputs(tmp_path)
    code = cli.main([*paths, "-o", str(tmp_path / "o.safetensors"), "--dry-run"])
    text = capsys.readouterr().out
    assert code == 0 and "dry run" in text and "estimate" in text and "validation: OK" in text
    assert not os.path.exists(tmp_path / "o.safetensors")
    code = cli.main([*paths, "-o", str(tmp_path / "o.safetensors"), "--dry-run", "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rep["dry_run"] and rep["files"][0]["tensors"] == 7


def test_error_json(tmp_path, capsys):
    paths, _ = inputs(tmp_path, 2)
    s = make_state(5)
    del s["flags"]
    bad = save_file_layout(str(tmp_path / "bad.safetensors"), s)
    code = cli.main([paths[0], bad, "-o", str(tmp_path / "o.safetensors"), "--json"])
    captured = capsys.readouterr()
    assert code == 1
    rep = json.loads(captured.out)
    assert not rep["ok"] and len(rep["problems"]) == 1 and "'flags'" in rep["problems"][0]


def test_add_and_remove_subcommands(tmp_path, capsys):
    paths, states = inputs(tmp_path, 3)
    soup = tmp_path / "soup.safetensors"
    assert cli.main([paths[0], paths[1], "-o", str(soup), "-q"]) == 0
    assert cli.main(["add", str(soup), paths[2], "-o", str(tmp_path / "soup3.safetensors"), "-q"]) == 0
    check_merged(load_any(str(tmp_path / "soup3.safetensors")), states, [1 / 3] * 3)
    assert cli.main(["remove", str(tmp_path / "soup3.safetensors"), paths[0],
                     "-o", str(tmp_path / "soup12.safetensors"), "-q"]) == 0
    check_merged(load_any(str(tmp_path / "soup12.safetensors")), states[1:], [0.5, 0.5])
    code = cli.main(["remove", str(soup), paths[2], "-o", str(tmp_path / "x.safetensors"), "-q"])
    assert code == 1 and "is not a constituent" in capsys.readouterr().err
    code = cli.main(["add", paths[0], paths[2], "-o", str(tmp_path / "y.safetensors"), "-q"])
    assert code == 1 and "not a fastsoup soup" in capsys.readouterr().err


def test_fastsoup_merge_subcommand_forwards(tmp_path, capsys):
    paths, states = inputs(tmp_path, 2)
    out = tmp_path / "o.safetensors"
    assert fastsoup_cli.main(["merge", *paths, "-o", str(out), "-q"]) == 0
    check_merged(load_any(str(out)), states, [0.5, 0.5])


def test_subprocess_run(tmp_path):
    paths, states = inputs(tmp_path, 2)
    out = tmp_path / "o.safetensors"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "fastsoup", "merge", *paths, "-o", str(out)],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "\r" not in res.stderr  # no progress bar when not a tty
    check_merged(load_any(str(out)), states, [0.5, 0.5])
    res = subprocess.run([sys.executable, "-m", "fastsoup.merge.cli", *paths, "-o", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1 and "already exists" in res.stderr


def test_progress_bar_names_tensors(tmp_path, capsys, monkeypatch):
    import fastsoup as fs

    paths, _ = inputs(tmp_path, 2)
    fs.merge(paths, tmp_path / "o.safetensors", quiet=False)  # forced on (not a tty here)
    err = capsys.readouterr().err
    assert "merging" in err and "B/s" in err
    monkeypatch.setenv("CI", "true")
    fs.merge(paths, tmp_path / "p.safetensors")  # CI: nothing at all
    assert capsys.readouterr().err == ""


def test_progress_in_logs_notebooks_and_callbacks(tmp_path, capsys, monkeypatch):
    """A log (stderr not a terminal, not CI) gets one line per phase; a notebook gets the
    tqdm.auto bar; a progress= callback gets phases and bytes."""
    import fastsoup as fs
    from fastsoup.merge import api

    monkeypatch.delenv("CI", raising=False)
    paths, _ = inputs(tmp_path, 2)
    fs.merge(paths, tmp_path / "o.safetensors")
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(":")[1].strip() for ln in lines] == ["plan", "merge", "verify", "finish",
                                                          "commit"]
    bars = []
    import tqdm.auto

    class FakeBar:
        def __init__(self, **kw):
            bars.append(self)
            self.n = 0

        def update(self, n):
            self.n += n

        def set_postfix_str(self, *a, **k):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    monkeypatch.setattr(api, "_in_notebook", lambda: True)
    rep = fs.merge(paths, tmp_path / "n.safetensors")
    assert len(bars) == 1 and bars[0].n == rep.bytes_to_write
    assert capsys.readouterr().err == ""
    events = []
    fs.merge(paths, tmp_path / "c.safetensors", progress=lambda *e: events.append(e))
    phases = [e[0] for e in events if e[3] is None]
    assert phases == ["plan", "merge", "verify", "finish", "commit"]
    chunks = [e for e in events if e[3] is not None]
    assert chunks and chunks[-1][1] == chunks[-1][2] == rep.bytes_to_write


def test_dry_run_needs_no_output(tmp_path, capsys, monkeypatch):
    paths, _ = inputs(tmp_path, 3)
    monkeypatch.chdir(tmp_path)
    assert cli.main([*paths, "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out and not os.path.exists(tmp_path / "soup.safetensors")
    import pytest

    with pytest.raises(SystemExit) as info:
        cli.main([*paths])
    assert info.value.code == 2 and "-o/--output" in capsys.readouterr().err
