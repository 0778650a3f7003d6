"""Committing the output: the final path always holds the old or the new output, problems
after the commit are reported as such, and outputs that are not fastsoup's are never
replaced."""
import errno
import json
import os
import signal

import pytest
from safetensors import safe_open

import fastsoup as fs
from fastsoup.io import atomic
from fastsoup.merge import MergeError, api
from fastsoup.merge import output as merge_output
from tests.helpers import leftovers, run_quiet, make_state, save_file_layout, save_sharded


run = run_quiet


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """The tests below send SIGINT as a terminal's Ctrl-C does: Python's default handler
    turns it into KeyboardInterrupt. A process started with SIGINT ignored (a background
    job of a non-interactive shell) would keep ignoring it, and the signal would be lost."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def sharded(tmp_path):
    a = save_sharded(str(tmp_path / "a"), make_state(0), 2)
    b = save_sharded(str(tmp_path / "b"), make_state(1), 2)
    out = tmp_path / "out"
    fs.merge([a, b], out, hash="none", quiet=True)
    (out / "marker-of-old-output").write_text("old")
    return tmp_path, a, b, out


def test_directory_replace_uses_an_atomic_exchange(sharded, monkeypatch):
    tmp, a, b, out = sharded
    if not atomic._renameat2():
        pytest.skip("no renameat2 here")
    probe_a, probe_b = tmp / "probe_a", tmp / "probe_b"
    probe_a.mkdir()
    probe_b.mkdir()
    if not atomic.exchange(str(probe_a), str(probe_b)):
        pytest.skip("this filesystem cannot exchange")

    def no_rename(*a, **k):
        raise AssertionError("two renames used instead of an exchange")

    monkeypatch.setattr(atomic.os, "rename", no_rename)
    fs.merge([a, b], out, weights=[1, 3], hash="none", quiet=True, overwrite=True)
    assert not (out / "marker-of-old-output").exists() and (out / "fastsoup.json").exists()
    assert not leftovers(tmp)


def test_signal_between_the_two_renames_is_deferred(sharded, monkeypatch, capsys):
    """Fallback without renameat2: SIGINT between the renames arrives after both."""
    tmp, a, b, out = sharded
    monkeypatch.setattr(atomic, "exchange", lambda x, y: False)
    real_rename = os.rename
    calls = []

    def rename_then_signal(src, dst):
        real_rename(src, dst)
        calls.append((src, dst))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(atomic.os, "rename", rename_then_signal)
    code, err = run([a, b, "-o", out, "--overwrite"], capsys)
    assert out.is_dir() and (out / "fastsoup.json").exists()
    assert not (out / "marker-of-old-output").exists()
    assert "nothing was written" not in err
    assert code == 0 and "output written" in err


def test_fallback_second_rename_failure_restores_the_old_output(sharded, monkeypatch):
    tmp, a, b, out = sharded
    monkeypatch.setattr(atomic, "exchange", lambda x, y: False)
    real_rename = os.rename
    calls = []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.EIO, "injected")
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", flaky)
    with pytest.raises(OSError):
        fs.merge([a, b], out, weights=[1, 3], hash="none", quiet=True, overwrite=True)
    assert (out / "marker-of-old-output").exists() and not leftovers(tmp)


def test_interrupted_old_tree_removal_is_reported_as_written(sharded, monkeypatch, capsys):
    tmp, a, b, out = sharded

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_output.AtomicOutput, "remove_old", interrupted)
    code, err = run([a, b, "-o", out, "--overwrite"], capsys)
    assert code == 0
    assert "output written; cleanup of the previous output failed" in err
    assert "nothing was written" not in err
    assert not (out / "marker-of-old-output").exists() and (out / "fastsoup.json").exists()


def test_sidecar_rename_failure_is_a_warning(tmp_path, monkeypatch):
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(2)]
    out = tmp_path / "soup.safetensors"
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".fastsoup.json"):
            raise OSError(errno.ENOSPC, "injected")
        return real_replace(src, dst)

    monkeypatch.setattr(api.os, "replace", replace)
    report = fs.merge(paths, out, hash="none", quiet=True)
    assert out.exists() and not (tmp_path / "soup.fastsoup.json").exists()
    assert any("sidecar" in w and "output written" in w for w in report.warnings)
    assert not leftovers(tmp_path)


def test_overwrite_refuses_a_directory_that_is_not_a_fastsoup_output(tmp_path, capsys):
    a = save_sharded(str(tmp_path / "a"), make_state(0), 2)
    b = save_sharded(str(tmp_path / "b"), make_state(1), 2)
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_text("precious")
    code, err = run([a, b, "-o", out, "--overwrite"], capsys)
    assert code == 1 and "not a previous fastsoup output" in err
    assert (out / "holiday.jpg").read_text() == "precious" and not leftovers(tmp_path)


def test_bad_hash_option_leaves_no_temporary(tmp_path):
    a = save_sharded(str(tmp_path / "a"), make_state(0), 2)
    b = save_sharded(str(tmp_path / "b"), make_state(1), 2)
    with pytest.raises(MergeError, match="hash"):
        fs.merge([a, b], tmp_path / "out", hash="md5", quiet=True)
    assert not leftovers(tmp_path) and not (tmp_path / "out").exists()


def test_fsync_dir_raises_real_errors(tmp_path, monkeypatch):
    def fail(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(atomic.os, "fsync", fail(errno.EINVAL))
    atomic.fsync_dir(str(tmp_path))  # a filesystem that cannot fsync directories
    monkeypatch.setattr(atomic.os, "fsync", fail(errno.EIO))
    with pytest.raises(OSError):
        atomic.fsync_dir(str(tmp_path))


def test_output_metadata_is_the_soups_own(tmp_path):
    """format pt, the manifest, the entries every input shares, and the user's; never
    input 1's title (apps would label the soup as model A)."""
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i),
                              metadata={"format": "pt", "modelspec.title": "AB"[i],
                                        "modelspec.architecture": "sd-v1"}) for i in range(2)]
    out = str(tmp_path / "soup.safetensors")
    fs.merge(paths, out, hash="none", quiet=True, metadata={"modelspec.author": "me"})
    with safe_open(out, "pt") as f:
        md = f.metadata()
    assert md["format"] == "pt" and "modelspec.title" not in md
    assert md["modelspec.architecture"] == "sd-v1" and md["modelspec.author"] == "me"
    with pytest.raises(fs.MergeError, match="written by fastsoup itself"):
        fs.merge(paths, str(tmp_path / "x.safetensors"), quiet=True, metadata={"format": "np"})
    assert json.loads(md["fastsoup"])["format"] == "fastsoup.merge/1"
    plain = [save_file_layout(str(tmp_path / f"p{i}.safetensors"), make_state(i)) for i in range(2)]
    out2 = str(tmp_path / "soup2.safetensors")
    fs.merge(plain, out2, hash="none", quiet=True)
    with safe_open(out2, "pt") as f:
        assert f.metadata()["format"] == "pt"


