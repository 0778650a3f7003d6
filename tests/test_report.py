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
