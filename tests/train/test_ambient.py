"""fastsoup.train.ambient: fixed-noise data, VP training batches, early-stopped sampler."""
import pytest
import torch

import fastsoup as fs
from fastsoup.train.fixed_noise import FixedNoise
from fastsoup.train import ambient_vp_batch, ambient_vp_dataset, corrupt_batch, sample_early_stop

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402


def _sched():
    return DDPMScheduler(num_train_timesteps=1000)


def _ab(ac, t):
    a = ac.double()[t]
    return a.sqrt(), (1 - a).sqrt()


# ----------------------------------------------------------------------------- data
class _Clean(torch.utils.data.Dataset):
    def __init__(self, n=12, shape=(3, 4, 4)):
        self.x = torch.randn((n,) + shape, generator=torch.Generator().manual_seed(99))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "label": i % 3}


def test_dataset_wrapper_uses_scheduler_levels_and_fixed_noise():
    sched, t_n = _sched(), 250
    clean = _Clean()
    ds = ambient_vp_dataset(clean, sched, t_n, seed=5, key="pixel_values")
    a_n, s_n = _ab(sched.alphas_cumprod, t_n)
    eta = FixedNoise(5).noise(3, (3, 4, 4))
    item = ds[3]
    assert item["label"] == 0
    torch.testing.assert_close(item["pixel_values"], (a_n * clean.x[3] + s_n * eta).float())
    assert torch.equal(ds[3]["pixel_values"], item["pixel_values"])      # read again: same noise
    assert not torch.equal(ds[4]["pixel_values"] - a_n.float() * clean.x[4],
                           item["pixel_values"] - a_n.float() * clean.x[3])


def test_dataset_noise_is_identical_across_epochs_and_loaders():
    sched = _sched()
    ds = ambient_vp_dataset(_Clean(), sched, 100, seed=1, key="pixel_values")
    ref = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])

    def epoch(seed):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx.tolist()), batch_size=5)
        return idx, torch.cat([b["pixel_values"] for b in loader])

    for seed in (0, 1):
        idx, got = epoch(seed)
        assert torch.equal(got, ref[idx])
    # a fresh wrapper with the same seed gives the same data; another seed does not
    ds2 = ambient_vp_dataset(_Clean(), sched, 100, seed=1, key="pixel_values")
    assert torch.equal(ds2[7]["pixel_values"], ref[7])
    ds3 = ambient_vp_dataset(_Clean(), sched, 100, seed=2, key="pixel_values")
    assert not torch.equal(ds3[7]["pixel_values"], ref[7])


def test_corrupt_batch_matches_the_dataset():
    sched, t_n = _sched(), 300
    clean = _Clean()
    noise = FixedNoise(3)
    ds = ambient_vp_dataset(clean, sched, t_n, key="pixel_values", noise=noise)
    a_n, s_n = fs.vp_alpha_sigma(sched, t_n)
    idx = torch.tensor([5, 0, 9])
    got = corrupt_batch(clean.x[idx], idx, noise, float(a_n), float(s_n))
    expect = torch.stack([ds[i]["pixel_values"] for i in idx.tolist()])
    torch.testing.assert_close(got, expect)
    with pytest.raises(ValueError, match="indices has 2 entries for a batch of B=3"):
        corrupt_batch(clean.x[idx], [1, 2], noise, 1.0, 0.1)
    with pytest.raises(ValueError, match=r"t_n must be an int in \[0, 999\]"):
        ambient_vp_dataset(clean, sched, 1000)


