"""Flow matching (SD3, Flux) in fs.train.diffusion_loss.

Oracle: the loss block of diffusers' ``train_dreambooth_sd3.py`` / ``train_dreambooth_flux.py``
written out (timestep sampling with ``compute_density_for_timestep_sampling``, the scripts'
``get_sigmas``, ``compute_loss_weighting_for_sd3``), with diffusers' own scheduler.
"""
import pytest
import torch

import fastsoup as fs
from fastsoup.train import (
    diffusion_loss, diffusion_target, flow_matching_bank_timesteps, flow_matching_loss_weights,
    prediction_type_of, scheduler_family,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler,
)
from diffusers.training_utils import (  # noqa: E402
    compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3,
)

SCHEMES = ["none", "sigma_sqrt", "cosmap", "logit_normal", "mode"]


def _script_batch(sched, scheme, B=6, shape=(4, 8, 8), dtype=torch.float32, seed=0):
    """What the SD3/Flux scripts compute before the loss (verbatim in structure)."""
    g = torch.Generator().manual_seed(seed)
    model_input = torch.randn((B,) + shape, generator=g).to(dtype)
    noise = torch.randn((B,) + shape, generator=g).to(dtype)
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=B,
                                              logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                              generator=g)
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = sched.sigmas.to(dtype=dtype)
        schedule_timesteps = sched.timesteps
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    model_pred = torch.randn((B,) + shape, generator=g).to(dtype).requires_grad_(True)
    return model_input, noise, timesteps, sigmas, noisy, model_pred


def _script_loss(model_pred, model_input, noise, sigmas, noisy, scheme, precondition):
    if precondition:
        model_pred = model_pred * (-sigmas) + noisy
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = model_input if precondition else noise - model_input
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1),
        1,
    )
    return loss.mean()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_matches_the_diffusers_sd3_script_loss(scheme, precondition, shift):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    x0, noise, t, sigmas, noisy, pred = _script_batch(sched, scheme, seed=int(shift))
    ref = _script_loss(pred, x0, noise, sigmas, noisy, scheme, precondition)
    ref.backward()
    g_ref = pred.grad.clone()
    pred.grad = None
    kw = dict(noisy_latents=noisy) if precondition else {}
    loss, stats = diffusion_loss(sched, pred, latents=x0, noise=noise, timesteps=t, sigmas=sigmas,
                                 weighting_scheme=scheme, precondition_outputs=precondition, **kw)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pred.grad, g_ref, rtol=1e-5, atol=1e-8)
    assert stats.total == 6 and int(stats.kept) == 6


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_sigmas_default_to_timesteps_over_num_train_timesteps(scheme):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise, t, sigmas, noisy, pred = _script_batch(sched, scheme, seed=5)
    ref = _script_loss(pred, x0, noise, sigmas, noisy, scheme, False)
    loss, _ = diffusion_loss(sched, pred, latents=x0, noise=noise, timesteps=t,
                             weighting_scheme=scheme)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)


def test_bf16_inputs_match_the_script():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise, t, sigmas, noisy, pred = _script_batch(sched, "cosmap", dtype=torch.bfloat16)
    ref = _script_loss(pred, x0, noise, sigmas, noisy, "cosmap", False)
    loss, _ = diffusion_loss(sched, pred, latents=x0, noise=noise, timesteps=t, sigmas=sigmas,
                             weighting_scheme="cosmap")
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-3)  # the bf16 target rounds


def test_flow_target_and_prediction_type():
    sched = FlowMatchEulerDiscreteScheduler()
    assert scheduler_family(sched) == "flow_matching"
    assert scheduler_family(DDPMScheduler()) == "ddpm"
    assert prediction_type_of(sched) == "flow_matching"
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(diffusion_target(sched, latents=x0, noise=noise), noise - x0)
    for wrong in ("epsilon", "v_prediction", "sample"):
        with pytest.raises(ValueError, match="noise - latents"):
            diffusion_loss(sched, torch.randn(2, 3), latents=x0, noise=noise,
                           prediction_type=wrong)
    with pytest.raises(ValueError, match="needs a flow-matching scheduler"):
        diffusion_loss(DDPMScheduler(), torch.randn(2, 3), latents=x0, noise=noise,
                       timesteps=torch.tensor([1, 2]), prediction_type="flow_matching")


