"""fastsoup.train.difftuning: Diff-Tuning batch mixing (target + replay rows, weights)."""
import types

import pytest
import torch

from fastsoup.train import DiffTuning, diffusion_loss


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
