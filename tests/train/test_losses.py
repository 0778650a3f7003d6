"""fastsoup.train.losses: the diffusers-facing loss helper.

Oracle: the loss block of diffusers' ``train_text_to_image.py`` written out by hand (with
diffusers' own ``compute_snr`` and scheduler ``get_velocity``).
"""
import types

import pytest
import torch
import torch.nn.functional as F

import fastsoup as fs
from fastsoup.train import (
    compute_snr, diffusion_loss, diffusion_target, min_snr_loss_weights, prediction_type_of,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402
from diffusers.training_utils import compute_snr as diffusers_compute_snr  # noqa: E402


def _scheduler(prediction_type="epsilon", **kw):
    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **kw)


def _batch(B=6, shape=(4, 8, 8), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((B,) + shape, generator=g)
    noise = torch.randn((B,) + shape, generator=g)
    timesteps = torch.randint(0, 1000, (B,), generator=g)
    pred = torch.randn((B,) + shape, generator=g).to(dtype).requires_grad_(True)
    return latents, noise, timesteps, pred


def _diffusers_loss(sched, pred, latents, noise, timesteps, snr_gamma):
    """The loss block of diffusers' train_text_to_image.py, verbatim in structure."""
    if sched.config.prediction_type == "epsilon":
        target = noise
    elif sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {sched.config.prediction_type}")
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    snr = diffusers_compute_snr(sched, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if sched.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif sched.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0, 1.0])
def test_matches_diffusers_loss_block(ptype, snr_gamma):
    sched = _scheduler(ptype)
    latents, noise, _, pred = _batch(seed=3)
    timesteps = torch.tensor([0, 7, 60, 250, 600, 999])  # both sides of SNR = γ
    ref = _diffusers_loss(sched, pred, latents, noise, timesteps, snr_gamma)
    (g_ref,) = torch.autograd.grad(ref, pred)
    loss, stats = diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps,
                                 snr_gamma=snr_gamma)
    (g,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-9)
    assert int(stats.kept) == pred.shape[0] and stats.total == pred.shape[0]


def test_snr_weighting_changes_the_loss():
    sched = _scheduler()
    latents, noise, _, pred = _batch()
    timesteps = torch.tensor([0, 5, 20, 50, 400, 900])  # SNR > 5 for the first four
    plain, _ = diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps)
    weighted, _ = diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps,
                                 snr_gamma=5.0)
    assert not torch.allclose(plain, weighted)


def test_compute_snr_is_bit_exact_with_diffusers():
    for kw in ({}, {"beta_schedule": "squaredcos_cap_v2"}, {"beta_schedule": "scaled_linear"}):
        sched = _scheduler(**kw)
        t = torch.arange(1000)
        ours, theirs = compute_snr(sched, t), diffusers_compute_snr(sched, t)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, theirs)


def test_min_snr_weights_by_prediction_type():
    t = torch.tensor([0, 10, 200, 500, 999])
    snr = diffusers_compute_snr(_scheduler(), t)
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    torch.testing.assert_close(min_snr_loss_weights(_scheduler("epsilon"), t, 5.0), clipped / snr)
    torch.testing.assert_close(min_snr_loss_weights(_scheduler("v_prediction"), t, 5.0),
                               clipped / (snr + 1))
    torch.testing.assert_close(min_snr_loss_weights(_scheduler("sample"), t, 5.0), clipped)
    # high-noise timesteps keep weight 1 for ε; low-noise ones are down-weighted
    w = min_snr_loss_weights(_scheduler(), t, 5.0)
    assert w[-1] == 1.0 and w[0] < 0.01
    # prediction_type= overrides the scheduler's config
    torch.testing.assert_close(min_snr_loss_weights(_scheduler(), t, 5.0, "v_prediction"),
                               clipped / (snr + 1))


def test_zero_terminal_snr_gives_finite_weights():
    sched = _scheduler(rescale_betas_zero_snr=True)
    t = torch.tensor([0, 500, 999])
    assert compute_snr(sched, t)[-1] == 0
    w = min_snr_loss_weights(sched, t, 5.0)
    assert torch.isfinite(w).all() and w[-1] == 1.0
    wv = min_snr_loss_weights(sched, t, 5.0, "v_prediction")
    assert torch.isfinite(wv).all() and wv[-1] == 0.0