# ----------------------------------------------------------------------------- batches
def test_batch_coefficients_match_the_spec():
    sched, t_n = _sched(), 200
    x_n = torch.randn(64, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    b = ambient_vp_batch(x_n, sched, t_n, generator=torch.Generator().manual_seed(1))
    t = b.timesteps
    assert t.dtype == torch.int64 and int(t.min()) >= t_n and int(t.max()) <= 999
    a_t, s_t = _ab(sched.alphas_cumprod, t)
    a_n, s_n = _ab(sched.alphas_cumprod, torch.full_like(t, t_n))
    for got, ref in ((b.alpha_t, a_t), (b.sigma_t, s_t), (b.alpha_n, a_n), (b.sigma_n, s_n)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    a = a_t / a_n
    bb = (s_t ** 2 - a ** 2 * s_n ** 2).clamp_min(0).sqrt()
    # the forward-process marginal: a²σ_n² + b² = σ_t²
    torch.testing.assert_close(a ** 2 * s_n ** 2 + bb ** 2, s_t ** 2)
    expect = a.view(-1, 1, 1, 1) * x_n.double() + bb.view(-1, 1, 1, 1) * b.extra_noise.double()
    torch.testing.assert_close(b.x_t.double(), expect, rtol=1e-5, atol=1e-6)


def test_batch_timesteps_cover_t_n_to_T_uniformly():
    sched, t_n = _sched(), 990
    b = ambient_vp_batch(torch.zeros(5000, 1), sched, t_n, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(b.timesteps - t_n, minlength=10)
    assert counts.numel() == 10 and int(counts.min()) > 400       # 500 expected per value
    at_tn = b.timesteps == t_n
    assert torch.equal(b.x_t[at_tn], torch.zeros_like(b.x_t[at_tn]))  # b = 0 at t_n
    bm = ambient_vp_batch(torch.zeros(200, 1), sched, 100, max_timestep=120)
    assert int(bm.timesteps.max()) <= 120 and int(bm.timesteps.min()) >= 100


def test_batch_loss_is_one_line_and_matches_the_op():
    sched, t_n = _sched(), 100
    x_n = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    b = ambient_vp_batch(x_n, sched, t_n, generator=torch.Generator().manual_seed(3))
    eps = torch.randn_like(x_n, requires_grad=True)
    for mode in ("x0", "eps"):
        ref = fs.ambient_loss_vp(eps, b.extra_noise, b.alpha_t, b.sigma_t, b.alpha_n, b.sigma_n, mode=mode)
        torch.testing.assert_close(b.loss(eps, mode=mode), ref)
    # The loss is the double-Tweedie residual: with ε̂ = the noise that was really added
    # relative to x_n's level (x̂_n = x_n exactly), the x0-mode loss vanishes.
    t = b.timesteps
    a = (b.alpha_t / b.alpha_n).double()
    bb = (b.sigma_t.double() ** 2 - a ** 2 * b.sigma_n.double() ** 2).clamp_min(0).sqrt()
    k = torch.where(bb > 0, bb / b.sigma_t.double(), torch.zeros_like(bb))
    perfect = (b.extra_noise.double() / torch.where(k > 0, k, torch.ones_like(k)).view(-1, 1, 1, 1)).float()
    assert float(b.loss(perfect)) < 1e-6
    assert float(b.loss(eps.detach())) > 1e-3
    assert t.shape == (8,)


def test_batch_is_deterministic_and_accepts_given_draws():
    sched = _sched()
    x_n = torch.randn(4, 3)
    b1 = ambient_vp_batch(x_n, sched, 50, generator=torch.Generator().manual_seed(7))
    b2 = ambient_vp_batch(x_n, sched, 50, generator=torch.Generator().manual_seed(7))
    for u, v in zip(b1, b2):
        assert torch.equal(u, v)
    t = torch.tensor([50, 60, 999, 500])
    z = torch.randn(4, 3)
    b3 = ambient_vp_batch(x_n, sched, 50, timesteps=t, extra_noise=z)
    assert torch.equal(b3.timesteps, t) and b3.extra_noise is z
    assert torch.equal(b3.x_t[0], x_n[0])  # t = t_n: x_t = x_n


def test_batch_errors():
    sched = _sched()
    x_n = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[t_n=50, 999\]"):
        ambient_vp_batch(x_n, sched, 50, timesteps=torch.tensor([10, 60, 70, 80]))
    with pytest.raises(ValueError, match=r"timesteps must have shape \[B\] = \[4\]"):
        ambient_vp_batch(x_n, sched, 50, timesteps=torch.tensor([60]))
    with pytest.raises(ValueError, match="x_n and extra_noise must have the same shape"):
        ambient_vp_batch(x_n, sched, 50, extra_noise=torch.randn(4, 2))
    with pytest.raises(ValueError, match="t_n must be an int"):
        ambient_vp_batch(x_n, sched, -1)
    with pytest.raises(ValueError, match="max_timestep"):
        ambient_vp_batch(x_n, sched, 50, max_timestep=10)
    with pytest.raises(TypeError, match="x_n must be a torch.Tensor"):
        ambient_vp_batch([1.0], sched, 50)


# ----------------------------------------------------------------------------- sampler
MU, S = 0.5, 1.0   # data x_0 ~ N(MU, S²) per element


class GaussianEps:
    """The exact ε-predictor of Gaussian data, recording the timesteps it is called at."""

    def __init__(self, ac):
        self.ac = ac.double()
        self.calls = []

    def tweedie(self, x, t):
        a, s = self.ac[t].sqrt(), (1 - self.ac[t]).sqrt()
        return MU + a * S ** 2 / (a ** 2 * S ** 2 + s ** 2) * (x - a * MU)

    def __call__(self, x, t):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],) and (t == t[0]).all()
        ti = int(t[0])
        self.calls.append(ti)
        a, s = self.ac[ti].sqrt(), (1 - self.ac[ti]).sqrt()
        return ((x.double() - a * self.tweedie(x.double(), ti)) / s).to(x.dtype)


def test_early_stop_returns_the_tweedie_estimate_at_t_n():
    sched = _sched()
    model = GaussianEps(sched.alphas_cumprod)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    ts = list(range(999, -1, -50))                 # 999, 949, …, 49: t_n = 100 is not on it
    x0, x_tn = sample_early_stop(model, x, sched, ts, t_n=100, return_x_tn=True)
    assert model.calls == [t for t in ts if t > 100] + [100]
    assert min(model.calls) == 100                 # never below the data noise level
    torch.testing.assert_close(x0.double(), model.tweedie(x_tn.double(), 100), rtol=1e-5, atol=1e-5)
    # it is not the sample a sampler run to t = 0 would give
    full = sample_early_stop(GaussianEps(sched.alphas_cumprod), x, sched, ts, t_n=0)
    assert (full - x0).abs().max() > 0.05


def test_ddim_step_is_the_hand_formula():
    sched = _sched()
    model = GaussianEps(sched.alphas_cumprod)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, x_s = sample_early_stop(model, x, sched, [700], t_n=300, return_x_tn=True)
    a_t, s_t = _ab(sched.alphas_cumprod, 700)
    a_s, s_s = _ab(sched.alphas_cumprod, 300)
    eps = model(x, torch.full((4,), 700))
    x0 = (x - s_t * eps) / a_t
    torch.testing.assert_close(x_s, a_s * x0 + s_s * eps, rtol=1e-6, atol=1e-6)


def test_ancestral_step_is_the_hand_formula_and_seeded():
    sched = _sched()
    model = GaussianEps(sched.alphas_cumprod)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    _, x_s = sample_early_stop(model, x, sched, [700], t_n=300, eta=1.0,
                               generator=torch.Generator().manual_seed(9), return_x_tn=True)
    xi = torch.randn(4, 5, generator=torch.Generator().manual_seed(9))
    ac = sched.alphas_cumprod.double()
    a_t, s_t = _ab(ac, 700)
    a_s, s_s = _ab(ac, 300)
    c_f = (s_s / s_t) * (1 - ac[700] / ac[300]).sqrt()
    c_o = (s_s ** 2 - c_f ** 2).sqrt()
    eps = model(x, torch.full((4,), 700)).double()
    x0 = (x.double() - s_t * eps) / a_t
    torch.testing.assert_close(x_s.double(), a_s * x0 + c_o * eps + c_f * xi.double(), rtol=1e-5, atol=1e-5)
    again = sample_early_stop(model, x, sched, [700], t_n=300, eta=1.0,
                              generator=torch.Generator().manual_seed(9))
    once = sample_early_stop(model, x, sched, [700], t_n=300, eta=1.0,
                             generator=torch.Generator().manual_seed(9))
    assert torch.equal(again, once)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_early_stop_statistics_on_gaussian_data(eta):
    """x_{t_n} follows the clean marginal and the output is E[x_0 | x_{t_n}]: mean μ,
    variance α²S⁴/(α²S² + σ²) (far below S² at t_n = 500)."""
    sched, t_n = _sched(), 500
    ac = sched.alphas_cumprod.double()
    g = torch.Generator().manual_seed(4)
    a_T, s_T = _ab(ac, 999)
    n = 20000
    x = (a_T * MU + (a_T ** 2 * S ** 2 + s_T ** 2).sqrt() * torch.randn(n, 1, generator=g, dtype=torch.float64)).float()
    ts = list(range(999, t_n, -5))
    x0, x_tn = sample_early_stop(GaussianEps(sched.alphas_cumprod), x, sched, ts, t_n=t_n,
                                 eta=eta, generator=g, return_x_tn=True)
    a_n, s_n = _ab(ac, t_n)
    var_tn = float(a_n ** 2 * S ** 2 + s_n ** 2)
    var_x0 = float(a_n ** 2 * S ** 4 / (a_n ** 2 * S ** 2 + s_n ** 2))
    assert abs(float(x_tn.double().mean()) - float(a_n) * MU) < 0.03
    assert abs(float(x_tn.double().var()) / var_tn - 1) < 0.06
    assert abs(float(x0.double().mean()) - MU) < 0.03
    assert abs(float(x0.double().var()) / var_x0 - 1) < 0.06
    assert var_x0 < 0.2 * S ** 2


def test_sampler_with_a_diffusers_unet_and_scheduler_timesteps():
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(5)                        # 800, 600, 400, 200, 0
    out = sample_early_stop(unet, torch.randn(2, 3, 8, 8), ddim, ddim.timesteps, t_n=300)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_sampler_errors():
    sched = _sched()
    model = GaussianEps(sched.alphas_cumprod)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_early_stop(model, x, sched, [500, 600], t_n=100)
    with pytest.raises(ValueError, match="below t_n=100"):
        sample_early_stop(model, x, sched, [50, 10], t_n=100)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        sample_early_stop(model, x, sched, [1000, 10], t_n=5)
    with pytest.raises(ValueError, match="eta must be a number in"):
        sample_early_stop(model, x, sched, [500], t_n=100, eta=2.0)
    with pytest.raises(ValueError, match="must return ε̂ with the shape of x"):
        sample_early_stop(lambda x, t: x[:1], x, sched, [500], t_n=100)
    with pytest.raises(TypeError, match="sequence of ints"):
        sample_early_stop(model, x, sched, [500.0], t_n=100)


def test_sample_early_stop_clip_sample_bounds_every_x0():
    """clip_sample clamps the Tweedie estimates (a wildly wrong model stays in range)."""
    import fastsoup as fs

    ac = torch.linspace(0.999, 0.01, 50)
    model = lambda x, t: -50.0 * x  # noqa: E731  (absurd ε-predictions)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ts = list(range(49, 9, -5))
    free = fs.train.sample_early_stop(model, x, ac, ts, t_n=10)
    clipped = fs.train.sample_early_stop(model, x, ac, ts, t_n=10, clip_sample=1.0)
    assert free.abs().max() > 1.0
    assert clipped.abs().max() <= 1.0
    with pytest.raises(ValueError, match="clip_sample"):
        fs.train.sample_early_stop(model, x, ac, ts, t_n=10, clip_sample=0)
