"""Many small tensors: consecutive tensors that are contiguous in the output and in every
input (same op, dtypes and weights) are summed as one run, one ``_C`` call, one ``pread``
and one digest range per input, and the result is bit-exact as if each tensor were
summed alone. Runs break where the inputs' layouts, dtypes or weights differ."""
import hashlib
import json
import struct

import numpy as np
import pytest
import torch

import fastsoup as fs
from fastsoup.merge import engine
from fastsoup.merge import mmap as input_maps

from tests.helpers import check_merged, load_any, make_state, save_file_layout


def _spec(n=1500, every_f32=0):
    spec = {}
    for i in range(n):
        dtype = torch.float32 if every_f32 and i % every_f32 == 0 else torch.bfloat16
        spec[f"layers.{i // 30:03d}.experts.{i % 30:02d}.w"] = ((1 + (i * 7) % 23,), dtype)
    spec["position_ids"] = ((1, 12), torch.int64)
    return spec


def _save_in_order(path, state, order):
    """A safetensors file whose data is laid out in ``order`` (not sorted by key)."""
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16",
             torch.int64: "I64", torch.bool: "BOOL"}
    header, blobs, pos = {}, [], 0
    for k in order:
        t = state[k].contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


class _Count:
    """Counts the engine's preads and kernel calls for one merge."""

    def __init__(self, monkeypatch):
        self.reads = 0
        orig = input_maps.InputFiles.read_into

        def read_into(files, wf, lo, out):
            self.reads += 1
            return orig(files, wf, lo, out)

        monkeypatch.setattr(input_maps.InputFiles, "read_into", read_into)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("memory", ["256MiB", "64KiB"])
def test_small_tensors_are_summed_in_runs_bit_exact(tmp_path, monkeypatch, memory):
    spec = _spec()
    states = [make_state(200 + i, spec) for i in range(3)]
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), s) for i, s in enumerate(states)]
    count = _Count(monkeypatch)
    rep = fs.merge(paths, tmp_path / "o.safetensors", weights=[0.5, 0.3, 0.2], memory=memory,
                   quiet=True)
    check_merged(load_any(str(tmp_path / "o.safetensors")), states, [0.5, 0.3, 0.2])
    assert rep.work_items >= 1500
    if memory == "256MiB":  # one window: a run per input layout stretch, a read per file
        assert rep.kernel_calls <= 3 and count.reads <= 3 * 3, (rep.kernel_calls, count.reads)
    else:  # windows of a few KiB still hold many tensors each
        assert rep.kernel_calls < rep.work_items / 4
    for c, p in zip(rep.manifest["constituents"], paths):  # digests from coalesced reads
        assert c["files"][0]["sha256"] == _sha(p)


def test_runs_break_at_dtype_changes_and_stay_exact(tmp_path):
    spec = _spec(600, every_f32=7)
    states = [make_state(300 + i, spec) for i in range(2)]
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), s) for i, s in enumerate(states)]
    rep = fs.merge(paths, tmp_path / "o.safetensors", quiet=True, dtype=None)
    check_merged(load_any(str(tmp_path / "o.safetensors")), states, [0.5, 0.5])
    assert rep.kernel_calls < rep.work_items


def test_inputs_laid_out_in_another_order(tmp_path):
    """Input 2 stores its tensors in reverse order: nothing fuses across it, the result is
    still exact and its digest is still the file's sha256."""
    spec = _spec(300)
    states = [make_state(400 + i, spec) for i in range(2)]
    a = save_file_layout(str(tmp_path / "a.safetensors"), states[0])
    b = _save_in_order(str(tmp_path / "b.safetensors"), states[1], sorted(spec, reverse=True))
    rep = fs.merge([a, b], tmp_path / "o.safetensors", quiet=True)
    check_merged(load_any(str(tmp_path / "o.safetensors")), states, [0.5, 0.5])
    assert [c["files"][0]["sha256"] for c in rep.manifest["constituents"]] == [_sha(a), _sha(b)]


def test_coalesce_merges_touching_and_overlapping_ranges_per_file():
    class F:
        def __init__(self, path):
            self.path = path

    a, b = F("a"), F("b")
    spans = [("r1", 0, a, 100, 200), ("r1", 1, b, 0, 50), ("r2", 0, a, 200, 260),
             ("r2", 1, b, 60, 70), ("r3", 0, a, 150, 210), ("r0", 0, a, 10, 20)]
    got = [(f.path, lo, hi, len(m)) for f, lo, hi, m in input_maps.coalesce(spans)]
    assert got == [("a", 10, 20, 1), ("a", 100, 260, 3), ("b", 0, 50, 1), ("b", 60, 70, 1)]


def test_union_keys_with_other_weights_break_runs(tmp_path):
    """A key missing from one input has its weights renormalised: its run is its own."""
    spec = _spec(120)
    states = [make_state(600 + i, spec) for i in range(2)]
    hole = "layers.002.experts.05.w"
    del states[1][hole]
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), s) for i, s in enumerate(states)]
    rep = fs.merge(paths, tmp_path / "o.safetensors", keys="union", quiet=True)
    out = load_any(str(tmp_path / "o.safetensors"))
    check_merged(out, states, [0.5, 0.5], keys=[k for k in spec if k != hole])
    assert torch.equal(out[hole], states[0][hole])
    assert rep.kernel_calls >= 2


def test_make_runs_fuses_only_contiguous_items(tmp_path):
    spec = _spec(50)
    states = [make_state(700 + i, spec) for i in range(2)]
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), s) for i, s in enumerate(states)]
    seen = {}
    orig = engine.make_runs

    def spy(items, writers, window, staging):
        runs = orig(items, writers, window, staging)
        seen["runs"], seen["items"] = runs, items
        return runs

    engine.make_runs = spy
    try:
        fs.merge(paths, tmp_path / "o.safetensors", quiet=True, hash="none")
    finally:
        engine.make_runs = orig
    runs = seen["runs"]
    assert sum(len(r.items) for r in runs) == len(seen["items"])
    for r in runs:
        assert r.n == sum(it.hi - it.lo for it in r.items)
        for s in r.sources:
            assert s.hi - s.lo == r.n * np.dtype(np.uint16 if s.dtype == "BF16" else np.int64).itemsize \
                or r.op == "copy"


def test_no_cyclic_gc_during_a_merge_and_restored_after(tmp_path):
    import gc

    states = [make_state(800 + i, _spec(20)) for i in range(2)]
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), s) for i, s in enumerate(states)]
    seen = []
    assert gc.isenabled()
    fs.merge(paths, tmp_path / "o.safetensors", progress=lambda *e: seen.append(gc.isenabled()))
    assert seen and not any(seen) and gc.isenabled()
    with pytest.raises(fs.MergeError):
        fs.merge(paths, None)
    assert gc.isenabled()
    gc.disable()
    try:  # a caller that turned it off keeps it off
        fs.merge(paths, tmp_path / "p.safetensors", quiet=True)
        assert not gc.isenabled()
    finally:
        gc.enable()
