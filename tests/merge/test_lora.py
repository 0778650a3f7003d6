"""Exact LoRA soups: the merged adapter's product equals the weighted mean of the
adapters' products (float64 check), whatever their ranks and naming; compression by
truncated SVD; baking into a base; add/remove recompute LoRA soups."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastsoup as fs
from fastsoup.merge import MergeError, cli, soup_add, soup_remove

OUT, IN = 6, 5


def _adapter(path, rank, seed, style="peft", alpha=None, conv=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    down, up = ("lora_A", "lora_B") if style == "peft" else ("lora_down", "lora_up")
    st = {}
    for mod in ("unet.blk.to_q", "unet.blk.to_k"):
        a_shape = (rank, IN, 3, 3) if conv and mod.endswith("to_k") else (rank, IN)
        b_shape = (OUT, rank, 1, 1) if conv and mod.endswith("to_k") else (OUT, rank)
        st[f"{mod}.{down}.weight"] = torch.randn(a_shape, generator=g).to(dtype)
        st[f"{mod}.{up}.weight"] = torch.randn(b_shape, generator=g).to(dtype)
        if alpha is not None:
            st[f"{mod}.alpha"] = torch.tensor(float(alpha))
    save_file(st, path)
    return st


def _delta(st, mod, style="peft"):
    """s · B·A in float64, flattened to [out, in·k·k]."""
    down, up = ("lora_A", "lora_B") if style == "peft" else ("lora_down", "lora_up")
    a = st[f"{mod}.{down}.weight"].double()
    b = st[f"{mod}.{up}.weight"].double()
    r = a.shape[0]
    s = float(st[f"{mod}.alpha"]) / r if f"{mod}.alpha" in st else 1.0
    return s * (b.reshape(b.shape[0], r) @ a.reshape(r, -1))


@pytest.mark.parametrize("style,alpha,conv", [("peft", None, False), ("kohya", 8.0, True)])
def test_lora_soup_product_is_the_weighted_mean_of_products(tmp_path, style, alpha, conv):
    ranks, weights = (2, 3, 4), [0.5, 0.3, 0.2]
    paths = [str(tmp_path / f"l{i}.safetensors") for i in range(3)]
    states = [_adapter(p, r, i, style, alpha, conv) for i, (p, r) in enumerate(zip(paths, ranks))]
    out = str(tmp_path / "soup.safetensors")
    rep = fs.merge(paths, out, weights, quiet=True)
    got = load_file(out)
    assert sorted(got) == sorted(states[0])
    for mod in ("unet.blk.to_q", "unet.blk.to_k"):
        expected = sum(w * _delta(st, mod, style) for w, st in zip(weights, states))
        np.testing.assert_allclose(_delta(got, mod, style).numpy(), expected.numpy(),
                                   rtol=1e-6, atol=1e-6)
        down = "lora_A" if style == "peft" else "lora_down"
        assert got[f"{mod}.{down}.weight"].shape[0] == sum(ranks)
        if alpha is not None:
            assert float(got[f"{mod}.alpha"]) == sum(ranks)  # scale 1
    assert rep.manifest["lora"] == {"mode": "concat", "modules": 2}


def test_equal_rank_factors_are_not_averaged_one_by_one(tmp_path):
    """The old behaviour (mean of A, mean of B) is 70% off the mean of products."""
    paths = [str(tmp_path / f"l{i}.safetensors") for i in range(2)]
    states = [_adapter(p, 4, i) for i, p in enumerate(paths)]
    out = str(tmp_path / "soup.safetensors")
    fs.merge(paths, out, quiet=True)
    got = load_file(out)
    mod = "unet.blk.to_q"
    expected = 0.5 * _delta(states[0], mod) + 0.5 * _delta(states[1], mod)
    np.testing.assert_allclose(_delta(got, mod).numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_bf16_adapters_keep_their_dtype(tmp_path):
    paths = [str(tmp_path / f"l{i}.safetensors") for i in range(2)]
    states = [_adapter(p, 2, i, dtype=torch.bfloat16) for i, p in enumerate(paths)]
    out = str(tmp_path / "soup.safetensors")
    fs.merge(paths, out, quiet=True)
    got = load_file(out)
    assert got["unet.blk.to_q.lora_A.weight"].dtype == torch.bfloat16
    mod = "unet.blk.to_q"
    expected = 0.5 * _delta(states[0], mod) + 0.5 * _delta(states[1], mod)
    np.testing.assert_allclose(_delta(got, mod).numpy(), expected.numpy(), rtol=2e-2, atol=2e-2)


def test_compressed_soup_is_the_best_rank_k_approximation(tmp_path):
    paths = [str(tmp_path / f"l{i}.safetensors") for i in range(3)]
    states = [_adapter(p, 2, i, alpha=4.0, style="kohya") for i, p in enumerate(paths)]
    out = str(tmp_path / "soup.safetensors")
    rep = fs.merge(paths, out, lora_rank=3, quiet=True)
    got = load_file(out)
    worst = 0.0
    for mod in ("unet.blk.to_q", "unet.blk.to_k"):
        full = sum(_delta(st, mod, "kohya") for st in states) / 3
        u, s, vt = np.linalg.svd(full.numpy())
        best = (u[:, :3] * s[:3]) @ vt[:3]
        assert got[f"{mod}.lora_down.weight"].shape[0] == 3 and float(got[f"{mod}.alpha"]) == 3
        np.testing.assert_allclose(_delta(got, mod, "kohya").numpy(), best, rtol=1e-5, atol=1e-5)
        worst = max(worst, np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum()))
    lora = rep.manifest["lora"]
    assert lora["mode"] == "compressed" and lora["rank"] == 3
    assert float(lora["relative_error_max"]) == pytest.approx(worst, rel=1e-5)


def test_bake_into_a_base_adds_the_mean_delta(tmp_path):
    paths = [str(tmp_path / f"l{i}.safetensors") for i in range(2)]
    states = [_adapter(p, r, i, conv=True) for i, (p, r) in enumerate(zip(paths, (2, 3)))]
    g = torch.Generator().manual_seed(9)
    base = {"blk.to_q.weight": torch.randn(OUT, IN, generator=g),
            "blk.to_k.weight": torch.randn(OUT, IN, 3, 3, generator=g),
            "blk.norm.weight": torch.randn(OUT, generator=g)}
    bp = str(tmp_path / "base.safetensors")
    save_file(base, bp)
    out = str(tmp_path / "baked.safetensors")
    rep = fs.merge(paths, out, base=bp, quiet=True)
    got = load_file(out)
    assert torch.equal(got["blk.norm.weight"], base["blk.norm.weight"])
    for mod, key in (("unet.blk.to_q", "blk.to_q.weight"), ("unet.blk.to_k", "blk.to_k.weight")):
        delta = sum(0.5 * _delta(st, mod) for st in states)
        expected = base[key].double().reshape(OUT, -1) + delta
        np.testing.assert_allclose(got[key].double().reshape(OUT, -1).numpy(), expected.numpy(),
                                   rtol=1e-6, atol=1e-6)
    assert rep.manifest["lora"]["mode"] == "bake" and rep.manifest["base"] is not None


def test_add_and_remove_recompute_a_lora_soup(tmp_path):
    paths = [str(tmp_path / f"l{i}.safetensors") for i in range(3)]
    for i, (p, r) in enumerate(zip(paths, (2, 3, 1))):
        _adapter(p, r, i)
    soup = str(tmp_path / "soup.safetensors")
    assert cli.main(paths[:2] + ["-o", soup, "-q"]) == 0
    added, direct = str(tmp_path / "added.safetensors"), str(tmp_path / "direct.safetensors")
    soup_add(soup, paths[2], added, quiet=True)
    fs.merge(paths, direct, quiet=True)
    a, d = load_file(added), load_file(direct)
    assert sorted(a) == sorted(d) and all(torch.equal(a[k], d[k]) for k in d)
    removed, pair = str(tmp_path / "removed.safetensors"), str(tmp_path / "pair.safetensors")
    soup_remove(added, paths[1], removed, quiet=True)
    fs.merge([paths[0], paths[2]], pair, quiet=True)
    r, p = load_file(removed), load_file(pair)
    assert all(torch.equal(r[k], p[k]) for k in p)
    assert r["unet.blk.to_q.lora_A.weight"].shape[0] == 3


def test_compressed_soup_add_keeps_the_rank(tmp_path):
    paths = [str(tmp_path / f"l{i}.safetensors") for i in range(3)]
    for i, p in enumerate(paths):
        _adapter(p, 2, i)
    soup = str(tmp_path / "soup.safetensors")
    fs.merge(paths[:2], soup, lora_rank=2, quiet=True)
    added = str(tmp_path / "added.safetensors")
    rep = soup_add(soup, paths[2], added, quiet=True)
    assert load_file(added)["unet.blk.to_q.lora_A.weight"].shape[0] == 2
    assert rep.manifest["lora"]["rank"] == 2


def test_lora_problems_are_reported(tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    _adapter(a, 2, 0)
    save_file({"unet.blk.to_q.lora_A.weight": torch.ones(2, IN)}, b)
    with pytest.raises(MergeError, match="incomplete LoRA pairs"):
        fs.merge([a, b], str(tmp_path / "o.safetensors"), quiet=True)
    c = str(tmp_path / "c.safetensors")
    save_file({"x.weight": torch.ones(3)}, c)
    with pytest.raises(MergeError, match="hold no LoRA factors"):
        fs.merge([a, c], str(tmp_path / "o.safetensors"), quiet=True)
    with pytest.raises(MergeError, match="adapt no tensor of the base"):
        fs.merge([a], str(tmp_path / "o.safetensors"), base=c, quiet=True)
    d = str(tmp_path / "d.safetensors")
    save_file({"x.weight": torch.zeros(3)}, d)
    with pytest.raises(MergeError, match="not LoRA adapters"):
        fs.merge([c, d], str(tmp_path / "o.safetensors"), lora_rank=2, quiet=True)


def test_adapters_are_found_among_inputs_sharing_one_header(tmp_path):
    """Inputs parsed from one shared header are scanned for LoRA names once; an adapter
    after them, or among them, is still found."""
    from fastsoup.io.safetensors import shared_headers
    from fastsoup.merge import formats, lora

    plain = {"w.weight": torch.ones(4, 4)}
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"full{i}.safetensors"))
        save_file(plain, paths[-1])
    for name, seed in (("a", 0), ("b", 1)):
        paths.append(str(tmp_path / f"{name}.safetensors"))
        _adapter(paths[-1], 2, seed=seed)
    with shared_headers():
        lays = [formats.resolve(p) for p in paths]
    full, adapters = lays[:3], lays[3:]
    assert full[0].components[""].infos_of_file is full[2].components[""].infos_of_file
    assert adapters[0].components[""].infos_of_file is adapters[1].components[""].infos_of_file
    assert not lora.any_lora(full)
    assert lora.any_lora(full + adapters[:1]) and lora.any_lora(adapters)
    assert lora.any_lora(adapters[1:] + full)
