"""agc_loss and fs.train.diffusion_loss compile in one graph (fullgraph=True).

Data-dependent checks are skipped while tracing (documented in agc_loss); the compiled
loss, gradients and bank updates equal the eager ones."""
import pytest
import torch

import fastsoup as fs

torch._dynamo.config.cache_size_limit = 64


def _data(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, 3, 4, generator=g)
    target = torch.randn(B, 3, 4, generator=g)
    t = torch.tensor([1, 3, 1, 0, 3, 1])[:B]
    return pred, target, t


def _run(fn, pred, *args):
    p = pred.clone().requires_grad_()
    loss, stats = fn(p, *args)
    loss.backward()
    return loss.detach(), p.grad, stats


@pytest.mark.parametrize("rule", ["bank", "topk"])
def test_agc_loss_fullgraph(rule):
    pred, target, t = _data()
    banks = [fs.AGCMemoryBank(num_timesteps=4, ratio=1.25) for _ in range(2)]
    for b in banks:
        b.bank.copy_(torch.tensor([0.5, 4.0, 0.0, 3.0]))

    def make(bank):
        def f(p, tg, ts):
            kw = {"bank": dict(bank=bank, timesteps=ts), "topk": dict(exclude_k=2),
                  "none": {}, "fraction": dict(exclude_fraction=0.5)}[rule]
            loss, stats = fs.agc_loss(p, tg, **kw)
            return loss, stats.kept
        return f

    compiled = torch.compile(make(banks[1]), fullgraph=True, backend="aot_eager")
    for step in range(2):  # two steps: the bank evolves identically
        l_e, g_e, k_e = _run(make(banks[0]), pred, target, t)
        l_c, g_c, k_c = _run(compiled, pred, target, t)
        torch.testing.assert_close(l_c, l_e)
        torch.testing.assert_close(g_c, g_e)
        assert int(k_c) == int(k_e)
    assert torch.equal(banks[0].bank, banks[1].bank)
    assert torch.equal(banks[0].count, banks[1].count)


def test_diffusion_loss_fullgraph():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    pred, latents, _ = _data()
    noise = torch.randn_like(latents)
    t = torch.tensor([10, 500, 10, 999, 3, 500])
    banks = [fs.AGCMemoryBank(1000, ratio=1.25) for _ in range(2)]

    def make(bank):
        def f(p, x0, n, ts):
            loss, stats = fs.train.diffusion_loss(sched, p, latents=x0, noise=n, timesteps=ts,
                                                  snr_gamma=5.0, bank=bank)
            return loss, stats.kept
        return f

    compiled = torch.compile(make(banks[1]), fullgraph=True, backend="aot_eager")
    for _ in range(2):
        l_e, g_e, _ = _run(make(banks[0]), pred, latents, noise, t)
        l_c, g_c, _ = _run(compiled, pred, latents, noise, t)
        torch.testing.assert_close(l_c, l_e)
        torch.testing.assert_close(g_c, g_e)
    assert torch.equal(banks[0].bank, banks[1].bank)


def test_nonfinite_under_compile_shows_in_the_loss_and_spares_the_bank():
    pred, target, t = _data()
    target[2, 0, 0] = float("nan")
    bank = fs.AGCMemoryBank(num_timesteps=4)
    f = torch.compile(lambda p, tg, ts: fs.agc_loss(p, tg, bank=bank, timesteps=ts)[0],
                      fullgraph=True, backend="aot_eager")
    assert torch.isnan(f(pred, target, t))
    assert torch.isfinite(bank.bank).all() and int(bank.count.sum()) == 5
