"""Fidelity experiment 3: Diffusion Soup against the paragon, and unlearning by ``remove``.

Data: a *source* Gaussian mixture (the pre-training data) and a *target* mixture of 8
components in ``D`` dimensions. One MLP ε-network is pre-trained on the source; from it,
``S`` shard models are fine-tuned on the target's training set split into ``S`` shards:

* ``IID`` shards: a random split;
* ``domain`` shards: shard ``i`` holds the points of 2 of the 8 components.

The soup is the mean of the shard models (``fs.weighted_sum_`` over every parameter); the
*paragon* is the pre-trained model fine-tuned on the union of the shards for the same number
of steps as each shard model. Removing shard ``j`` from the soup is
``θ' = (S·θ_S − θ_j)/(S − 1)`` (SPEC §5), again one ``fs.weighted_sum_``.

Measured: the held-out denoising error ``mean((ε̂ − ε)²)`` per timestep bin on fixed
held-out triples ``(x_0, t, ε)`` shared by every model (a paired comparison: the noise floor
is the same for all), on the target's held-out data, and per shard's data for unlearning.
Expected (Biggs et al., 2024): the soup close to the paragon and better than each shard on
the union; removing a shard raises the error on that shard's data while the others barely
change (domain shards).

    python benchmarks/fidelity/soup.py            # full size, a few minutes
    python benchmarks/fidelity/soup.py --size smoke
"""
from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastsoup as fs  # noqa: E402
from fidelity.common import (  # noqa: E402
    GaussianMixture, MLPDenoiser, T, Timer, mean_sd, start, write_results,
)

SIZES = {
    "smoke": dict(dim=4, n=128, pretrain=30, finetune=10, batch=32, shards=4, seeds=1, eval_n=128,
                  per_bin=2, hidden=32, lr=2e-3),
    "full": dict(dim=8, n=1024, pretrain=1500, finetune=500, batch=128, shards=4, seeds=3, eval_n=1024,
                 per_bin=4, hidden=128, lr=2e-3),
}
COMPONENTS = 8
SPLITS = ("IID", "domain")


def bins():
    return [(0, 100), (100, 300), (300, 600), (600, T)]