def test_embedded_manifest_wins_over_a_stale_sidecar(tmp_path):
    from fastsoup.merge import manifest

    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(3)]
    out = tmp_path / "soup.safetensors"
    fs.merge(paths[:2], out, hash="none", quiet=True)
    stale_src = tmp_path / "old.safetensors"
    fs.merge(paths, stale_src, hash="none", quiet=True)
    # a stale sidecar: e.g. the run that wrote the data could not replace it
    os.replace(tmp_path / "old.fastsoup.json", tmp_path / "soup.fastsoup.json")
    with pytest.warns(UserWarning, match="stale"):
        m = manifest.read(str(out))
    assert [c["path"] for c in m["constituents"]] == paths[:2]
    os.unlink(tmp_path / "soup.fastsoup.json")
    assert manifest.read(str(out)) == m


def test_signal_during_the_exchange_is_reported_as_written(sharded, monkeypatch, capsys):
    tmp, a, b, out = sharded
    real = atomic.exchange

    def exchange_then_signal(x, y):
        done = real(x, y)
        os.kill(os.getpid(), signal.SIGINT)
        return done

    monkeypatch.setattr(atomic, "exchange", exchange_then_signal)
    code, err = run([a, b, "-o", out, "--overwrite"], capsys)
    assert out.is_dir() and (out / "fastsoup.json").exists()
    assert "nothing was written" not in err and code == 0 and "output written" in err
    assert not leftovers(tmp)


def test_signal_right_after_a_file_replace_is_reported_as_written(tmp_path, monkeypatch, capsys):
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(2)]
    out = tmp_path / "soup.safetensors"
    out.write_bytes(b"old")
    real = os.replace

    def replace_then_signal(src, dst):
        real(src, dst)
        if str(dst) == str(out):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(atomic.os, "replace", replace_then_signal)
    code, err = run([*paths, "-o", out, "--overwrite"], capsys)
    assert code == 0 and "nothing was written" not in err and "output written" in err
    assert out.read_bytes() != b"old" and (tmp_path / "soup.fastsoup.json").exists()
    assert not leftovers(tmp_path)
