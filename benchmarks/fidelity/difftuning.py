"""Fidelity experiment 4: Diff-Tuning retention against plain fine-tuning.

Data: a *source* Gaussian mixture (pre-training) and a *target* mixture with other means
(fine-tuning), both 8 components in ``D`` dimensions. One MLP ε-network is pre-trained on the
source; a knowledge bank of its samples (``fs.train.KnowledgeBank``, DDPM ancestral sampling
with ``fs.vp_reverse_step_from_eps``) is drawn once; then the pre-trained model is fine-tuned
on the target for the same steps by:

* ``plain``: batches of 32 target samples, uniform timesteps, mean per-sample MSE;
* ``Diff-Tuning``: ``fs.train.DiffTuning`` (τ = 1, λ = 0.1, 26 target + 6 replay), target
  timesteps from ``P_adapt ∝ (t + 1)^τ``, replay timesteps from ``P_retain ∝ (T − t)^τ``,
  ``L = mean(ℓ_target) + λ·mean(ℓ_replay)`` (``fs.per_sample_mse`` with the batch's weights);
* ``w/o reconsolidation``: the same with uniform target timesteps (``τ = 0`` for the target);
* ``w/o retention``: the same without replay (32 target samples from ``P_adapt``).

Measured: the denoising error ``mean((ε̂ − ε)²)`` on fixed held-out ``(x_0, t, ε)`` (shared
by every model) per timestep bin, on the source (retention: the low-noise bin
``t < 100`` above all) and on the target (adaptation). Expected (Zhong et al., 2024):
Diff-Tuning keeps the source's low-noise error closer to the pre-trained model's than plain
fine-tuning, at a similar target error; each ablation loses part of it.

    python benchmarks/fidelity/difftuning.py            # full size, a few minutes
    python benchmarks/fidelity/difftuning.py --size smoke
"""
from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import fastsoup as fs  # noqa: E402
from fidelity.common import (  # noqa: E402
    GaussianMixture, MLPDenoiser, T, Timer, ancestral_sample, mean_sd, start, write_results,
)
from fidelity.soup import bins, error, fit, triples  # noqa: E402

SIZES = {
    "smoke": dict(dim=4, n=128, pretrain=30, finetune=10, pre_batch=32, seeds=1, eval_n=128, per_bin=2,
                  hidden=32, lr=2e-3, bank=64, bank_steps=5),
    "full": dict(dim=8, n=1024, pretrain=1500, finetune=1000, pre_batch=128, seeds=3, eval_n=1024,
                 per_bin=4, hidden=128, lr=2e-3, bank=2048, bank_steps=50),
}
COMPONENTS = 8
BATCH = 32
METHODS = ("plain", "Diff-Tuning", "w/o reconsolidation", "w/o retention")


def tuner(method: str):
    """The batch builder of a method (``None``: plain fine-tuning)."""
    if method == "plain":
        return None
    if method == "Diff-Tuning":
        return fs.train.DiffTuning(T, tau=1.0, replay_share=0.2, retention_weight=0.1)
    if method == "w/o reconsolidation":
        return fs.train.DiffTuning(T, tau=0.0, retain_tau=1.0, replay_share=0.2, retention_weight=0.1)
    if method == "w/o retention":
        return fs.train.DiffTuning(T, tau=1.0, replay_share=0.0)
    raise ValueError(method)


