"""Host syncs per call of the training layer.

On a GPU every read of a tensor value by the host (``.item()``, ``.tolist()``, ``bool()``,
``int()``, ``float()``) waits for the device. The count below is what remains per call
after the first (the first call caches the schedule on the device); each is documented
in the function's docstring. A CUDA test checks the same calls under CUDA's sync-debug
mode where a GPU exists.
"""

import pytest
import torch

import fastsoup as fs

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from tests.helpers import HOST_READS, count_host_reads, cuda_syncs  # noqa: E402

READS = tuple(r for r in HOST_READS if r != "cpu")


def _ddpm_batch(B=4, device="cpu"):
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(B, 4, 8, 8, generator=g), torch.randn(B, 4, 8, 8, generator=g)
    pred = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([3, 500, 500, 999])[:B]
    return [x.to(device) for x in (latents, noise, pred, t)]


def _calls(device):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    eps_sched = DDPMScheduler(num_train_timesteps=1000)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    latents, noise, pred, t = _ddpm_batch(device=device)
    bank = fs.AGCMemoryBank(1000, ratio=1.25).to(device)
    flow_t = flow.timesteps[torch.tensor([0, 100, 500, 999])].to(device)
    x_n = torch.randn(4, 3, 8, 8, device=device)
    amb = fs.train.ambient_vp_batch(x_n, eps_sched, t_n=100)
    # name -> (call, syncs per call after the first)
    return {
        "agc_loss": (lambda: fs.agc_loss(pred, noise), 1),
        "agc_loss bank": (lambda: fs.agc_loss(pred, noise, timesteps=t, bank=bank), 1),
        "agc_loss top-k": (lambda: fs.agc_loss(pred, noise, exclude_k=1), 1),
        "diffusion_loss epsilon": (lambda: fs.train.diffusion_loss(
            eps_sched, pred, latents=latents, noise=noise), 1),
        "diffusion_loss v + min-SNR + bank": (lambda: fs.train.diffusion_loss(
            sched, pred, latents=latents, noise=noise, timesteps=t, snr_gamma=5.0,
            bank=bank), 2),
        "diffusion_loss flow + cosmap + bank": (lambda: fs.train.diffusion_loss(
            flow, pred, latents=latents, noise=noise, timesteps=flow_t,
            weighting_scheme="cosmap", bank=bank), 2),
        "vp_alpha_sigma": (lambda: fs.vp_alpha_sigma(eps_sched, t), 1),
        "ambient_vp_batch": (lambda: fs.train.ambient_vp_batch(x_n, eps_sched, t_n=100), 0),
        "ambient_vp_batch given timesteps": (lambda: fs.train.ambient_vp_batch(
            x_n, eps_sched, t_n=100, timesteps=amb.timesteps), 1),
        "ambient loss": (lambda: amb.loss(torch.randn_like(x_n)), 1),
        "bank.step": (lambda: bank.step(torch.rand(4, device=device), t), 1),
        "stats.as_dict": (lambda: fs.agc_loss(pred, noise)[1].as_dict(), 2),  # loss + dict
    }


@pytest.mark.parametrize("name", list(_calls("cpu")))
def test_syncs_per_call(monkeypatch, name):
    call, expected = _calls("cpu")[name]
    call()  # first call: caches
    with count_host_reads(monkeypatch, READS) as counter:
        call()
    assert counter["n"] == expected, counter["where"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(_calls("cpu")))
def test_syncs_per_call_cuda_sync_debug(name):
    """On a GPU: no synchronising CUDA call beyond the documented count (sync-debug mode
    warns on each one)."""
    call, expected = _calls("cuda")[name]
    syncs = cuda_syncs(call)
    assert len(syncs) <= expected, syncs
