"""Streaming by slices (the CPU stream): each worker reads a slice of every input, sums
it while it is in cache and hashes it in its file's turn. Its output and digests equal
the windowed stream's, bit for bit, and an error in any slice ends the merge with that
error and nothing written."""
import hashlib
import os
import threading

import pytest
import torch

import fastsoup as fs
from fastsoup.merge import MergeError, engine, hashing
from fastsoup.merge.mmap import InputFiles

from tests.helpers import (digest_bytes_fed, leftovers, load_any, make_state, save_file_layout,
                           save_sharded)

SPEC = {
    "emb.weight": ((300, 64), torch.bfloat16),
    "big.weight": ((70000,), torch.bfloat16),
    "norm.weight": ((64,), torch.float32),
    "half.weight": ((33, 7), torch.float16),
    "position_ids": ((1, 77), torch.int64),
    "empty.weight": ((0, 4), torch.bfloat16),
}


def _spy(monkeypatch):
    calls = []
    real = engine._stream_sliced
    monkeypatch.setattr(engine, "_stream_sliced", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case", ["plain", "small-memory", "base", "fp64", "sharded", "cached",
                                  "first"])
def test_sliced_stream_equals_the_windowed_stream(tmp_path, monkeypatch, case):
    states = [make_state(40 + i, SPEC) for i in range(3)]
    for s in states:  # integers are copied: equal in every input
        s["position_ids"] = torch.arange(77).reshape(1, 77)
    if case == "sharded":
        paths = [save_sharded(str(tmp_path / f"m{i}"), s, 3) for i, s in enumerate(states)]
    else:
        paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), s)
                 for i, s in enumerate(states)]
    kw = {"quiet": True, "hash": "none"}
    if case == "small-memory":
        kw["memory"] = "64KiB"  # chunks and many staging buffers
    if case == "base":
        kw.update(base=paths.pop(), weights=[0.7, 0.6])
    if case == "fp64":
        kw.update(accumulate="fp64", dtype="fp32")
    if case == "cached":  # digests known: nothing to feed, the sliced stream runs
        monkeypatch.setenv("FASTSOUP_CACHE_DIR", str(tmp_path / "cache"))
        kw["hash"] = "sha256"
        fs.merge(paths, str(tmp_path / "first.safetensors"), **kw)
    if case == "first":  # digests computed from the slices
        monkeypatch.setenv("FASTSOUP_HASH_CACHE", "0")
        kw["hash"] = "sha256"
    calls = _spy(monkeypatch)
    monkeypatch.setattr(engine, "SLICE_BYTES", 8 << 10)  # many slices per run
    out_sliced = str(tmp_path / ("sliced" + ("" if case == "sharded" else ".safetensors")))
    rep_sliced = fs.merge(paths, out_sliced, **kw)
    assert calls == [1]
    monkeypatch.setattr(engine, "SLICED", False)
    out_windowed = str(tmp_path / ("windowed" + ("" if case == "sharded" else ".safetensors")))
    rep_windowed = fs.merge(paths, out_windowed, **kw)
    assert calls == [1]
    assert (rep_sliced.manifest or {}).get("constituents") == (rep_windowed.manifest or {}).get("constituents")
    got, want = load_any(out_sliced), load_any(out_windowed)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k


