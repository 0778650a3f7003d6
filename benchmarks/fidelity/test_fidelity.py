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

from fidelity import ambient, common, difftuning, memorization, soup  # noqa: E402


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
    # wall and CPU time of the run; the load average as numbers, not a Python list
    assert data["seconds"] > 0 and data["cpu_seconds"] > 0
    assert f"{data['seconds']:.0f} s, {data['cpu_seconds']:.0f} s of CPU" in text
    assert "load average (1/5/15 min) at the end " in text and "load average [" not in text
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


def test_soup_smoke(tmp_path):
    md = soup.main(["--size", "smoke", "--out", str(tmp_path / "soup")])
    data, text = _load(md)
    assert data["rows"][0][1] == "pre-trained"
    assert [(r[0], r[1]) for r in data["rows"][1:]] == [
        (s, m) for s in soup.SPLITS for m in ("shard (mean of shards)", "shard (best on union)", "soup", "paragon")]
    assert all(len(r) == len(data["header"]) for r in data["rows"])
    assert data["size"] == "smoke" and "Command:" in text and len(data["notes"]) == 1 + 2 * len(soup.SPLITS)
    for split in soup.SPLITS:
        ul = data["data"]["per_seed"][0][split]["unlearning"]
        assert all(math.isfinite(v) and v > 0 for v in ul.values())


def test_difftuning_smoke(tmp_path):
    md = difftuning.main(["--size", "smoke", "--out", str(tmp_path / "dt")])
    data, text = _load(md)
    assert [r[0] for r in data["rows"]] == ["pre-trained", *difftuning.METHODS]
    assert all(len(r) == len(data["header"]) for r in data["rows"])
    assert data["size"] == "smoke" and "Command:" in text and len(data["notes"]) == len(difftuning.METHODS)
    for runs in data["data"]["per_seed"][0].values():
        assert all(math.isfinite(v) and v > 0 for dom in ("source", "target") for v in runs[dom])


def test_difftuning_ablations_are_what_they_say():
    assert difftuning.tuner("plain") is None
    full = difftuning.tuner("Diff-Tuning")
    assert full.split(32) == (26, 6) and full.retention_weight == 0.1 and full.adapt.tau == 1.0
    assert difftuning.tuner("w/o reconsolidation").adapt.tau == 0.0   # uniform target timesteps
    assert difftuning.tuner("w/o retention").split(32) == (32, 0)     # no replay


def test_soup_remove_is_exact():
    """Removing a shard from the soup with fs.weighted_sum_ gives the mean of the others."""
    torch.manual_seed(0)
    models = [common.MLPDenoiser(3, hidden=8) for _ in range(3)]
    s = soup.combine(models, [1 / 3] * 3, models[0])
    removed = soup.combine([s, models[2]], [3 / 2, -1 / 2], models[0])
    expect = soup.combine(models[:2], [0.5, 0.5], models[0])
    for a, b in zip(removed.parameters(), expect.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_consistency_verdict_needs_a_material_change():
    same = [[0.74, 0.75]] * 3
    tiny = [[0.7401, 0.7502], [0.7399, 0.7500], [0.7402, 0.7503]]
    assert "claim does not hold" in ambient.consistency_note(0.1, same, tiny, 0.3, 0.04)
    lower = [[0.6, 0.6], [0.61, 0.6], [0.6, 0.62]]
    varied = [[0.74, 0.75], [0.73, 0.76], [0.75, 0.75]]
    assert "lowers the error by 19%: the claim holds" in ambient.consistency_note(1, varied, lower, 0.3, 0.04)
    assert "raises the error" in ambient.consistency_note(1, lower, varied, 0.3, 0.04)
    assert "no verdict" in ambient.consistency_note(1, varied[:1], lower[:1], 0.3, 0.04)


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
