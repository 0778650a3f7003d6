"""The Triton per-sample MSE kernels against the reference.

Without a GPU these run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on small fp32/fp16 shapes; on a GPU they run compiled.
"""
import pytest
import torch

import fastsoup as fs
from fastsoup.kernels.layout import plan_chunks, row_layout
from fastsoup.ops.mse import reference_backward, reference_forward

triton = pytest.importorskip("triton")


def _run(pred, target, weight=None):
    """Forward + backward through the public op with the Triton backend forced."""
    pred = pred.detach().requires_grad_()
    target = target.detach().requires_grad_(target.dtype.is_floating_point)
    with fs.use_backend("triton"):
        out = fs.per_sample_mse(pred, target, weight)
        g = torch.linspace(0.5, 1.5, out.shape[0], device=out.device)
        (out * g).sum().backward()
    return out, pred.grad, target.grad, g


def _check(pred, target, rtol, atol):
    out, gp, gt, g = _run(pred, target)
    ref = reference_forward(pred, target)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    rgp, rgt = reference_backward(g, pred, target, True, True)
    torch.testing.assert_close(gp.float(), rgp.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(gt.float(), rgt.float(), rtol=rtol, atol=atol)
    assert gp.dtype == pred.dtype and gt.dtype == target.dtype
    assert gp.stride() == pred.stride() or not pred.is_contiguous()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (3, 1000), (2, 5, 7, 11)])
def test_contiguous(triton_device, dtype, tol, shape):
    torch.manual_seed(0)
    pred = torch.randn(shape, device=triton_device).to(dtype)
    target = torch.randn(shape, device=triton_device).to(dtype)
    _check(pred, target, tol, tol)


def test_mixed_dtypes(triton_device):
    torch.manual_seed(1)
    pred = torch.randn(3, 4, 6, 6, device=triton_device).half()
    target = torch.randn(3, 4, 6, 6, device=triton_device)
    _check(pred, target, 2e-3, 2e-3)


def test_channels_last_and_slices(triton_device):
    torch.manual_seed(2)
    pred = torch.randn(2, 4, 6, 5, device=triton_device).to(memory_format=torch.channels_last)
    target = torch.randn(2, 4, 6, 5, device=triton_device).to(memory_format=torch.channels_last)
    assert row_layout([pred, target]).dense  # walked in storage order
    _check(pred, target, 1e-5, 1e-5)
    base = torch.randn(3, 8, 7, 9, device=triton_device)
    sliced = base[:, 1::2, :, 2:]                    # strided in every inner dim
    other = torch.randn(3, 7, 4, 9, device=triton_device).permute(0, 2, 1, 3)[..., 2:]
    layout = row_layout([sliced, other])
    assert layout is not None and not layout.dense
    _check(sliced, other, 1e-5, 1e-5)


def test_expanded_target_and_many_dims(triton_device):
    torch.manual_seed(3)
    pred = torch.randn(2, 3, 4, 5, 6, device=triton_device)
    target = torch.randn(1, 3, 1, 5, 6, device=triton_device).expand(2, 3, 4, 5, 6)
    _check(pred, target.contiguous(), 1e-5, 1e-5)
    with fs.use_backend("triton"):
        out2 = fs.per_sample_mse(pred, target)
    torch.testing.assert_close(out2, reference_forward(pred, target), rtol=1e-5, atol=1e-5)
    # five inner dims that cannot merge fall back to a contiguous copy, still correct
    odd = torch.randn(2, 3, 4, 5, 6, 2, device=triton_device).permute(0, 5, 3, 1, 4, 2)
    odd_t = torch.randn(2, 2, 5, 3, 6, 4, device=triton_device)
    assert row_layout([odd, odd_t]) is None
    _check(odd, odd_t, 1e-5, 1e-5)


def test_long_rows_split_across_programs(triton_device):
    """B = 1 with a long row: many chunks, partial sums combined deterministically."""
    from fastsoup.kernels.triton import mse as tmse

    torch.manual_seed(4)
    pred = torch.randn(1, 3 * 4096 + 17, device=triton_device)
    target = torch.randn_like(pred)
    layout = row_layout([pred, target])
    chunk, n_chunks = plan_chunks(1, layout.row_numel, tmse.BLOCK, 64)
    assert n_chunks > 1 and chunk % tmse.BLOCK == 0 and chunk * n_chunks >= layout.row_numel
    out = tmse.mse_forward(pred, target, layout, chunk=tmse.BLOCK)
    torch.testing.assert_close(out, reference_forward(pred, target), rtol=1e-5, atol=1e-6)
    _check(pred, target, 1e-5, 1e-6)


def test_zero_coefficient_rows_are_exact_zeros_even_with_nan(triton_device):
    pred = torch.randn(3, 50, device=triton_device, requires_grad=True)
    target = torch.randn(3, 50, device=triton_device)
    target[1, 7] = float("nan")
    keep = torch.tensor([True, False, True], device=triton_device)
    with fs.use_backend("triton"):
        losses = fs.per_sample_mse(pred, target)
        torch.where(keep, losses, torch.zeros_like(losses)).sum().backward()
    assert torch.isnan(losses[1])
    assert (pred.grad[1] == 0).all() and torch.isfinite(pred.grad).all()


def test_plan_chunks_covers_rows():
    for batch, numel in [(1, 1), (1, 16 * 2**20), (8, 16384), (256, 196608), (3, 1025)]:
        chunk, n = plan_chunks(batch, numel, 1024, 1056)
        assert chunk % 1024 == 0 and chunk * n >= numel and chunk * (n - 1) < numel
        if batch == 1 and numel > 2**20:
            assert n > 100  # one huge sample still spreads over the device


def test_backward_uses_the_backend_chosen_in_forward(triton_device, monkeypatch):
    """The backward of CUDA tensors runs on autograd's own thread, which does not see a
    thread-local use_backend(): the forward's choice must travel with the graph."""
    from fastsoup.kernels.triton import mse as tmse

    calls = []
    real = tmse.mse_backward
    monkeypatch.setattr(tmse, "mse_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    pred = torch.randn(2, 40, device=triton_device, requires_grad=True)
    target = torch.randn(2, 40, device=triton_device)
    with fs.use_backend("triton"):
        out = fs.per_sample_mse(pred, target)
    out.sum().backward()          # outside the override, like autograd's device thread
    assert calls == [1]
    pred.grad = None
    with fs.use_backend("triton"):
        out = torch.compile(lambda p, t: fs.per_sample_mse(p, t), backend="aot_eager")(pred, target)
    out.sum().backward()
    assert calls == [1, 1]
