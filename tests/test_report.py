"""benchmarks/report.py: ratios against baseline and ceiling, markdown, README section."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("fs_report", os.path.join(ROOT, "benchmarks", "report.py"))
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def _bench(group, impl, median, gbps=None, role=None):
    info = {"impl": impl, "median_s": median}
    if gbps is not None:
        info["effective_GBps"] = gbps
    if role:
        info["role"] = role
    return {"group": group, "name": f"test[{impl}]", "extra_info": info,
            "stats": {"median": median, "rounds": 3, "data": [median] * 3}}


def test_summarise_ratios_and_markdown():
    rows = [_bench("g", "eager", 4e-3, 100.0), _bench("g", "fastsoup", 1e-3, 400.0),
            _bench("g", "copy", 0.8e-3, 500.0),
            _bench("m", "floor", 1.0), _bench("m", "fastsoup", 1.25), _bench("m", "naive", 5.0)]
    table = report.summarise(rows)
    g = {r["impl"]: r for r in table["g"]}
    assert g["eager"]["role"] == "baseline" and g["copy"]["role"] == "ceiling"
    assert abs(g["fastsoup"]["speedup_vs_baseline"] - 4.0) < 1e-9
    assert abs(g["fastsoup"]["fraction_of_ceiling"] - 0.8) < 1e-9
    m = {r["impl"]: r for r in table["m"]}
    assert abs(m["fastsoup"]["fraction_of_ceiling"] - 0.8) < 1e-9  # time ratio when no GB/s
    assert abs(m["fastsoup"]["speedup_vs_baseline"] - 4.0) < 1e-9
    meta = {"device": "X", "date": "2026-01-01", "size": "small", "versions": {"torch": "t"},
            "machine": "m", "command": "c"}
    md = report.to_markdown(meta, table)
    assert "## g" in md and "| fastsoup | - | 1.000 |" in md and "4.00×" in md and "80%" in md


def test_update_readme_rewrites_only_the_marked_section(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("head\n<!-- perf:start -->\nold\n<!-- perf:end -->\ntail\n")
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    table = report.summarise([_bench("g", "eager", 2e-3), _bench("g", "fastsoup", 1e-3)])
    meta = {"device": "GPU-Z", "date": "2026-01-02", "size": "full", "versions": {"torch": "t"},
            "machine": "m", "command": "c"}
    (results / "gpu-z-2026-01-02.json").write_text(json.dumps({"meta": meta, "table": table}))
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    monkeypatch.setattr(report, "RESULTS", str(results))
    assert report.update_readme()
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("head\n") and text.endswith("tail\n") and "old" not in text
    assert "### GPU-Z (2026-01-02)" in text and "| g | fastsoup (-) | 1.000 | 2.00× | - |" in text


def _modelled(group, impl, median, model, role=None):
    b = _bench(group, impl, median, gbps=1.0, role=role)
    b["extra_info"].update(model_s=model, copy_GBps=2.5, bytes_moved=int(model * 2.5e9))
    return b


def test_ceiling_model_ratio_and_markdown():
    """Rows carrying the copy-bandwidth model read as model / median, ceiling rows too;
    rows without it fall back to the group's ceiling row."""
    rows = [_modelled("k", "eager", 4e-3, 1e-3), _modelled("k", "fastsoup", 2e-3, 1e-3),
            _modelled("k", "copy", 0.5e-3, 0.25e-3), _bench("k", "unmodelled", 1e-3, 0.5)]
    table = report.summarise(rows)
    k = {r["impl"]: r for r in table["k"]}
    assert abs(k["fastsoup"]["fraction_of_ceiling"] - 0.5) < 1e-9
    assert abs(k["eager"]["fraction_of_ceiling"] - 0.25) < 1e-9
    assert abs(k["copy"]["fraction_of_ceiling"] - 0.5) < 1e-9  # a ceiling row has a model too
    assert abs(k["fastsoup"]["model_ms"] - 1.0) < 1e-9
    assert abs(k["unmodelled"]["fraction_of_ceiling"] - 0.5 / 1.0) < 1e-9  # vs copy's GB/s
    assert k["unmodelled"]["model_ms"] is None
    meta = {"device": "X", "date": "2026-01-01", "size": "small", "versions": {"torch": "t"},
            "machine": "m", "command": "c"}
    md = report.to_markdown(meta, table)
    assert "Model: bytes / 2.5 GB/s (measured copy bandwidth)." in md
    assert "| model ms | of ceiling |" in md
    assert "| fastsoup | - | 2.000 | 2.000–2.000 | 1.0 | 2.00× | 1.000 | 50% | - |" in md
    assert "| unmodelled | - | 1.000 | 1.000–1.000 | 0.5 | 4.00× | - | 50% | - |" in md


