"""benchmarks/bench_merge.py --run: a row that fails is recorded with its error and the
other rows are still measured."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    bench_merge = pytest.importorskip("bench_merge")
    inputs = bench_merge.generate(str(tmp_path / "in"), 2, 1, "sd")

    def broken(i, o):
        raise ValueError("broken on purpose")

    monkeypatch.setitem(bench_merge.TOOLS, "fastsoup-nohash", broken)
    monkeypatch.setenv("FASTSOUP_CACHE_DIR", str(tmp_path / "cache"))
    skip = ["fastsoup (first merge)", "fastsoup (digests cached)", "fastsoup TIES",
            "fastsoup DARE", "fastsoup LoRA", "naive", "fastsoup-merge"]
    rows, _ = bench_merge.interleaved(inputs, str(tmp_path), 1, False, peers=(), skip=skip)
    bad = rows["fastsoup (hash none) [in-process]"]
    assert bad["error"] == "ValueError: broken on purpose" and not bad["times"]
    assert set(rows) == {"fastsoup (hash none) [in-process]", "floor [in-process]", "floor [command]"}
    assert all(len(rows[k]["times"]) == 1 for k in ("floor [in-process]", "floor [command]"))