def test_a_first_merge_digests_the_bytes_the_slices_read(tmp_path, monkeypatch):
    """A first merge streams by slices: every data byte the merge reads reaches its
    digest from the slices, in file order (no second read), and the digests are the
    files' sha256. (Integer tensors are copied from the first input: the others' are
    only compared, and their digests read those bytes themselves.)"""
    monkeypatch.setenv("FASTSOUP_HASH_CACHE", "0")
    monkeypatch.setattr(engine, "SLICE_BYTES", 8 << 10)
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i, SPEC))
             for i in range(3)]
    fed = digest_bytes_fed(monkeypatch)
    monkeypatch.setattr(hashing.Hasher, "feed", lambda *a: pytest.fail("windowed feed"))
    calls = _spy(monkeypatch)
    rep = fs.merge(paths, str(tmp_path / "o.safetensors"), quiet=True, threads=2)
    assert calls == [1]
    copied = 77 * 8  # position_ids, int64
    for i, (entry, p) in enumerate(zip(rep.manifest["constituents"], paths)):
        with open(p, "rb") as f:
            data = f.read()
        assert entry["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
        header = 8 + int.from_bytes(data[:8], "little")
        assert fed[os.path.abspath(p)] == len(data) - header - (copied if i else 0)


def _failing_merge(paths, tmp_path, what: str, **kw) -> list:
    """Merge ``paths`` into ``tmp_path/o.safetensors`` in a thread that must end within a
    minute (no slice left waiting after ``what``); returns what it raised, having checked
    that nothing is left behind: no output, no temporary, no fastsoup thread."""
    errors = []

    def run():
        try:
            fs.merge(paths, str(tmp_path / "o.safetensors"), quiet=True, **kw)
        except BaseException as exc:  # noqa: BLE001 - checked by the caller
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"the merge hangs after {what}"
    assert not leftovers(tmp_path) and not os.path.exists(tmp_path / "o.safetensors")
    assert not [th for th in threading.enumerate() if th.name.startswith("fastsoup-")]
    return errors


@pytest.mark.parametrize("hash_mode", ["none", "sha256"])
def test_an_error_in_a_slice_ends_the_merge(tmp_path, monkeypatch, hash_mode):
    """The slice's own error ends the merge (with digests: not a later slice that stopped
    waiting for the failed slice's turn), nothing is written and no thread is left
    waiting."""
    monkeypatch.setenv("FASTSOUP_HASH_CACHE", "0")
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i, SPEC))
             for i in range(3)]
    real = InputFiles.read_into
    count = [0]

    def read_into(self, wf, lo, out):
        count[0] += 1
        if count[0] == 5:
            raise MergeError(f"input {wf.path} was truncated while merging (injected)")
        return real(self, wf, lo, out)

    monkeypatch.setattr(InputFiles, "read_into", read_into)
    monkeypatch.setattr(engine, "SLICE_BYTES", 8 << 10)
    calls = _spy(monkeypatch)
    errors = _failing_merge(paths, tmp_path, "a failed slice", hash=hash_mode, threads=2)
    assert len(errors) == 1 and isinstance(errors[0], MergeError), errors
    assert "injected" in str(errors[0])
    assert calls == [1] and count[0] >= 5


