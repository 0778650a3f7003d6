"""Low-loss exclusion: top-k keep mask, the AGC memory bank and agc_loss."""
import math

import pytest
import torch

import fastsoup as fs
from fastsoup.ops.agc_bank import _rank_within_timestep


# ---------------------------------------------------------------- top-k
def test_keep_mask_drops_k_lowest():
    losses = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    assert fs.low_loss_keep_mask(losses, k=2).tolist() == [True, False, True, False, True]
    assert fs.low_loss_keep_mask(losses).all()
    assert fs.low_loss_keep_mask(losses, k=0).all()
    # floor(0.5 * 5) = 2
    assert fs.low_loss_keep_mask(losses, fraction=0.5).tolist() == [True, False, True, False, True]
    assert fs.low_loss_keep_mask(losses, fraction=0.19).all()


def test_keep_mask_ties_drop_lower_index_first():
    losses = torch.tensor([0.2, 0.1, 0.2, 0.1, 0.2, 0.1])
    assert fs.low_loss_keep_mask(losses, k=1).tolist() == [True, False, True, True, True, True]
    assert fs.low_loss_keep_mask(losses, k=4).tolist() == [False, False, True, False, True, False]
    same = torch.zeros(64)
    mask = fs.low_loss_keep_mask(same, k=10)
    assert mask[:10].logical_not().all() and mask[10:].all()


@pytest.mark.parametrize("seed", range(5))
def test_keep_mask_matches_python_sort(seed):
    g = torch.Generator().manual_seed(seed)
    losses = torch.randint(0, 5, (40,), generator=g).float()  # many ties
    k = int(torch.randint(1, 39, (1,), generator=g))
    dropped = sorted(range(40), key=lambda i: (losses[i].item(), i))[:k]
    expected = [i not in dropped for i in range(40)]
    assert fs.low_loss_keep_mask(losses, k=k).tolist() == expected


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(k=5), ValueError, r"k=5 would exclude the whole batch"),
        (dict(k=7), ValueError, r"need k < B"),
        (dict(k=-1), ValueError, "k must be >= 0"),
        (dict(k=1.5), TypeError, "k must be an int"),
        (dict(fraction=1.0), ValueError, r"fraction must be in \[0, 1\)"),
        (dict(fraction=-0.1), ValueError, "fraction must be in"),
        (dict(k=1, fraction=0.1), ValueError, "either k or fraction"),
    ],
)
def test_keep_mask_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fs.low_loss_keep_mask(torch.rand(5), **kwargs)


def test_keep_mask_rejects_non_vector_and_nan():
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        fs.low_loss_keep_mask(torch.rand(2, 3), k=1)
    with pytest.raises(TypeError, match="floating"):
        fs.low_loss_keep_mask(torch.arange(4), k=1)
    with pytest.raises(ValueError, match="NaN"):
        fs.low_loss_keep_mask(torch.tensor([0.1, float("nan"), 0.3]), k=1)


# ---------------------------------------------------------------- memory bank
def _python_bank(losses, timesteps, bank, ratio, decay):
    """The reference code's rule, sample by sample, in float32 like the bank."""
    bank = bank.clone()
    keep = [bool(ratio * l >= bank[t]) for l, t in zip(losses, timesteps.tolist())]
    for l, t in zip(losses, timesteps.tolist()):
        bank[t] = decay * bank[t] + (1.0 - decay) * l
    return keep, bank


@pytest.mark.parametrize("seed", range(4))
def test_bank_matches_sequential_loop_bit_for_bit(seed):
    g = torch.Generator().manual_seed(seed)
    T = 20
    bank = fs.AGCMemoryBank(num_timesteps=T, ratio=1.25, decay=0.8)
    ref = torch.zeros(T)
    for step in range(6):
        t = torch.randint(0, T, (32,), generator=g)          # many repeats within a batch
        l = torch.rand(32, generator=g) * (1 + step)
        keep = bank.step(l, t)
        ref_keep, ref = _python_bank(l, t, ref, 1.25, 0.8)
        assert keep.tolist() == ref_keep
        assert torch.equal(bank.bank, ref)
    assert int(bank.count.sum()) == 6 * 32


