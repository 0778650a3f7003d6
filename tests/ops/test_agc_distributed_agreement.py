"""An error on one rank is an error on every rank (gloo, 2 and 3 CPU processes).

Each case makes exactly one rank's call invalid (an empty batch, a shape mismatch, a
missing ``timesteps``, a bank on one rank only, ...). Every rank must raise the same
error in the same step; a rank left waiting in a collective would instead hit the
process group's short timeout (a few seconds), so a hang fails the test rather than
stalling CI. A last, valid step checks that the ranks are still paired correctly.
"""
import datetime
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastsoup as fs

GROUP_TIMEOUT_S = 5


class _Sched:
    """A duck-typed DDPM scheduler (10 timesteps, epsilon prediction)."""

    class config:
        prediction_type = "epsilon"
        num_train_timesteps = 10

    alphas_cumprod = torch.linspace(0.99, 0.1, 10)


def _args(rank, world, case):
    """Keyword arguments of this rank's call; only ``bad`` rank's call is invalid."""
    g = torch.Generator().manual_seed(rank)
    pred, target = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([0, 3, 3])
    bank = fs.AGCMemoryBank(num_timesteps=5)
    kw = dict(pred=pred, target=target, timesteps=t, bank=bank)
    bad = {"empty_batch": world - 1, "shape_mismatch": 0, "missing_timesteps": world - 1,
           "bank_on_one_rank": 1, "timesteps_outside_bank": world - 1, "nonfinite": 0,
           "float_timesteps": 1, "diffusion_loss_timestep_range": world - 1,
           "diffusion_loss_shape": 0}[case]
    if rank != bad:
        return kw
    if case == "empty_batch":
        kw.update(pred=pred[:0], target=target[:0], timesteps=t[:0])
    elif case == "shape_mismatch":
        kw.update(target=target[:, :1])
    elif case == "missing_timesteps":
        kw.update(timesteps=None)
    elif case == "bank_on_one_rank":
        kw.update(bank=None, timesteps=None, exclude_k=1)
    elif case == "timesteps_outside_bank":
        kw.update(timesteps=torch.tensor([0, 3, 7]))
    elif case == "nonfinite":
        target = target.clone()
        target[1, 0, 0] = float("nan")
        kw.update(target=target)
    elif case == "float_timesteps":
        kw.update(timesteps=t.float())
    elif case == "diffusion_loss_timestep_range":
        kw.update(timesteps=torch.tensor([0, 3, 12]))
    elif case == "diffusion_loss_shape":
        kw.update(target=target[:2])
    return kw


CASES = {  # case -> (exception type, text every rank's message contains)
    "empty_batch": ("ValueError", "empty batch"),
    "shape_mismatch": ("ValueError", "pred and target must have the same shape"),
    "missing_timesteps": ("ValueError", "bank= needs timesteps="),
    "bank_on_one_rank": ("ValueError", "different rules"),
    "timesteps_outside_bank": ("ValueError", "timesteps must lie in [0, 5)"),
    "nonfinite": ("NonFiniteLossError", "non-finite per-sample loss for 1 of"),
    "float_timesteps": ("TypeError", "timesteps must be an integer tensor"),
    "diffusion_loss_timestep_range": ("ValueError", "timesteps must lie in [0, 10)"),
    "diffusion_loss_shape": ("ValueError", "same shape"),
}


def _call(case, kw, group):
    if case.startswith("diffusion_loss"):
        return fs.train.diffusion_loss(_Sched(), kw["pred"], latents=kw["target"],
                                       noise=kw["target"], timesteps=kw["timesteps"],
                                       bank=kw["bank"], process_group=group)
    return fs.agc_loss(kw["pred"], kw["target"], timesteps=kw["timesteps"], bank=kw["bank"],
                       exclude_k=kw.get("exclude_k"), process_group=group)


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # rendezvous may wait for slow process start-up; the calls then get a short timeout
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.new_group(list(range(world)),
                           timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    results = {}
    try:
        for case in CASES:
            dist.barrier()
            kw = _args(rank, world, case)
            start = time.monotonic()
            try:
                _call(case, kw, group)
                outcome = ["no error", ""]
            except Exception as exc:  # noqa: BLE001 - recorded for the parent
                outcome = [type(exc).__name__, str(exc)]
                if isinstance(exc, RuntimeError) and "imeout" in str(exc):
                    outcome.append(traceback.format_exc())
            results[case] = outcome + [time.monotonic() - start]
        # a valid step afterwards: every rank still pairs its collectives correctly
        dist.barrier()
        kw = _args(rank, world, "empty_batch") if rank != world - 1 else \
            _args(0, world, "empty_batch")
        bank = fs.AGCMemoryBank(num_timesteps=5)
        loss, stats = fs.agc_loss(kw["pred"], kw["target"], timesteps=kw["timesteps"],
                                  bank=bank, process_group=group)
        results["valid_step"] = [stats.total, bank.bank.tolist()]
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def outcomes(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"agree{world}")
    mp.start_processes(_worker, args=(world, _free_port(), str(out)), nprocs=world,
                       join=True, start_method="spawn")
    return world, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("case", list(CASES))
def test_error_on_one_rank_raises_on_every_rank(outcomes, case):
    world, results = outcomes
    exc_type, text = CASES[case]
    per_rank = [r[case] for r in results]
    for rank, outcome in enumerate(per_rank):
        assert outcome[0] == exc_type and text in outcome[1], (rank, outcome)
        assert outcome[-1] < GROUP_TIMEOUT_S, (rank, outcome)  # raised, not timed out
    messages = {o[1] for o in per_rank}
    assert len(messages) == 1, per_rank            # the same error on every rank


def test_ranks_stay_paired_after_the_errors(outcomes):
    world, results = outcomes
    totals = {r["valid_step"][0] for r in results}
    banks = {tuple(r["valid_step"][1]) for r in results}
    assert totals == {3 * world} and len(banks) == 1
