"""benchmarks/bench_merge.py --run: a row that fails is recorded with its error and the
other rows are still measured; benchmarks/merge_stages.py reports every stage;
benchmarks/sum_kernel.py times the CPU sum kernel."""
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


def test_merge_stages_times_every_stage(tmp_path, capsys):
    """benchmarks/merge_stages.py runs on real inputs and reports each stage and the sum."""
    bench_merge = pytest.importorskip("bench_merge")
    import merge_stages

    inputs = bench_merge.generate(str(tmp_path / "in"), 2, 1, "sd")
    assert merge_stages.main(["--repeat", "1", *inputs]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2 inputs, minimum of 1:"
    got = {line[:34].strip(): float(line[34:].split()[0]) for line in lines[1:]}
    assert list(got) == ["resolve", "plan (resolve included)", "report", "items", "runs",
                         "plan + report + items + runs"]
    assert all(v >= 0 for v in got.values())
    assert got["plan + report + items + runs"] == pytest.approx(
        got["plan (resolve included)"] + got["report"] + got["items"] + got["runs"],
        abs=2.6e-3)  # five figures printed to 3 decimals: each off by up to 0.5e-3


def test_sum_kernel_reports_every_size_and_the_call_cost(capsys):
    """benchmarks/sum_kernel.py sums its inputs with the compiled kernel and prints a
    throughput per size and the cost of one call."""
    import sum_kernel

    assert sum_kernel.main(["--kib", "4,8", "--seconds", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fastsoup._C from ")
    assert [ln.split(":")[0].strip() for ln in lines[1:3]] == ["8 bf16 inputs × 4 KiB",
                                                              "8 bf16 inputs × 8 KiB"]
    assert all(float(ln.split(": ")[1].split()[0]) > 0 for ln in lines[1:4])
    assert lines[3].startswith("  one call of 8 fp32 elements")


def test_sum_kernel_inputs_are_normal_bf16():
    """The kernel benchmark sums weights-like values (no subnormals, NaNs or infinities,
    which would time other paths of the hardware)."""
    import numpy as np
    import sum_kernel

    bits = sum_kernel.bf16_normal(10_000, np.random.default_rng(1)).astype(np.uint32) << 16
    x = bits.view(np.float32)
    assert np.isfinite(x).all() and (np.abs(x[x != 0]) > np.finfo(np.float32).tiny).all()
    assert 0.01 < float(x.std()) < 0.04


def test_bytecode_is_compiled_before_the_rounds():
    """Whole commands load fastsoup's bytecode as an installed package does: the bench
    byte-compiles fastsoup and itself first, even under PYTHONDONTWRITEBYTECODE."""
    import importlib.util

    import bench_merge
    import fastsoup.merge.api as api

    said = bench_merge.compile_bytecode()
    assert said.startswith("compiled before the rounds")
    for f in (api.__file__, bench_merge.__file__):
        assert os.path.exists(importlib.util.cache_from_source(f)), f
