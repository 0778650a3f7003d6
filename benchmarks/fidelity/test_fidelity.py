"""Smoke runs of the fidelity experiments (tiny sizes, seconds): the pipeline runs with
fastsoup's ops and the table is well formed and sane. The scientific results are in the
full-size tables under benchmarks/results/, not checked here."""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fidelity import ambient, common, memorization  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _load(md_path):
    stem = md_path[:-3]
    with open(stem + ".json") as f:
        data = json.load(f)
    with open(md_path) as f:
        text = f.read()
    return data, text


def _check_table(data, text, methods):
    env = data["environment"]
    for key in ("date", "machine", "versions", "command"):
        assert env[key]
    assert env["versions"]["torch"] == torch.__version__
    assert data["size"] == "smoke"
    assert [r[0] for r in data["rows"]][:len(methods)] == list(methods)
    assert all(len(r) == len(data["header"]) for r in data["rows"])
    assert "| " + " | ".join(data["header"]) + " |" in text
    assert env["date"] in text and "Command:" in text
    assert data["notes"] and all(n.strip() for n in data["notes"])


def test_ambient_smoke(tmp_path):
    md = ambient.main(["--size", "smoke", "--out", str(tmp_path / "ambient")])
    data, text = _load(md)
    _check_table(data, text, ambient.methods())
    per_seed = data["data"]["per_seed"]
    assert set(per_seed) == set(ambient.methods())
    for runs in per_seed.values():
        assert len(runs) == 1 and len(runs[0]) == len(ambient.bins())
        assert all(math.isfinite(v) and v >= 0 for v in runs[0])
    assert 0 < data["data"]["sigma_n"] < 1


def test_memorization_smoke(tmp_path):
    md = memorization.main(["--size", "smoke", "--out", str(tmp_path / "mem")])
    data, text = _load(md)
    _check_table(data, text, memorization.METHODS)
    for m, runs in data["data"]["per_seed"].items():
        r = runs[0]
        for key in ("copy_rate", "coverage", "near_any_training_point", "copy_rate_fresh"):
            assert 0.0 <= r[key] <= 1.0
        if "AGC" not in m:
            assert r["excluded"] == 0
    cfg = data["data"]["config"]
    seen = {m: runs[0]["gradient_samples"] for m, runs in data["data"]["per_seed"].items()}
    assert seen["IET"] == cfg["shards"] * seen["plain"]   # the cost IET is charged


def test_optimal_denoiser_is_bayes_optimal():
    """The closed-form ε* of the mixture beats perturbations of itself (a sanity check of
    the oracle the ambient experiment measures against)."""
    gm = common.GaussianMixture(3, 3, spread=0.7, std=0.1, seed=0)
    g = torch.Generator().manual_seed(0)
    ac = common.linear_alphas_cumprod()
    x0 = gm.sample(4096, g)
    t = torch.full((x0.shape[0],), 150)
    a, s = (ac[t].sqrt(), (1 - ac[t]).sqrt())
    eps = torch.randn(x0.shape, generator=g)
    x_t = a[:, None] * x0 + s[:, None] * eps
    best = gm.optimal_eps(x_t, a, s)
    err = (best - eps).square().mean()
    for scale in (0.9, 1.1):
        assert err < (scale * best - eps).square().mean()
    assert err < (x_t - eps).square().mean()
