"""`fastsoup demo` at its smallest setting, and the examples' --smoke mode, end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402  (diffusers brings Pillow)

from fastsoup.cli import main as cli_main  # noqa: E402
from fastsoup.train.data import STYLES, nearest_neighbour_rms, procedural_images, shard_datasets  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_smallest_setting_writes_grid_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli_main(["demo", "--shards", "2", "--rounds", "2", "--steps", "2", "--per-shard", "4",
                   "--size", "8", "--samples", "2", "--sample-steps", "2", "--width", "8",
                   "--batch", "4", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"demo output: {out}" in printed and "round 2/2" in printed
    report = json.loads((out / "report.json").read_text())
    assert len(report["history"]) == 2 * 2
    assert set(report["memorisation"]) == {"shard 0", "shard 1", "soup"}
    assert report["soup"]["weights"] == [0.5, 0.5]
    img = Image.open(out / "grid.png")
    assert img.size[0] > 0 and img.size[1] > 0
    assert (out / "report.md").read_text().startswith("# fastsoup demo report")
    # the soup really is the weighted average of the saved shard models
    from safetensors.torch import load_file

    shards = [load_file(out / "shards" / f"shard_{k}" / "diffusion_pytorch_model.safetensors") for k in range(2)]
    soup = load_file(out / "soup" / "diffusion_pytorch_model.safetensors")
    for key, value in soup.items():
        torch.testing.assert_close(value, (shards[0][key] + shards[1][key]) / 2, rtol=1e-6, atol=1e-7)


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