def finetune(pre, method, target, bank, cfg, ac, g):
    model = copy.deepcopy(pre)
    dt = tuner(method)
    if dt is None:
        return fit(model, target, cfg["finetune"], BATCH, cfg["lr"], ac, g)
    n_t, n_r = dt.split(BATCH)
    replay = bank.stream(n_r, generator=g) if n_r else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    for _ in range(cfg["finetune"]):
        x_t0 = target[torch.randint(0, target.shape[0], (n_t,), generator=g)]
        b = dt.make_batch(x_t0, next(replay) if replay else None, generator=g)
        eps = torch.randn(b.latents.shape, generator=g)
        a, s = fs.vp_alpha_sigma(ac, b.timesteps)
        pred = model(a[:, None] * b.latents + s[:, None] * eps, b.timesteps)
        loss = b.weighted_sum(fs.per_sample_mse(pred, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def run_seed(cfg, seed, ac):
    g = torch.Generator().manual_seed(seed)
    source = GaussianMixture(cfg["dim"], COMPONENTS, spread=0.7, std=0.1, seed=3000 + seed)
    target = GaussianMixture(cfg["dim"], COMPONENTS, spread=0.7, std=0.1, seed=4000 + seed)
    torch.manual_seed(seed)
    pre = fit(MLPDenoiser(cfg["dim"], hidden=cfg["hidden"]), source.sample(cfg["n"], g),
              cfg["pretrain"], cfg["pre_batch"], cfg["lr"], ac, g)
    samples = ancestral_sample(pre, torch.randn(cfg["bank"], cfg["dim"], generator=g), ac,
                               cfg["bank_steps"], g)
    bank = fs.train.KnowledgeBank(samples.detach())
    target_train = target.sample(cfg["n"], g)
    src_trip = triples(source.sample(cfg["eval_n"], g), cfg, g)
    tgt_trip = triples(target.sample(cfg["eval_n"], g), cfg, g)
    out = {"pre-trained": {"source": error(pre, src_trip, ac), "target": error(pre, tgt_trip, ac)}}
    for m in METHODS:
        model = finetune(pre, m, target_train, bank, cfg, ac, g)
        out[m] = {"source": error(model, src_trip, ac), "target": error(model, tgt_trip, ac)}
    return out


def main(argv=None) -> str:
    args, cfg, seeds, ac = start(__doc__, SIZES, argv)
    with Timer() as total:
        per_seed = [run_seed(cfg, seed, ac) for seed in range(seeds)]
    nb = len(bins())
    low = f"t in [{bins()[0][0]}, {bins()[0][1]})"
    header = ["method", f"source {low} (retention)", "source, all bins", f"target {low}",
              "target, all bins (adaptation)"]
    col = lambda m, dom, i=None: [(r[m][dom][i] if i is not None else sum(r[m][dom]) / nb) for r in per_seed]
    rows = [[m, mean_sd(col(m, "source", 0)), mean_sd(col(m, "source")), mean_sd(col(m, "target", 0)),
             mean_sd(col(m, "target"))] for m in ("pre-trained",) + METHODS]
    avg = lambda xs: sum(xs) / len(xs)
    notes = [f"Data: source and target 8-component Gaussian mixtures in {cfg['dim']} dimensions (other "
             f"means); pre-training {cfg['pretrain']} steps on {cfg['n']} source points; knowledge bank of "
             f"{cfg['bank']} samples of the pre-trained model ({cfg['bank_steps']} ancestral steps); "
             f"fine-tuning {cfg['finetune']} AdamW steps of {BATCH} (learning rate {cfg['lr']:g}) on {cfg['n']} "
             f"target points; MLP ε-network ({cfg['hidden']} hidden, 3 layers); error = mean (ε̂ − ε)² on "
             f"fixed held-out (x_0, t, ε) shared by every model ({cfg['per_bin']} timesteps per bin, "
             f"{cfg['eval_n']} points each); {seeds} seed(s), mean ± sd."]
    pre_low = avg(col("pre-trained", "source", 0))
    plain_low, plain_tgt = avg(col("plain", "source", 0)), avg(col("plain", "target"))
    for m in METHODS[1:]:
        lo, tg = avg(col(m, "source", 0)), avg(col(m, "target"))
        kept = ((plain_low - lo) / (plain_low - pre_low)) if plain_low > pre_low else float("nan")
        notes.append(f"{m}: source low-noise error {lo:.4g} vs plain {plain_low:.4g} (pre-trained "
                     f"{pre_low:.4g}; {kept:.0%} of what plain fine-tuning forgot is kept), target error "
                     f"{tg:.4g} vs plain {plain_tgt:.4g} ({tg / plain_tgt - 1:+.1%}).")
    return write_results("difftuning", args, "Fidelity: Diff-Tuning retention vs plain fine-tuning",
                         header, rows, notes, {"per_seed": per_seed, "bins": bins(), "config": cfg},
                         total)


if __name__ == "__main__":
    print(main())
