"""fastsoup.train.knowledge_bank: generate, save, load and replay the knowledge bank."""
import hashlib
import json

import pytest
import torch

from fastsoup.train import KnowledgeBank


# ----------------------------------------------------------------------------- knowledge bank
def _toy_generate(calls):
    def generate(n, generator):
        calls.append(n)
        return torch.randn(n, 4, 8, 8, generator=generator)
    return generate


def test_knowledge_bank_round_trip(tmp_path):
    calls, seen = [], []

    def generate(n, generator, labels):       # class-conditional: gets each chunk's labels
        seen.append(labels.tolist())
        return _toy_generate(calls)(n, generator)

    bank = KnowledgeBank.generate(generate, 10, batch_size=4, seed=11,
                                  source="toy model v1", labels=torch.arange(10))
    assert calls == [4, 4, 2]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    g = torch.Generator().manual_seed(11)
    expect = torch.cat([torch.randn(n, 4, 8, 8, generator=g) for n in (4, 4, 2)])
    assert torch.equal(bank.latents, expect)
    path = tmp_path / "kb.safetensors"
    bank.save(path)
    back = KnowledgeBank.load(path)
    assert torch.equal(back.latents, bank.latents) and torch.equal(back.labels, torch.arange(10))
    m = back.metadata
    assert m["format"] == "fastsoup.knowledge_bank" and m["count"] == "10"
    assert json.loads(m["shape"]) == [4, 8, 8] and m["dtype"] == "float32"
    assert m["source"] == "toy model v1" and m["seed"] == "11" and m["batch_size"] == "4"
    assert len(back) == 10 and torch.equal(back[3], expect[3])
    # a standard safetensors file
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["latents"], expect)


def test_knowledge_bank_file_is_deterministic(tmp_path):
    digests = []
    for i in range(2):
        bank = KnowledgeBank.generate(_toy_generate([]), 6, batch_size=4, seed=3, source="s")
        bank.metadata["note"] = "x"
        bank.metadata["alpha"] = "y"
        p = tmp_path / f"kb{i}.safetensors"
        bank.save(p)
        digests.append(hashlib.sha256(p.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    bank = KnowledgeBank.generate(_toy_generate([]), 6, batch_size=4, seed=4, source="s")
    bank.save(tmp_path / "other.safetensors")
    assert hashlib.sha256((tmp_path / "other.safetensors").read_bytes()).hexdigest() != digests[0]


def test_knowledge_bank_detects_tampering_and_foreign_files(tmp_path):
    bank = KnowledgeBank.generate(_toy_generate([]), 4, batch_size=4)
    p = tmp_path / "kb.safetensors"
    bank.save(p)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="content hash mismatch"):
        KnowledgeBank.load(tmp_path / "bad.safetensors")
    KnowledgeBank.load(tmp_path / "bad.safetensors", verify=False)  # opt out
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(2, 3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a fastsoup knowledge bank"):
        KnowledgeBank.load(tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="cannot read knowledge bank"):
        KnowledgeBank.load(tmp_path / "junk.safetensors")


def test_knowledge_bank_generate_validation():
    with pytest.raises(ValueError, match=r"returned shape \(3, 4\); expected \[2, \.\.\.\]"):
        KnowledgeBank.generate(lambda n, g: torch.zeros(3, 4), 2)
    with pytest.raises(TypeError, match="must return a tensor"):
        KnowledgeBank.generate(lambda n, g: "image", 2)
    with pytest.raises(ValueError, match="non-finite"):
        KnowledgeBank.generate(lambda n, g: torch.full((n, 2), float("nan")), 2)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        KnowledgeBank.generate(lambda n, g: torch.zeros(n, 2), 0)
    with pytest.raises(TypeError, match="generate must be callable"):
        KnowledgeBank.generate(None, 2)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \[num_samples\] = \[2\]"):
        KnowledgeBank.generate(lambda n, g, y: torch.zeros(n, 2), 2, labels=torch.arange(3))


def test_knowledge_bank_with_a_diffusers_pipeline(tmp_path):
    """The documented pixel-model recipe with a real (tiny, untrained) DDPMPipeline."""
    pytest.importorskip("diffusers")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    def gen(n, g):
        images = pipe(batch_size=n, generator=g, num_inference_steps=2, output_type="np").images
        return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1

    bank = KnowledgeBank.generate(gen, 3, batch_size=2, seed=0, source="tiny DDPM")
    assert bank.latents.shape == (3, 3, 8, 8)
    assert float(bank.latents.min()) >= -1 and float(bank.latents.max()) <= 1
    again = KnowledgeBank.generate(gen, 3, batch_size=2, seed=0, source="tiny DDPM")
    assert torch.equal(bank.latents, again.latents)
    # a pipeline output object (.images) is accepted; its NHWC [0, 1] numpy images are
    # refused on the first chunk (the recipe above converts them), unless told otherwise
    with pytest.raises(ValueError, match="channels-last"):
        KnowledgeBank.generate(
            lambda n, g: pipe(batch_size=n, generator=g, num_inference_steps=2, output_type="np"), 2)
    out = KnowledgeBank.generate(
        lambda n, g: pipe(batch_size=n, generator=g, num_inference_steps=2, output_type="np"), 2,
        check_samples=False)
    assert out.latents.shape == (2, 8, 8, 3)


def test_replay_stream_and_sample():
    bank = KnowledgeBank(torch.arange(10, dtype=torch.float32).view(10, 1))
    stream = bank.stream(3, generator=torch.Generator().manual_seed(0))
    first_pass = [next(stream) for _ in range(3)]          # 9 of 10, no repeats in a pass
    seen = torch.cat(first_pass).flatten().tolist()
    assert len(set(seen)) == 9
    nxt = next(stream)                                      # a new permutation begins
    assert nxt.shape == (3, 1)
    s2 = bank.stream(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(next(s2), first_pass[0])
    assert bank.sample(5, torch.Generator().manual_seed(1)).shape == (5, 1)
    with pytest.raises(ValueError, match="exceeds the bank"):
        bank.stream(11)


# ---------------------------------------------------------------- training-space checks
def _counting(make):
    calls = []

    def gen(n, g):
        calls.append(n)
        return make(n, g)
    return gen, calls


def test_generate_refuses_zero_one_images_on_the_first_chunk():
    import numpy as np

    gen, calls = _counting(lambda n, g: torch.rand(n, 3, 8, 8, generator=g))   # output_type="pt"
    with pytest.raises(ValueError, match=r"\[0, 1\].*images \* 2 - 1.*output_type='latent'"):
        KnowledgeBank.generate(gen, 64, batch_size=4)
    assert calls == [4]                          # stopped before generating more
    gen, calls = _counting(lambda n, g: np.random.default_rng(0).random((n, 8, 8, 3),
                                                                         dtype=np.float32))
    with pytest.raises(ValueError, match=r"channels-last.*permute\(0, 3, 1, 2\)"):
        KnowledgeBank.generate(gen, 64, batch_size=4)  # output_type="np": NHWC
    assert calls == [4]


def test_generate_accepts_the_training_space():
    pix = KnowledgeBank.generate(lambda n, g: torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, 8,
                                 batch_size=4)
    assert pix.latents.shape == (8, 3, 8, 8)
    lat = KnowledgeBank.generate(lambda n, g: torch.randn(n, 4, 8, 8, generator=g), 8)
    assert lat.latents.shape == (8, 4, 8, 8)
    ok = KnowledgeBank.generate(lambda n, g: torch.rand(n, 3, 8, 8, generator=g), 4,
                                check_samples=False)
    assert ok.latents.min() >= 0
