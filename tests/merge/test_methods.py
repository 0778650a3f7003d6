"""TIES, DARE and SLERP (``method=``) against references written from the papers'
definitions (float64, one tensor at a time, no fastsoup code), on small tensors."""
import hashlib
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastsoup as fs
from fastsoup.merge import MergeError, cli, soup_add

SHAPES = {"a.weight": (7, 9), "b.bias": (33,), "c.conv": (4, 3, 2, 2), "n.ids": (5,)}


def _models(tmp_path, n, seed=0, scale=0.1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items() if k != "n.ids"}
    base["n.ids"] = torch.arange(5)
    paths, states = [], []
    for i in range(n):
        st = {k: (v + scale * torch.randn(v.shape, generator=g)).to(dtype)
              if v.is_floating_point() else v.clone() for k, v in base.items()}
        p = str(tmp_path / f"m{i}.safetensors")
        save_file(st, p)
        paths.append(p)
        states.append(st)
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}
    bp = str(tmp_path / "base.safetensors")
    save_file(base, bp)
    return bp, base, paths, states


# ------------------------------------------------------------------ references (papers)
def ref_ties(base, thetas, density, weights=None):
    """Yadav et al. 2023, Algorithm 1 (trim, elect, disjoint merge), λ = 1; with weights,
    the elected sign and the disjoint mean are weighted."""
    base = base.astype(np.float64).ravel()
    n = len(thetas)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    trimmed = []
    for th in thetas:
        tau = th.astype(np.float64).ravel() - base
        k = math.ceil(density * tau.size)
        order = np.argsort(-np.abs(tau), kind="stable")[:k]
        t = np.zeros_like(tau)
        t[order] = tau[order]
        trimmed.append(t)
    gamma = np.sign(sum(wi * t for wi, t in zip(w, trimmed)))
    merged = np.zeros_like(base)
    for p in range(base.size):
        num = den = 0.0
        for wi, t in zip(w, trimmed):
            if t[p] != 0 and np.sign(t[p]) == gamma[p]:
                num += wi * t[p]
                den += wi
        merged[p] = num / den if den else 0.0
    return base + merged


def ref_dare_mask(seed, position, key, numel, density):
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(position, h))))
    return rng.random(numel) < density


def ref_dare(base, thetas, density, coefs, seed, key):
    """Yu et al. 2024, eq. 1-2: drop with probability 1 - density, rescale by 1/density,
    then task arithmetic with the coefficients."""
    base = base.astype(np.float64).ravel()
    out = base.copy()
    for i, (th, c) in enumerate(zip(thetas, coefs)):
        tau = th.astype(np.float64).ravel() - base
        m = ref_dare_mask(seed, i, key, tau.size, density)
        out += c * np.where(m, tau / density, 0.0)
    return out


def ref_slerp(v0, v1, t):
    """Shoemake 1985 on the flattened tensors; linear when nearly parallel."""
    v0 = v0.astype(np.float64).ravel()
    v1 = v1.astype(np.float64).ravel()
    cos = v0 @ v1 / (np.linalg.norm(v0) * np.linalg.norm(v1))
    if abs(cos) > 0.9995:
        return (1 - t) * v0 + t * v1
    om = math.acos(cos)
    return (math.sin((1 - t) * om) * v0 + math.sin(t * om) * v1) / math.sin(om)


def _np(t):
    return t.double().numpy()


# ------------------------------------------------------------------------------ TIES
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_the_papers_algorithm(tmp_path, density):
    bp, base, paths, states = _models(tmp_path, 3)
    out = str(tmp_path / "ties.safetensors")
    rep = fs.merge(paths, out, base=bp, method="ties", density=density, quiet=True)
    got = load_file(out)
    for k in ("a.weight", "b.bias", "c.conv"):
        ref = ref_ties(_np(base[k]), [_np(s[k]) for s in states], density)
        np.testing.assert_allclose(_np(got[k]).ravel(), ref, rtol=1e-6, atol=1e-6, err_msg=k)
    assert torch.equal(got["n.ids"], base["n.ids"])
    assert rep.manifest["method"] == "ties" and rep.manifest["density"] == density


def test_ties_with_weights_and_bf16(tmp_path):
    bp, base, paths, states = _models(tmp_path, 3, dtype=torch.bfloat16)
    out = str(tmp_path / "ties.safetensors")
    fs.merge(paths, out, [0.5, 0.3, 0.2], base=bp, method="ties", density=0.3, quiet=True)
    got = load_file(out)
    for k in ("a.weight", "c.conv"):
        ref = ref_ties(_np(base[k]), [_np(s[k]) for s in states], 0.3, [0.5, 0.3, 0.2])
        assert got[k].dtype == torch.bfloat16
        np.testing.assert_allclose(_np(got[k]).ravel(), ref, rtol=2 ** -8, atol=1e-6, err_msg=k)


def test_ties_differs_from_task_arithmetic(tmp_path):
    """Trimming and sign election change the result (the method is not silently the mean)."""
    bp, base, paths, _ = _models(tmp_path, 3)
    a, b = str(tmp_path / "t.safetensors"), str(tmp_path / "m.safetensors")
    fs.merge(paths, a, base=bp, method="ties", quiet=True)
    fs.merge(paths, b, base=bp, quiet=True)
    assert not torch.allclose(load_file(a)["a.weight"], load_file(b)["a.weight"])


