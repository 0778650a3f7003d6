"""Inputs that change under a running merge, digests the manifest can vouch for, commits
that never replace what they were not asked to, and side files that stay inside their
input (issue 10: data integrity and security)."""
import hashlib
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import fastsoup as fs
from fastsoup.merge import MergeError, hashing, soup_add, soup_remove
from fastsoup.kernels import cpu as cpu_kernels
from tests.helpers import (digest_bytes_fed, leftovers, load_any, make_state, save_diffusers,
                           save_file_layout)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def big_pair(tmp_path, n=1 << 16):
    a = save_file_layout(str(tmp_path / "a.safetensors"), {"w": torch.randn(n), "v": torch.randn(n)})
    b = save_file_layout(str(tmp_path / "b.safetensors"), {"w": torch.randn(n), "v": torch.randn(n)})
    return a, b


def test_input_truncated_inside_a_window_is_exit_1_not_sigbus(tmp_path):
    """The input is truncated while the kernel runs (after every size check the old
    design made): a mapped read would be SIGBUS; the pread design reports the input."""
    a, b = big_pair(tmp_path)
    out = tmp_path / "out.safetensors"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from fastsoup.kernels import cpu
        from fastsoup.merge import cli
        real, n = cpu.weighted_sum, [0]
        def hooked(*a, **k):
            n[0] += 1
            if n[0] == 2:
                os.truncate({b!r}, 4096)
            return real(*a, **k)
        cpu.weighted_sum = hooked
        sys.exit(cli.main([{a!r}, {b!r}, "-o", {str(out)!r}, "--memory", "64KiB", "-q"]))
    """)
    env = dict(os.environ, FASTSOUP_HASH_CACHE="0")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "b.safetensors" in proc.stderr and "truncated while merging" in proc.stderr
    assert not out.exists() and not leftovers(tmp_path)


def _rewrite_in_place_keeping_mtime(path):
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size - 64)
        f.write(os.urandom(64))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(path) == st.st_size


def test_same_size_rewrite_during_the_merge_is_never_committed(tmp_path, monkeypatch):
    a, b = big_pair(tmp_path)
    real, n = cpu_kernels.weighted_sum, [0]

    def hooked(*args, **kw):
        n[0] += 1
        if n[0] == 2:
            _rewrite_in_place_keeping_mtime(b)
        return real(*args, **kw)

    monkeypatch.setattr(cpu_kernels, "weighted_sum", hooked)
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeError, match=r"b\.safetensors changed while merging .*ctime_ns"):
        fs.merge([a, b], out, memory="64KiB", quiet=True)
    assert not out.exists() and not leftovers(tmp_path)


def test_manifest_digest_is_computed_from_the_merged_bytes(tmp_path, monkeypatch):
    """In-order inputs are digested from the engine's own reads (no second read of the
    file); an input serialised in another tensor order is hashed by a second read; both
    digests equal the files' sha256."""
    a, _ = big_pair(tmp_path)
    # b holds the same keys in the other order in the file
    from safetensors.torch import save_file
    state = {"w": torch.randn(1 << 16), "v": torch.randn(1 << 16)}
    b = str(tmp_path / "b.safetensors")
    save_file(state, b)
    fed = digest_bytes_fed(monkeypatch)
    monkeypatch.setattr(hashing, "file_sha256", lambda *a, **k: pytest.fail("re-read"))
    rep = fs.merge([a, b], tmp_path / "o.safetensors", memory="64KiB", quiet=True)
    for entry, path in zip(rep.manifest["constituents"], (a, b)):
        want = hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert entry["files"][0]["sha256"] == want
    assert fed[os.path.abspath(a)] == 2 * (1 << 16) * 4  # every tensor byte came from the merge


