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
    # the runs of all the tensors planned at once (a run never spans two chunks of them)
    monkeypatch.setattr(engine.PlannedRuns, "FIRST_CHUNK", 1 << 30)
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


def test_first_bytes_are_written_before_every_run_is_planned(tmp_path, monkeypatch):
    """The runs are planned a chunk of tensors at a time as the stream takes them: the
    first output bytes are written before the last chunk's runs are planned, and the
    result is the same (bit-exact, every input byte hashed once, in order)."""
    from fastsoup.merge import writer

    spec = _spec(3000)
    states = [make_state(250 + i, spec) for i in range(3)]
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), s) for i, s in enumerate(states)]
    monkeypatch.setattr(engine.PlannedRuns, "FIRST_CHUNK", 256)
    monkeypatch.setattr(engine.PlannedRuns, "MAX_CHUNK", 512)
    events = []
    orig_runs, orig_pwrite = engine.make_runs, writer.SafetensorsFileWriter.pwrite

    def make_runs(items, *a):
        runs = orig_runs(items, *a)
        events.append(("runs", len(items)))
        return runs

    def pwrite(self, data, offset, *a):
        if offset >= self.data_start:
            events.append(("write", offset))
        return orig_pwrite(self, data, offset, *a)

    monkeypatch.setattr(engine, "make_runs", make_runs)
    monkeypatch.setattr(writer.SafetensorsFileWriter, "pwrite", pwrite)
    rep = fs.merge(paths, tmp_path / "o.safetensors", memory="64KiB", quiet=True)
    check_merged(load_any(str(tmp_path / "o.safetensors")), states, [1 / 3] * 3)
    kinds = [k for k, _ in events]
    assert kinds.count("runs") >= 6 and sum(n for k, n in events if k == "runs") == rep.work_items
    last_runs = len(kinds) - 1 - kinds[::-1].index("runs")
    assert "write" in kinds[:last_runs], kinds
    for c, p in zip(rep.manifest["constituents"], paths):
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


def _sources_of(t):
    """``t.sources`` without building them on ``t`` (which would take it off the engine's
    input-set path the test checks)."""
    from fastsoup.merge.plan import Source

    if t.shared is None:
        return t.sources
    inputs, info, key = t.shared
    return [Source(k, f, info, w, key) for k, f, w in zip(inputs.indices, inputs.files, inputs.weights)]