# ------------------------------------------------------------------------------ DARE
def test_dare_matches_the_definition_and_is_reproducible(tmp_path):
    bp, base, paths, states = _models(tmp_path, 3)
    out1, out2 = str(tmp_path / "d1.safetensors"), str(tmp_path / "d2.safetensors")
    rep = fs.merge(paths, out1, base=bp, method="dare", density=0.4, seed=7, quiet=True)
    fs.merge(paths, out2, base=bp, method="dare", density=0.4, seed=7, quiet=True,
             memory="64KiB")
    g1, g2 = load_file(out1), load_file(out2)
    for k in ("a.weight", "b.bias", "c.conv"):
        ref = ref_dare(_np(base[k]), [_np(s[k]) for s in states], 0.4, [1 / 3] * 3, 7, k)
        np.testing.assert_allclose(_np(g1[k]).ravel(), ref, rtol=1e-6, atol=1e-6, err_msg=k)
        assert torch.equal(g1[k], g2[k])
    assert rep.manifest["seed"] == 7 and rep.manifest["density"] == 0.4
    out3 = str(tmp_path / "d3.safetensors")
    fs.merge(paths, out3, base=bp, method="dare", density=0.4, seed=8, quiet=True)
    assert not torch.equal(load_file(out3)["a.weight"], g1["a.weight"])


def test_dare_keeps_about_density_of_the_entries():
    m = ref_dare_mask(0, 0, "k", 100000, 0.3)
    from fastsoup.merge.methods import dare_mask

    assert np.array_equal(m, dare_mask(0, 0, "k", 100000, 0.3))
    assert abs(m.mean() - 0.3) < 0.01


# ----------------------------------------------------------------------------- SLERP
def test_slerp_matches_shoemake(tmp_path):
    _, _, paths, states = _models(tmp_path, 2, scale=1.0)
    out = str(tmp_path / "s.safetensors")
    fs.merge(paths, out, [0.7, 0.3], method="slerp", quiet=True)
    got = load_file(out)
    for k in ("a.weight", "b.bias", "c.conv"):
        ref = ref_slerp(_np(states[0][k]), _np(states[1][k]), 0.3)
        np.testing.assert_allclose(_np(got[k]).ravel(), ref, rtol=1e-5, atol=1e-6, err_msg=k)


def test_slerp_of_nearly_parallel_tensors_is_linear(tmp_path):
    a = {"w": torch.linspace(1, 2, 50)}
    b = {"w": torch.linspace(1, 2, 50) * 1.001}
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file(a, pa)
    save_file(b, pb)
    out = str(tmp_path / "s.safetensors")
    fs.merge([pa, pb], out, method="slerp", quiet=True)
    np.testing.assert_allclose(_np(load_file(out)["w"]), 0.5 * _np(a["w"]) + 0.5 * _np(b["w"]),
                               rtol=1e-6)


def test_slerp_keeps_the_norm_of_orthogonal_unit_vectors(tmp_path):
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file({"w": torch.tensor([1.0, 0.0])}, pa)
    save_file({"w": torch.tensor([0.0, 1.0])}, pb)
    out = str(tmp_path / "s.safetensors")
    fs.merge([pa, pb], out, method="slerp", quiet=True)
    np.testing.assert_allclose(_np(load_file(out)["w"]), [math.sqrt(0.5)] * 2, rtol=1e-6)


# ------------------------------------------------------------------------ validation
def test_methods_refuse_what_has_no_meaning(tmp_path):
    bp, _, paths, _ = _models(tmp_path, 3)
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(MergeError, match="needs --base"):
        fs.merge(paths, out, method="ties", quiet=True)
    with pytest.raises(MergeError, match="exactly two"):
        fs.merge(paths, out, method="slerp", quiet=True)
    with pytest.raises(MergeError, match="takes no --base"):
        fs.merge(paths[:2], out, base=bp, method="slerp", quiet=True)
    with pytest.raises(MergeError, match="density"):
        fs.merge(paths, out, base=bp, method="ties", density=1.5, quiet=True)
    with pytest.raises(MergeError, match="unknown merge method"):
        fs.merge(paths, out, base=bp, method="magic", quiet=True)
    with pytest.raises(MergeError, match="seed applies"):
        fs.merge(paths, out, base=bp, method="ties", seed=3, quiet=True)


def test_cli_method_and_soup_add_keeps_it(tmp_path, capsys):
    bp, base, paths, states = _models(tmp_path, 3)
    soup = str(tmp_path / "soup.safetensors")
    assert cli.main(paths[:2] + ["--base", bp, "--method", "dare", "--density", "0.5",
                                 "--seed", "3", "-o", soup, "-q"]) == 0
    added = str(tmp_path / "added.safetensors")
    soup_add(soup, paths[2], added, quiet=True)
    direct = str(tmp_path / "direct.safetensors")
    fs.merge(paths, direct, base=bp, method="dare", density=0.5, seed=3, quiet=True)
    a, d = load_file(added), load_file(direct)
    assert all(torch.equal(a[k], d[k]) for k in d)