def test_out_of_order_inputs_are_hashed_by_a_second_read(tmp_path):
    from fastsoup.io.safetensors import encode_header, layout_header

    a, _ = big_pair(tmp_path, 1 << 12)
    w, v = torch.randn(1 << 12), torch.randn(1 << 12)
    obj, _ = layout_header([("w", "F32", (1 << 12,), 1 << 14), ("v", "F32", (1 << 12,), 1 << 14)], None)
    b = tmp_path / "b.safetensors"  # w first in the file: out of a's (v, w) order
    b.write_bytes(encode_header(obj) + w.numpy().tobytes() + v.numpy().tobytes())
    rep = fs.merge([a, str(b)], tmp_path / "o.safetensors", memory="16KiB", quiet=True)
    got = rep.manifest["constituents"][1]["files"][0]["sha256"]
    assert got == hashlib.sha256(b.read_bytes()).hexdigest()
    out = load_any(str(tmp_path / "o.safetensors"))
    assert torch.allclose(out["w"], (load_any(a)["w"] + w) / 2)


def test_digest_cache_notices_a_same_size_change_with_the_mtime_restored(tmp_path):
    a, b = big_pair(tmp_path, 1 << 10)
    c = save_file_layout(str(tmp_path / "c.safetensors"), {"w": torch.randn(1 << 10),
                                                           "v": torch.randn(1 << 10)})
    soup = tmp_path / "soup.safetensors"
    fs.merge([a, b], soup, quiet=True)  # digests now cached
    _rewrite_in_place_keeping_mtime(a)
    with pytest.raises(MergeError, match="sha256 differs"):
        soup_add(soup, c, tmp_path / "soup2.safetensors", quiet=True)
    assert not (tmp_path / "soup2.safetensors").exists()


@pytest.mark.parametrize("layout", ["file", "diffusers"])
def test_two_merges_to_the_same_new_output_cannot_both_succeed(tmp_path, monkeypatch, layout):
    if layout == "file":
        ins = list(big_pair(tmp_path, 1 << 10))
        out = tmp_path / "out.safetensors"
    else:
        ins = [save_diffusers(str(tmp_path / f"d{i}"), {"unet": make_state(i)}) for i in range(2)]
        out = tmp_path / "out"
    real, n = cpu_kernels.weighted_sum, [0]

    def hooked(*args, **kw):
        n[0] += 1
        if n[0] == 1:  # another merge writes the same output meanwhile
            fs.merge(ins, out, [2, 1], quiet=True, hash="none")
        return real(*args, **kw)

    monkeypatch.setattr(cpu_kernels, "weighted_sum", hooked)
    with pytest.raises(MergeError, match="appeared while merging"):
        fs.merge(ins, out, quiet=True, hash="none")
    monkeypatch.undo()
    rep = fs.merge(ins, tmp_path / ("check" + out.suffix), [2, 1], quiet=True, hash="none")
    assert load_any(str(out)).keys() == load_any(rep.output).keys()
    for k, t in load_any(rep.output).items():
        assert torch.equal(load_any(str(out))[k], t), k  # the first commit survived
    assert not leftovers(tmp_path)


