"""fastsoup.merge against a float64 numpy average and a bit-exact fp32 oracle, on random
checkpoints with mixed dtypes (bf16, fp16, fp32, int64, bool), in every layout."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

import fastsoup as fs
from fastsoup.merge import MergeError, PlanError
from tests.helpers import (SPEC, bf16_from_f64, check_merged, load_any, make_state, save_diffusers,
                                save_file_layout, save_sharded)

FLOAT_KEYS = [k for k, (_, d) in SPEC.items() if d.is_floating_point]


def files(tmp_path, n=3, spec=SPEC):
    states = [make_state(10 + i, spec) for i in range(n)]
    paths = [save_file_layout(str(tmp_path / f"m{i}.safetensors"), s) for i, s in enumerate(states)]
    return paths, states


def test_uniform_mean_file(tmp_path):
    paths, states = files(tmp_path)
    out = tmp_path / "soup.safetensors"
    report = fs.merge(paths, out, quiet=True)
    assert isinstance(report, fs.MergeReport)
    merged = load_any(str(out))
    assert set(merged) == set(states[0])
    check_merged(merged, states, [1 / 3] * 3)
    assert report.tensors_copied == 2 and report.tensors_summed == len(SPEC) - 2
    assert report.output_dtypes == {"BF16": 2, "BOOL": 1, "F16": 1, "F32": 2, "I64": 1}
    # the output keeps each tensor's input dtype
    for k, (_, dt) in SPEC.items():
        assert merged[k].dtype == dt
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~_umask())
    assert not [p for p in os.listdir(tmp_path) if "fastsoup-tmp" in p]


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_weights_normalize_and_no_normalize(tmp_path):
    paths, states = files(tmp_path)
    fs.merge(paths, tmp_path / "a.safetensors", [0.5, 0.3, 0.2], quiet=True)
    check_merged(load_any(str(tmp_path / "a.safetensors")), states, [0.5, 0.3, 0.2])
    fs.merge(paths, tmp_path / "b.safetensors", [2.0, 1.0, 1.0], quiet=True)
    check_merged(load_any(str(tmp_path / "b.safetensors")), states, [0.5, 0.25, 0.25])
    fs.merge(paths, tmp_path / "c.safetensors", [1.5, -0.75, 0.25], normalize=False, quiet=True)
    check_merged(load_any(str(tmp_path / "c.safetensors")), states, [1.5, -0.75, 0.25])


def test_task_arithmetic_with_base(tmp_path):
    paths, states = files(tmp_path, 3)
    base, others = paths[0], paths[1:]
    fs.merge(others, tmp_path / "ta.safetensors", [0.7, 0.4], base=base, quiet=True)
    # θ0 + Σ w_i (θ_i − θ0) = (1 − Σw) θ0 + Σ w_i θ_i, computed as a weighted sum in fp32:
    # the coefficients are ordered inputs first, then the base
    merged = load_any(str(tmp_path / "ta.safetensors"))
    check_merged(merged, [states[1], states[2], states[0]], [0.7, 0.4, 1 - 1.1], exact=False)
    for k in FLOAT_KEYS:
        if states[0][k].numel() == 0:
            continue
        e = states[0][k].double() + 0.7 * (states[1][k].double() - states[0][k].double()) \
            + 0.4 * (states[2][k].double() - states[0][k].double())
        tol = 4 * {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-22}[merged[k].dtype]
        assert torch.allclose(merged[k].double(), e, rtol=tol, atol=tol), k


def test_dtype_override_and_fp64_accumulation(tmp_path):
    paths, states = files(tmp_path)
    fs.merge(paths, tmp_path / "f32.safetensors", dtype="fp32", quiet=True)
    merged = load_any(str(tmp_path / "f32.safetensors"))
    for k in FLOAT_KEYS:
        assert merged[k].dtype == torch.float32
    check_merged(merged, states, [1 / 3] * 3)
    fs.merge(paths, tmp_path / "f64acc.safetensors", dtype="bf16", accumulate="fp64", quiet=True)
    merged = load_any(str(tmp_path / "f64acc.safetensors"))
    for k in FLOAT_KEYS:
        assert merged[k].dtype == torch.bfloat16
        e = sum((1 / 3) * s[k].double().numpy() for s in states)
        # fp64 accumulation rounds once: the nearest bf16 of the float64 sum
        assert torch.equal(merged[k], bf16_from_f64(e).reshape(merged[k].shape)), k


def test_sharded_inputs_and_output(tmp_path):
    states = [make_state(20 + i) for i in range(3)]
    ins = [save_sharded(str(tmp_path / f"s{i}"), s, nshards=2 + i % 2) for i, s in enumerate(states)]
    with open(os.path.join(ins[0], "config.json"), "w") as f:
        f.write('{"hidden": 4}')
    out = tmp_path / "out"
    fs.merge(ins, out, quiet=True)
    names = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in names and "config.json" in names
    assert "fastsoup.json" in names
    assert names == sorted(os.listdir(ins[0]) + ["fastsoup.json"])  # mirrors the first input
    index = json.load(open(out / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(SPEC)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in states[0].values())
    check_merged(load_any(str(out)), states, [1 / 3] * 3)


def test_mixed_layouts_and_resharding(tmp_path):
    spec = {f"layer{i}.weight": ((40, 50), torch.bfloat16) for i in range(6)}
    spec["step"] = ((1,), torch.int64)
    states = [make_state(30 + i, spec) for i in range(3)]
    a = save_file_layout(str(tmp_path / "a.safetensors"), states[0])
    b = save_sharded(str(tmp_path / "b"), states[1], 3)
    save_sharded(str(tmp_path / "c"), states[2], 2)
    out = tmp_path / "resharded"
    report = fs.merge([a, b, str(tmp_path / "c" / "model.safetensors.index.json")], out,
                      max_shard_size="10kB", quiet=True)
    assert report.kind == "dir"
    shards = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(shards) == 3 and shards[0] == "a-00001-of-00003.safetensors"  # 2 x 4000 B per shard
    for s in shards:
        assert os.path.getsize(out / s) < 10_000 + 1000
    index = json.load(open(out / "a.safetensors.index.json"))
    assert sorted(set(index["weight_map"].values())) == shards
    check_merged(load_any(str(out)), states, [1 / 3] * 3)


def test_diffusers_roots_with_variant_and_sharded_components(tmp_path):
    comps = lambda seed: {"unet": make_state(seed), "text_encoder": make_state(seed + 100)}
    states = [comps(40 + i) for i in range(2)]
    roots = [save_diffusers(str(tmp_path / f"d{i}"), s, variant="fp16",
                            sharded=("unet",) if i == 0 else ()) for i, s in enumerate(states)]
    # a non-variant copy of the weights must be ignored with --variant fp16
    save_file_layout(str(tmp_path / "d0" / "text_encoder" / "model.safetensors"),
                     make_state(999))
    out = tmp_path / "soup"
    report = fs.merge(roots, out, variant="fp16", quiet=True)
    assert report.kind == "diffusers"
    assert os.path.isfile(out / "model_index.json")
    assert os.path.isfile(out / "scheduler" / "scheduler_config.json")
    assert os.path.isfile(out / "tokenizer" / "vocab.txt")
    assert os.path.isfile(out / "unet" / "config.json")
    assert os.path.isfile(out / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json")
    assert os.path.isfile(out / "text_encoder" / "model.fp16.safetensors")
    assert not os.path.exists(out / "text_encoder" / "model.safetensors")
    merged = load_any(str(out))
    flat = [{f"{c}/{k}": v for c, sd in s.items() for k, v in sd.items()} for s in states]
    check_merged(merged, flat, [0.5, 0.5])


def test_key_policies(tmp_path):
    s0, s1, s2 = (make_state(50 + i) for i in range(3))
    s1 = dict(s1)
    del s1["up.norm.weight"]
    s2 = dict(s2)
    s2["extra.only_in_c"] = torch.randn(4, 4)
    paths = [save_file_layout(str(tmp_path / f"k{i}.safetensors"), s) for i, s in enumerate([s0, s1, s2])]
    with pytest.raises(PlanError) as info:
        fs.merge(paths, tmp_path / "strict.safetensors", quiet=True)
    text = str(info.value)
    assert "'up.norm.weight'" in text and "'extra.only_in_c'" in text  # all listed at once
    assert len(info.value.problems) == 2
    assert not os.path.exists(tmp_path / "strict.safetensors")

    rep = fs.merge(paths, tmp_path / "inter.safetensors", keys="intersection", quiet=True)
    merged = load_any(str(tmp_path / "inter.safetensors"))
    assert set(rep.dropped_keys) == {"up.norm.weight", "extra.only_in_c"}
    assert "up.norm.weight" not in merged and "extra.only_in_c" not in merged
    check_merged(merged, [s0, s1, s2], [1 / 3] * 3, keys=[k for k in SPEC if k != "up.norm.weight"])

    fs.merge(paths, tmp_path / "union.safetensors", [1.0, 2.0, 3.0], keys="union", quiet=True)
    merged = load_any(str(tmp_path / "union.safetensors"))
    assert set(merged) == set(SPEC) | {"extra.only_in_c"}
    # union renormalises the weights per key over the inputs holding it
    check_merged(merged, [s0, s2], [1 / 4, 3 / 4], keys=["up.norm.weight"])
    check_merged(merged, [s2], [1.0], keys=["extra.only_in_c"])
    check_merged(merged, [s0, s1, s2], [1 / 6, 2 / 6, 3 / 6], keys=["down.0.weight"])


def test_integer_tensors_must_match(tmp_path):
    s0, s1 = make_state(60), make_state(61)
    s1 = dict(s1)
    s1["position_ids"] = s1["position_ids"] + 1
    paths = [save_file_layout(str(tmp_path / f"i{i}.safetensors"), s) for i, s in enumerate([s0, s1])]
    with pytest.raises(PlanError, match="position_ids.*differ"):
        fs.merge(paths, tmp_path / "o.safetensors", quiet=True)
    with pytest.raises(PlanError, match="position_ids.*differ"):
        fs.merge(paths, tmp_path / "o.safetensors", dry_run=True)
    assert not os.listdir(tmp_path) == [] and not os.path.exists(tmp_path / "o.safetensors")
    assert not [p for p in os.listdir(tmp_path) if "fastsoup-tmp" in p]


def test_shape_and_kind_mismatches_listed_at_once(tmp_path):
    s0, s1 = make_state(70), make_state(71)
    s1 = dict(s1)
    s1["down.0.weight"] = torch.randn(17, 32).bfloat16()
    s1["down.0.bias"] = torch.arange(17)
    paths = [save_file_layout(str(tmp_path / f"x{i}.safetensors"), s) for i, s in enumerate([s0, s1])]
    with pytest.raises(PlanError) as info:
        fs.merge(paths, tmp_path / "o.safetensors", quiet=True)
    assert len(info.value.problems) == 2
    assert "shapes differ" in str(info.value) and "integer/bool in others" in str(info.value)


@pytest.mark.parametrize("memory", ["4KiB", "64KiB"])
def test_large_tensors_are_chunked(tmp_path, memory):
    spec = {"big": ((300, 257), torch.bfloat16), "big32": ((70001,), torch.float32),
            "small": ((3,), torch.float16)}
    states = [make_state(80 + i, spec) for i in range(4)]
    paths = [save_file_layout(str(tmp_path / f"c{i}.safetensors"), s) for i, s in enumerate(states)]
    from fastsoup.merge import engine

    calls = []
    orig = engine.make_items

    def spy(*a, **k):
        items = orig(*a, **k)
        calls.append(items)
        return items

    engine.make_items = spy
    try:
        fs.merge(paths, tmp_path / "o.safetensors", memory=memory, quiet=True)
    finally:
        engine.make_items = orig
    big_items = [it for it in calls[0] if it.tensor.key == "big"]
    assert len(big_items) > 4  # split into many chunks
    check_merged(load_any(str(tmp_path / "o.safetensors")), states, [0.25] * 4)


def test_threads_do_not_change_results(tmp_path):
    spec = {"w": ((1 << 19,), torch.bfloat16), "h": ((1 << 18,), torch.float16)}
    states = [make_state(90 + i, spec) for i in range(3)]
    paths = [save_file_layout(str(tmp_path / f"t{i}.safetensors"), s) for i, s in enumerate(states)]
    fs.merge(paths, tmp_path / "one.safetensors", threads=1, quiet=True, hash="none")
    fs.merge(paths, tmp_path / "two.safetensors", threads=2, quiet=True, hash="none")
    a, b = load_any(str(tmp_path / "one.safetensors")), load_any(str(tmp_path / "two.safetensors"))
    for k in spec:
        assert torch.equal(a[k], b[k])
    check_merged(a, states, [1 / 3] * 3)


def test_torch_device_path_matches(tmp_path):
    """The --device cuda code path (fastsoup.weighted_sum_ on torch tensors), run on CPU."""
    paths, states = files(tmp_path)
    fs.merge(paths, tmp_path / "gpu_path.safetensors", device="torch:cpu", quiet=True)
    check_merged(load_any(str(tmp_path / "gpu_path.safetensors")), states, [1 / 3] * 3, exact=False)


def test_torch_device_pipeline_finishes_every_run_before_its_bytes_are_written(tmp_path, monkeypatch):
    """The --device cuda pipeline (submit run r, finish r − 1, then reserve r's output
    bytes) with a stand-in device whose results arrive only when a run is finished: a run
    written before it finished would leave garbage in the file. A budget of a few KiB makes
    many runs, windows and staging flushes."""
    from fastsoup.merge import engine

    class LateDevice(engine.TorchSummer):
        def __init__(self, *a):
            super().__init__(*a)
            self.late = {}
            self.overlapped = 0

        def submit(self, *a):
            ticket = super().submit(*a)
            self.late[id(ticket)] = ticket[2].clone()
            ticket[2].fill_(0xAB)              # not there yet: "the device" is still working
            self.overlapped += len(self.pending) > 1
            return ticket

        def finish(self, keep=0):
            for t in self.pending[:max(0, len(self.pending) - keep)]:
                t[2].copy_(self.late.pop(id(t)))
            super().finish(keep)

    made = []
    monkeypatch.setattr(engine, "TorchSummer", lambda *a: made.append(LateDevice(*a)) or made[-1])
    real_flush = engine.Staging.flush

    def flush(self, before=None):  # the writer must never get bytes of an unfinished run
        buf = self.bufs[self.cur]
        lo, hi = buf.ctypes.data, buf.ctypes.data + self.fill
        for t in (made[0].pending if made else []):
            if t[4] is not None and len(t[4]):
                at = np.frombuffer(t[4], dtype=np.uint8).ctypes.data
                assert not lo <= at < hi, "a run's bytes went to the writer before it finished"
        real_flush(self, before)

    monkeypatch.setattr(engine.Staging, "flush", flush)
    spec = {f"layer.{i}.weight": ((40 + i, 33), torch.bfloat16) for i in range(12)}
    spec.update({f"layer.{i}.bias": ((33,), torch.float32) for i in range(12)})
    paths, states = files(tmp_path, 3, spec)
    fs.merge(paths, tmp_path / "p.safetensors", device="torch:cpu", memory="64KiB", quiet=True)
    check_merged(load_any(str(tmp_path / "p.safetensors")), states, [1 / 3] * 3, exact=False)
    assert made and made[0].overlapped > 0 and not made[0].pending


def test_manifest_in_metadata_and_sidecar(tmp_path):
    paths, states = files(tmp_path)
    out = tmp_path / "soup.safetensors"
    report = fs.merge(paths, out, [1, 1, 2], quiet=True)
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["fastsoup"])
    side = json.load(open(tmp_path / "soup.fastsoup.json"))
    assert meta == side == report.manifest
    assert meta["format"] == "fastsoup.merge/1" and meta["fastsoup_version"] == fs.__version__
    assert meta["operation"] == "weighted"
    assert [c["weight"] for c in meta["constituents"]] == [1.0, 1.0, 2.0]
    import hashlib

    for c, p in zip(meta["constituents"], paths):
        assert c["size_bytes"] == os.path.getsize(p)
        assert c["files"][0]["sha256"] == hashlib.sha256(open(p, "rb").read()).hexdigest()
    fs.merge(paths, tmp_path / "nohash.safetensors", hash="none", quiet=True)
    side = json.load(open(tmp_path / "nohash.fastsoup.json"))
    assert "sha256" not in side["constituents"][0]


def test_soup_add_remove_round_trip(tmp_path):
    paths, states = files(tmp_path, 4)
    soup3 = tmp_path / "soup3.safetensors"
    fs.merge(paths[:3], soup3, quiet=True)
    soup4 = tmp_path / "soup4.safetensors"
    from fastsoup.merge import soup_add, soup_remove

    soup_add(soup3, paths[3], soup4, quiet=True)
    fresh4 = tmp_path / "fresh4.safetensors"
    fs.merge(paths, fresh4, quiet=True)
    a, b = load_any(str(soup4)), load_any(str(fresh4))
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical to recomputing from scratch
    check_merged(a, states, [0.25] * 4)
    back = tmp_path / "back3.safetensors"
    soup_remove(soup4, paths[3], back, quiet=True)
    a, b = load_any(str(back)), load_any(str(soup3))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta = json.load(open(tmp_path / "back3.fastsoup.json"))
    assert [c["path"] for c in meta["constituents"]] == [os.path.abspath(p) for p in paths[:3]]


def test_soup_refuses_changed_constituent(tmp_path):
    paths, states = files(tmp_path, 3)
    soup = tmp_path / "soup.safetensors"
    fs.merge(paths[:2], soup, quiet=True)
    # same size, different bytes: caught by the sha256 check during the run
    changed = make_state(10)
    changed["down.0.bias"] = changed["down.0.bias"] + 1
    save_file_layout(paths[0], changed)
    from fastsoup.merge import soup_add

    with pytest.raises(MergeError, match="changed since the soup was made"):
        soup_add(soup, paths[2], tmp_path / "new.safetensors", quiet=True)
    assert not os.path.exists(tmp_path / "new.safetensors")


def test_pickle_refused_unless_allowed(tmp_path):
    states = [make_state(100 + i) for i in range(2)]
    ck = [str(tmp_path / f"p{i}.ckpt") for i in range(2)]
    for s, p in zip(states, ck):
        torch.save({"state_dict": s}, p)
    with pytest.raises(PlanError, match="refusing to load a pickle"):
        fs.merge(ck, tmp_path / "o.safetensors", quiet=True)
    fs.merge(ck, tmp_path / "o.safetensors", allow_pickle=True, quiet=True)
    check_merged(load_any(str(tmp_path / "o.safetensors")), states, [0.5, 0.5])


def test_dry_run_reads_nothing_and_writes_nothing(tmp_path):
    paths, states = files(tmp_path)
    rep = fs.merge(paths, tmp_path / "o.safetensors", dry_run=True)
    assert rep.dry_run and not os.path.exists(tmp_path / "o.safetensors")
    assert rep.bytes_to_write == sum(t.numel() * t.element_size() for t in states[0].values())
    assert rep.disk_free is not None and rep.memory_budget > 0
    assert "dry run" in rep.summary() and "validation: OK" in rep.summary()


def test_hash_cache_reuses_digests_and_notices_changes(tmp_path, monkeypatch):
    from fastsoup.merge import hashing

    paths, states = files(tmp_path, 2)
    digested = []
    orig = hashing._FileDigest.__init__
    monkeypatch.setattr(hashing._FileDigest, "__init__",
                        lambda self, wf, *a: (digested.append(wf.path), orig(self, wf, *a))[1])
    fs.merge(paths, tmp_path / "a.safetensors", quiet=True)
    assert sorted(digested) == sorted(os.path.abspath(p) for p in paths)
    digested.clear()
    rep = fs.merge(paths, tmp_path / "b.safetensors", [1, 2], quiet=True)
    assert digested == []  # both digests came from the cache
    first = rep.manifest["constituents"][0]["files"][0]["sha256"]
    save_file_layout(paths[0], make_state(77))  # rewritten: new mtime/inode
    rep = fs.merge(paths, tmp_path / "c.safetensors", quiet=True)
    assert digested == [os.path.abspath(paths[0])]
    assert rep.manifest["constituents"][0]["files"][0]["sha256"] != first
    monkeypatch.setenv("FASTSOUP_HASH_CACHE", "0")
    digested.clear()
    fs.merge(paths, tmp_path / "d.safetensors", quiet=True)
    assert len(digested) == 2


def test_soup_add_remove_task_arithmetic_default_weights(tmp_path):
    """A base soup made with the default weights (1/n task weights) stays the mean of
    its constituents after add and remove."""
    paths, states = files(tmp_path, 4)
    from fastsoup.merge import soup_add, soup_remove

    soup = tmp_path / "ta.safetensors"
    fs.merge(paths[1:3], soup, base=paths[0], quiet=True)
    soup_add(soup, paths[3], tmp_path / "ta3.safetensors", quiet=True)
    fresh = tmp_path / "fresh.safetensors"
    fs.merge(paths[1:], fresh, base=paths[0], quiet=True)
    a, b = load_any(str(tmp_path / "ta3.safetensors")), load_any(str(fresh))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta = json.load(open(tmp_path / "ta3.fastsoup.json"))
    assert meta["operation"] == "task_arithmetic" and meta["default_weights"]
    assert [c["coefficient"] for c in meta["constituents"]] == [1 / 3] * 3
    soup_remove(tmp_path / "ta3.safetensors", paths[1], tmp_path / "ta2.safetensors", quiet=True)
    check_merged(load_any(str(tmp_path / "ta2.safetensors")), [states[2], states[3], states[0]],
                 [0.5, 0.5, 0.0], exact=False)


def test_soup_of_sharded_and_diffusers_inputs_add_remove(tmp_path):
    from fastsoup.merge import soup_add, soup_remove

    comps = lambda seed: {"unet": make_state(seed), "text_encoder": make_state(seed + 100)}
    states = [comps(300 + i) for i in range(3)]
    roots = [save_diffusers(str(tmp_path / f"d{i}"), s, variant="fp16", sharded=("unet",))
             for i, s in enumerate(states)]
    soup = tmp_path / "soup"
    fs.merge(roots[:2], soup, variant="fp16", quiet=True)
    soup_add(soup, roots[2], tmp_path / "soup3", quiet=True)  # variant taken from the manifest
    fresh = tmp_path / "fresh"
    fs.merge(roots, fresh, variant="fp16", quiet=True)
    a, b = load_any(str(tmp_path / "soup3")), load_any(str(fresh))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    soup_remove(tmp_path / "soup3", roots[0], tmp_path / "soup12", quiet=True)
    flat = [{f"{c}/{k}": v for c, sd in s.items() for k, v in sd.items()} for s in states]
    check_merged(load_any(str(tmp_path / "soup12")), flat[1:], [0.5, 0.5])

    sh = [save_sharded(str(tmp_path / f"s{i}"), make_state(400 + i), 2) for i in range(3)]
    idx0 = os.path.join(sh[0], "model.safetensors.index.json")
    fs.merge([idx0, sh[1]], tmp_path / "ssoup", quiet=True)  # one input given as its index
    soup_add(tmp_path / "ssoup", sh[2], tmp_path / "ssoup3", quiet=True)
    check_merged(load_any(str(tmp_path / "ssoup3")), [make_state(400 + i) for i in range(3)], [1 / 3] * 3)


def test_resident_memory_stays_within_the_budget(tmp_path):
    """In a fresh process, merging 2 x 48 MB inputs with a 16 MiB budget must not map the
    inputs wholesale: peak RSS grows by about the budget, not by the input size."""
    import subprocess
    import sys

    spec = {f"w{i}": ((3000, 1000), torch.bfloat16) for i in range(8)}  # 8 x 6 MB each
    paths = [save_file_layout(str(tmp_path / f"r{i}.safetensors"), make_state(500 + i, spec))
             for i in range(2)]
    script = (
        "import sys, fastsoup as fs\n"
        "def kb(key):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
        "base = kb('VmRSS:')\n"
        "fs.merge(sys.argv[1:3], sys.argv[3], memory='16MiB', quiet=True, hash='none')\n"
        "print((kb('VmHWM:') - base) * 1024)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script, *paths, str(tmp_path / "o.safetensors")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    grown = int(res.stdout.strip().splitlines()[-1])
    inputs = sum(os.path.getsize(p) for p in paths)
    assert grown < 16 * 2**20 + 24 * 2**20, (grown, inputs)  # budget + allocator/imports slack
    check_merged(load_any(str(tmp_path / "o.safetensors")), [make_state(500 + i, spec) for i in range(2)],
                 [0.5, 0.5])


def test_inputs_are_read_without_memory_maps(tmp_path, monkeypatch):
    """Inputs are read with pread into window buffers, never mapped (a mapped page past
    the end of a file truncated under the merge would be SIGBUS)."""
    import mmap as stdlib_mmap

    real = stdlib_mmap.mmap

    def refuse(fileno, *a, **k):  # anonymous memory (the engine's buffers) is fine
        if fileno != -1:
            raise AssertionError("an input was memory-mapped")
        return real(fileno, *a, **k)

    monkeypatch.setattr(stdlib_mmap, "mmap", refuse)
    spec = {f"w{i}": ((257, 300), torch.bfloat16) for i in range(5)}
    states = [make_state(600 + i, spec) for i in range(3)]
    paths = [save_file_layout(str(tmp_path / f"p{i}.safetensors"), s) for i, s in enumerate(states)]
    fs.merge(paths, tmp_path / "o.safetensors", memory="64KiB", quiet=True)
    check_merged(load_any(str(tmp_path / "o.safetensors")), states, [1 / 3] * 3)


@pytest.mark.cuda
def test_merge_on_the_gpu_matches_cpu(tmp_path):
    paths, states = files(tmp_path)
    fs.merge(paths, tmp_path / "gpu.safetensors", device="cuda", memory="64KiB", quiet=True)
    check_merged(load_any(str(tmp_path / "gpu.safetensors")), states, [1 / 3] * 3, exact=False)


def test_stream_buffers_are_anonymous_mappings_not_numpy_allocations():
    """The window and staging buffers live in mappings of their own: numpy would advise
    huge pages for them, whose first touch can stall in direct compaction."""
    import mmap as stdlib_mmap
    from concurrent.futures import ThreadPoolExecutor

    from fastsoup.merge import engine
    from fastsoup.merge.mmap import WindowBuffer

    wb = WindowBuffer(1 << 20)
    wb.ensure(3 << 20)
    with ThreadPoolExecutor(1) as pool:
        staging = engine.Staging(1 << 20, pool)
    for buf in [wb.buf, *staging.bufs]:
        base = buf.base.obj if isinstance(buf.base, memoryview) else buf.base
        assert isinstance(base, stdlib_mmap.mmap) and buf.flags.writeable
    assert len(wb.buf) == 3 << 20