def test_ceiling_row_without_model_has_no_fraction():
    table = report.summarise([_bench("g", "copy", 1e-3, 100.0), _bench("g", "fastsoup", 2e-3, 50.0)])
    g = {r["impl"]: r for r in table["g"]}
    assert g["copy"]["fraction_of_ceiling"] is None
    assert abs(g["fastsoup"]["fraction_of_ceiling"] - 0.5) < 1e-9


def test_harness_measure_records_the_model(monkeypatch):
    """measure() adds model_s = bytes_moved / measured copy bandwidth (one measurement per
    process, cached)."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import harness
    finally:
        sys.path.pop(0)
    monkeypatch.setenv("FASTSOUP_BENCH_COPY_MB", "1")
    monkeypatch.setattr(harness, "_COPY", {})

    class Bench:
        def __init__(self):
            self.extra_info = {}

        def pedantic(self, fn, rounds, iterations, warmup_rounds):
            for _ in range(rounds):
                fn()
            self.stats = type("S", (), {"stats": type("D", (), {"data": [2e-3, 1e-3, 3e-3]})()})()

    b = Bench()
    harness.measure(b, lambda: None, bytes_moved=10**6, rounds=3)
    info = b.extra_info
    bw = harness.copy_bandwidth()
    assert bw > 0 and harness._COPY["bytes"] == 2**20
    assert info["median_s"] == 2e-3 and abs(info["copy_GBps"] - bw / 1e9) < 1e-12
    assert abs(info["model_s"] - 10**6 / bw) < 1e-15
    b2 = Bench()
    harness.measure(b2, lambda: None, rounds=3)  # no bytes: no model
    assert "model_s" not in b2.extra_info


def test_update_readme_skips_other_results_files(tmp_path, monkeypatch):
    """JSON files of other tools in results/ (no report table) are not report runs."""
    (tmp_path / "README.md").write_text("<!-- perf:start -->\n<!-- perf:end -->\n")
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "cpu-host-cost-2026-01-03.json").write_text(json.dumps(
        {"meta": {"date": "2026-01-03"}, "weighted_sum": {}}))
    meta = {"device": "cpu-2core", "date": "2026-01-02", "size": "small",
            "versions": {"torch": "t"}, "machine": "m", "command": "c"}
    table = report.summarise([_bench("g", "eager", 2e-3), _bench("g", "fastsoup", 1e-3)])
    (results / "cpu-2core-2026-01-02.json").write_text(json.dumps({"meta": meta, "table": table}))
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    monkeypatch.setattr(report, "RESULTS", str(results))
    assert report.update_readme()
    text = (tmp_path / "README.md").read_text()
    assert "### cpu-2core (2026-01-02)" in text and "host-cost" not in text


def test_load_average_is_printed_as_numbers_and_merges_show_the_first_merge():
    text = report._fmt_load({"before": (3.2, 3.1, 2.9), "after": (4.0, 3.5, 3.0)})
    assert text == "before 3.20 / 3.10 / 2.90, after 4.00 / 3.50 / 3.00"
    rows = [{"impl": "fastsoup-hash-cached", "median_ms": 1.0},
            {"impl": "fastsoup", "median_ms": 3.0}]
    assert report._readme_row("merge 4 x 400 MB bf16", rows)["impl"] == "fastsoup"
    assert report._readme_row("weighted_sum K=4", rows)["impl"] == "fastsoup-hash-cached"
