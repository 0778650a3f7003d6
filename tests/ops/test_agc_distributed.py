"""Global selection across data-parallel ranks (gloo, 2 CPU processes).

Each rank holds half of a batch. With process_group set, selection runs on the gathered
global batch, the local loss is world·Σ_local m_i ℓ_i / K_global and the bank is updated
from the global batch in rank order. Averaging the ranks' gradients (what DDP does) must
give exactly the single-process gradient, and every rank's bank must equal the
single-process bank.
"""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastsoup as fs

WORLD = 2
SIZES = [5, 3]  # unequal local batches
B = sum(SIZES)
RULES = ("topk", "bank", "none-kept")


def _data():
    g = torch.Generator().manual_seed(123)
    pred = torch.randn(B, 2, 3, 4, generator=g)
    target = torch.randn(B, 2, 3, 4, generator=g)
    t = torch.tensor([4, 1, 4, 0, 2, 4, 1, 3])
    return pred, target, t


def _bank(rule):
    """Bank levels chosen so that the bank rule excludes some samples (and, for the
    "none-kept" rule, all of them)."""
    bank = fs.AGCMemoryBank(num_timesteps=5, ratio=2.0)
    bank.bank.fill_(1e9 if rule == "none-kept" else 4.0)
    return bank


def _rank_nonfinite(rank, out_dir):
    """A NaN on rank 1 only: every rank must raise (none may hang in the collective)."""
    pred, target, t = _data()
    lo = sum(SIZES[:rank])
    sl = slice(lo, lo + SIZES[rank])
    tgt = target[sl].clone()
    if rank == 1:
        tgt[0, 0, 0, 0] = float("nan")
    try:
        fs.agc_loss(pred[sl], tgt, exclude_k=1, process_group=True)
        outcome = "no error"
    except fs.NonFiniteLossError as exc:
        outcome = str(exc)
    with open(os.path.join(out_dir, f"nonfinite-rank{rank}.txt"), "w") as f:
        f.write(outcome)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # a short timeout turns a hang (one rank raising alone) into a failure
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for rule in RULES:
            _rank_run(rank, rule, out_dir)
        _rank_nonfinite(rank, out_dir)
    finally:
        dist.destroy_process_group()


def _rank_run(rank, rule, out_dir):
    pred, target, t = _data()
    lo = sum(SIZES[:rank])
    sl = slice(lo, lo + SIZES[rank])
    p = pred[sl].clone().requires_grad_()
    bank = _bank(rule)
    kwargs = dict(exclude_k=3) if rule == "topk" else dict(bank=bank, timesteps=t[sl])
    for _ in range(2):  # two steps: the bank must stay identical across ranks
        p.grad = None
        loss, stats = fs.agc_loss(p, target[sl], process_group=True, **kwargs)
        loss.backward()
    torch.save({"grad": p.grad, "bank": bank.bank, "kept": int(stats.kept),
                "total": stats.total}, os.path.join(out_dir, f"{rule}-rank{rank}.pt"))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD,
                       join=True, start_method="spawn")
    return out


@pytest.mark.parametrize("rule", RULES)
def test_global_selection_matches_single_process(rank_results, rule):
    results = [torch.load(rank_results / f"{rule}-rank{r}.pt") for r in range(WORLD)]

    pred, target, t = _data()
    p = pred.clone().requires_grad_()
    bank = _bank(rule)
    kwargs = dict(exclude_k=3) if rule == "topk" else dict(bank=bank, timesteps=t)
    for _ in range(2):
        p.grad = None
        loss, stats = fs.agc_loss(p, target, **kwargs)
        loss.backward()

    # DDP averages gradients over ranks: each rank's grad of its own rows, divided by world
    ddp_grad = torch.cat([r["grad"] for r in results]) / WORLD
    torch.testing.assert_close(ddp_grad, p.grad, rtol=1e-6, atol=1e-7)
    for r in results:
        assert r["kept"] == int(stats.kept) and r["total"] == B
        assert torch.equal(r["bank"], results[0]["bank"])
    torch.testing.assert_close(results[0]["bank"], bank.bank)
    if rule == "none-kept":
        assert int(stats.kept) == 0 and all(r["grad"].eq(0).all() for r in results)
    else:
        assert 0 < int(stats.kept) < B  # the rule really excluded samples


def test_nonfinite_on_one_rank_raises_on_every_rank(rank_results):
    for r in range(WORLD):
        text = (rank_results / f"nonfinite-rank{r}.txt").read_text()
        assert "non-finite per-sample loss for 1 of 8 samples" in text, text
        assert "global batch indices (rank-major) [5]" in text
