"""fastsoup.train.difftuning: power-law timestep samplers, knowledge bank, batch mixing."""
import hashlib
import json
import math
import types

import pytest
import torch

from fastsoup.train import (
    DiffTuning, KnowledgeBank, PowerLawTimestepSampler, diffusion_loss,
    power_law_timestep_probs, split_batch,
)


# ----------------------------------------------------------------------------- chi-square
def chi2_critical(df: int, z: float = 3.0902) -> float:
    """Upper quantile of χ²(df) by the Wilson–Hilferty approximation (z=3.09: p = 0.001)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2_statistic(samples: torch.Tensor, probs: torch.Tensor, bins: int = None) -> (float, int):
    """Pearson χ² of integer samples against ``probs``; optionally merged into equal-width
    bins of timesteps (so every expected count is large). Returns (statistic, df)."""
    T = probs.numel()
    counts = torch.bincount(samples, minlength=T).double()
    p = probs.double()
    if bins is not None:
        counts = counts.view(bins, -1).sum(1)
        p = p.view(bins, -1).sum(1)
    expected = p * samples.numel()
    assert expected.min() >= 5, "test design: expected counts too small for χ²"
    stat = float(((counts - expected) ** 2 / expected).sum())
    return stat, counts.numel() - 1


def test_probabilities_match_the_power_laws():
    T = 10
    t = torch.arange(T, dtype=torch.float64)
    for tau in (0.0, 1.0, 2.5):
        pr = power_law_timestep_probs("retain", T, tau)
        pa = power_law_timestep_probs("adapt", T, tau)
        torch.testing.assert_close(pr, (T - t) ** tau / ((T - t) ** tau).sum())
        torch.testing.assert_close(pa, (t + 1) ** tau / ((t + 1) ** tau).sum())
        assert pr.dtype == torch.float64 and abs(float(pr.sum()) - 1) < 1e-12
    # τ = 1, T = 1000 exactly as the reference: i for i in 1..1000 (adapt), reversed (retain)
    pa = power_law_timestep_probs("adapt", 1000, 1.0)
    ref = torch.arange(1, 1001, dtype=torch.float64)
    torch.testing.assert_close(pa, ref / ref.sum())
    torch.testing.assert_close(power_law_timestep_probs("retain", 1000, 1.0), pa.flip(0))


@pytest.mark.parametrize("kind", ["retain", "adapt"])
def test_sampler_chi_square_small_T(kind):
    T, N = 20, 20000
    sampler = PowerLawTimestepSampler(kind, T, tau=1.0)
    g = torch.Generator().manual_seed(1234)
    s = sampler.sample(N, generator=g)
    assert s.dtype == torch.int64 and s.shape == (N,) and int(s.min()) >= 0 and int(s.max()) < T
    stat, df = chi2_statistic(s, sampler.probs)
    crit = chi2_critical(df)
    assert stat < crit, f"{kind}: χ²={stat:.1f} ≥ {crit:.1f}: samples do not follow P_{kind}"
    # the test has power: the same samples are rejected against a wrong τ or the other law
    for wrong in (power_law_timestep_probs(kind, T, 1.3), power_law_timestep_probs(kind, T, 0.7),
                  power_law_timestep_probs(kind, T, 0.0),
                  power_law_timestep_probs("adapt" if kind == "retain" else "retain", T, 1.0)):
        wstat, _ = chi2_statistic(s, wrong)
        assert wstat > crit, f"wrong distribution not rejected (χ²={wstat:.1f})"


@pytest.mark.parametrize("kind", ["retain", "adapt"])
def test_sampler_chi_square_T1000_binned(kind):
    sampler = PowerLawTimestepSampler(kind, 1000, tau=1.0)
    s = sampler.sample(40000, generator=torch.Generator().manual_seed(7))
    stat, df = chi2_statistic(s, sampler.probs, bins=20)
    assert stat < chi2_critical(df)
    wrong_sampler = PowerLawTimestepSampler(kind, 1000, tau=1.25)
    ws = wrong_sampler.sample(40000, generator=torch.Generator().manual_seed(7))
    wstat, _ = chi2_statistic(ws, sampler.probs, bins=20)
    assert wstat > chi2_critical(df), "a sampler with τ=1.25 must be rejected against τ=1"


def test_sampler_is_deterministic_and_biased_the_right_way():
    r = PowerLawTimestepSampler("retain", 1000)
    a = PowerLawTimestepSampler("adapt", 1000)
    s1 = r.sample(1000, torch.Generator().manual_seed(3))
    s2 = r.sample(1000, torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)
    sa = a.sample(20000, torch.Generator().manual_seed(3)).double()
    sr = r.sample(20000, torch.Generator().manual_seed(4)).double()
    # E[t] = (2T−1)/3 ≈ 666 for adapt, (T−2)/3 ≈ 333 for retain (τ = 1)
    assert abs(sa.mean() - 1999 / 3) < 8 and abs(sr.mean() - 998 / 3) < 8
    assert r.sample(0).shape == (0,)
    assert r.sample(3, device="cpu").device.type == "cpu"


def test_loss_weights_mode_is_equivalent_in_expectation():
    T = 50
    s = PowerLawTimestepSampler("adapt", T, tau=1.0)
    t = torch.arange(T)
    w = s.loss_weights(t)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double().mean(), torch.tensor(1.0, dtype=torch.float64))
    ell = torch.rand(T, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # E_uniform[w(t) ℓ(t)] == E_P[ℓ(t)] exactly
    torch.testing.assert_close((w.double() * ell).mean(), (s.probs * ell).sum(), rtol=1e-6, atol=0)


def test_split_batch_reference_numbers():
    assert split_batch(32, 0.2) == (26, 6)
    assert split_batch(32) == (26, 6)
    assert split_batch(10, 0.0) == (10, 0)
    assert split_batch(7, 0.5) == (4, 3)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            split_batch(bad)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="replay_share"):
            split_batch(32, bad)


def test_sampler_validation():
    with pytest.raises(ValueError, match="kind must be one of"):
        PowerLawTimestepSampler("forward")
    with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
        PowerLawTimestepSampler("adapt", 1000, tau=-1)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        PowerLawTimestepSampler("adapt", 0)
    s = PowerLawTimestepSampler("adapt", 10)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 10\)"):
        s.loss_weights(torch.tensor([10]))
    with pytest.raises(ValueError, match="n must be an int"):
        s.sample(-1)


# ----------------------------------------------------------------------------- batch mixing
def _dt_batch(mode="sample", B_t=26, B_r=6, shape=(4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn((B_t,) + shape, generator=g)
    replay = torch.randn((B_r,) + shape, generator=g)
    labels = torch.randint(0, 10, (B_t,), generator=g)
    dt = DiffTuning(num_train_timesteps=1000, mode=mode)
    b = dt.make_batch(target, replay, target_cond=labels, null_cond=10,
                      generator=torch.Generator().manual_seed(seed))
    return dt, b, target, replay, labels


def test_batch_composition():
    dt, b, target, replay, labels = _dt_batch()
    assert dt.split(32) == (26, 6)
    assert len(b) == 32 and b.num_target == 26 and b.num_replay == 6
    assert torch.equal(b.latents[:26], target) and torch.equal(b.latents[26:], replay)
    assert b.is_replay.tolist() == [False] * 26 + [True] * 6
    assert torch.equal(b.cond[:26], labels) and (b.cond[26:] == 10).all()
    assert b.timesteps.dtype == torch.int64 and b.timesteps.shape == (32,)
    assert b.weights.dtype == torch.float32
    torch.testing.assert_close(b.weights[:26], torch.full((26,), 1 / 26))
    torch.testing.assert_close(b.weights[26:], torch.full((6,), 0.1 / 6))
    torch.testing.assert_close(b.mean_weights, b.weights * 32)
    # timesteps come from the two samplers in order: adapt for target, retain for replay
    g = torch.Generator().manual_seed(0)
    assert torch.equal(b.timesteps[:26], dt.adapt.sample(26, g))
    assert torch.equal(b.timesteps[26:], dt.retain.sample(6, g))


def test_weight_identity_sum_and_mean_forms():
    dt, b, target, replay, _ = _dt_batch()
    ell = torch.rand(32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expect = ell[:26].mean() + 0.1 * ell[26:].mean()
    torch.testing.assert_close(b.weighted_sum(ell), expect.to(torch.float64), rtol=1e-6, atol=0)
    mt, mr = b.group_means(ell)
    torch.testing.assert_close(mt + 0.1 * mr, expect)
    # through the fused loss: diffusion_loss(weight=mean_weights) == mean(ℓ_t) + λ mean(ℓ_r)
    sched = types.SimpleNamespace(config=types.SimpleNamespace(prediction_type="epsilon"),
                                  alphas_cumprod=torch.linspace(0.999, 0.001, 1000))
    noise = torch.randn_like(b.latents)
    pred = torch.randn_like(b.latents, requires_grad=True)
    loss, _ = diffusion_loss(sched, pred, latents=b.latents, noise=noise, timesteps=b.timesteps,
                             weight=b.mean_weights)
    per = ((pred.detach() - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.detach(), per[:26].mean() + 0.1 * per[26:].mean())
    # and the gradient is that of the two separately averaged sub-batches
    (g,) = torch.autograd.grad(loss, pred)
    ref = pred.detach().clone().requires_grad_(True)
    per_r = ((ref - noise) ** 2).mean(dim=(1, 2, 3))
    (g_ref,) = torch.autograd.grad(per_r[:26].mean() + 0.1 * per_r[26:].mean(), ref)
    torch.testing.assert_close(g, g_ref)


def test_weight_mode_uses_uniform_timesteps_and_power_law_weights():
    dt, b, *_ = _dt_batch(mode="weight")
    g = torch.Generator().manual_seed(0)
    t_t = torch.randint(0, 1000, (26,), generator=g)
    t_r = torch.randint(0, 1000, (6,), generator=g)
    assert torch.equal(b.timesteps, torch.cat([t_t, t_r]))
    torch.testing.assert_close(b.weights[:26], dt.adapt.loss_weights(t_t) / 26)
    torch.testing.assert_close(b.weights[26:], dt.retain.loss_weights(t_r) * 0.1 / 6)


def test_prompt_embedding_null_cond_and_no_replay():
    dt = DiffTuning(1000)
    target = torch.randn(3, 4, 8, 8)
    replay = torch.randn(2, 4, 8, 8)
    emb = torch.randn(3, 7, 16)
    empty = torch.randn(7, 16)
    b = dt.make_batch(target, replay, target_cond=emb, null_cond=empty)
    assert b.cond.shape == (5, 7, 16)
    assert torch.equal(b.cond[3], empty) and torch.equal(b.cond[4], empty)
    b1 = dt.make_batch(target, replay, target_cond=emb, null_cond=empty[None])
    assert torch.equal(b1.cond, b.cond)
    b0 = dt.make_batch(target)
    assert b0.num_replay == 0 and torch.equal(b0.latents, target) and b0.cond is None
    torch.testing.assert_close(b0.weights, torch.full((3,), 1 / 3))
    assert b0.group_means(torch.ones(3))[1].isnan()


def test_make_batch_errors():
    dt = DiffTuning(1000)
    target, replay = torch.randn(3, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="null_cond is required"):
        dt.make_batch(target, replay, target_cond=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="per-sample shape"):
        dt.make_batch(target, torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"target_cond must have shape \[B_t = 3"):
        dt.make_batch(target, replay, target_cond=torch.zeros(2, dtype=torch.long), null_cond=0)
    with pytest.raises(ValueError, match="null_cond must have shape"):
        dt.make_batch(target, replay, target_cond=torch.randn(3, 7, 16), null_cond=torch.randn(5, 16))
    with pytest.raises(TypeError, match="replay_latents is torch.float16"):
        dt.make_batch(target, replay.half())
    with pytest.raises(ValueError, match="mode must be"):
        DiffTuning(mode="both")
    with pytest.raises(ValueError, match="retention_weight"):
        DiffTuning(retention_weight=-1)


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
    # a pipeline output object (.images) is accepted and stored as returned: the bank does
    # not guess layouts (here NHWC numpy), so the recipe above converts explicitly
    out = KnowledgeBank.generate(
        lambda n, g: pipe(batch_size=n, generator=g, num_inference_steps=2, output_type="np"), 2)
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