def test_bank_closed_form_for_repeated_timestep():
    bank = fs.AGCMemoryBank(num_timesteps=4, decay=0.8)
    bank.bank[2] = 1.0
    l = torch.tensor([0.5, 0.25, 2.0], dtype=torch.float32)
    bank.update(l, torch.tensor([2, 2, 2]))
    b = 0.8
    closed = b**3 * 1.0 + (1 - b) * (b**2 * 0.5 + b * 0.25 + 2.0)
    assert math.isclose(float(bank.bank[2]), closed, rel_tol=1e-6)
    assert bank.bank[[0, 1, 3]].eq(0).all()


def test_bank_reads_before_update_and_keeps_ties():
    bank = fs.AGCMemoryBank(num_timesteps=3, ratio=2.0)
    bank.bank[1] = 1.0
    # 2 * 0.5 == 1.0 is a tie: kept. Sample 2 shares t=1 but reads the pre-update bank.
    keep = bank.step(torch.tensor([0.5, 0.4, 0.49]), torch.tensor([1, 0, 1]))
    assert keep.tolist() == [True, True, False]


def test_rank_within_timestep():
    t = torch.tensor([3, 1, 3, 3, 0, 1])
    assert _rank_within_timestep(t).tolist() == [0, 0, 1, 2, 0, 1]


def test_bank_state_dict_round_trip_and_module_behaviour():
    bank = fs.AGCMemoryBank(num_timesteps=10)
    bank.update(torch.rand(8), torch.randint(0, 10, (8,)))
    sd = bank.state_dict()
    assert set(sd) == {"bank", "count"}
    other = fs.AGCMemoryBank(num_timesteps=10)
    other.load_state_dict(sd)
    assert torch.equal(other.bank, bank.bank) and torch.equal(other.count, bank.count)
    model = torch.nn.Module()
    model.agc = bank
    assert "agc.bank" in model.state_dict()
    with pytest.raises(RuntimeError):
        fs.AGCMemoryBank(num_timesteps=11).load_state_dict(sd)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda b: b.keep_mask(torch.rand(3), torch.tensor([0, 1, 10])), ValueError, r"timesteps must lie in \[0, 10\)"),
        (lambda b: b.keep_mask(torch.rand(3), torch.tensor([0, -1, 2])), ValueError, "must lie in"),
        (lambda b: b.update(torch.rand(3), torch.tensor([0.0, 1.0, 2.0])), TypeError, "integer tensor"),
        (lambda b: b.update(torch.rand(3), torch.tensor([0, 1])), ValueError, r"shape \[B\] = \[3\]"),
        (lambda b: b.update(torch.arange(3), torch.tensor([0, 1, 2])), TypeError, "losses must be a floating"),
    ],
)
def test_bank_bad_input(call, exc, match):
    bank = fs.AGCMemoryBank(num_timesteps=10)
    before = bank.bank.clone()
    with pytest.raises(exc, match=match):
        call(bank)
    assert torch.equal(bank.bank, before)


def test_bank_constructor_validation():
    with pytest.raises(ValueError, match="num_timesteps"):
        fs.AGCMemoryBank(num_timesteps=0)
    with pytest.raises(ValueError, match="decay"):
        fs.AGCMemoryBank(decay=1.0)
    with pytest.raises(ValueError, match="ratio"):
        fs.AGCMemoryBank(ratio=0.0)


