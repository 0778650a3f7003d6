"""Iterative ensemble training: exact weighted averaging, in one process and across ranks."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fastsoup.train.iet import (
    IterativeEnsemble,
    average_across_shard_groups,
    averaged_tensors,
    shard_weights,
)


def _model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].num_batches_tracked.fill_(seed)
    return m.to(dtype)


def _expected(models, weights):
    lists = [[t.detach().double() for _, t in averaged_tensors(m)] for m in models]
    return [sum(w * l[p] for w, l in zip(weights, lists)) for p in range(len(lists[0]))]


def test_average_is_weighted_mean_over_params_and_float_buffers():
    models = [_model(s) for s in range(3)]
    sizes = [10, 20, 30]
    weights = shard_weights(sizes, 3)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    for m, o in zip(models, opts):  # create optimizer state
        m(torch.randn(2, 3, 6, 6)).sum().backward()
        o.step()
    expected = _expected(models, weights)
    counters = [int(m[1].num_batches_tracked) for m in models]
    momenta = [[o.state[p]["momentum_buffer"].clone() for p in m.parameters()] for m, o in zip(models, opts)]
    iet = IterativeEnsemble(models, shard_sizes=sizes)
    iet.average_()
    for m in models:
        got = [t.detach().double() for _, t in averaged_tensors(m)]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    # integer buffers and optimizer state are per shard and untouched
    assert [int(m[1].num_batches_tracked) for m in models] == counters
    for m, o, mom in zip(models, opts, momenta):
        for p, b in zip(m.parameters(), mom):
            assert torch.equal(o.state[p]["momentum_buffer"], b)
    assert iet.rounds == 1


def test_bf16_replicas_accumulate_in_fp32_and_round_once():
    models = [_model(s, torch.bfloat16) for s in range(4)]
    expected = _expected(models, [0.25] * 4)
    IterativeEnsemble(models).average_()
    for (_, g), e in zip(averaged_tensors(models[2]), expected):
        # one rounding to bf16 of the fp32 sum: within one bf16 ulp of the exact mean
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.detach().double(), e, rtol=2**-8, atol=1e-30)


def test_step_averages_every_n_and_ema_models_separately():
    models = [_model(s) for s in range(2)]
    emas = [_model(s + 10) for s in range(2)]
    exp_models = _expected(models, [0.5, 0.5])
    exp_emas = _expected(emas, [0.5, 0.5])
    iet = IterativeEnsemble(models, ema_models=emas, average_every=3)
    assert [iet.step() for _ in range(3)] == [False, False, True]
    torch.testing.assert_close(averaged_tensors(models[1])[0][1].double(), exp_models[0])
    torch.testing.assert_close(averaged_tensors(emas[0])[0][1].double(), exp_emas[0])
    state = iet.state_dict()
    other = IterativeEnsemble(models, average_every=1)
    other.load_state_dict(state)
    assert other.steps == 3 and other.average_every == 3 and other.rounds == 1


def test_structure_and_argument_errors():
    with pytest.raises(ValueError, match="differ at"):
        IterativeEnsemble([_model(0), _model(1, torch.float64)])
    with pytest.raises(ValueError, match="averaged tensors"):
        IterativeEnsemble([_model(0), nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="shard_sizes has 3 entries for 2"):
        IterativeEnsemble([_model(0), _model(1)], shard_sizes=[1, 2, 3])
    with pytest.raises(ValueError, match="positive total"):
        shard_weights([0, 0], 2)
    with pytest.raises(ValueError, match="ema_models"):
        IterativeEnsemble([_model(0)], ema_models=[_model(0), _model(1)])


# ------------------------------------------------------------------ distributed (gloo)
SHARDS, PER_SHARD = 2, 2
SIZES = [3, 5]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=SHARDS * PER_SHARD)
    try:
        shard = rank // PER_SHARD
        model = _model(100 + shard)  # identical replicas inside a shard group
        average_across_shard_groups(model, shard, SHARDS, shard_sizes=SIZES, bucket_bytes=1024)
        torch.save({n: t.detach() for n, t in averaged_tensors(model)} |
                   {"counter": model[1].num_batches_tracked.clone()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_shard_groups_across_ranks_match_single_process(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=SHARDS * PER_SHARD,
                       join=True, start_method="spawn")
    ref_models = [_model(100 + s) for s in range(SHARDS)]
    IterativeEnsemble(ref_models, shard_sizes=SIZES).average_()
    ref = dict(averaged_tensors(ref_models[0]))
    for r in range(SHARDS * PER_SHARD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for name, t in ref.items():
            torch.testing.assert_close(got[name], t.detach(), rtol=1e-6, atol=1e-7)
        assert int(got["counter"]) == 100 + r // PER_SHARD  # integer buffers untouched
