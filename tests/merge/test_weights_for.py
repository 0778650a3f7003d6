"""Per-key weights (``weights_for`` / ``--weights-for``), base fingerprints and Hub ids."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastsoup as fs
from fastsoup.merge import MergeError, cli, soup_add, soup_remove


def _inputs(tmp_path, n=3, metadata=None):
    g = torch.Generator().manual_seed(0)
    paths, states = [], []
    for i in range(n):
        st = {"unet.down.0.w": torch.randn(4, 3, generator=g),
              "unet.mid.attn.w": torch.randn(5, generator=g),
              "te.emb": torch.randn(2, 2, generator=g)}
        p = str(tmp_path / f"m{i}.safetensors")
        save_file(st, p, metadata=(metadata[i] if metadata else None))
        paths.append(p)
        states.append(st)
    return paths, states


def _mean(states, ws, k):
    ws = np.asarray(ws, np.float64) / sum(ws)
    return sum(w * s[k].double().numpy() for w, s in zip(ws, states))


def test_first_matching_pattern_wins_and_default_for_the_rest(tmp_path):
    paths, states = _inputs(tmp_path)
    out = str(tmp_path / "o.safetensors")
    rep = fs.merge(paths, out, [1, 1, 1], quiet=True,
                   weights_for={"unet.mid.*": [1, 0, 0], "unet.*": [0, 1, 1]})
    got = load_file(out)
    assert torch.equal(got["unet.mid.attn.w"], states[0]["unet.mid.attn.w"])
    np.testing.assert_allclose(got["unet.down.0.w"].double(), _mean(states, [0, 1, 1], "unet.down.0.w"),
                               rtol=1e-6)
    np.testing.assert_allclose(got["te.emb"].double(), _mean(states, [1, 1, 1], "te.emb"), rtol=1e-6)
    assert rep.manifest["weights_for"] == [{"pattern": "unet.mid.*", "weights": [1.0, 0.0, 0.0]},
                                           {"pattern": "unet.*", "weights": [0.0, 1.0, 1.0]}]


def test_cli_weights_for_and_validation(tmp_path):
    paths, states = _inputs(tmp_path)
    out = str(tmp_path / "o.safetensors")
    assert cli.main(paths + ["--weights-for", "te.*=0,0,1", "-o", out, "-q"]) == 0
    assert torch.equal(load_file(out)["te.emb"], states[2]["te.emb"])
    with pytest.raises(MergeError, match="match(es)? no tensor"):
        fs.merge(paths, str(tmp_path / "x.safetensors"), weights_for={"vae.*": [1, 1, 1]}, quiet=True)
    with pytest.raises(MergeError, match="2 weights for 3 inputs"):
        fs.merge(paths, str(tmp_path / "x.safetensors"), weights_for={"te.*": [1, 1]}, quiet=True)
    assert cli.main(paths + ["--weights-for", "nothing=1,1,1", "-o", str(tmp_path / "y.safetensors")]) == 1


def test_add_and_remove_honour_per_key_weights(tmp_path):
    paths, states = _inputs(tmp_path, 3)
    soup = str(tmp_path / "soup.safetensors")
    fs.merge(paths[:2], soup, [1, 1], weights_for={"te.*": [2, 1]}, quiet=True)
    added = str(tmp_path / "added.safetensors")
    soup_add(soup, paths[2], added, weight=1.0, quiet=True)
    direct = str(tmp_path / "direct.safetensors")
    fs.merge(paths, direct, [1, 1, 1], weights_for={"te.*": [2, 1, 1]}, quiet=True)
    a, d = load_file(added), load_file(direct)
    assert all(torch.equal(a[k], d[k]) for k in d)
    removed = str(tmp_path / "removed.safetensors")
    soup_remove(added, paths[0], removed, quiet=True)
    pair = str(tmp_path / "pair.safetensors")
    fs.merge(paths[1:], pair, [1, 1], weights_for={"te.*": [1, 1]}, quiet=True)
    r, p = load_file(removed), load_file(pair)
    assert all(torch.equal(r[k], p[k]) for k in p)


# ------------------------------------------------------------------ base fingerprints
def test_inputs_declaring_different_bases_are_refused_unless_forced(tmp_path):
    paths, _ = _inputs(tmp_path, 2, metadata=[{"ss_sd_model_hash": "aaaa"},
                                               {"ss_sd_model_hash": "bbbb"}])
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(MergeError, match="different base models"):
        fs.merge(paths, out, quiet=True)
    rep = fs.merge(paths, out, force=True, quiet=True)
    assert any("different base models" in w for w in rep.warnings)


def test_agreed_fingerprint_is_recorded_and_soups_declare_their_base(tmp_path):
    paths, states = _inputs(tmp_path, 3, metadata=[{"ss_sd_model_hash": "aaaa"}] * 3)
    soup = str(tmp_path / "soup.safetensors")
    rep = fs.merge(paths[:2], soup, quiet=True)
    assert rep.manifest["base_fingerprint"] == {"kohya": "aaaa"}
    # a task-arithmetic soup declares its base by sha256; mixing it with a soup of another
    # base is refused
    base2 = str(tmp_path / "b2.safetensors")
    save_file({k: v * 0 for k, v in states[0].items()}, base2)
    ta = str(tmp_path / "ta.safetensors")
    fs.merge(paths[:1], ta, base=paths[2], quiet=True)
    tb = str(tmp_path / "tb.safetensors")
    fs.merge(paths[1:2], tb, base=base2, quiet=True)
    with pytest.raises(MergeError, match="sha256"):
        fs.merge([ta, tb], str(tmp_path / "x.safetensors"), quiet=True)


# ---------------------------------------------------------------------------- Hub ids
def _fake_hub_cache(root, repo, files, revision="main", commit="0123456789abcdef0123456789abcdef01234567"):
    """A folder laid out like the Hugging Face cache (blobs, refs, snapshots)."""
    folder = os.path.join(root, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", revision), "w") as f:
        f.write(commit)
    for rel, writer in files.items():
        path = os.path.join(folder, "snapshots", commit, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        writer(path)
    return os.path.join(folder, "snapshots", commit)


def test_hub_ids_resolve_from_the_local_cache_offline(tmp_path, monkeypatch):
    # huggingface_hub imported before the environment names the cache (as in a session
    # where diffusers was imported first): the cache must still be found
    pytest.importorskip("huggingface_hub")
    paths, states = _inputs(tmp_path, 2)
    cache = str(tmp_path / "hub")
    snaps = []
    for i, repo in enumerate(("org/a", "org/b")):
        snaps.append(_fake_hub_cache(cache, repo, {
            "unet/diffusion_pytorch_model.safetensors": lambda p, i=i: save_file(states[i], p),
            "unet/config.json": lambda p: open(p, "w").write("{}")}))
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "o")
    rep = fs.merge(["org/a/unet", "hf://org/b/unet@main"], out, quiet=True)
    got = load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    np.testing.assert_allclose(got["te.emb"].double(), _mean(states, [1, 1], "te.emb"), rtol=1e-6)
    assert rep.manifest["constituents"][0]["path"] == os.path.join(snaps[0], "unet")
    with pytest.raises(MergeError, match="local Hugging Face cache"):
        fs.merge(["org/missing", "org/a/unet"], str(tmp_path / "p"), quiet=True)


def test_importing_fastsoup_merge_does_not_import_huggingface_hub():
    import subprocess
    import sys

    code = ("import sys, fastsoup, fastsoup.merge.api, fastsoup.merge.cli; "
            "print('huggingface_hub' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
