"""Broken and hostile inputs, refused outputs, full disks and interrupts: each exits
non-zero with a clear message and leaves nothing at the output (an existing output is
left untouched)."""
import errno
import json
import os
import struct

import pytest
import torch

import fastsoup as fs
from fastsoup.merge import cli, engine, writer
from tests.helpers import leftovers, run_quiet, make_state, raw_safetensors, save_file_layout, save_sharded


@pytest.fixture
def two(tmp_path):
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)) for i in range(2)]
    return tmp_path, paths


run = run_quiet


def corrupt(path, mutate):
    blob = bytearray(open(path, "rb").read())
    blob = mutate(blob)
    with open(path, "wb") as f:
        f.write(blob)


def _header_of(blob):
    n = struct.unpack("<Q", bytes(blob[:8]))[0]
    return n, json.loads(bytes(blob[8:8 + n]))


def _rewrite(blob, fn):
    n, h = _header_of(blob)
    data = bytes(blob[8 + n:])
    fn(h)
    return bytearray(raw_safetensors(h, data))


BROKEN = {
    "truncated file": (lambda b: b[: len(b) - 100], "truncated"),
    "header length beyond the file": (lambda b: bytearray(struct.pack("<Q", 10**7)) + b[8:],
                                      "runs past the end of the file"),
    "invalid JSON": (lambda b: b[:8] + b"{" + b"x" * (_header_of(b)[0] - 1) + b[8 + _header_of(b)[0]:],
                     "not valid JSON"),
    "overlapping offsets": (lambda b: _rewrite(b, lambda h: h["down.0.bias"].__setitem__(
        "data_offsets", [0, 68])), "overlap"),
    "out-of-range offsets": (lambda b: _rewrite(b, lambda h: h["down.0.bias"].__setitem__(
        "data_offsets", [10**6, 10**6 + 68])), "run past the end of the data section"),
    "wrong byte length": (lambda b: _rewrite(b, lambda h: h["down.0.bias"].__setitem__(
        "shape", [18])), "needs 72 bytes"),
    "unknown dtype": (lambda b: _rewrite(b, lambda h: h["down.0.bias"].__setitem__(
        "dtype", "F128")), "unknown dtype 'F128'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_input_exits_nonzero_and_writes_nothing(two, capsys, case):
    tmp, paths = two
    mutate, message = BROKEN[case]
    corrupt(paths[1], mutate)
    out = tmp / "out.safetensors"
    code, err = run([*paths, "-o", out], capsys)
    assert code == 1
    assert message in err and "m1.safetensors" in err, err
    assert not os.path.exists(out) and not leftovers(tmp)


def test_missing_shard_named_in_index(tmp_path, capsys):
    a = save_sharded(str(tmp_path / "a"), make_state(0), 2)
    b = save_sharded(str(tmp_path / "b"), make_state(1), 2)
    os.unlink(os.path.join(b, "model-00002-of-00002.safetensors"))
    code, err = run([a, b, "-o", tmp_path / "out"], capsys)
    assert code == 1 and "model-00002-of-00002.safetensors" in err and "does not exist" in err
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_index_with_path_traversal_is_refused(tmp_path, capsys):
    a = save_sharded(str(tmp_path / "a"), make_state(0), 1)
    idx = os.path.join(a, "model.safetensors.index.json")
    j = json.load(open(idx))
    j["weight_map"] = {k: "../../etc/passwd" for k in j["weight_map"]}
    json.dump(j, open(idx, "w"))
    b = save_sharded(str(tmp_path / "b"), make_state(1), 1)
    code, err = run([idx, b, "-o", tmp_path / "out"], capsys)
    assert code == 1 and "not a plain file name" in err


def test_duplicate_inputs_refused(two, capsys):
    tmp, paths = two
    os.link(paths[0], tmp / "hardlink.safetensors")
    code, err = run([paths[0], paths[1], tmp / "hardlink.safetensors", "-o", tmp / "o.safetensors"], capsys)
    assert code == 1 and "is the same as input 1" in err
    assert not os.path.exists(tmp / "o.safetensors")


def test_output_equal_to_an_input_refused(two, capsys):
    tmp, paths = two
    before = open(paths[0], "rb").read()
    code, err = run([*paths, "-o", paths[0], "--overwrite"], capsys)
    assert code == 1 and "is (or contains) input 1" in err
    assert open(paths[0], "rb").read() == before


def test_output_directory_containing_an_input_refused(tmp_path, capsys):
    a = save_sharded(str(tmp_path / "a"), make_state(0), 2)
    b = save_sharded(str(tmp_path / "b"), make_state(1), 2)
    code, err = run([a, b, "-o", tmp_path / "a", "--overwrite"], capsys)
    assert code == 1 and "input 1" in err
    assert len(os.listdir(a)) == 3


def test_existing_output_needs_overwrite(two, capsys):
    tmp, paths = two
    out = tmp / "o.safetensors"
    out.write_bytes(b"precious")
    code, err = run([*paths, "-o", out], capsys)
    assert code == 1 and "already exists" in err and out.read_bytes() == b"precious"
    code, _ = run([*paths, "-o", out, "--overwrite"], capsys)
    assert code == 0 and out.read_bytes() != b"precious"


def _fail_pwrite(monkeypatch, exc):
    calls = {"n": 0}
    orig = writer.SafetensorsFileWriter.pwrite

    def pwrite(self, data, offset, start_writeback=False):
        calls["n"] += 1
        if offset > 0:  # let the header through, fail on tensor data
            raise exc
        return orig(self, data, offset, start_writeback)

    monkeypatch.setattr(writer.SafetensorsFileWriter, "pwrite", pwrite)
    return calls


def test_full_disk_leaves_existing_output_untouched(two, capsys, monkeypatch):
    tmp, paths = two
    out = tmp / "o.safetensors"
    out.write_bytes(b"old soup")
    calls = _fail_pwrite(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    code, err = run([*paths, "-o", out, "--overwrite"], capsys)
    assert calls["n"] >= 2
    assert code == 1 and "No space left on device" in err and "nothing was written" in err
    assert out.read_bytes() == b"old soup" and not leftovers(tmp)
    assert not os.path.exists(tmp / "o.fastsoup.json")


def test_full_disk_at_preallocation(two, capsys, monkeypatch):
    tmp, paths = two

    def no_space(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    code, err = run([*paths, "-o", tmp / "o.safetensors"], capsys)
    assert code == 1 and "No space left on device" in err
    assert not os.path.exists(tmp / "o.safetensors") and not leftovers(tmp)


def test_not_enough_free_space_is_refused_before_writing(two, capsys, monkeypatch):
    tmp, paths = two
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 10, 10))
    code, err = run([*paths, "-o", tmp / "o.safetensors"], capsys)
    assert code == 1 and "not enough disk space" in err


def test_ctrl_c_mid_merge_cleans_up(tmp_path, capsys, monkeypatch):
    a = save_sharded(str(tmp_path / "a"), make_state(0), 2)
    b = save_sharded(str(tmp_path / "b"), make_state(1), 2)
    out = tmp_path / "out"
    os.mkdir(out)
    (out / "keep.txt").write_text("existing output")
    (out / "fastsoup.json").write_text("{}")  # a previous fastsoup output: may be replaced

    class Boom(engine.CpuSummer):  # the interrupt arrives in the third sum
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.n = 0

        def __call__(self, *a, **k):
            self.n += 1
            if self.n == 3:
                raise KeyboardInterrupt
            return super().__call__(*a, **k)

    monkeypatch.setattr(engine, "CpuSummer", Boom)
    code, err = run([a, b, "-o", out, "--overwrite"], capsys)
    assert code == 130 and "interrupted" in err, err
    assert sorted(os.listdir(out)) == ["fastsoup.json", "keep.txt"] and not leftovers(tmp_path)


def test_api_raises_and_cleans_up_on_any_error(two, monkeypatch):
    tmp, paths = two

    def explode(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine.CpuSummer, "__call__", explode)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        fs.merge(paths, tmp / "o.safetensors", quiet=True)
    assert not os.path.exists(tmp / "o.safetensors") and not leftovers(tmp)


def test_fp8_is_refused_with_a_clear_message(tmp_path, capsys):
    states = [{"w": torch.randn(4).to(torch.float8_e4m3fn)} for _ in range(2)]
    paths = [save_file_layout(str(tmp_path / f"f{i}.safetensors"), s) for i, s in enumerate(states)]
    code, err = run([*paths, "-o", tmp_path / "o.safetensors"], capsys)
    assert code == 1 and "cannot average F8_E4M3" in err


def test_bad_weights_and_options(two, capsys):
    tmp, paths = two
    out = tmp / "o.safetensors"
    code, err = run([*paths, "-o", out, "--weights", "1,2,3"], capsys)
    assert code == 1 and "got 3 weights for 2 inputs" in err
    code, err = run([*paths, "-o", out, "--weights", "1,-1"], capsys)
    assert code == 1 and "cannot normalise" in err
    code, err = run([*paths, "-o", out, "--memory", "lots"], capsys)
    assert code == 1 and "cannot parse size" in err
    code, err = run([*paths, "-o", tmp / "o.bin"], capsys)
    assert code == 1 and "name it *.safetensors" in err
    with pytest.raises(SystemExit) as info:
        cli.main([*map(str, paths), "-o", str(out), "--weights", "a,b"])
    assert info.value.code == 2
    assert not os.path.exists(out)