def test_targets():
    latents, noise, timesteps, _ = _batch()
    assert diffusion_target(_scheduler(), noise=noise) is noise
    assert diffusion_target(_scheduler("sample"), latents=latents) is latents
    sched = _scheduler("v_prediction")
    v = diffusion_target(sched, latents=latents, noise=noise, timesteps=timesteps)
    torch.testing.assert_close(v, sched.get_velocity(latents, noise, timesteps))
    # hand formula v = α ε − σ x0
    ac = sched.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, ac.sqrt() * noise - (1 - ac).sqrt() * latents)


def test_velocity_fallback_without_get_velocity():
    """A duck-typed scheduler with only config + alphas_cumprod."""
    real = _scheduler("v_prediction")
    duck = types.SimpleNamespace(config=types.SimpleNamespace(prediction_type="v_prediction"),
                                 alphas_cumprod=real.alphas_cumprod.clone())
    latents, noise, timesteps, pred = _batch()
    torch.testing.assert_close(
        diffusion_target(duck, latents=latents, noise=noise, timesteps=timesteps),
        real.get_velocity(latents, noise, timesteps), rtol=1e-6, atol=1e-6)
    a, _ = diffusion_loss(duck, pred, latents=latents, noise=noise, timesteps=timesteps, snr_gamma=5.0)
    b, _ = diffusion_loss(real, pred, latents=latents, noise=noise, timesteps=timesteps, snr_gamma=5.0)
    torch.testing.assert_close(a, b)


def test_sample_prediction_loss():
    sched = _scheduler("sample")
    latents, noise, timesteps, pred = _batch()
    loss, _ = diffusion_loss(sched, pred, latents=latents, timesteps=timesteps, snr_gamma=5.0)
    snr = diffusers_compute_snr(sched, timesteps)
    w = torch.minimum(snr, torch.full_like(snr, 5.0))
    ref = ((pred.float() - latents) ** 2).mean(dim=(1, 2, 3)).mul(w).mean()
    torch.testing.assert_close(loss, ref)


def test_topk_exclusion_drops_lowest_losses():
    sched = _scheduler()
    latents, noise, timesteps, _ = _batch(B=8)
    scale = torch.arange(1, 9, dtype=torch.float32).view(-1, 1, 1, 1)
    pred = (noise + 0.1 * scale * torch.ones_like(noise)).requires_grad_(True)  # ℓ_i = 0.01 i²
    loss, stats = diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps,
                                 exclude_k=2)
    per = (0.1 * torch.arange(1, 9, dtype=torch.float32)) ** 2
    torch.testing.assert_close(loss, per[2:].mean())
    assert stats.keep_mask.tolist() == [False, False] + [True] * 6
    (g,) = torch.autograd.grad(loss, pred)
    assert (g[:2] == 0).all() and (g[2:] != 0).all()
    loss_f, stats_f = diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps,
                                     exclude_fraction=0.25)
    torch.testing.assert_close(loss_f, loss)
    assert stats_f.as_dict()["excluded"] == 2


def test_agc_bank_rule_and_update():
    sched = _scheduler()
    latents, noise, _, pred = _batch(B=4)
    timesteps = torch.tensor([3, 3, 7, 9])
    bank = fs.AGCMemoryBank(1000, ratio=2.0)
    bank.bank[3] = 100.0          # sample 0 and 1 fall far below the bank: excluded
    loss, stats = diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps,
                                 bank=bank)
    assert stats.keep_mask.tolist() == [False, False, True, True]
    per = ((pred.detach() - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.detach(), per[2:].mean())
    # bank updated with the unweighted MSE, in batch order
    expect3 = 0.8 * (0.8 * 100.0 + 0.2 * per[0]) + 0.2 * per[1]
    torch.testing.assert_close(bank.bank[3], expect3)
    torch.testing.assert_close(bank.bank[7], 0.2 * per[2])


def test_weight_multiplies_snr_weight_and_mixed_dtypes():
    sched = _scheduler()
    latents, noise, timesteps, pred = _batch(dtype=torch.bfloat16)
    extra = torch.linspace(0.5, 2.0, pred.shape[0])
    loss, _ = diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps,
                             snr_gamma=5.0, weight=extra)
    w = min_snr_loss_weights(sched, timesteps, 5.0) * extra
    ref = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3)).mul(w).mean()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss2, _ = diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps, weight=2.0)
    ref2 = 2.0 * ((pred.float() - noise) ** 2).mean()
    torch.testing.assert_close(loss2, ref2, rtol=1e-5, atol=1e-6)