def _reference_items(files, window, staging):
    """Work items tensor by tensor (what :func:`engine.make_items` computes on arrays): a
    tensor whole when it fits both buffers, else chunks of the most elements that fit."""
    size = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "BOOL": 1}
    out = []
    for fi, tensors in files:
        for t in tensors:
            n = int(np.prod(t.shape))
            per_in = sum(size[s.info.dtype] for s in _sources_of(t))
            chunk = max(1, min(window // max(per_in, 1), staging // size[t.dtype]))
            out.extend((fi, t.qualified, lo, min(n, lo + chunk)) for lo in range(0, max(n, 1), chunk))
    return out


def _reference_runs(items, writers, window, staging):
    """The fusion rule written item by item (what :func:`engine.make_runs` computes on
    arrays): join the current run when output file, op, output dtype, output position and,
    for every input, file, dtype, weight and position all continue it, within the caps."""
    size = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "BOOL": 1}
    runs, cur = [], None
    for it in items:
        t = it.tensor
        n = it.hi - it.lo
        out_off = writers[it.file_index].offsets[t.key] + it.lo * size[t.dtype]
        srcs = _sources_of(t)[:1] if t.op == "copy" else _sources_of(t)
        spans = []
        for s in srcs:
            h = s.file.header
            lo = None if h is None else h.data_start + s.info.begin + it.lo * size[s.dtype]
            spans.append((s.file.path if h else None, s.dtype, s.weight, lo,
                          None if lo is None else lo + n * size[s.dtype]))
        if (cur is not None and cur["key"] == (it.file_index, t.op, t.dtype)
                and cur["out_end"] == out_off and len(spans) == len(cur["spans"])
                and all(a[0] is not None and b[0] == a[0] and b[1:3] == a[1:3] and b[3] == a[4]
                        for a, b in zip(cur["spans"], spans))
                and cur["in"] + sum(b[4] - b[3] for b in spans) <= window
                and cur["out"] + n * size[t.dtype] <= staging):
            cur["spans"] = [a[:4] + (b[4],) for a, b in zip(cur["spans"], spans)]
            cur["n"] += n
            cur["count"] += 1
            cur["in"] += sum(b[4] - b[3] for b in spans)
            cur["out"] += n * size[t.dtype]
            cur["out_end"] += n * size[t.dtype]
            continue
        cur = {"key": (it.file_index, t.op, t.dtype), "out_start": out_off, "spans": spans, "n": n,
               "count": 1, "in": sum((b[4] or 0) - (b[3] or 0) for b in spans),
               "out": n * size[t.dtype], "out_end": out_off + n * size[t.dtype]}
        runs.append(cur)
    return [(r["out_start"], r["n"], r["count"], [(s[3], s[4]) for s in r["spans"] if s[3] is not None])
            for r in runs]


@pytest.mark.parametrize("case", ["shuffled", "mixed", "union", "small-memory", "small-memory-shared",
                                  "base", "weights_for", "weights_for_same"])
def test_make_runs_matches_the_item_by_item_rule(tmp_path, case):
    """make_items and make_runs (arrays; items planned from a shared header read through
    their input set) give what the rules give written item by item and source by source,
    also when items of both kinds alternate and may join."""
    # "big" is cut into chunks under a small budget; its last chunk may join what follows
    spec = {"big": ((5000,), torch.bfloat16), **_spec(120, every_f32=7 if case == "mixed" else 0)}
    # 4 inputs: the window (input bytes), not the staging buffer, bounds the runs
    states = [make_state(900 + i, spec) for i in range(4 if case == "small-memory-shared" else 3)]
    if case == "small-memory":  # input bytes, not output bytes, bound the chunks of "big"
        for s in states[1:]:
            s["big"] = s["big"].float()
    kw = {"quiet": True, "hash": "none"}
    paths = []
    for i, s in enumerate(states):
        p = str(tmp_path / f"m{i}.safetensors")
        keys = list(s)
        if case == "shuffled" and i == 1:
            keys = keys[:40][::-1] + keys[40:]  # the first 40 laid out backwards
        if case == "union" and i == 2:
            del s["layers.001.experts.03.w"]
            keys.remove("layers.001.experts.03.w")
            kw["keys"] = "union"
        paths.append(_save_in_order(p, s, keys))
    if case.startswith("small-memory"):
        kw["memory"] = "8KiB"
    if case == "base":
        kw.update(base=paths.pop(), weights=[0.3, 0.5])
    if case == "weights_for":
        kw["weights_for"] = {"layers.002.*": [0.9, 0.05, 0.05]}
    if case == "weights_for_same":  # the default weights again: sources rebuilt, runs may join
        kw["weights_for"] = {"layers.002.*": [1.0, 1.0, 1.0]}
    seen = []
    kinds = []
    orig = engine.make_runs

    def spy(items, writers, window, staging):
        kinds.append({it.tensor.shared is None for it in items})  # True: read source by source
        runs = orig(items, writers, window, staging)
        seen.append((runs, _reference_runs(items, writers, window, staging), len(items)))
        return runs

    orig_items = engine.make_items
    cut = []

    def spy_items(files, window, staging):
        items = orig_items(files, window, staging)
        cut.append(([(it.file_index, it.tensor.qualified, it.lo, it.hi) for it in items],
                    _reference_items(files, window, staging)))
        return items

    engine.make_runs, engine.make_items = spy, spy_items
    try:
        fs.merge(paths, tmp_path / "o.safetensors", **kw)
    finally:
        engine.make_runs, engine.make_items = orig, orig_items
    (items_got, items_ref), = cut
    # byte-identical headers (same shapes, dtypes and order) are parsed once and shared
    expect = {"shuffled": {True}, "union": {True}, "small-memory": {True}, "mixed": {True, False},
              "base": {True, False}, "weights_for": {True, False}, "weights_for_same": {True, False},
              "small-memory-shared": {True, False}}
    assert kinds == [expect[case]]  # ("mixed", "base": the integer position_ids is a copy)
    assert items_got == items_ref
    assert case.startswith("small-memory") == (len(items_got) > len({q for _, q, _, _ in items_got}))
    (runs, ref, n_items), = seen
    got = [(r.out_offset, r.n, len(r.items), [(s.lo, s.hi) for s in r.sources]) for r in runs]
    assert got == ref
    # the case exercises fusion: by the item-by-item rule, several runs, some of many items
    assert len(ref) > 1 and max(count for _, _, count, _ in ref) > 1 and len(ref) < n_items


@pytest.mark.parametrize("shared", [False, True], ids=["parsed-each", "shared-headers"])
@pytest.mark.parametrize("case", ["plain", "base", "mixed-dtype", "int", "zero-weight", "fp64"])
def test_bulk_plan_equals_the_key_by_key_plan(tmp_path, monkeypatch, case, shared):
    """Keys every input holds with one shape and dtype are planned in bulk, and a single
    file's tensors keep its order without a sort; the plan is the one the key-by-key pass
    and the sort build (sources, weights, dtypes, order, files, warnings). Inputs whose
    headers are byte-identical and parsed once (``shared_headers``, as a merge resolves
    them) are planned from the one mapping they share, with no comparison per key."""
    from fastsoup.io.safetensors import shared_headers
    from fastsoup.merge import formats, plan as planning

    spec = _spec(60, every_f32=9)
    states = [make_state(950 + i, spec) for i in range(3)]
    if case == "mixed-dtype":
        states[1]["layers.000.experts.02.w"] = states[1]["layers.000.experts.02.w"].half()
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), s) for i, s in enumerate(states)]
    if shared:
        with shared_headers():
            lays = [formats.resolve(p) for p in paths]
    else:
        lays = [formats.resolve(p) for p in paths]
    one_mapping = planning._shared_single_files(lays) is not None
    assert one_mapping == (shared and case != "mixed-dtype")
    maps = planning._key_maps(lays)
    assert maps == [lay.keys() for lay in lays]
    assert (maps[0] is maps[1]) == one_mapping  # built once for the inputs sharing a header
    if len(lays) > 2:  # "mixed-dtype": inputs 1 and 3 share theirs
        assert (maps[0] is maps[2]) == shared
    kw = {}
    if case == "base":
        kw = {"base": lays.pop(), "weights": [0.25, 0.5]}
    if case == "zero-weight":
        kw = {"weights": [1.0, 0.0, 2.0]}
    if case == "fp64":
        kw = {"accumulate": "fp64", "dtype": "F32"}

    def summary(p):
        return ([(t.qualified, t.key, t.dtype, t.shape, t.op,
                  [(s.input_index, s.file.path, s.info, s.weight, s.key) for s in t.sources])
                 for t in p.tensors()], p.warnings, p.coefficients,
                [(c.name, [f.name for f in c.files]) for c in p.components])

    taken = []
    real_order = planning._single_file_order
    monkeypatch.setattr(planning, "_single_file_order", lambda *a: taken.append(real_order(*a)) or taken[-1])
    bulk = planning.build_plan(lays, **kw)
    assert taken and taken[-1] is not None  # the file's order, no sort
    calls = []
    real = planning._plan_uniform

    def keyed(*a):
        calls.append(len(a[2]))
        return a[2]  # every key to the key-by-key pass

    monkeypatch.setattr(planning, "_plan_uniform", keyed)
    monkeypatch.setattr(planning, "_single_file_order", lambda *a: calls.append(0))
    careful = planning.build_plan(lays, **kw)
    assert calls[-1] == 0 and summary(bulk) == summary(careful)
    monkeypatch.setattr(planning, "_plan_uniform", real)
    rest = real(lays + ([kw["base"]] if "base" in kw else []), len(lays), list(lays[0].keys()),
                kw.get("weights", [1.0] * len(lays)), "base" in kw, "base" not in kw, None,
                3e38, {})
    assert rest == [k for k in lays[0].keys()
                    if k == "position_ids" or case == "mixed-dtype" and k == "layers.000.experts.02.w"]


