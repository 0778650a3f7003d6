"""Silent failure modes of the AGC ops: loaded bank state, bank dtype, fraction rounding,
bank threshold lookups, and logging stats without NaN."""
import math
import warnings

import pytest
import torch

import fastsoup as fs
from fastsoup.ops import agc as agc_mod


# ---------------------------------------------------------------- load_state_dict
@pytest.mark.parametrize("bad, match", [
    (float("nan"), "finite"), (float("inf"), "finite"), (-float("inf"), "finite"),
    (-1.0, "non-negative"),
])
def test_load_state_dict_refuses_non_finite_or_negative_bank(bad, match):
    src = fs.AGCMemoryBank(num_timesteps=4)
    state = src.state_dict()
    state["bank"][2] = bad
    dst = fs.AGCMemoryBank(num_timesteps=4)
    with pytest.raises(ValueError, match=match) as info:
        dst.load_state_dict(state)
    assert "bank" in str(info.value)
    assert torch.equal(dst.bank, torch.zeros(4))  # nothing was loaded


def test_load_state_dict_refuses_wrong_shape_dtype_and_counts():
    dst = fs.AGCMemoryBank(num_timesteps=4)
    with pytest.raises(RuntimeError, match=r"size mismatch for bank"):
        dst.load_state_dict({"bank": torch.zeros(5), "count": torch.zeros(4, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"bank.*float"):
        dst.load_state_dict({"bank": torch.zeros(4, dtype=torch.int64),
                             "count": torch.zeros(4, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"count.*non-negative"):
        dst.load_state_dict({"bank": torch.zeros(4), "count": torch.tensor([0, -1, 0, 0])})
    with pytest.raises(TypeError, match=r"count.*integer"):
        dst.load_state_dict({"bank": torch.zeros(4), "count": torch.zeros(4)})


def test_load_state_dict_inside_a_model_and_round_trip():
    model = torch.nn.Module()
    model.agc = fs.AGCMemoryBank(num_timesteps=3)
    model.agc.update(torch.tensor([1.0, 2.0]), torch.tensor([0, 2]))
    state = model.state_dict()
    other = torch.nn.Module()
    other.agc = fs.AGCMemoryBank(num_timesteps=3)
    other.load_state_dict(state)
    assert torch.equal(other.agc.bank, model.agc.bank)
    state["agc.bank"][0] = float("nan")
    with pytest.raises(ValueError, match=r"agc\.bank.*finite"):
        other.load_state_dict(state)


# ---------------------------------------------------------------- bank dtype
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_bank_refuses_dtypes_that_cannot_hold_it(dtype):
    with pytest.raises(TypeError, match="dtype"):
        fs.AGCMemoryBank(num_timesteps=4, dtype=dtype)


def test_bank_stays_float32_when_the_model_is_cast_to_half():
    model = torch.nn.Module()
    model.agc = fs.AGCMemoryBank(num_timesteps=4)
    model.half()
    assert model.agc.bank.dtype == torch.float32
    model.to(torch.bfloat16)
    assert model.agc.bank.dtype == torch.float32
    # losses above the float16 range stay finite in the bank
    model.agc.update(torch.tensor([1e6], dtype=torch.float32), torch.tensor([1]))
    assert torch.isfinite(model.agc.bank).all() and model.agc.bank[1] == pytest.approx(2e5)
    model.double()  # float64 can hold it: allowed
    assert model.agc.bank.dtype == torch.float64


# ---------------------------------------------------------------- fraction rounding
@pytest.mark.parametrize("batch", [1, 2, 3, 7, 10, 100])
def test_fraction_just_below_one_never_drops_the_whole_batch(batch):
    keep = fs.low_loss_keep_mask(torch.rand(batch), fraction=0.9999999999)
    assert keep.sum() == 1


@pytest.mark.parametrize("fraction, batch, expected", [
    (0.29, 100, 29), (0.1, 30, 3), (0.3, 10, 3), (0.7, 10, 7), (0.5, 5, 2), (0.0, 8, 0),
    (1 / 3, 3, 1), (2 / 3, 3, 2), (0.9999999999, 10, 9), (0.999, 1000, 999),
])
def test_fraction_is_floor_of_the_product_and_below_the_batch(fraction, batch, expected):
    # floor(fraction·B) as the decimal fraction means it (0.29·100 is 28.999…98 in binary,
    # 1/3·3 is 0.99…9), but never the whole batch: fraction < 1 means k < B
    keep = fs.low_loss_keep_mask(torch.arange(batch, dtype=torch.float32), fraction=fraction)
    assert int((~keep).sum()) == expected


def test_agc_loss_errors_name_the_callers_argument():
    pred, target = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"exclude_k=4 would exclude the whole batch") as info:
        fs.agc_loss(pred, target, exclude_k=4)
    assert "k=" not in str(info.value).replace("exclude_k=", "")
    with pytest.raises(ValueError, match=r"exclude_fraction must be in \[0, 1\)"):
        fs.agc_loss(pred, target, exclude_fraction=1.0)
    with pytest.raises(TypeError, match=r"exclude_k must be an int"):
        fs.agc_loss(pred, target, exclude_k=1.5)
    with pytest.raises(ValueError, match=r"exclude_k or exclude_fraction"):
        fs.agc_loss(pred, target, exclude_k=1, exclude_fraction=0.1)
    loss, stats = fs.agc_loss(pred, target, exclude_fraction=0.9999999999)
    assert int(stats.kept) == 1


# ---------------------------------------------------------------- small batches
def test_exclude_fraction_that_excludes_nothing_warns_once(monkeypatch):
    monkeypatch.setattr(agc_mod, "_WARNED_SMALL_BATCH", False)
    pred, target = torch.randn(4, 3), torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fs.agc_loss(pred, target, exclude_fraction=0.1)
        fs.agc_loss(pred, target, exclude_fraction=0.1)
        fs.agc_loss(torch.randn(20, 3), torch.randn(20, 3), exclude_fraction=0.1)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1, msgs
    assert "excludes nothing" in msgs[0] and "AGCMemoryBank" in msgs[0] \
        and "process_group" in msgs[0]


# ---------------------------------------------------------------- threshold lookups
def test_threshold_validates_timesteps_like_agc_loss():
    bank = fs.AGCMemoryBank(num_timesteps=4, ratio=2.0)
    bank.bank.copy_(torch.tensor([2.0, 4.0, 6.0, 8.0]))
    assert bank.threshold(torch.tensor([0, 3])).tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 4\)"):
        bank.threshold(torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 4\)"):
        bank.threshold(torch.tensor([4]))
    with pytest.raises(TypeError, match="integer"):
        bank.threshold(torch.tensor([1.7]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        bank.threshold(1)


# ---------------------------------------------------------------- stats for logging
def test_stats_as_dict_has_no_nan():
    pred, target = torch.randn(4, 3), torch.randn(4, 3)
    bank = fs.AGCMemoryBank(num_timesteps=10)
    _, stats = fs.agc_loss(pred, target, timesteps=torch.tensor([1, 2, 3, 4]), bank=bank)
    d = stats.as_dict()
    assert d["excluded"] == 0 and d["mean_excluded_loss"] == 0.0
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in d.values()), d
    _, stats = fs.agc_loss(pred, target)   # no rule: threshold undefined
    d = stats.as_dict()
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in d.values()), d
    bank.bank.fill_(1e9)                   # nothing kept
    _, stats = fs.agc_loss(pred, target, timesteps=torch.tensor([1, 2, 3, 4]), bank=bank)
    d = stats.as_dict()
    assert d["kept"] == 0 and d["mean_kept_loss"] == 0.0
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in d.values()), d
