"""GPU tests (``pytest -m cuda``; skipped without a CUDA device).

Both GPU backends (Triton and the CUDA extension) against the reference, in bf16 and at
large shapes, plus a training step of a small convolutional model with agc_loss.
"""
import pytest
import torch

import fastsoup as fs
from fastsoup import _backend
from fastsoup.ops.mse import reference_backward, reference_forward

pytestmark = pytest.mark.cuda

BACKENDS = ["triton", "cuda"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _skip_unavailable(backend):
    ok, why = _backend._available(backend, "cuda")
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")


def _fwd_bwd(backend, pred, target):
    pred = pred.detach().requires_grad_()
    target = target.detach().requires_grad_()
    with fs.use_backend(backend):
        out = fs.per_sample_mse(pred, target)
        g = torch.rand(out.shape[0], device=out.device)
        (out * g).sum().backward()
    return out, g, pred.grad, target.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pdt,tdt", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float16, torch.float16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("shape", [(8, 4, 64, 64), (1, 16 * 2**20), (3, 5, 17, 33), (256, 3, 32, 32)])
def test_backend_vs_reference(backend, pdt, tdt, shape):
    _skip_unavailable(backend)
    torch.manual_seed(0)
    pred = torch.randn(shape, device="cuda").to(pdt)
    target = torch.randn(shape, device="cuda").to(tdt)
    out, g, gp, gt = _fwd_bwd(backend, pred, target)
    tol = max(TOL[pdt], TOL[tdt])
    torch.testing.assert_close(out, reference_forward(pred, target), rtol=1e-4, atol=1e-5)
    rgp, rgt = reference_backward(g, pred, target, True, True)
    torch.testing.assert_close(gp.float(), rgp.float(), rtol=tol, atol=tol * 1e-3)
    torch.testing.assert_close(gt.float(), rgt.float(), rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_channels_last(backend):
    _skip_unavailable(backend)
    torch.manual_seed(1)
    cases = [
        (torch.randn(4, 8, 32, 32, device="cuda").to(memory_format=torch.channels_last).bfloat16(),
         torch.randn(4, 8, 32, 32, device="cuda").bfloat16()),
        (torch.randn(4, 16, 32, 33, device="cuda")[:, ::2, :, 1:], torch.randn(4, 8, 32, 32, device="cuda")),
    ]
    for pred, target in cases:
        out, g, gp, gt = _fwd_bwd(backend, pred, target)
        torch.testing.assert_close(out, reference_forward(pred, target), rtol=1e-4, atol=1e-5)
        rgp, _ = reference_backward(g, pred, target, True, False)
        torch.testing.assert_close(gp.float(), rgp.float(), rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_offsets_beyond_2_31_elements(backend):
    """B·D > 2^31: batch offsets overflow int32 if not promoted."""
    _skip_unavailable(backend)
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GB")
    B, D = 9, 2**28
    pred = torch.zeros(B, D, device="cuda", dtype=torch.bfloat16)
    target = torch.zeros(B, D, device="cuda", dtype=torch.bfloat16)
    pred[-1, -4:] = 2.0
    with fs.use_backend(backend):
        out = fs.per_sample_mse(pred, target)
    assert out[:-1].eq(0).all()
    torch.testing.assert_close(out[-1], torch.tensor(16.0 / D, device="cuda"))


def test_training_step_small_unet_like_model():
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(64, 4, 3, padding=1),
    ).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bank = fs.AGCMemoryBank(num_timesteps=1000, ratio=1.25).cuda()
    x = torch.randn(16, 4, 64, 64, device="cuda")
    for _ in range(3):
        t = torch.randint(0, 1000, (16,), device="cuda")
        noise = torch.randn_like(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(x + noise)
        loss, stats = fs.agc_loss(pred, noise, timesteps=t, bank=bank)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert bank.bank.abs().sum() > 0 and 0 < int(stats.kept) <= 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_run_the_requested_backend(backend, monkeypatch):
    """The backward runs on autograd's device thread; it must still use the backend the
    forward chose (so both CUDA kernels really are exercised by the tests above)."""
    _skip_unavailable(backend)
    from fastsoup.ops import mse as mse_mod

    seen = []
    real_f, real_b = mse_mod._forward_impl, mse_mod._backward_impl
    monkeypatch.setattr(mse_mod, "_forward_impl", lambda *a: seen.append(("f", a[-1])) or real_f(*a))
    monkeypatch.setattr(mse_mod, "_backward_impl", lambda *a: seen.append(("b", a[-1])) or real_b(*a))
    pred = torch.randn(4, 4096, device="cuda", requires_grad=True)
    with fs.use_backend(backend):
        out = fs.per_sample_mse(pred, torch.randn_like(pred))
    out.sum().backward()
    assert seen == [("f", backend), ("b", backend)]
