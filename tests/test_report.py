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
    assert "### GPU-Z (2026-01-02)" in text and "| g | 2026-01-02 | fastsoup | - | 1.000 | 2.00× | - |" in text


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


def _bench_n(group, impl, median, rounds, label=None, role=None):
    b = _bench(group, impl, median, role=role)
    b["stats"].update(rounds=rounds, data=[median] * rounds)
    if label:
        b["extra_info"]["label"] = label
    return b


def _readme_for(tmp_path, monkeypatch, files):
    """update_readme over a results folder holding ``files`` ({name: json object})."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "README.md").write_text("<!-- perf:start -->\n<!-- perf:end -->\n")
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    for name, obj in files.items():
        (results / name).write_text(json.dumps(obj))
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    monkeypatch.setattr(report, "RESULTS", str(results))
    assert report.update_readme()
    return (tmp_path / "README.md").read_text()


META = {"device": "cpu-2core", "date": "2026-01-02", "size": "small", "versions": {"torch": "t"},
        "machine": "m", "command": "c",
        "load_average": {"before": [1.5, 1.25, 1.0], "after": [2.0, 1.5, 1.125]}}


def test_readme_shows_every_train_step_loss_against_one_baseline(tmp_path, monkeypatch):
    g = "train step UNet2DCondition tiny b4"
    table = report.summarise([_bench(g, "eager", 60e-3), _bench(g, "fastsoup-mse", 50e-3),
                              _bench(g, "fastsoup-agc", 80e-3)])
    text = _readme_for(tmp_path, monkeypatch, {"cpu-2core-2026-01-02.json": {"meta": META, "table": table}})
    mse = [ln for ln in text.splitlines() if ln.startswith(f"| {g} |") and "fastsoup-mse" in ln]
    agc = [ln for ln in text.splitlines() if ln.startswith(f"| {g} |") and "fastsoup-agc" in ln]
    assert len(mse) == 1 and len(agc) == 1
    assert "| 50.000 | 1.20× |" in mse[0] and "| 80.000 | 0.75× |" in agc[0]  # both vs eager
    assert "`fs.agc_loss(" in agc[0] and "`fs.per_sample_mse(" in mse[0]
    # the load average as numbers, not a dict
    assert "load average (1/5/15 min): before 1.50 / 1.25 / 1.00, after 2.00 / 1.50 / 1.12" in text
    assert "{'before'" not in text and '"before"' not in text


def test_weighted_sum_rows_say_which_is_the_public_api(tmp_path, monkeypatch):
    g = "weighted_sum K=4 x 442 bf16 tensors"
    rows = [_bench(g, "foreach", 100e-3), _bench(g, "fastsoup", 30e-3), _bench(g, "cpu-C", 20e-3)]
    md = report.to_markdown(META, report.summarise(rows))
    assert "`fastsoup` = `fs.weighted_sum_` (the public API)" in md
    assert "`cpu-C` = `fastsoup._C.weighted_sum` per tensor" in md and "not the public API" in md
    # a label recorded by the suite wins over the built-in one
    rows[1]["extra_info"]["label"] = "`fs.weighted_sum_` (recorded)"
    table = report.summarise(rows)
    assert {r["impl"]: r["label"] for r in table[g]}["fastsoup"] == "`fs.weighted_sum_` (recorded)"
    text = _readme_for(tmp_path, monkeypatch, {"cpu-2core-2026-01-02.json": {"meta": META, "table": table}})
    lines = [ln for ln in text.splitlines() if ln.startswith(f"| {g} |")]
    assert len(lines) == 2
    assert "| fastsoup = `fs.weighted_sum_` (recorded) |" in lines[1] and "| 3.33× |" in lines[1]
    assert "| cpu-C = `fastsoup._C.weighted_sum` per tensor" in lines[0] and "| 5.00× |" in lines[0]


def test_one_round_rows_print_no_spread():
    rows = [_bench_n("g", "eager", 2e-3, 1), _bench_n("g", "fastsoup", 1e-3, 1),
            _bench_n("h", "fastsoup", 1e-3, 5)]
    table = report.summarise(rows)
    md = report.to_markdown(dict(META, size="smoke"), table)
    assert "| fastsoup | - | 1.000 | - (1 round) |" in md and "1.000–1.000" not in md.split("## g")[1].split("## h")[0]
    assert "| fastsoup | - | 1.000 | 1.000–1.000 |" in md.split("## h")[1]  # five rounds: a spread
    assert "smoke run" in md and "one round per row" in md


def _merge_row(name, kind, times, rss=None, error=None):
    return {"name": name, "kind": kind, "times": times, "cpu": [1.0] * len(times),
            "rss": rss or [None] * len(times), "load": [[1.0, 1.0]] * len(times), "error": error}


def _merge_file(date, rows, skipped=None, rounds=3, cache="warm: inputs read once"):
    return {"meta": {"date": date, "machine": "m", "versions": {"fastsoup": "0"}, "rounds": rounds,
                     "layout": "sd", "layout_text": "2 × 10 MB bf16 SD-like inputs, 5 tensors each",
                     "cache_text": cache, "command": "bench_merge.py --run",
                     "load_average": {"before": [0.5, 0.25, 0.125], "after": [1.0, 0.75, 0.5]}},
            "rows": {f"{r['name']} [{r['kind']}]": r for r in rows}, "skipped": skipped or {}}


def test_readme_merge_table_from_bench_merge_results(tmp_path, monkeypatch):
    mb = 10**6
    rows = [
        _merge_row("floor", "in-process", [1.0, 1.2, 1.1]),
        _merge_row("fastsoup (first merge)", "in-process", [2.0, 2.2, 2.4]),
        _merge_row("fastsoup (digests cached)", "in-process", [0.9, 0.8, 1.0]),  # beats its floor
        _merge_row("fastsoup TIES (density 0.2, hash none)", "in-process", [1.5] * 3),  # extra row
        _merge_row("floor", "command", [2.0] * 3, rss=[50 * mb] * 3),
        _merge_row("fastsoup-merge (first merge)", "command", [3.0] * 3, rss=[300 * mb] * 3),
        _merge_row("fastsoup-merge --hash none", "command", [2.5] * 3, rss=[290 * mb] * 3),
        _merge_row("mergekit", "command", [], error="mergekit-yaml exited 1:\nTraceback\nRuntimeError: boom"),
    ]  # no naive row, no cached or in-process --hash none: tolerated
    files = {
        "cpu-merge-2026-01-03-sd-2x10.json": _merge_file("2026-01-03 10:00 UTC", rows,
                                                         {"sd-mecha": "not installed"}),
        "cpu-merge-2026-01-01-sd-2x10.json": _merge_file("2026-01-01 10:00 UTC", rows[:1]),  # older
        "cpu-merge-2026-01-04-sd-2x10-cold.json": _merge_file(  # a variant: listed, not tabled
            "2026-01-04 10:00 UTC", rows[:1], cache="cold: evicted"),
        "cpu-merge-2026-01-05-sd-2x10-memlimit.json": _merge_file("2026-01-05 10:00 UTC", rows[:1]),
        "cpu-merge-2026-01-06-sd-2x10.json": dict(_merge_file("2026-01-06 10:00 UTC", rows[:1]),
                                                  meta=dict(_merge_file("2026-01-06 10:00 UTC", [])["meta"],
                                                            memory_limit=2**30)),
        "cpu-2core-2026-01-02.json": {"meta": META, "table": report.summarise(
            [_bench("merge 4 x 400 MB bf16", "fastsoup", 1.0), _bench("merge 4 x 400 MB bf16", "floor", 2.0)])},
    }
    text = _readme_for(tmp_path, monkeypatch, files)
    assert "From `benchmarks/results/cpu-merge-2026-01-03-sd-2x10.json`" in text
    assert "load average (1/5/15 min): before 0.50 / 0.25 / 0.12, after 1.00 / 0.75 / 0.50" in text
    assert "| I/O floor (read every input, write + fsync the output) | 1.100 | 1.00 | 2.000 | 1.00 | 50 |" in text
    assert "| fastsoup, first merge (sha256 digests computed) | 2.200 | 2.00 | 3.000 | 1.50 | 300 |" in text
    assert "| fastsoup, digests cached | 0.900 | **0.82: below the floor** | not in this run |  | - |" in text
    assert "**A floor is beaten**: fastsoup, digests cached (in-process) 0.900 s < floor 1.100 s" in text
    assert "| fastsoup, `--hash none` | not in this run |  | 2.500 | 1.25 | 290 |" in text
    assert "| naive `safe_open` + `add_` loop | not in this run |  | not in this run |  | - |" in text
    assert "| mergekit | - |  | failed |  | - |" in text and "`RuntimeError: boom`" in text
    assert "| sd-mecha | not measured |  | not measured |  | - |" in text
    assert "sd-mecha: not measured: not installed" in text
    assert "`fastsoup TIES (density 0.2, hash none) (in-process)`" in text  # extra rows named
    assert "cpu-merge-2026-01-04-sd-2x10-cold.md` (" in text  # the cold variant only listed
    # the report's pytest-benchmark merge group is replaced by this table
    assert "| merge 4 x 400 MB bf16 |" not in text and "left out here" in text


def test_report_merge_group_faster_than_its_floor_is_flagged():
    g = "merge 4 x 400 MB bf16"
    table = report.summarise([_bench(g, "floor", 0.34), _bench(g, "fastsoup-hash-cached", 0.28),
                              _bench(g, "fastsoup", 1.2), _bench(g, "naive", 1.9)])
    md = report.to_markdown(META, table)
    flagged = [ln for ln in md.splitlines() if "below the floor" in ln]
    assert len(flagged) == 1 and flagged[0].startswith("| fastsoup-hash-cached |")
    assert "the fractions above are not bounds" in md


def test_readme_merge_table_says_how_the_commands_found_their_bytecode(tmp_path, monkeypatch):
    rows = [_merge_row("floor", "in-process", [1.0] * 3),
            _merge_row("fastsoup (first merge)", "in-process", [2.0] * 3)]
    with_bc = _merge_file("2026-01-03 10:00 UTC", rows)
    with_bc["meta"]["bytecode"] = "compiled before the rounds (compileall)"
    text = _readme_for(tmp_path, monkeypatch, {"cpu-merge-2026-01-03-sd-2x10.json": with_bc})
    assert "bytecode: compiled before the rounds (compileall); load average" in text
    text = _readme_for(tmp_path / "older", monkeypatch,  # older results: nothing said
                       {"cpu-merge-2026-01-03-sd-2x10.json": _merge_file("2026-01-03 10:00 UTC", rows)})
    assert "bytecode" not in text
