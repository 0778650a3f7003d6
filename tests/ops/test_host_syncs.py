"""Host syncs per call of the public ops (issue 12 §4).

On a GPU every read of a tensor's value by the host waits for the device. Here, on CPU
tensors, every such read is counted by wrapping the ``torch.Tensor`` methods through which
Python code reads values: ``.item()``, ``.tolist()``, ``bool()``, ``int()``, ``float()``,
``__index__``, ``.numpy()`` and ``.cpu()`` (a device-to-host copy on a GPU). What this
cannot see: syncs inside PyTorch's C++ (``nonzero``, boolean-mask indexing,
``masked_select``, ``repeat_interleave`` without ``output_size``) and host copies written
as ``.to("cpu")``; the CUDA variant below (sync-debug mode) sees those where a GPU exists.

Budgets, per call after the first (forward + backward): ``per_sample_mse`` 0;
``agc_loss`` with ``exclude_k`` ≤ 1 and with a bank ≤ 1; ``ambient_loss_vp`` and
``ambient_loss_ve`` 0 on the steady path (schedule scalars from ``fs.vp_alpha_sigma``),
1 with scalars the caller made (their values are checked). The training layer's counts are in
``tests/train/test_host_syncs.py``.
"""

import pytest
import torch

import fastsoup as fs

from tests.helpers import count_host_reads, cuda_syncs


def _data(device="cpu", B=4):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(B, 4, 8, 8, generator=g)
    target = torch.randn(B, 4, 8, 8, generator=g)
    abar_t = torch.rand(B, generator=g) * 0.55 + 0.05
    return {
        "pred": pred.to(device).requires_grad_(True), "target": target.to(device),
        "x_n": (0.5 * target).to(device),
        "timesteps": torch.tensor([3, 500, 500, 999])[:B].to(device),
        "alpha_t": abar_t.sqrt().to(device), "sigma_t": (1 - abar_t).sqrt().to(device),
        "alpha_n": torch.full((B,), 0.7).sqrt().to(device),
        "sigma_n": torch.full((B,), 0.3).sqrt().to(device),
        "schedule_t": fs.vp_alpha_sigma(_ALPHAS_CUMPROD, torch.tensor([500, 600, 700, 800])[:B].to(device)),
        "schedule_n": fs.vp_alpha_sigma(_ALPHAS_CUMPROD, torch.full((B,), 100).to(device)),
    }


_ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)


def _calls(device):
    d = _data(device)
    bank = fs.AGCMemoryBank(1000, ratio=1.25).to(device)
    p, t = d["pred"], d["target"]

    def backward(loss):
        p.grad = None
        loss.backward()

    # name -> (call: forward + backward, host reads allowed per call after the first)
    return {
        "per_sample_mse": (lambda: backward(fs.per_sample_mse(p, t).sum()), 0),
        "per_sample_mse weighted": (lambda: backward(fs.per_sample_mse(
            p, t, torch.rand(4, device=device)).sum()), 0),
        "agc_loss exclude_k=1": (lambda: backward(fs.agc_loss(p, t, exclude_k=1)[0]), 1),
        "agc_loss bank": (lambda: backward(fs.agc_loss(
            p, t, timesteps=d["timesteps"], bank=bank)[0]), 1),
        "ambient_loss_vp": (lambda: backward(fs.ambient_loss_vp(
            p, t, d["alpha_t"], d["sigma_t"], d["alpha_n"], d["sigma_n"])), 1),
        "ambient_loss_vp eps": (lambda: backward(fs.ambient_loss_vp(
            p, t, d["alpha_t"], d["sigma_t"], d["alpha_n"], d["sigma_n"], mode="eps")), 1),
        "ambient_loss_ve": (lambda: backward(fs.ambient_loss_ve(
            p, t, d["x_n"], d["sigma_t"] + 1.0, d["sigma_n"])), 1),
        # the steady training path: schedule scalars from fs.vp_alpha_sigma, which
        # fastsoup vouches for, so the losses skip their value checks
        "ambient_loss_vp schedule scalars": (lambda: backward(fs.ambient_loss_vp(
            p, t, *d["schedule_t"], *d["schedule_n"])), 0),
        "ambient_loss_vp eps schedule scalars": (lambda: backward(fs.ambient_loss_vp(
            p, t, *d["schedule_t"], *d["schedule_n"], mode="eps")), 0),
        "consistency_loss_eps schedule scalars": (lambda: backward(fs.consistency_loss_eps(
            p, t, *d["schedule_t"], p * 0.5, t, p * 0.25, t, *d["schedule_n"])), 0),
    }


# Scalars the caller made (above: not from fs.vp_alpha_sigma) are checked (finite, in
# range, the coefficient table finite) in one .tolist() per call (DeferredChecks.run in
# fastsoup/ops/_checks.py): the price of an error instead of a silent NaN. The steady path,
# with schedule scalars, makes none.
OVER_BUDGET: dict = {}


def _params():
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=OVER_BUDGET[name]))
            if name in OVER_BUDGET else name for name in _calls("cpu")]


@pytest.mark.parametrize("name", _params())
def test_host_reads_per_call(monkeypatch, name):
    call, budget = _calls("cpu")[name]
    call()  # the first call may cache (schedules, layouts)
    with count_host_reads(monkeypatch) as counter:
        call()
    assert counter["n"] <= budget, counter["where"]


def test_counter_sees_every_read_kind(monkeypatch):
    """The counter is live: each wrapped read counts once, and is undone afterwards."""
    x = torch.tensor([1.5])
    with count_host_reads(monkeypatch) as counter:
        x.item(), x.tolist(), bool(x), int(x), float(x), x.numpy(), x.cpu()
        [0, 1][torch.tensor(1)]
    assert counter["n"] == 8, counter["where"]
    assert torch.Tensor.item.__name__ == "item"


@pytest.mark.cuda
@pytest.mark.parametrize("name", _params())
def test_host_syncs_per_call_cuda_sync_debug(name):
    """On a GPU: no synchronising CUDA call beyond the budget (sync-debug mode warns on
    each one, including those inside PyTorch's C++)."""
    call, budget = _calls("cuda")[name]
    syncs = cuda_syncs(call)
    assert len(syncs) <= budget, syncs
