"""The fastsoup._C per-sample MSE kernel (the CPU fast path for dense rows)."""
import pytest
import torch

import fastsoup as fs
from fastsoup.kernels import _ext
from fastsoup.kernels import cpu as cpu_kernels
from fastsoup.ops import mse as M

pytestmark = pytest.mark.skipif(_ext.cpu_ext(warn=False) is None, reason="fastsoup._C not built")


@pytest.mark.parametrize("pdt,tdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                     (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(3, 5), (4, 3, 17, 9), (2, 200_003), (1, 1)])
def test_kernel_matches_reference(pdt, tdt, shape):
    torch.manual_seed(0)
    pred = torch.randn(shape).to(pdt)
    target = torch.randn(shape).to(tdt)
    assert cpu_kernels.mse_rows_ok(pred, target)
    out = cpu_kernels.mse_forward(pred, target)
    torch.testing.assert_close(out, M.reference_forward(pred, target), rtol=2e-6, atol=1e-7)
    g = torch.rand(shape[0])
    gp, gt = M._backward_impl(g, pred, target, True, True, "reference")
    rgp, rgt = M.reference_backward(g, pred, target, True, True)
    # same fp32 arithmetic, one rounding into the storage dtype: identical bits
    assert torch.equal(gp, rgp) and torch.equal(gt, rgt)
    assert gp.dtype == pdt and gt.dtype == tdt


def test_public_op_uses_the_kernel_for_dense_rows_only(monkeypatch):
    calls = []
    ext = _ext.cpu_ext(warn=False)

    class Spy:
        def per_sample_mse_forward(self, *a, **k):
            calls.append("f")
            return ext.per_sample_mse_forward(*a, **k)

        def per_sample_mse_backward(self, *a, **k):
            calls.append("b")
            return ext.per_sample_mse_backward(*a, **k)

    monkeypatch.setattr(_ext, "cpu_ext", lambda warn=True: Spy())
    pred = torch.randn(4, 3, 8, 8, requires_grad=True)
    fs.per_sample_mse(pred, torch.randn(4, 3, 8, 8)).sum().backward()
    assert calls == ["f", "b"]
    calls.clear()
    sliced = torch.randn(4, 6, 8, 8)[:, ::2].requires_grad_()   # rows not contiguous
    target = torch.randn(4, 3, 8, 8)
    out = fs.per_sample_mse(sliced, target)
    out.sum().backward()
    assert calls == []                                           # the reference ran
    torch.testing.assert_close(out, M.reference_forward(sliced.detach(), target))
    batch_slice = torch.randn(8, 3, 4)[::2]                      # rows contiguous, batch strided
    assert cpu_kernels.mse_rows_ok(batch_slice, batch_slice)


def test_zero_coefficient_rows_are_exact_zeros_with_nan_inputs():
    pred = torch.randn(3, 40)
    target = torch.randn(3, 40)
    target[1, 3] = float("nan")
    gp, gt = M._backward_impl(torch.tensor([1.0, 0.0, 2.0]), pred, target, True, True, "reference")
    assert (gp[1] == 0).all() and (gt[1] == 0).all() and torch.isfinite(gp).all()
