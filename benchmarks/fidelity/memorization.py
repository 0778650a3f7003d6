"""Fidelity experiment 2: AGC and IET against a duplicated training point.

Data: ``N`` points of a Gaussian mixture plus one of them repeated ``R`` times (a
duplicated training image). A small MLP ε-network is trained, with fastsoup's ops, by:

* ``plain``: ``fs.agc_loss`` without exclusion (the mean per-sample MSE);
* ``AGC``: ``fs.agc_loss`` with ``fs.AGCMemoryBank(1000, ratio=2.0)`` (the reference rule);
* ``IET``: ``S`` shard models (the data split into ``S`` shards, duplicates spread evenly),
  each trained on its shard and averaged every round with ``fs.train.IterativeEnsemble``;
  every shard model runs as many steps as the plain model, so IET costs ``S`` times the
  gradient computations (reported);
* ``IET + AGC``: both, one bank per shard.

Measured on ``M`` samples (DDPM ancestral sampling with ``fs.vp_reverse_step_from_eps``):

* copy rate: the share of samples within ``r`` of the duplicated point, with ``r`` a
  quarter of the median distance from fresh data points to their nearest training point;
  the same share among fresh data points is the baseline;
* coverage (Naeem et al., 2020): the share of fresh data points whose 5-nearest-neighbour
  ball (among fresh points) holds at least one sample.

    python benchmarks/fidelity/memorization.py            # full size, a few minutes
    python benchmarks/fidelity/memorization.py --size smoke
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastsoup as fs  # noqa: E402
from fidelity.common import (  # noqa: E402
    GaussianMixture, MLPDenoiser, T, Timer, ancestral_sample, mean_sd, start, write_results,
)

SIZES = {
    "smoke": dict(dim=2, components=4, n=32, copies=8, steps=20, batch=32, rounds=2, shards=2,
                  samples=128, sample_steps=10, seeds=1, hidden=32, lr=2e-3),
    # A few minutes of CPU time on a 2-core machine. The training set is small enough for
    # plain training to copy the duplicate within these steps: with 64 unique points, 32
    # copies and 1000 steps, plain training made no copies (0 of 1500 samples), which leaves
    # nothing for AGC or IET to cut.
    "full": dict(dim=2, components=4, n=16, copies=16, steps=1500, batch=64, rounds=10, shards=4,
                 samples=500, sample_steps=50, seeds=3, hidden=64, lr=2e-3),
}
METHODS = ("plain", "AGC", "IET", "IET + AGC")


def make_data(cfg: dict, seed: int):
    gm = GaussianMixture(cfg["dim"], cfg["components"], spread=1.0, std=0.15, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    unique = gm.sample(cfg["n"], g)
    dup = unique[0]
    train = torch.cat([unique, dup.expand(cfg["copies"], -1)])
    is_dup = torch.zeros(train.shape[0], dtype=torch.bool)
    is_dup[0] = True
    is_dup[cfg["n"]:] = True
    fresh = gm.sample(cfg["samples"], g)
    return train, is_dup, dup, fresh


def shards_of(n_total: int, is_dup: torch.Tensor, shards: int):
    """Shard indices with the duplicates (and the unique points) spread evenly."""
    dup_idx = torch.nonzero(is_dup).flatten().tolist()
    uni_idx = torch.nonzero(~is_dup).flatten().tolist()
    out = [[] for _ in range(shards)]
    for i, j in enumerate(dup_idx + uni_idx):
        out[i % shards].append(j)
    return [torch.tensor(o) for o in out]


def train_one(model, opt, data, steps, batch, bank, ac, g, stats):
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        x0 = data[idx]
        t = torch.randint(0, T, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a, s = fs.vp_alpha_sigma(ac, t)
        pred = model(a[:, None] * x0 + s[:, None] * eps, t)
        if bank is not None:
            loss, st = fs.agc_loss(pred, eps, timesteps=t, bank=bank)
            stats["excluded"] += int((~st.keep_mask).sum())
        else:
            loss, _ = fs.agc_loss(pred, eps)
        stats["seen"] += batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train(method: str, train_x: torch.Tensor, is_dup: torch.Tensor, ac, cfg: dict, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 2)
    agc = "AGC" in method
    stats = {"excluded": 0, "seen": 0}
    if not method.startswith("IET"):
        model = MLPDenoiser(cfg["dim"], hidden=cfg["hidden"])
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
        bank = fs.AGCMemoryBank(T, ratio=2.0) if agc else None
        train_one(model, opt, train_x, cfg["steps"], cfg["batch"], bank, ac, g, stats)
        return model, stats
    shard_idx = shards_of(train_x.shape[0], is_dup, cfg["shards"])
    base = MLPDenoiser(cfg["dim"], hidden=cfg["hidden"])
    models = []
    for _ in shard_idx:
        m = MLPDenoiser(cfg["dim"], hidden=cfg["hidden"])
        m.load_state_dict(base.state_dict())
        models.append(m)
    opts = [torch.optim.AdamW(m.parameters(), lr=cfg["lr"]) for m in models]
    banks = [fs.AGCMemoryBank(T, ratio=2.0) if agc else None for _ in models]
    iet = fs.train.IterativeEnsemble(models, shard_sizes=[len(i) for i in shard_idx])
    per_round = max(1, cfg["steps"] // cfg["rounds"])
    for _ in range(cfg["rounds"]):
        for m, opt, bank, idx in zip(models, opts, banks, shard_idx):
            train_one(m, opt, train_x[idx], per_round, cfg["batch"], bank, ac, g, stats)
        iet.average_()
    return models[0], stats


@torch.no_grad()
def measure(model, dup, fresh, train_x, ac, cfg, seed):
    g = torch.Generator().manual_seed(50_000 + seed)
    x = ancestral_sample(model, torch.randn(cfg["samples"], cfg["dim"], generator=g), ac,
                         cfg["sample_steps"], g)
    r = 0.25 * float(torch.cdist(fresh, train_x).min(1).values.median())
    copy = float(((x - dup).norm(dim=1) < r).float().mean())
    copy_base = float(((fresh - dup).norm(dim=1) < r).float().mean())
    d_ff = torch.cdist(fresh, fresh)
    radius = d_ff.kthvalue(6, dim=1).values                   # 5-NN (the point itself is the 1st)
    coverage = float((torch.cdist(fresh, x).min(1).values <= radius).float().mean())
    near_train = float((torch.cdist(x, train_x).min(1).values < r).float().mean())
    return {"copy_rate": copy, "copy_rate_fresh": copy_base, "coverage": coverage,
            "near_any_training_point": near_train, "radius": r}


def main(argv=None) -> str:
    args, cfg, seeds, ac = start(__doc__, SIZES, argv)
    res = {m: [] for m in METHODS}
    secs = {m: 0.0 for m in METHODS}
    with Timer() as total:
        for seed in range(seeds):
            train_x, is_dup, dup, fresh = make_data(cfg, seed)
            for m in METHODS:
                with Timer() as tm:
                    model, stats = train(m, train_x, is_dup, ac, cfg, seed)
                secs[m] += tm.seconds
                out = measure(model, dup, fresh, train_x, ac, cfg, seed)
                out["excluded"] = stats["excluded"] / max(stats["seen"], 1)
                out["gradient_samples"] = stats["seen"]
                res[m].append(out)
    col = lambda m, k: [r[k] for r in res[m]]
    avg = lambda m, k: sum(col(m, k)) / seeds
    header = ["method", "copy rate of the duplicate", "coverage", "samples near any training point",
              "AGC excluded", "gradient samples", "train s/seed"]
    rows = [[m, mean_sd(col(m, "copy_rate")), mean_sd(col(m, "coverage")),
             mean_sd(col(m, "near_any_training_point")), mean_sd(col(m, "excluded")),
             res[m][0]["gradient_samples"], f"{secs[m] / seeds:.1f}"] for m in METHODS]
    rows.append(["fresh data (baseline)", mean_sd([r["copy_rate_fresh"] for r in res["plain"]]),
                 "-", "-", "-", "-", "-"])
    dup_share = cfg["copies"] / (cfg["n"] + cfg["copies"])
    notes = [f"Data: {cfg['components']}-component Gaussian mixture in {cfg['dim']} dimensions "
             f"(component std 0.15), {cfg['n']} unique training points plus {cfg['copies']} copies of "
             f"one ({dup_share:.0%} of the training set); MLP ε-network ({cfg['hidden']} hidden, 3 "
             f"layers), {cfg['steps']} AdamW steps of {cfg['batch']} per model (learning rate {cfg['lr']:g}); IET: {cfg['shards']} "
             f"shards, {cfg['rounds']} rounds; {cfg['samples']} samples ({cfg['sample_steps']} ancestral "
             f"steps); {seeds} seed(s), mean ± sd."]
    base = avg("plain", "copy_rate")
    for m in METHODS[1:]:
        cr, cov = avg(m, "copy_rate"), avg(m, "coverage")
        pcov = avg("plain", "coverage")
        change = (f"{'cut by' if cr <= base else 'raised by'} {abs(1 - cr / base):.0%}" if base > 0
                  else "plain made no copies to cut")
        dcov = f"{cov / pcov - 1:+.0%}" if pcov > 0 else "plain covers nothing"
        cost = res[m][0]["gradient_samples"] / res["plain"][0]["gradient_samples"]
        notes.append(f"{m}: copy rate {cr:.3f} vs plain {base:.3f} ({change}), coverage {cov:.3f} vs "
                     f"{pcov:.3f} ({dcov}), at {cost:.0f}x the gradient computations and "
                     f"{secs[m] / max(secs['plain'], 1e-9):.1f}x the training time.")
    return write_results("memorization", args, "Fidelity: AGC and IET against a duplicated training point",
                         header, rows, notes, {"per_seed": res, "config": cfg}, total)


if __name__ == "__main__":
    print(main())