def test_unsupported_schedulers_raise_saying_so():
    with pytest.raises(TypeError, match=r"unsupported scheduler EDMEulerScheduler.*flow-matching"):
        diffusion_loss(EDMEulerScheduler(), torch.randn(2, 3), latents=torch.randn(2, 3),
                       noise=torch.randn(2, 3))


def test_flow_matching_argument_errors():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise, t, sigmas, noisy, pred = _script_batch(sched, "none")
    kw = dict(latents=x0, noise=noise)
    with pytest.raises(ValueError, match="snr_gamma"):
        diffusion_loss(sched, pred, timesteps=t, snr_gamma=5.0, **kw)
    with pytest.raises(ValueError, match="weighting_scheme must be one of"):
        diffusion_loss(sched, pred, timesteps=t, weighting_scheme="sigma", **kw)
    with pytest.raises(ValueError, match="needs sigmas= .* or timesteps="):
        diffusion_loss(sched, pred, weighting_scheme="sigma_sqrt", **kw)
    with pytest.raises(ValueError, match="needs noisy_latents="):
        diffusion_loss(sched, pred, timesteps=t, precondition_outputs=True, **kw)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\]"):
        diffusion_loss(sched, pred, timesteps=t + 1000, **kw)
    with pytest.raises(ValueError, match=r"sigmas must lie in \[0, 1\]"):
        diffusion_loss(sched, pred, sigmas=sigmas + 1, weighting_scheme="cosmap", **kw)
    with pytest.raises(ValueError, match=r"sigmas must have shape \[B\]"):
        diffusion_loss(sched, pred, sigmas=sigmas[:2], weighting_scheme="cosmap", **kw)
    with pytest.raises(ValueError, match="bank= needs timesteps="):
        diffusion_loss(sched, pred, bank=fs.AGCMemoryBank(), **kw)
    with pytest.raises(ValueError, match="weighting_scheme= applies to flow-matching"):
        diffusion_loss(DDPMScheduler(), pred, timesteps=t.long(), weighting_scheme="none", **kw)


def test_continuous_timesteps_are_binned_onto_the_bank():
    t = torch.tensor([0.0, 0.9, 1.0, 499.99, 500.0, 999.4, 1000.0])
    assert flow_matching_bank_timesteps(t, 1000).tolist() == [0, 0, 1, 499, 500, 999, 999]
    assert flow_matching_bank_timesteps(t, 10).tolist() == [0, 0, 0, 4, 5, 9, 9]
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise, t, sigmas, noisy, pred = _script_batch(sched, "none", B=8)
    bank = fs.AGCMemoryBank(num_timesteps=50, ratio=1.25)
    loss, stats = diffusion_loss(sched, pred, latents=x0, noise=noise, timesteps=t, sigmas=sigmas,
                                 bank=bank)
    bins = flow_matching_bank_timesteps(t, 50)
    ref = fs.AGCMemoryBank(num_timesteps=50, ratio=1.25)
    ref.update(fs.per_sample_mse(pred.detach(), noise - x0), bins)
    assert torch.equal(bank.bank, ref.bank) and torch.equal(bank.count, ref.count)
    assert int(bank.count.sum()) == 8


def test_flow_matching_weights_match_diffusers():
    sig = torch.tensor([0.01, 0.3, 0.5, 0.99, 1.0])
    for scheme in SCHEMES:
        torch.testing.assert_close(flow_matching_loss_weights(scheme, sig),
                                   compute_loss_weighting_for_sd3(scheme, sig).float(),
                                   rtol=0, atol=0)