def test_prediction_type_override_and_lookup():
    assert prediction_type_of(_scheduler("v_prediction")) == "v_prediction"
    assert prediction_type_of(_scheduler(), "sample") == "sample"
    sched = _scheduler("epsilon")
    latents, noise, timesteps, pred = _batch()
    loss, _ = diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps,
                             prediction_type="v_prediction")
    v = sched.get_velocity(latents, noise, timesteps)
    torch.testing.assert_close(loss, F.mse_loss(pred.float(), v))
    assert sched.config.prediction_type == "epsilon"  # config not mutated


def test_errors_name_the_argument():
    sched = _scheduler()
    latents, noise, timesteps, pred = _batch()
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps,
                       prediction_type="flow")
    bad = types.SimpleNamespace(config=types.SimpleNamespace(prediction_type="x"),
                                alphas_cumprod=sched.alphas_cumprod)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        diffusion_loss(bad, pred, latents=latents, noise=noise, timesteps=timesteps)
    with pytest.raises(ValueError, match="missing: noise"):
        diffusion_loss(sched, pred, latents=latents, timesteps=timesteps)
    with pytest.raises(ValueError, match="missing: timesteps"):
        diffusion_loss(_scheduler("v_prediction"), pred, latents=latents, noise=noise)
    with pytest.raises(ValueError, match="model_pred and target must have the same shape"):
        diffusion_loss(sched, pred[:, :2], latents=latents, noise=noise, timesteps=timesteps)
    with pytest.raises(ValueError, match="latents and noise must have the same shape"):
        diffusion_target(_scheduler("v_prediction"), latents=latents[:3], noise=noise,
                         timesteps=timesteps)
    with pytest.raises(ValueError, match="snr_gamma= needs timesteps="):
        diffusion_loss(sched, pred, latents=latents, noise=noise, snr_gamma=5.0)
    with pytest.raises(ValueError, match="snr_gamma must be a positive number"):
        diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps, snr_gamma=0)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps + 1000)
    with pytest.raises(ValueError, match=r"timesteps must have shape \[B\] = \[6\]"):
        diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps[:3])
    with pytest.raises(TypeError, match="timesteps must be an integer tensor"):
        diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps.float())
    with pytest.raises(ValueError, match=r"weight must be a number or have shape \[B\]"):
        diffusion_loss(sched, pred, latents=latents, noise=noise, weight=torch.ones(3))
    with pytest.raises(TypeError, match="model_pred must be a torch.Tensor"):
        diffusion_loss(sched, [1.0], latents=latents, noise=noise)
    with pytest.raises(ValueError, match="either bank= or exclude_k"):
        diffusion_loss(sched, pred, latents=latents, noise=noise, timesteps=timesteps,
                       bank=fs.AGCMemoryBank(), exclude_k=1)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        compute_snr(object(), timesteps)
    with pytest.raises(ValueError, match="no config.prediction_type"):
        prediction_type_of(object())


def test_documented_loop_trains_a_diffusers_unet():
    """The 'after' block of the module docstring in a real (tiny) diffusers training step."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    opt = torch.optim.SGD(unet.parameters(), lr=1e-3)
    noise_scheduler = _scheduler("v_prediction")
    bank = fs.AGCMemoryBank(noise_scheduler.config.num_train_timesteps, ratio=1.25)
    latents = torch.randn(4, 3, 8, 8)
    for step in range(2):
        noise = torch.randn_like(latents)
        timesteps = torch.tensor([10, 10, 500, 900])
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        model_pred = unet(noisy_latents, timesteps, return_dict=False)[0]
        loss, agc_stats = diffusion_loss(noise_scheduler, model_pred, latents=latents, noise=noise,
                                         timesteps=timesteps, snr_gamma=5.0, bank=bank)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in unet.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
        assert 0 <= agc_stats.as_dict()["exclusion_rate"] <= 1
    assert int(bank.count[10]) == 4 and float(bank.bank[10]) > 0 and float(bank.bank[11]) == 0