@pytest.mark.parametrize("case", ["same-buffer", "later-buffer"])
def test_the_cause_is_raised_not_the_turns_it_interrupted(tmp_path, monkeypatch, case):
    """Slice 0 is hashing when slice 1's read fails: slice 0 then stops with
    InterruptedError, and comes first in order; the merge still raises slice 1's error,
    the cause, also when slice 1 fills the next staging buffer (``later-buffer``: two
    tensors of 8 KiB, each one slice filling one 8 KiB buffer of a 64 KiB budget)."""
    monkeypatch.setenv("FASTSOUP_HASH_CACHE", "0")
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 2)
    spec, memory = SPEC, None
    if case == "same-buffer":
        monkeypatch.setattr(engine, "SLICE_BYTES", 8 << 10)
    else:
        spec, memory = {"a": ((4096,), torch.bfloat16), "b": ((4096,), torch.bfloat16)}, "64KiB"
        assert engine.budget_split(64 << 10) == (24 << 10, 8 << 10)
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i, spec))
             for i in range(3)]
    failed = threading.Event()
    first_reader = []
    real_read = InputFiles.read_into

    def read_into(self, wf, lo, out):
        me = threading.current_thread().name
        if not me.startswith("fastsoup-slice"):  # the integer copies' comparison
            return real_read(self, wf, lo, out)
        first_reader.append(me) if not first_reader else None
        if me != first_reader[0]:
            failed.set()
            raise MergeError(f"input {wf.path} was truncated while merging (injected)")
        return real_read(self, wf, lo, out)

    real_update = hashing._FileDigest.update

    def update(self, lo, view):
        assert failed.wait(20)  # slice 0 hashes once slice 1 has failed
        return real_update(self, lo, view)

    monkeypatch.setattr(InputFiles, "read_into", read_into)
    monkeypatch.setattr(hashing._FileDigest, "update", update)
    with pytest.raises(MergeError, match="injected"):
        fs.merge(paths, str(tmp_path / "o.safetensors"), quiet=True, threads=2, memory=memory)
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_slice_buffers_stay_within_the_memory_budget(tmp_path, monkeypatch, threads):
    """Whatever the number of workers, their buffers and the two staging buffers fit
    ``--memory`` (the windowed stream's two windows' share)."""
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i, SPEC))
             for i in range(3)]
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 8)
    sizes = []
    real = engine.anonymous_buffer
    monkeypatch.setattr(engine, "anonymous_buffer", lambda n: sizes.append(n) or real(n))
    calls = _spy(monkeypatch)
    memory = 256 << 10
    fs.merge(paths, str(tmp_path / "o.safetensors"), quiet=True, hash="none", memory=memory,
             threads=threads)
    window, staging = engine.budget_split(memory)
    at = sizes.index(staging)  # before: the integer copies' comparison buffers
    assert calls == [1] and sizes[at:at + 2] == [staging, staging]
    workers = sizes[at + 2:]  # one buffer per worker that took a slice, all of one size
    share = min(engine.SLICE_BYTES, 2 * window // threads)  # the windows' part, divided
    assert workers and len(workers) <= threads and set(workers) == {share}
    assert 2 * staging + threads * share <= memory


@pytest.mark.parametrize("sliced", [True, False])
def test_drop_cache_releases_every_range_read(tmp_path, monkeypatch, sliced):
    """``drop_cache`` (inputs larger than memory): every input byte the merge read is
    dropped from the page cache as the merge goes, batch by batch."""
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i, SPEC))
             for i in range(3)]
    monkeypatch.setattr(engine, "SLICED", sliced)
    monkeypatch.setattr(engine, "SLICE_BYTES", 8 << 10)
    released = []
    real = InputFiles.release
    monkeypatch.setattr(InputFiles, "release",
                        lambda self, wf, lo, hi: released.append((wf.path, lo, hi)) or real(self, wf, lo, hi))
    fs.merge(paths, str(tmp_path / "o.safetensors"), quiet=True, hash="none",
             drop_cache=True, memory="256KiB")
    for p in paths:
        with open(p, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        ranges = sorted((lo, hi) for path, lo, hi in released if path == p)
        covered = 0
        for lo, hi in ranges:
            assert lo <= max(covered, data_start)  # no gap (page-aligned starts)
            covered = max(covered, hi)
        assert ranges and ranges[0][0] <= data_start and covered == os.path.getsize(p)
    assert len(released) > len(paths)  # released as the merge went, not once at the end


@pytest.mark.parametrize("hash_mode", ["none", "sha256"])
def test_an_error_planning_later_runs_ends_the_merge(tmp_path, monkeypatch, hash_mode):
    """The runs of later tensors are planned while earlier slices stream: an error there
    (after bytes were written) ends the merge with that error, nothing is left behind and
    no thread keeps running."""
    monkeypatch.setenv("FASTSOUP_HASH_CACHE", "0")
    spec = {f"layers.{i:03d}.w": ((64 + i,), torch.bfloat16) for i in range(600)}
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(40 + i, spec))
             for i in range(3)]
    monkeypatch.setattr(engine.PlannedRuns, "FIRST_CHUNK", 64)
    monkeypatch.setattr(engine.PlannedRuns, "MAX_CHUNK", 64)
    real = engine.make_runs
    calls = [0]

    def make_runs(*a):
        calls[0] += 1
        if calls[0] == 4:
            raise MergeError("planning the runs failed (injected)")
        return real(*a)

    monkeypatch.setattr(engine, "make_runs", make_runs)
    from fastsoup.merge import writer

    writes = []  # data written before the error
    real_pwrite = writer.SafetensorsFileWriter.pwrite

    def pwrite(self, data, offset, *a):
        if offset >= self.data_start and calls[0] < 4:
            writes.append(offset)
        return real_pwrite(self, data, offset, *a)

    monkeypatch.setattr(writer.SafetensorsFileWriter, "pwrite", pwrite)
    errors = _failing_merge(paths, tmp_path, "an error planning runs", hash=hash_mode,
                            threads=2, memory="64KiB")
    assert len(errors) == 1 and "injected" in str(errors[0]), errors
    assert calls[0] == 4 and writes
