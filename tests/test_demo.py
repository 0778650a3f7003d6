"""`fastsoup demo` at its smallest setting, and the examples' --smoke mode, end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402  (diffusers brings Pillow)

from fastsoup import demo  # noqa: E402
from fastsoup.cli import main as cli_main  # noqa: E402
from fastsoup.train.data import STYLES, nearest_neighbour_rms, procedural_images, shard_datasets  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_smallest_setting_writes_grid_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    rc = cli_main(["demo", "--shards", "2", "--rounds", "2", "--steps", "2", "--finetune-steps", "2",
                   "--per-shard", "4", "--size", "8", "--samples", "2", "--sample-steps", "2",
                   "--width", "8", "--batch", "4", "--out", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == threads          # the demo restores torch's thread count
    printed = capsys.readouterr().out
    assert f"demo output: {out}" in printed and "round 2/2" in printed and "fine-tuning:" in printed
    # not a terminal: plain progress lines instead of a progress bar
    assert "training: 12/12 steps (100%)" in printed
    report = json.loads((out / "report.json").read_text())
    assert len(report["history"]) == 2 * 3
    assert [h["phase"] for h in report["history"]] == ["iet"] * 4 + ["fine-tune"] * 2
    assert set(report["models"]) == {"shard 0", "shard 1", "soup", demo.AVERAGE_ROW}
    assert report["models"]["shard 1"]["style"] == "rings" and report["models"]["soup"]["style"] is None
    for m in report["models"].values():
        assert len(m["labels"]) == 2 and 0 <= m["training_style_fraction"] <= 1
        assert set(m["labels"]) <= set(report["classifier"]["classes"])
    assert report["classifier"]["heldout_style_accuracy"] > 0.8
    assert len(report["findings"]) == 4 and all(f.endswith(".") for f in report["findings"])
    assert report["soup"]["weights"] == [0.5, 0.5]
    assert len(report["grid_rows"]) == 2 + 4 and report["grid_rows"][0].startswith("training data: stripes")
    img = Image.open(out / "grid.png")
    assert img.size[0] > 2 * (8 * 4 + 2) and img.size[1] == 6 * (8 * 4 + 2) + 2   # label column + 6 rows
    md = (out / "report.md").read_text()
    assert md.startswith("# fastsoup demo report") and "## Findings" in md
    samples = md.split("## Samples")[1].split("\n\n")[1].splitlines()
    assert len(samples) == 2 + 4 and len({line.count("|") for line in samples}) == 1   # aligned columns
    # the soup really is the weighted average of the saved shard models
    from safetensors.torch import load_file

    shards = [load_file(out / "shards" / f"shard_{k}" / "diffusion_pytorch_model.safetensors") for k in range(2)]
    soup = load_file(out / "soup" / "diffusion_pytorch_model.safetensors")
    for key, value in soup.items():
        torch.testing.assert_close(value, (shards[0][key] + shards[1][key]) / 2, rtol=1e-6, atol=1e-7)


def test_demo_thread_default(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert demo.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert demo.default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert demo.default_threads() == 4


def test_demo_findings_state_the_baselines():
    hist = [{"excluded_duplicates": 30, "seen_duplicates": 100, "excluded_unique": 10, "seen_unique": 200}]

    def model(style, own, covered, n=10, every=None):
        m = {"style": style, "labels": ["x"] * n, "own_style_fraction": own,
             "asked_style_fraction": own if own is not None else 0.75,
             "training_style_fraction": 0.9, "styles_covered": covered, "nn_rms_mean": 0.3,
             "heldout_nn_rms_mean": 0.5, "copies": 1, "copies_of_duplicate": 1,
             "heldout_copy_fraction": 0.05}
        if every is not None:
            m["every_style_asked_fraction"], m["every_style_covered"] = every, covered
        return m

    soup = model(None, None, ["rings", "stripes"])
    soup["asked_style_fraction_by_style"] = {"stripes": 0.5, "rings": 1.0}
    soup["rms_to_average_samples"] = 0.123
    r = {"history": hist, "styles": ["stripes", "rings"], "copy_threshold": 0.1,
         "classifier": {"heldout_style_accuracy": 0.97, "heldout_images": 500},
         "models": {"shard 0": model("stripes", 0.8, ["stripes"], every=0.4),
                    "shard 1": model("rings", 1.0, ["rings"], every=0.5),
                    "soup": soup, demo.AVERAGE_ROW: model(None, None, ["rings", "stripes"])}}
    f = demo.findings(r)
    assert f[0].startswith("AGC excluded 30% of the duplicated") and "against 5% of the unique" in f[0]
    assert "(6.0x)" in f[0]
    assert "90% of the shard models' and the soup's samples" in f[1] and "80%-100%" in f[1]
    assert "soup gives the style asked in 75% of its samples (stripes 50%, rings 100%)" in f[2]
    assert "covers 2 of the 2 training styles" in f[2] and "single shard model asked the same" in f[2]
    assert "40%-50% of cases (covering 1-1 styles)" in f[2] and "0.123" in f[2]
    assert "0.300" in f[3] and "(0.500)" in f[3] and "3 of 30 samples" in f[3] and "5% of fresh" in f[3]


def test_style_classifier_separates_styles_and_rejects_noise():
    clf = demo.StyleClassifier(16, per_class=60)
    assert clf.heldout_style_accuracy > 0.85
    x = procedural_images("checker", 6, 16, seed=99)
    assert clf.predict(demo.repaint(x, "checker")).count("checker") >= 5   # repainting keeps the style
    noise = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert clf.predict(noise).count("other") >= 5


def test_demo_error_hint_works_from_a_source_tree():
    assert "fastsoup[" not in demo.INSTALL_HINT and "make demo" in demo.INSTALL_HINT


def test_demo_rejects_bad_flags(tmp_path):
    with pytest.raises(SystemExit, match="--width must be a multiple of 8"):
        cli_main(["demo", "--width", "12", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        cli_main(["demo", "--steps", "0", "--out", str(tmp_path / "x")])


def test_procedural_data_is_deterministic_and_styled():
    a = procedural_images("rings", 3, 12, seed=4)
    assert a.shape == (3, 3, 12, 12) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, procedural_images("rings", 3, 12, seed=4))
    assert not torch.equal(a, procedural_images("rings", 3, 12, seed=5))
    data = shard_datasets(3, 8, 8, duplicate_fraction=0.25)
    for images, is_dup in data:
        assert int(is_dup.sum()) == 2 and torch.equal(images[0], images[1])
    d = nearest_neighbour_rms(data[0][0][:2], data[0][0])
    assert torch.allclose(d, torch.zeros(2))
    with pytest.raises(ValueError, match="unknown style"):
        procedural_images("plaid", 1)
    assert len(STYLES) == 5


def test_example_train_agc_smoke(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_agc.py"), "--smoke",
                          "--shards", "2", "--out", str(tmp_path / "ex")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "ex" / "train_agc.json").read_text())
    assert len(result["shards"]) == 2 and os.path.isdir(result["soup"])
    assert os.path.exists(os.path.join(result["shards"][0], "agc_bank.pt"))


def test_example_tiny_train_step_runs():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "tiny_train_step.py"),
                          "--steps", "3", "--batch", "4", "--size", "8"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done in" in res.stdout


def test_load_image_folder_and_grid(tmp_path):
    from fastsoup.train.data import image_grid, load_image_folder

    (tmp_path / "sub").mkdir()
    Image.new("RGB", (5, 7), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (9, 3), (0, 0, 255)).save(tmp_path / "sub" / "b.jpg")
    x = load_image_folder(str(tmp_path), 4)
    assert x.shape == (2, 3, 4, 4) and x.min() >= -1 and x.max() <= 1
    assert x[0, 0].mean() > 0.9 and x[0, 2].mean() < -0.9   # red, sorted first
    grid = image_grid([x, x[:1]], scale=2)
    assert grid.dtype == torch.uint8 and grid.shape == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2, 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image_folder(str(tmp_path), 4)
    with pytest.raises(ValueError, match="not a directory"):
        load_image_folder(str(tmp_path / "nope"), 4)
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(str(_empty(tmp_path)), 4)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d
