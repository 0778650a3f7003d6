"""Backend selection and `fastsoup info`."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastsoup as fs
from fastsoup import _backend


def test_cpu_tensors_use_reference_by_default(monkeypatch):
    monkeypatch.delenv("FASTSOUP_BACKEND", raising=False)
    ch = _backend.choose("per_sample_mse", "cpu")
    assert ch.backend == "reference" and "cpu" in ch.reason


def test_use_backend_forces_triton_under_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend.triton_status.cache_clear()
    try:
        with fs.use_backend("triton"):
            ch = _backend.choose("per_sample_mse", "cpu")
        assert ch.backend == "triton" and "use_backend" in ch.reason
        assert _backend.choose("per_sample_mse", "cpu").backend == "reference"
    finally:
        _backend.triton_status.cache_clear()


def test_env_override_per_op_and_global(monkeypatch):
    monkeypatch.setenv("FASTSOUP_BACKEND", "per_sample_mse=reference")
    assert _backend._requested("per_sample_mse")[0] == "reference"
    monkeypatch.setenv("FASTSOUP_BACKEND", "reference")
    assert _backend._requested("per_sample_mse")[0] == "reference"
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setenv("FASTSOUP_BACKEND", "per_sample_mse=fast,nosuchop=triton")
    with pytest.warns(RuntimeWarning, match="FASTSOUP_BACKEND"):
        assert _backend.choose("per_sample_mse", "cpu").backend == "reference"
    problems = _backend.backend_env_problems()
    assert len(problems) == 2 and "unknown op 'nosuchop'" in problems[1]


def test_unavailable_request_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setenv("FASTSOUP_BACKEND", "cuda")
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="backend 'cuda' requested for per_sample_mse cannot run here"):
        ch = _backend.choose("per_sample_mse", "cpu")
    assert ch.backend == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backend.choose("per_sample_mse", "cpu")  # no second warning


def test_gpu_default_order_and_fallback(monkeypatch):
    monkeypatch.delenv("FASTSOUP_BACKEND", raising=False)
    avail = {"triton": (False, "no triton"), "cuda": (True, "ext"), "reference": (True, "ref")}
    monkeypatch.setattr(_backend, "_available", lambda name, dev: avail[name])
    ch = _backend.choose("per_sample_mse", "cuda")
    assert ch.backend == "cuda" and "fallback" in ch.reason and "no triton" in ch.reason
    avail["cuda"] = (False, "no ext")
    assert _backend.choose("per_sample_mse", "cuda").backend == "reference"
    avail["triton"] = (True, "triton 3")
    ch = _backend.choose("per_sample_mse", "cuda")
    assert ch.backend == "triton" and "default GPU backend" in ch.reason


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend"):
        with fs.use_backend("numpy"):
            pass
    with pytest.raises(KeyError, match="unknown fastsoup op"):
        _backend.choose("no_such_op", "cpu")


def test_info_cli_text_and_json():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "fastsoup", "info"], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert "per_sample_mse" in out and "torch" in out and "backends for cpu tensors" in out
    js = subprocess.run([sys.executable, "-m", "fastsoup", "info", "--json"], capture_output=True,
                        text=True, env=env, check=True).stdout
    data = json.loads(js)
    assert data["fastsoup"] == fs.__version__
    assert data["backends"]["cpu"]["per_sample_mse"]["backend"] == "reference"
    assert data["torch"] == torch.__version__
    env["FASTSOUP_BACKEND"] = "per_sample_mse=cuda,bogus"
    res = subprocess.run([sys.executable, "-m", "fastsoup", "info"], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "ignored: FASTSOUP_BACKEND: unknown backend 'bogus'" in res.stdout
    assert "cuda requested by FASTSOUP_BACKEND" in res.stdout


def test_info_in_a_fresh_process_lists_every_op():
    """`fastsoup info` in a new interpreter (fastsoup loads its ops lazily) reports every
    op, weighted_sum included."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fastsoup", "info", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ops = set(json.loads(proc.stdout)["backends"]["cpu"])
    assert {"per_sample_mse", "weighted_sum", "ambient_loss_vp", "ambient_loss_ve",
            "consistency_loss", "vp_reverse_step"} <= ops
