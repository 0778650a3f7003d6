"""fastsoup.train.timestep_samplers: the power-law timestep distributions and the batch split."""
import math

import pytest
import torch

from fastsoup.train import PowerLawTimestepSampler, power_law_timestep_probs, split_batch


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
