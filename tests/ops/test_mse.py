"""fs.per_sample_mse: reference values, gradients, layouts, dtypes, errors, registration."""
import pytest
import torch

import fastsoup as fs
from fastsoup.ops.mse import reference_backward, reference_forward


def _naive(pred, target, weight=None):
    l = ((pred.double() - target.double()) ** 2).reshape(pred.shape[0], -1).mean(1)
    return l if weight is None else l * weight.double()


def test_hand_computed_values():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # sample 0: (0 + 4)/2 = 2; sample 1: (1 + 1)/2 = 1; sample 2: (9 + 4)/2 = 6.5
    out = fs.per_sample_mse(pred, target)
    assert out.dtype == torch.float32
    assert out.tolist() == [2.0, 1.0, 6.5]
    w = torch.tensor([0.5, 2.0, 0.0])
    assert fs.per_sample_mse(pred, target, w).tolist() == [1.0, 2.0, 0.0]
    assert fs.per_sample_mse(pred, target, 3.0).tolist() == [6.0, 3.0, 19.5]


def test_hand_computed_gradient():
    pred = torch.tensor([[1.0, 2.0], [0.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    fs.per_sample_mse(pred, target).sum().backward()
    # d/dpred mean((p - t)^2) = 2 (p - t) / D with D = 2
    assert pred.grad.tolist() == [[1.0, 2.0], [-1.0, 3.0]]


def test_gradcheck_float64_pred_target_weight():
    torch.manual_seed(0)
    pred = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, t, w: fs.per_sample_mse(p, t, w), (pred, target, weight))


@pytest.mark.parametrize("pdt,tdt", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                     (torch.bfloat16, torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_mixed_dtypes_reference(pdt, tdt):
    torch.manual_seed(1)
    pred = torch.randn(4, 3, 8, 8).to(pdt).requires_grad_()
    target = torch.randn(4, 3, 8, 8).to(tdt).requires_grad_()
    out = fs.per_sample_mse(pred, target)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _naive(pred, target), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert pred.grad.dtype == pdt and target.grad.dtype == tdt
    expected = 2 * (pred.double() - target.double()) / (3 * 64)
    torch.testing.assert_close(pred.grad.double(), expected, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(target.grad.double(), -expected, rtol=1e-2, atol=1e-3)


def test_any_rank_and_noncontiguous():
    torch.manual_seed(2)
    for shape in [(5,), (5, 7), (5, 2, 3, 4, 6)]:
        pred, target = torch.randn(shape), torch.randn(shape)
        torch.testing.assert_close(fs.per_sample_mse(pred, target).double(), _naive(pred, target))
    base = torch.randn(4, 6, 9, 10)  # a channel slice: per-sample block not dense
    pred = base[:, ::2, :, :]
    target = torch.randn(4, 9, 10, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(fs.per_sample_mse(pred, target).double(), _naive(pred, target))


def test_weight_only_scales_and_excluded_rows_get_exact_zeros():
    pred = torch.randn(3, 4, requires_grad=True)
    target = torch.randn(3, 4)
    target[1, 2] = float("nan")
    w = torch.tensor([1.0, 0.0, 2.0])
    losses = fs.per_sample_mse(pred, target)
    loss = torch.where(torch.tensor([True, False, True]), losses * w, torch.zeros(3)).sum()
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert (pred.grad[1] == 0).all()


def test_reference_backward_matches_autograd_of_reference():
    torch.manual_seed(3)
    pred = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, 4, dtype=torch.float64)
    g = torch.randn(3, dtype=torch.float64)
    (auto,) = torch.autograd.grad(reference_forward(pred, target), pred, g)
    gp, gt = reference_backward(g, pred.detach(), target, True, False)
    torch.testing.assert_close(gp, auto)
    assert gt.numel() == 0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(pred=torch.randn(2, 3), target=torch.randn(2, 4)), ValueError, "same shape"),
        (dict(pred=torch.randn(2, 3), target=torch.randn(3)), ValueError, "same shape"),
        (dict(pred=torch.ones(2, 3, dtype=torch.int64), target=torch.randn(2, 3)), TypeError, "pred must be a floating"),
        (dict(pred=torch.randn(2, 3), target=torch.ones(2, 3, dtype=torch.int32)), TypeError, "target must be a floating"),
        (dict(pred=torch.tensor(1.0), target=torch.tensor(1.0)), ValueError, "batch dimension"),
        (dict(pred=torch.randn(2, 3), target=torch.randn(2, 3), weight=torch.ones(3)), ValueError, r"weight must have shape \[B\] = \[2\]"),
        (dict(pred=torch.randn(2, 3), target=torch.randn(2, 3), weight=torch.ones(2, dtype=torch.int64)), TypeError, "weight must be a floating"),
        (dict(pred=torch.randn(2, 0), target=torch.randn(2, 0)), ValueError, "no elements per sample"),
        (dict(pred=[1.0], target=torch.randn(1)), TypeError, "pred must be a torch.Tensor"),
    ],
)
def test_bad_input_errors_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fs.per_sample_mse(**kwargs)


def test_empty_batch_gives_empty_result():
    out = fs.per_sample_mse(torch.randn(0, 3, 4), torch.randn(0, 3, 4))
    assert out.shape == (0,) and out.dtype == torch.float32
    assert fs.per_sample_mse(torch.randn(0), torch.randn(0)).shape == (0,)


def test_float64_weight_keeps_fp32_result():
    out = fs.per_sample_mse(torch.randn(3, 4), torch.randn(3, 4), torch.rand(3, dtype=torch.float64))
    assert out.dtype == torch.float32


def test_opcheck_mixed_layouts_with_target_grad():
    torch.manual_seed(6)
    # pred is a dense permuted view, target contiguous: the gradients must come back in
    # the layouts the fake implementation promises (empty_like of each input)
    pred = torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1).requires_grad_()
    target = torch.randn(2, 4, 5, 3).requires_grad_()
    torch.library.opcheck(torch.ops.fastsoup.per_sample_mse.default, (pred, target))
    torch.library.opcheck(
        torch.ops.fastsoup.per_sample_mse_backward.default,
        (torch.randn(2), pred.detach(), torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1), True, True),
    )


def test_opcheck_forward_and_backward_ops():
    torch.manual_seed(4)
    pred = torch.randn(3, 4, 5, requires_grad=True)
    target = torch.randn(3, 4, 5)
    torch.library.opcheck(torch.ops.fastsoup.per_sample_mse.default, (pred, target))
    torch.library.opcheck(
        torch.ops.fastsoup.per_sample_mse_backward.default,
        (torch.randn(3), pred.detach(), target, True, False),
    )


def test_torch_compile_of_a_loss_using_the_op():
    torch.manual_seed(5)

    def loss_fn(pred, target, w):
        return (fs.per_sample_mse(pred, target) * w).mean()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    pred = torch.randn(4, 3, 6, requires_grad=True)
    target = torch.randn(4, 3, 6)
    w = torch.rand(4)
    out = compiled(pred, target, w)
    out.backward()
    g_compiled = pred.grad.clone()
    pred.grad = None
    loss_fn(pred, target, w).backward()
    torch.testing.assert_close(out, loss_fn(pred, target, w))
    torch.testing.assert_close(g_compiled, pred.grad)