def fit(model, data, steps, batch, lr, ac, g):
    """Plain ε-prediction training with ``fs.per_sample_mse`` (AdamW, a fresh optimizer)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        x0 = data[torch.randint(0, data.shape[0], (batch,), generator=g)]
        t = torch.randint(0, T, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a, s = fs.vp_alpha_sigma(ac, t)
        loss = fs.per_sample_mse(model(a[:, None] * x0 + s[:, None] * eps, t), eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def combine(models, weights, like):
    """A model whose every parameter is ``Σ_k weights[k]·models[k]`` (``fs.weighted_sum_``)."""
    out = copy.deepcopy(like)
    with torch.no_grad():
        outs = list(out.parameters())
        fs.weighted_sum_(outs, [list(m.parameters()) for m in models], weights)
    return out


def triples(x0_pool, cfg, g):
    """Fixed held-out ``(x_0, t, ε)`` per bin: ``per_bin`` timesteps, ``eval_n`` points each."""
    out = []
    for lo, hi in bins():
        ts = torch.linspace(lo, hi - 1, cfg["per_bin"]).round().long()
        x0 = x0_pool[torch.randint(0, x0_pool.shape[0], (cfg["per_bin"] * cfg["eval_n"],), generator=g)]
        t = ts.repeat_interleave(cfg["eval_n"])
        out.append((x0, t, torch.randn(x0.shape, generator=g)))
    return out


@torch.no_grad()
def error(model, trip, ac):
    errs = []
    for x0, t, eps in trip:
        a, s = fs.vp_alpha_sigma(ac, t)
        errs.append(float(fs.per_sample_mse(model(a[:, None] * x0 + s[:, None] * eps, t), eps).mean()))
    return errs


def run_seed(cfg, seed, ac):
    g = torch.Generator().manual_seed(seed)
    source = GaussianMixture(cfg["dim"], COMPONENTS, spread=0.7, std=0.1, seed=1000 + seed)
    target = GaussianMixture(cfg["dim"], COMPONENTS, spread=0.7, std=0.1, seed=2000 + seed)
    comp = torch.randint(0, COMPONENTS, (cfg["n"] + cfg["eval_n"],), generator=g)
    pts = target.means[comp] + target.std * torch.randn(comp.shape[0], cfg["dim"], generator=g)
    train_x, train_c = pts[:cfg["n"]], comp[:cfg["n"]]
    held_x, held_c = pts[cfg["n"]:], comp[cfg["n"]:]
    S = cfg["shards"]
    per_domain = COMPONENTS // S
    torch.manual_seed(seed)
    pre = fit(MLPDenoiser(cfg["dim"], hidden=cfg["hidden"]), source.sample(cfg["n"], g),
              cfg["pretrain"], cfg["batch"], cfg["lr"], ac, g)
    union_trip = triples(held_x, cfg, g)
    out = {"pre-trained": error(pre, union_trip, ac)}
    for split in SPLITS:
        if split == "IID":
            perm = torch.randperm(cfg["n"], generator=g)
            shard_idx = [perm[i::S] for i in range(S)]
            held_idx = [torch.arange(i, held_x.shape[0], S) for i in range(S)]
        else:
            shard_idx = [torch.nonzero(train_c // per_domain == i).flatten() for i in range(S)]
            held_idx = [torch.nonzero(held_c // per_domain == i).flatten() for i in range(S)]
        shards = [fit(copy.deepcopy(pre), train_x[idx], cfg["finetune"], cfg["batch"], cfg["lr"], ac, g)
                  for idx in shard_idx]
        paragon = fit(copy.deepcopy(pre), train_x, cfg["finetune"], cfg["batch"], cfg["lr"], ac, g)
        soup = combine(shards, [1.0 / S] * S, pre)
        res = {"shard (mean of shards)": [sum(v) / S for v in zip(*[error(m, union_trip, ac) for m in shards])],
               "shard (best on union)": min((error(m, union_trip, ac) for m in shards), key=sum),
               "soup": error(soup, union_trip, ac), "paragon": error(paragon, union_trip, ac)}
        # unlearning: remove each shard in turn from the soup
        own_before, own_after, other_before, other_after = [], [], [], []
        shard_trips = [triples(held_x[idx], cfg, g) for idx in held_idx]
        soup_err = [sum(error(soup, tr, ac)) / len(bins()) for tr in shard_trips]
        for j in range(S):
            removed = combine([soup, shards[j]], [S / (S - 1), -1.0 / (S - 1)], pre)
            after = [sum(error(removed, tr, ac)) / len(bins()) for tr in shard_trips]
            own_before.append(soup_err[j])
            own_after.append(after[j])
            other_before += [soup_err[i] for i in range(S) if i != j]
            other_after += [after[i] for i in range(S) if i != j]
        mean = lambda xs: sum(xs) / len(xs)
        res["unlearning"] = {"own_before": mean(own_before), "own_after": mean(own_after),
                             "others_before": mean(other_before), "others_after": mean(other_after)}
        out[split] = res
    return out


def main(argv=None) -> str:
    args, cfg, seeds, ac = start(__doc__, SIZES, argv)
    with Timer() as total:
        per_seed = [run_seed(cfg, seed, ac) for seed in range(seeds)]
    header = ["split", "model"] + [f"t in [{lo}, {hi})" for lo, hi in bins()] + ["mean"]
    rows = [["-", "pre-trained"] + [mean_sd([r["pre-trained"][i] for r in per_seed]) for i in range(len(bins()))]
            + [mean_sd([sum(r["pre-trained"]) / len(bins()) for r in per_seed])]]
    models = ("shard (mean of shards)", "shard (best on union)", "soup", "paragon")
    for split in SPLITS:
        for m in models:
            rows.append([split, m] + [mean_sd([r[split][m][i] for r in per_seed]) for i in range(len(bins()))]
                        + [mean_sd([sum(r[split][m]) / len(bins()) for r in per_seed])])
    avg = lambda split, m: sum(sum(r[split][m]) / len(bins()) for r in per_seed) / seeds
    ul = lambda split, k: sum(r[split]["unlearning"][k] for r in per_seed) / seeds
    notes = [f"Data: pre-training on a source 8-component Gaussian mixture in {cfg['dim']} dimensions "
             f"({cfg['pretrain']} steps), fine-tuning on a target 8-component mixture ({cfg['n']} "
             f"training points) split into {cfg['shards']} shards ({cfg['finetune']} AdamW steps of "
             f"{cfg['batch']} per shard model and for the paragon, learning rate {cfg['lr']:g}); MLP "
             f"ε-network ({cfg['hidden']} hidden, 3 layers); error = mean (ε̂ − ε)² on fixed held-out "
             f"(x_0, t, ε) shared by every model ({cfg['per_bin']} timesteps per bin, {cfg['eval_n']} "
             f"points each; the noise floor is common to all rows); {seeds} seed(s), mean ± sd."]
    for split in SPLITS:
        soup, par, shard = avg(split, "soup"), avg(split, "paragon"), avg(split, "shard (mean of shards)")
        line = (f"{split} shards: the soup's held-out error {soup:.4g} against the paragon's {par:.4g} "
                f"({soup - par:+.3g}) and a shard model's {shard:.4g} (mean over shards)")
        if shard > par:
            line += f": the soup closes {(shard - soup) / (shard - par):.0%} of the gap from a shard model to the paragon."
        else:
            line += ": the paragon is no better than a shard model here, so there is no gap for the soup to close."
        notes.append(line)
        ob, oa, xb, xa = (ul(split, k) for k in ("own_before", "own_after", "others_before", "others_after"))
        notes.append(f"{split} shards, removing shard j from the soup: the error on shard j's held-out data "
                     f"goes from {ob:.4g} to {oa:.4g} ({oa / ob - 1:+.1%}), on the other shards' data from "
                     f"{xb:.4g} to {xa:.4g} ({xa / xb - 1:+.1%}).")
    return write_results("soup", args, "Fidelity: Diffusion Soup vs the paragon, and unlearning by remove",
                         header, rows, notes, {"per_seed": per_seed, "bins": bins(), "config": cfg},
                         total)


if __name__ == "__main__":
    print(main())
