"""The Python side of the CUDA backend, checked without a GPU.

A stand-in for ``fastsoup._cuda`` implements the binding's contract (partial sums
``[B, n_chunks]`` scaled by 1/D; gradients written through the given strides) with
``torch.as_strided`` from the layout it receives. If the launchers passed wrong strides,
sizes or chunking, or summed the partials wrongly, these tests fail.
"""
import types

import pytest
import torch

import fastsoup as fs
from fastsoup.kernels import _ext, abi
from fastsoup.ops import mse as mse_mod


def _view(t, sizes, strides):
    B = t.shape[0]
    return torch.as_strided(t, (B,) + tuple(sizes), tuple(strides), t.storage_offset())


def _fake_forward(pred, target, sizes, strides, dense, chunk, n_chunks):
    assert chunk % abi.MSE_CUDA_CHUNK_QUANTUM == 0 and chunk * n_chunks >= sizes[0] * sizes[1] * sizes[2]
    B, D = pred.shape[0], sizes[0] * sizes[1] * sizes[2]
    p = _view(pred, sizes, strides[0]).reshape(B, D).float()
    t = _view(target, sizes, strides[1]).reshape(B, D).float()
    sq = torch.zeros(B, n_chunks * chunk)
    sq[:, :D] = (p - t) ** 2 / D
    return sq.view(B, n_chunks, chunk).sum(-1)


def _fake_backward(coef, pred, target, gp, gt, sizes, strides, dense, chunk, n_chunks):
    B = pred.shape[0]
    p = _view(pred, sizes, strides[0]).float()
    t = _view(target, sizes, strides[1]).float()
    g = coef.view(B, 1, 1, 1) * (p - t)
    if gp is not None:
        _view(gp, sizes, strides[2]).copy_(g)
    if gt is not None:
        _view(gt, sizes, strides[3]).copy_(-g)


@pytest.fixture
def fake_cuda_backend(monkeypatch):
    fake = types.SimpleNamespace(per_sample_mse_forward=_fake_forward,
                                 per_sample_mse_backward=_fake_backward)
    monkeypatch.setattr(_ext, "cuda_ext", lambda warn=False: fake)
    monkeypatch.setattr(mse_mod, "_backend_for", lambda pred, target: "cuda")


@pytest.mark.parametrize("make", [
    lambda: (torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)),
    lambda: (torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
             torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)),
    lambda: (torch.randn(3, 8, 7, 9)[:, 1::2, :, 2:],
             torch.randn(3, 7, 4, 9).permute(0, 2, 1, 3)[..., 2:]),
    lambda: (torch.randn(1, 5000).half(), torch.randn(1, 5000)),
])
def test_cuda_glue_matches_reference(fake_cuda_backend, make):
    torch.manual_seed(0)
    pred, target = make()
    pred = pred.detach().requires_grad_()
    target = target.detach().requires_grad_()
    out = fs.per_sample_mse(pred, target)
    g = torch.rand(out.shape[0])
    (out * g).sum().backward()
    ref = mse_mod.reference_forward(pred.detach(), target.detach())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    rgp, rgt = mse_mod.reference_backward(g, pred.detach(), target.detach(), True, True)
    torch.testing.assert_close(pred.grad, rgp, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(target.grad, rgt, rtol=1e-3, atol=1e-5)