def test_inputs_sharing_a_header_build_no_pairs_per_input(tmp_path, monkeypatch):
    """A one-file component's ``tensors`` reads its header's mapping; a dict of ``(file,
    info)`` pairs is built only to iterate over them, which a merge of inputs sharing one
    header never does (integer tensors included). The mapping is the dict it stands for."""
    from fastsoup.merge import formats

    spec = _spec(40, every_f32=7)
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(970 + i, spec))
             for i in range(3)]
    built = []
    real = formats.FileTensors._dict
    monkeypatch.setattr(formats.FileTensors, "_dict",
                        lambda self: (self._pairs is None and built.append(self.wf.path)) or real(self))
    fs.merge(paths, str(tmp_path / "o.safetensors"), quiet=True, hash="none")
    assert built == []
    comp = formats.resolve(paths[0]).components[""]
    wf = comp.files[0]
    want = {k: (wf, info) for k, info in wf.header.tensors.items()}
    assert isinstance(comp.tensors, formats.FileTensors)
    assert list(comp.tensors) == list(want) and len(comp.tensors) == len(want)
    key = next(iter(want))
    assert key in comp.tensors and "missing" not in comp.tensors
    assert comp.tensors[key] == want[key] == comp.tensors.get(key)
    assert comp.tensors.get("missing") is None and built == []
    with pytest.raises(KeyError):
        comp.tensors["missing"]
    assert list(comp.tensors.items()) == list(want.items()) and built == [wf.path]
    assert comp.tensors == want