# ---------------------------------------------------------------- agc_loss
def _setup(seed=0, B=6, D=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn((B,) + D, generator=g, requires_grad=True)
    target = torch.randn((B,) + D, generator=g)
    return pred, target


def test_agc_loss_topk_value_and_gradient():
    pred, target = _setup()
    l = ((pred.detach() - target) ** 2).flatten(1).mean(1)
    loss, stats = fs.agc_loss(pred, target, exclude_k=2)
    keep = fs.low_loss_keep_mask(l, k=2)
    assert torch.allclose(loss, l[keep].sum() / 4)
    loss.backward()
    D = 12
    expected = 2 * keep.view(-1, 1, 1) * (pred.detach() - target) / (4 * D)
    torch.testing.assert_close(pred.grad, expected)
    assert (pred.grad[~keep] == 0).all()
    d = stats.as_dict()
    assert d["kept"] == 4 and d["excluded"] == 2 and d["total"] == 6
    assert math.isclose(d["threshold"], float(l[~keep].max()), rel_tol=1e-6)
    assert math.isclose(d["mean_kept_loss"], float(l[keep].mean()), rel_tol=1e-6)
    assert math.isclose(d["mean_excluded_loss"], float(l[~keep].mean()), rel_tol=1e-6)


def test_agc_loss_with_weights_selects_on_weighted_loss():
    pred, target = _setup(1)
    w = torch.tensor([10.0, 1.0, 1.0, 0.01, 1.0, 1.0])
    mse = ((pred.detach() - target) ** 2).flatten(1).mean(1)
    loss, stats = fs.agc_loss(pred, target, exclude_fraction=0.5, weight=w)
    keep = fs.low_loss_keep_mask(mse * w, k=3)
    assert torch.equal(stats.keep_mask, keep)
    assert torch.allclose(loss, (mse * w)[keep].sum() / 3)


def test_agc_loss_bank_rule_and_update():
    pred, target = _setup(2)
    t = torch.tensor([0, 1, 1, 2, 3, 4])
    mse = fs.per_sample_mse(pred.detach(), target)  # the values agc_loss feeds the bank
    level = float((2.0 * mse).median())   # about half the batch falls below the bank
    bank = fs.AGCMemoryBank(num_timesteps=5, ratio=2.0)
    bank.bank.fill_(level)
    expected_keep = 2.0 * mse >= level
    assert 0 < int(expected_keep.sum()) < 6  # the rule really excludes something
    ref_bank = fs.AGCMemoryBank(num_timesteps=5, ratio=2.0)
    ref_bank.bank.fill_(level)
    ref_bank.update(mse, t)
    w = torch.full((6,), 0.5)  # the bank sees the unweighted MSE
    loss, stats = fs.agc_loss(pred, target, timesteps=t, bank=bank, weight=w)
    assert torch.equal(stats.keep_mask, expected_keep)
    assert torch.equal(bank.bank, ref_bank.bank)
    K = int(expected_keep.sum())
    torch.testing.assert_close(loss, (0.5 * mse)[expected_keep].sum() / K)
    loss.backward()
    assert (pred.grad[~expected_keep] == 0).all() and (pred.grad[expected_keep] != 0).any()
    assert math.isclose(stats.as_dict()["threshold"], level / 2.0, rel_tol=1e-6)


def test_agc_loss_update_bank_false_leaves_bank():
    pred, target = _setup(8)
    bank = fs.AGCMemoryBank(num_timesteps=5)
    bank.bank.fill_(0.3)
    before = bank.bank.clone()
    fs.agc_loss(pred, target, timesteps=torch.arange(6) % 5, bank=bank, update_bank=False)
    assert torch.equal(bank.bank, before)
    fs.agc_loss(pred, target, timesteps=torch.arange(6) % 5, bank=bank)
    assert not torch.equal(bank.bank, before)


def test_agc_loss_bank_rule_excludes_nonfinite_without_poisoning_bank():
    pred, target = _setup(9)
    target = target.clone()
    target[3, 1, 1] = float("nan")
    bank = fs.AGCMemoryBank(num_timesteps=5)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    loss, stats = fs.agc_loss(pred, target, timesteps=t, bank=bank, nonfinite="exclude")
    assert torch.isfinite(bank.bank).all() and bank.bank[3] == 0  # NaN sample not fed
    assert stats.nonfinite == 1 and not stats.keep_mask[3] and int(stats.kept) == 5
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[3] == 0).all()


def test_weight_gradient_is_zero_for_excluded_and_nonfinite_samples():
    pred, target = _setup(10)
    target = target.clone()
    target[1, 0, 0] = float("inf")
    w = torch.rand(6, requires_grad=True)
    loss, stats = fs.agc_loss(pred, target, weight=w, exclude_k=1, nonfinite="exclude")
    loss.backward()
    assert torch.isfinite(w.grad).all()
    assert (w.grad[~stats.keep_mask] == 0).all() and (w.grad[stats.keep_mask] > 0).all()


