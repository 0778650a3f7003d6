"""The ambient and Diff-Tuning training examples: `--smoke` end to end, outputs, flag errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fastsoup as fs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AMBIENT = os.path.join(ROOT, "examples", "train_ambient.py")
DIFFTUNING = os.path.join(ROOT, "examples", "train_difftuning.py")


def _run(script, *args, timeout=600):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _load_unet(path):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False)


def _check_png(path, min_side=16):
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= min_side


def test_train_ambient_smoke(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "amb"
    res = _run(AMBIENT, "--smoke", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step" in res.stdout and "saved to" in res.stdout          # progress lines
    s = json.loads((out / "train_ambient.json").read_text())
    assert s["script"] == "train_ambient" and s["mode"] == "x0" and s["t_n"] == 100
    # (alpha_n, sigma_n) are the DDPM schedule's values at t_n
    from diffusers import DDPMScheduler

    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod[100].double()
    assert math.isclose(s["alpha_n"], abar.sqrt().item(), rel_tol=1e-6)
    assert math.isclose(s["sigma_n"], (1 - abar).sqrt().item(), rel_tol=1e-6)
    # the smoke run exercises the consistency loss from step 1 on
    assert len(s["losses"]) == s["steps"] == 3
    assert "consistency" not in s["losses"][0]
    assert all(math.isfinite(r["ambient"]) and math.isfinite(r["consistency"])
               for r in s["losses"][1:])
    assert s["consistency_weight"] > 0 and math.isfinite(s["final_consistency_loss"])
    ts = s["sampler_timesteps"]
    assert ts[0] == 999 and ts[-1] == s["sample_stop"] == 100
    assert all(a > b for a, b in zip(ts, ts[1:]))
    unet = _load_unet(s["model"])
    assert unet.config.sample_size == s["resolution"] and unet.config.in_channels == 3
    assert os.path.isfile(out / "scheduler" / "scheduler_config.json")
    assert os.path.isfile(out / "model_index.json")                   # a DDPMPipeline folder
    _check_png(s["grid"])
    assert math.isfinite(s["nearest_clean_rms_mean"])


def test_train_ambient_eps_mode_two_step_consistency_and_folder(tmp_path):
    pytest.importorskip("diffusers")
    from PIL import Image

    data = tmp_path / "imgs" / "nested"
    data.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        px = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(data / f"{i}.png")
    out = tmp_path / "amb"
    res = _run(AMBIENT, "--smoke", "--mode", "eps", "--consistency-steps", "2", "--anchor-grad",
               "--data", str(tmp_path / "imgs"), "--tn", "50", "--sample-stop", "0",
               "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "train_ambient.json").read_text())
    assert s["mode"] == "eps" and s["num_images"] == 5 and s["t_n"] == 50
    assert s["consistency_steps"] == 2 and s["sampler_timesteps"][-1] == 0
    assert all(math.isfinite(r["ambient"]) for r in s["losses"])
    _load_unet(s["model"])


@pytest.fixture(scope="module")
def difftuning_smoke(tmp_path_factory):
    """One `train_difftuning.py --smoke` run, shared by the tests below: (out dir, result)."""
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("difftuning") / "dt"
    return out, _run(DIFFTUNING, "--smoke", "--out", str(out))


def test_train_difftuning_smoke(difftuning_smoke):
    out, res = difftuning_smoke
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pretrain step" in res.stdout and "finetune step" in res.stdout
    assert "knowledge bank" in res.stdout
    s = json.loads((out / "train_difftuning.json").read_text())
    assert s["script"] == "train_difftuning"
    # the 26 + 6 rule scaled to the smoke batch of 10: floor(0.2 * 10) = 2 replay rows
    assert (s["batch"], s["num_target"], s["num_replay"]) == (10, 8, 2)
    assert s["retention_weight"] == 0.1 and s["timestep_mode"] == "sample"
    assert len(s["losses"]) == s["steps"] == 3
    for r in s["losses"]:
        # diffusion_loss with mean_weights = mean(target) + lambda * mean(replay)
        assert math.isclose(r["loss"], r["target"] + 0.1 * r["replay"], rel_tol=1e-4)
    for phase in ("before", "after"):
        assert all(math.isfinite(v) and v > 0 for v in s[phase].values())
    # the knowledge bank file: N samples at the model's resolution, provenance recorded
    bank = fs.train.KnowledgeBank.load(s["bank"]["path"])
    assert len(bank) == s["bank"]["count"] == 8
    assert tuple(bank.latents.shape) == (8, 3, 16, 16)
    assert torch.isfinite(bank.latents).all() and bank.latents.abs().max() <= 1
    assert "DDIM" in bank.metadata["source"]
    # both models load; fine-tuning changed the weights
    tuned, pre = _load_unet(s["model"]), _load_unet(s["pretrained"])
    assert os.path.isfile(out / "model_index.json") and os.path.isfile(out / "pretrained" / "model_index.json")
    assert tuned.config.sample_size == 16
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(),
                                                    pre.state_dict().values()))
    _check_png(s["grid"])


def test_train_difftuning_from_pretrained_and_existing_bank(tmp_path, difftuning_smoke):
    """--pretrained loads a diffusers folder; --bank reuses a bank file without regenerating."""
    first, res = difftuning_smoke
    assert res.returncode == 0, res.stderr[-3000:]
    bank_file = first / "knowledge_bank.safetensors"
    before = bank_file.read_bytes()
    out = tmp_path / "second"
    res = _run(DIFFTUNING, "--smoke", "--pretrained", str(first), "--bank", str(bank_file),
               "--loss", "weighted-sum", "--timestep-mode", "weight", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loaded KnowledgeBank" in res.stdout and "pretrain step" not in res.stdout
    assert bank_file.read_bytes() == before
    s = json.loads((out / "train_difftuning.json").read_text())
    assert s["pretrained"] == str(first) and s["bank"]["path"] == str(bank_file)
    assert s["loss_kind"] == "weighted-sum" and s["timestep_mode"] == "weight"
    assert not (out / "pretrained").exists()
    _load_unet(s["model"])


@pytest.mark.parametrize("script,args,message", [
    (AMBIENT, ["--tn", "1000"], "--tn must be in [0, 999]"),
    (AMBIENT, ["--tn", "0", "--consistency-weight", "0.1"], "needs --tn >= 1"),
    (AMBIENT, ["--resolution", "10"], "--resolution must be a multiple of 4"),
    (AMBIENT, ["--data", "/nonexistent/folder"], "is not a directory"),
    (AMBIENT, ["--max-timestep", "50"], "--max-timestep must be in"),
    (DIFFTUNING, ["--replay-share", "1.5"], "--replay-share must be in [0, 1)"),
    (DIFFTUNING, ["--bank-size", "1"], "smaller than the 2 replay rows"),
    (DIFFTUNING, ["--target-style", "plaid"], "--target-style must be one of"),
    (DIFFTUNING, ["--pretrained", "/nonexistent/model"], "is not a directory"),
])
def test_examples_reject_bad_flags(tmp_path, script, args, message):
    pytest.importorskip("diffusers")
    res = _run(script, "--smoke", "--out", str(tmp_path / "x"), *args, timeout=300)
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()