def test_side_files_linking_outside_the_input_are_not_copied(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:hash")
    roots = [save_diffusers(str(tmp_path / f"d{i}"), {"unet": make_state(i)}) for i in range(2)]
    os.symlink(secret, os.path.join(roots[0], "tokenizer", "merges.txt"))
    private = os.path.join(roots[0], "tokenizer", "private.json")
    with open(private, "w") as f:
        f.write("{}")
    os.chmod(private, 0o600)
    out = tmp_path / "soup"
    rep = fs.merge(roots, out, quiet=True, hash="none")
    assert not (out / "tokenizer" / "merges.txt").exists()
    assert any("merges.txt" in w and "outside" in w for w in rep.warnings)
    assert (out / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert stat.S_IMODE(os.stat(out / "tokenizer" / "private.json").st_mode) == 0o600


def test_long_output_names_fit_their_temporaries(tmp_path):
    a, b = big_pair(tmp_path, 64)
    name = "s" * (255 - len(".safetensors")) + ".safetensors"
    rep = fs.merge([a, b], tmp_path / name, quiet=True)
    assert os.path.isfile(tmp_path / name) and not leftovers(tmp_path)
    assert any("no manifest sidecar" in w for w in rep.warnings)  # 257 bytes: cannot exist
    shorter = "t" * 230 + ".safetensors"
    fs.merge([a, b], tmp_path / shorter, quiet=True)
    assert os.path.isfile(tmp_path / ("t" * 230 + ".fastsoup.json"))
    roots = [save_diffusers(str(tmp_path / f"d{i}"), {"unet": make_state(i)}) for i in range(2)]
    fs.merge(roots, tmp_path / ("d" * 255), quiet=True, hash="none")
    assert os.path.isfile(tmp_path / ("d" * 255) / "fastsoup.json")


def test_an_output_header_safetensors_would_refuse_is_never_written(tmp_path, monkeypatch):
    from fastsoup.io import safetensors as st

    a, b = big_pair(tmp_path, 64)
    monkeypatch.setattr(st, "MAX_HEADER_BYTES", 4000)
    out = tmp_path / "o.safetensors"
    with pytest.raises(MergeError, match="more than the 4000 bytes safetensors readers accept"):
        fs.merge([a, b], out, quiet=True, metadata={"notes": "x" * 5000})
    assert not out.exists() and not leftovers(tmp_path)


def test_remove_matches_a_renamed_copy_or_a_symlink_by_content(tmp_path):
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(3)]
    soup = tmp_path / "soup.safetensors"
    fs.merge(paths, soup, quiet=True)
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(open(paths[1], "rb").read())
    rep = soup_remove(soup, copy, tmp_path / "r1.safetensors", quiet=True)
    assert [c["path"] for c in rep.manifest["constituents"]] == [paths[0], paths[2]]
    link = tmp_path / "link.safetensors"
    os.symlink(paths[2], link)
    rep = soup_remove(soup, link, tmp_path / "r2.safetensors", quiet=True)
    assert [c["path"] for c in rep.manifest["constituents"]] == [paths[0], paths[1]]


def test_add_and_remove_find_moved_constituents(tmp_path, capsys):
    from fastsoup.merge import cli

    src = tmp_path / "models"
    src.mkdir()
    paths = [save_file_layout(str(src / f"m{i}.safetensors"), make_state(i)) for i in range(3)]
    soup = tmp_path / "soup.safetensors"
    fs.merge(paths, soup, quiet=True)
    moved = tmp_path / "moved"
    os.rename(src, moved)
    with pytest.raises(MergeError, match=r"no longer exists.*search=\['DIR'\]"):
        soup_remove(soup, moved / "m1.safetensors", tmp_path / "x.safetensors", quiet=True)
    rep = soup_remove(soup, moved / "m1.safetensors", tmp_path / "r.safetensors", quiet=True,
                      search=[moved])
    assert [c["path"] for c in rep.manifest["constituents"]] == \
        [str(moved / "m0.safetensors"), str(moved / "m2.safetensors")]
    assert cli.main(["add", str(soup), str(moved / "m1.safetensors"), "-o",
                     str(tmp_path / "a.safetensors"), "--remap", f"{src}={moved}", "-q"]) == 1
    assert "is the same as" in capsys.readouterr().err  # found (m1 is already in the soup)
    # a wrong file of the same name is refused by its size/hash
    os.makedirs(tmp_path / "other")
    save_file_layout(str(tmp_path / "other" / "m0.safetensors"), make_state(9))
    code = cli.main(["remove", str(soup), str(moved / "m1.safetensors"), "-o",
                     str(tmp_path / "w.safetensors"), "--search", str(tmp_path / "other"),
                     "--search", str(moved), "-q"])
    assert code == 1 and "sha256 differs" in capsys.readouterr().err