def test_topk_fraction_floor_is_robust_to_float_rounding():
    losses = torch.arange(100, dtype=torch.float32)
    assert int((~fs.low_loss_keep_mask(losses, fraction=0.29)).sum()) == 29
    import numpy as np

    assert int((~fs.low_loss_keep_mask(losses, k=np.int64(3))).sum()) == 3


def test_bank_rejects_nonfinite_losses_and_bad_settings():
    bank = fs.AGCMemoryBank(num_timesteps=4)
    with pytest.raises(fs.NonFiniteLossError, match="poison the bank"):
        bank.update(torch.tensor([float("nan"), 1.0]), torch.tensor([1, 1]))
    assert torch.isfinite(bank.bank).all()
    with pytest.raises(ValueError, match="finite"):
        fs.AGCMemoryBank(ratio=float("inf"))
    with pytest.raises(TypeError, match="num_timesteps must be an int"):
        fs.AGCMemoryBank(num_timesteps=10.0)


def test_agc_loss_no_sample_kept_gives_zero_loss_and_zero_grad():
    pred, target = _setup(3)
    bank = fs.AGCMemoryBank(num_timesteps=10)
    bank.bank.fill_(1e9)
    loss, stats = fs.agc_loss(pred, target, timesteps=torch.zeros(6, dtype=torch.long), bank=bank)
    loss.backward()
    assert loss.item() == 0.0 and int(stats.kept) == 0
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    assert math.isnan(float(stats.mean_kept_loss))      # undefined: NaN in the tensor stats
    assert stats.as_dict()["mean_kept_loss"] == 0.0     # but never NaN in the logged dict


def test_agc_loss_no_rule_is_plain_mean():
    pred, target = _setup(4)
    loss, stats = fs.agc_loss(pred, target)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target))
    assert int(stats.kept) == 6


def test_agc_loss_nonfinite_raises_or_excludes():
    pred, target = _setup(5)
    target = target.clone()
    target[2, 0, 0] = float("inf")
    with pytest.raises(fs.NonFiniteLossError, match=r"batch indices \[2\]"):
        fs.agc_loss(pred, target, exclude_k=1)
    loss, stats = fs.agc_loss(pred, target, exclude_k=1, nonfinite="exclude")
    loss.backward()
    assert torch.isfinite(loss) and stats.nonfinite == 1
    assert int(stats.kept) == 4 and not stats.keep_mask[2]
    assert torch.isfinite(pred.grad).all() and (pred.grad[2] == 0).all()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(bank="x", timesteps=torch.zeros(6, dtype=torch.long)), TypeError, "AGCMemoryBank"),
        (dict(bank=fs.AGCMemoryBank(10)), ValueError, "needs timesteps"),
        (dict(bank=fs.AGCMemoryBank(10), timesteps=torch.zeros(6, dtype=torch.long), exclude_k=1), ValueError, "not both"),
        (dict(timesteps=torch.zeros(5, dtype=torch.long)), ValueError, r"timesteps must have shape \[B\] = \[6\]"),
        (dict(timesteps=torch.zeros(6)), TypeError, "integer tensor"),
        (dict(bank=fs.AGCMemoryBank(10), timesteps=torch.full((6,), 10)), ValueError, r"must lie in \[0, 10\)"),
        (dict(exclude_k=6), ValueError, "exclude the whole batch"),
        (dict(exclude_fraction=1.5), ValueError, "fraction must be in"),
        (dict(weight=torch.ones(5)), ValueError, r"weight must have shape \[B\] = \[6\]"),
        (dict(nonfinite="ignore"), ValueError, "nonfinite must be"),
    ],
)
def test_agc_loss_bad_input(kwargs, exc, match):
    pred, target = _setup(6)
    with pytest.raises(exc, match=match):
        fs.agc_loss(pred, target, **kwargs)


def test_agc_loss_mixed_dtype_inputs():
    pred, target = _setup(7)
    loss, _ = fs.agc_loss(pred.detach().bfloat16().requires_grad_(), target.half(), exclude_k=1)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
