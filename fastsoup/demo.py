"""``fastsoup demo``: anti-memorisation training, iterative ensembles and a soup, end to end.

1. Builds a small procedural dataset, one style per shard (stripes, rings, checker,
   blobs, ...; one fixed palette per style), each shard holding a duplicated image (the
   kind of sample diffusion models memorise).
2. Trains one tiny diffusers ``UNet2DModel`` per shard, conditioned on the style (a class
   label through ``num_class_embeds``, as Diffusion Soup's models are conditioned on a
   prompt), with the AGC memory-bank loss
   (``fs.train.diffusion_loss(..., bank=...)``) on class-balanced shards (every style in
   every shard, as the IET reference splits data), averaging the models after every round
   (iterative ensemble training, ``fs.train.IterativeEnsemble``); then each model
   fine-tunes on one style (a domain shard, as in Diffusion Soup), not averaged.
3. Saves every shard model in diffusers layout and soups them with the streaming merge
   engine (``fs.merge``).
4. Samples every shard model (asked for its own style, and for every style as the
   soup's baseline), the soup and the IET average (asked for each style in turn) from the
   same noise and measures the samples: a style classifier trained on fresh procedural images (its
   held-out accuracy is reported) says which style each sample is, and the distance of
   each sample to its nearest training image is compared with that of fresh images of the
   same styles. Writes ``grid.png`` (labelled rows: training data, each shard, the soup),
   ``report.json`` and ``report.md`` (one sentence per finding, each with its baseline).

The UNet predicts ``x_0`` (``--prediction sample``): with a few hundred steps per model it
gives recognisable images where ε-prediction still gives noise. Runs on CPU in about three
minutes at the default size (one torch thread on machines with two cores or fewer, where a
second thread slows these small kernels down; ``--threads`` overrides); uses the GPU when
there is one. Needs diffusers: ``pip install 'diffusers>=0.27'`` (``make demo`` from the
source tree installs everything).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class DemoConfig:
    shards: int = 4
    rounds: int = 4            # IET rounds on class-balanced shards (each ends with an average)
    steps: int = 25            # optimisation steps per shard per IET round
    per_shard: int = 24        # images per shard
    size: int = 16             # image side (pixels); a multiple of 8
    batch: int = 32
    lr: float = 2e-3
    finetune_steps: int = 35   # then each shard model fine-tunes on one style (not averaged)
    finetune_lr: float = 1e-3
    timesteps: int = 100       # DDPM training timesteps (also the AGC bank length)
    agc_ratio: float = 2.0     # the pixel-model ratio of the reference code
    samples: int = 16          # samples per model
    sample_steps: int = 20     # DDIM steps
    width: int = 16            # UNet base channels
    prediction: str = "sample"   # what the UNet predicts (the scheduler's prediction_type)
    seed: int = 0
    threads: int = 0           # torch CPU threads; 0: chosen from the machine (see default_threads)
    device: str = "auto"
    out: str = "fastsoup-demo-out"
    quiet: bool = False


INSTALL_HINT = ("pip install 'diffusers>=0.27' (from a source checkout, `make demo` installs "
                "everything the demo needs into .venv)")


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(f"fastsoup demo needs diffusers: {INSTALL_HINT} ({exc})") from None
    return diffusers


def default_threads() -> int:
    """Torch CPU threads for the demo's tiny models.

    ``OMP_NUM_THREADS`` when set; otherwise 1 on machines with at most two usable cores
    (a second thread on a busy 2-core machine slows these small kernels down many times
    over), else half the cores, at most 4 (the models are too small to use more).
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cpus = os.cpu_count() or 1
    return 1 if cpus <= 2 else min(4, cpus // 2)


def make_unet(cfg: DemoConfig, num_styles: int):
    """The demo's tiny ``UNet2DModel``, conditioned on the style through a class embedding
    (``num_class_embeds``; ``class_labels`` at every call), as Diffusion Soup's models are
    conditioned on a prompt."""
    from diffusers import UNet2DModel

    from .train.data import small_unet

    base = small_unet(cfg.size, cfg.width, attention=False)
    return UNet2DModel.from_config(base.config, num_class_embeds=num_styles)


def make_scheduler(cfg: DemoConfig):
    """The cosine schedule over ``cfg.timesteps`` steps. With a few hundred steps per
    model, x0-prediction (``sample``) on this schedule gives recognisable images where
    ε-prediction still gives noise (measured when this demo was tuned; ``--prediction``
    switches)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type=cfg.prediction)


# One fixed colour pair per style: the procedural patterns are repainted with it, so that a
# tiny model trained for a few hundred steps learns the pattern rather than the palette.
PALETTES = {
    "stripes": ((-0.9, -0.8, 0.6), (0.9, 0.8, -0.6)),
    "rings": ((0.8, -0.8, -0.8), (-0.6, 0.9, 0.9)),
    "checker": ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0)),
    "blobs": ((0.9, -0.3, 0.9), (-0.2, 0.6, -0.9)),
    "gradient": ((-0.9, 0.5, -0.2), (1.0, 0.9, 0.3)),
}


def repaint(images: Tensor, style: str) -> Tensor:
    """Repaint two-colour procedural images ``[N, 3, H, W]`` with the style's palette: the
    pattern is the projection on the image's principal colour axis, rescaled to [0, 1]."""
    n, _, h, w = images.shape
    f = images.reshape(n, 3, h * w).float()
    f = f - f.mean(-1, keepdim=True)
    _, evecs = torch.linalg.eigh(f @ f.transpose(1, 2) + 1e-8 * torch.eye(3))
    p = (evecs[:, :, -1:].transpose(1, 2) @ f).squeeze(1)
    lo, hi = p.min(1, keepdim=True).values, p.max(1, keepdim=True).values
    wgt = ((p - lo) / (hi - lo).clamp_min(1e-6)).view(n, 1, h, w)
    c0, c1 = (torch.tensor(c).view(1, 3, 1, 1) for c in PALETTES[style])
    return (c0 * (1 - wgt) + c1 * wgt).clamp_(-1, 1)


@torch.no_grad()
def sample(unet, cfg: DemoConfig, device, noise: Tensor, labels: Tensor) -> Tensor:
    """DDIM samples of ``unet`` from ``noise`` ``[N, 3, H, W]``, each conditioned on its style
    index in ``labels`` ``[N]``."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(make_scheduler(cfg).config)
    sched.set_timesteps(cfg.sample_steps)
    x = noise.to(device)
    y = labels.to(device)
    unet.eval()
    for t in sched.timesteps:
        out = unet(x, t.to(device), class_labels=y).sample
        x = sched.step(out, t, x).prev_sample
    unet.train()
    return x.clamp(-1, 1).cpu()


# ----------------------------------------------------------------------------- style classifier
def style_features(x: Tensor) -> Tensor:
    """Colour- and position-invariant features of ``[N, 3, H, W]`` images: ``[N, H·W + 1]``.

    The procedural styles paint a pattern ``w`` between two colours, so every pixel lies on
    a line in RGB space. The features are the magnitude spectrum of the image projected on
    its principal colour axis (normalised: invariant to the two colours, the sign and
    translations) and the share of the colour variance on that axis (1 for a clean
    two-colour image, lower for noise).
    """
    n, _, h, w = x.shape
    f = x.reshape(n, 3, h * w).float()
    f = f - f.mean(-1, keepdim=True)
    cov = f @ f.transpose(1, 2) + 1e-8 * torch.eye(3)
    evals, evecs = torch.linalg.eigh(cov)
    p = (evecs[:, :, -1:].transpose(1, 2) @ f).squeeze(1)
    p = p / (p.norm(dim=1, keepdim=True) + 1e-6)
    spec = torch.fft.fft2(p.view(n, h, w)).abs().reshape(n, h * w)
    share = (evals[:, -1] / evals.sum(1).clamp_min(1e-12)).unsqueeze(1)
    return torch.cat([spec, share], 1)


def _other_images(n: int, size: int, seed: int, styles: Sequence[str]) -> Tensor:
    """Images that belong to no style: smoothed colour noise and blends of two styles."""
    from .train.data import procedural_images

    g = torch.Generator().manual_seed(seed)
    half = n // 2
    noise = torch.randn(half, 3, size, size, generator=g)
    for i in range(half):
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            noise[i:i + 1] = torch.nn.functional.avg_pool2d(noise[i:i + 1], 3, 1, 1,
                                                            count_include_pad=False)
        noise[i] *= (0.3 + 0.5 * float(torch.rand(1, generator=g))) / float(noise[i].std())
    pairs = torch.randint(0, len(styles), (n - half, 2), generator=g)
    pairs[:, 1] = (pairs[:, 0] + 1 + pairs[:, 1] % (len(styles) - 1)) % len(styles)
    blends = torch.empty(n - half, 3, size, size)
    lam = 0.35 + 0.3 * torch.rand(n - half, generator=g)
    for i, (a, b) in enumerate(pairs.tolist()):
        xa = procedural_images(styles[a], 1, size, seed=seed + 7 + i)
        xb = procedural_images(styles[b], 1, size, seed=seed + 5003 + i)
        blends[i] = lam[i] * xa[0] + (1 - lam[i]) * xb[0]
    return torch.cat([noise, blends]).clamp_(-1, 1)


class StyleClassifier:
    """Multinomial logistic regression on :func:`style_features` over every procedural
    style plus ``"other"`` (colour noise, blends of two styles). A prediction whose
    probability is below ``min_prob`` counts as ``"other"`` too."""

    def __init__(self, size: int, seed: int = 12345, per_class: int = 200, min_prob: float = 0.5):
        from .train.data import STYLES, procedural_images

        self.classes = list(STYLES) + ["other"]
        self.min_prob = min_prob
        gen = torch.Generator().manual_seed(seed)

        def dataset(n: int, s: int):
            xs = [procedural_images(st, n, size, seed=s) for st in STYLES]
            xs.append(_other_images(n, size, s + 1, STYLES))
            x = torch.cat(xs)
            # light pixel noise: samples of a briefly trained model are never perfectly clean
            x = (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp_(-1, 1)
            y = torch.arange(len(self.classes)).repeat_interleave(n)
            return style_features(x), y

        f_tr, y_tr = dataset(per_class, seed)
        f_te, y_te = dataset(max(per_class // 2, 1), seed + 999)
        self.mu, self.sd = f_tr.mean(0), f_tr.std(0) + 1e-6
        f_tr, f_te = (f_tr - self.mu) / self.sd, (f_te - self.mu) / self.sd
        self.W = torch.zeros(f_tr.shape[1], len(self.classes), requires_grad=True)
        self.b = torch.zeros(len(self.classes), requires_grad=True)
        opt = torch.optim.LBFGS([self.W, self.b], max_iter=150, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(f_tr @ self.W + self.b, y_tr) \
                + 1e-3 * self.W.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.W.requires_grad_(False)
        self.b.requires_grad_(False)
        pred = self._predict_features(f_te)
        self.heldout_accuracy = {c: float((pred[y_te == i] == i).float().mean())
                                 for i, c in enumerate(self.classes)}
        styles = y_te < len(STYLES)
        self.heldout_style_accuracy = float((pred[styles] == y_te[styles]).float().mean())
        self.heldout_size = int(styles.sum())

    def _predict_features(self, f: Tensor) -> Tensor:
        prob = torch.softmax(f @ self.W + self.b, dim=1)
        p, idx = prob.max(dim=1)
        return torch.where(p >= self.min_prob, idx, torch.full_like(idx, len(self.classes) - 1))

    @torch.no_grad()
    def predict(self, x: Tensor) -> List[str]:
        f = (style_features(x.cpu()) - self.mu) / self.sd
        return [self.classes[i] for i in self._predict_features(f).tolist()]


# ----------------------------------------------------------------------------- progress
class _Progress:
    """A tqdm bar on a terminal; otherwise a plain line every 10 % (and at least every
    30 s), so that logs and CI show the demo is alive."""

    def __init__(self, total: int, say, quiet: bool):
        self.total, self.say, self.done = total, say, 0
        self.t0 = self.last_time = time.perf_counter()
        self.next_line = max(1, total // 10)
        self.bar = None
        self.lines = not quiet
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="step", desc="training", file=sys.stderr)
                self.lines = False
            except ImportError:  # pragma: no cover
                pass

    def update(self, note: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(1)
            return
        if not self.lines:
            return
        now = time.perf_counter()
        if self.done >= self.next_line or now - self.last_time >= 30 or self.done == self.total:
            elapsed = now - self.t0
            left = elapsed / self.done * (self.total - self.done)
            self.say(f"  training: {self.done}/{self.total} steps ({self.done / self.total:.0%}), "
                     f"{elapsed:.0f} s elapsed, ~{left:.0f} s left; {note}")
            self.last_time = now
            while self.next_line <= self.done:
                self.next_line += max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- the run
def run(cfg: DemoConfig) -> Dict:
    _require_diffusers()
    previous_threads = torch.get_num_threads()
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: DemoConfig) -> Dict:
    from diffusers import UNet2DModel

    import fastsoup as fs
    from fastsoup.train.data import nearest_neighbour_rms, procedural_images, shard_datasets

    if cfg.size % 8:
        raise ValueError(f"--size must be a multiple of 8, got {cfg.size}")
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available())
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    threads = cfg.threads or default_threads()
    torch.set_num_threads(threads)
    out_dir = os.path.abspath(cfg.out)
    os.makedirs(out_dir, exist_ok=True)
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, flush=True))
    t_start = time.perf_counter()

    styles = [_style_of(k) for k in range(cfg.shards)]
    data = [(repaint(images, st), dup) for (images, dup), st in
            zip(shard_datasets(cfg.shards, cfg.per_shard, cfg.size, seed=cfg.seed), styles)]
    train_all = torch.cat([d[0] for d in data])
    # IET splits the data class-balanced (as the reference code does): every IET shard holds
    # every style and its share of the duplicates; the fine-tuning round uses the style shards.
    # Every image carries its style's index (the class label the UNet is conditioned on).
    style_ids = sorted(set(styles), key=styles.index)
    data_labels = [torch.full((len(imgs),), style_ids.index(st), dtype=torch.long)
                   for (imgs, _), st in zip(data, styles)]
    iet_data = []
    for j in range(cfg.shards):
        pick = [(imgs[i], dup[i], lab[i]) for (imgs, dup), lab in zip(data, data_labels)
                for i in range(j, len(imgs), cfg.shards)]
        iet_data.append(tuple(torch.stack([p[c] for p in pick]) for c in range(3)))
    scheduler = make_scheduler(cfg)

    torch.manual_seed(cfg.seed)
    base = make_unet(cfg, len(style_ids))
    models = [make_unet(cfg, len(style_ids)) for _ in range(cfg.shards)]
    for m in models:
        m.load_state_dict(base.state_dict())  # every shard starts from the same weights
        m.to(device).train()
    opts = [torch.optim.AdamW(m.parameters(), lr=cfg.lr) for m in models]
    banks = [fs.AGCMemoryBank(cfg.timesteps, ratio=cfg.agc_ratio).to(device) for _ in models]
    iet = fs.train.IterativeEnsemble(models, shard_sizes=[len(d[0]) for d in iet_data])
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)

    say(f"fastsoup demo: {cfg.shards} models, {cfg.rounds} IET rounds x {cfg.steps} steps on "
        f"class-balanced shards, then {cfg.finetune_steps} fine-tuning steps each on one style "
        f"({', '.join(styles)}) on {device}"
        + (f" ({threads} torch thread{'s' if threads > 1 else ''})" if device.type == "cpu" else "")
        + f"; {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M-parameter UNet2DModel, "
        f"{cfg.size}x{cfg.size} images")
    history: List[Dict] = []
    progress = _Progress(cfg.shards * (cfg.rounds * cfg.steps + cfg.finetune_steps), say, cfg.quiet)
    average_state = None
    # IET rounds (each shard on its own data, then every model restarts from the average),
    # then one fine-tuning round whose models stay apart: the soup's ingredients.
    phases = [(r + 1, cfg.steps, cfg.lr, True) for r in range(cfg.rounds)]
    phases.append((cfg.rounds + 1, cfg.finetune_steps, cfg.finetune_lr, False))
    for rnd, steps, lr, averaged in phases:
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr
        for k, (model, opt, bank) in enumerate(zip(models, opts, banks)):
            images, is_dup, style_y = iet_data[k] if averaged else (*data[k], data_labels[k])
            losses, kept, total, dup_excl, dup_seen, uniq_excl, uniq_seen = [], 0, 0, 0, 0, 0, 0
            for _ in range(steps):
                idx = torch.randint(0, images.shape[0], (cfg.batch,), generator=gen)
                x0 = images[idx].to(device)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                t = torch.randint(0, cfg.timesteps, (cfg.batch,), generator=gen).to(device)
                x_t = scheduler.add_noise(x0, noise, t)
                pred = model(x_t, t, class_labels=style_y[idx].to(device)).sample
                loss, stats = fs.train.diffusion_loss(scheduler, pred, latents=x0, noise=noise,
                                                      timesteps=t, bank=bank)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                keep = stats.keep_mask.cpu()
                dup = is_dup[idx]
                losses.append(loss.item())
                kept += int(keep.sum())
                total += cfg.batch
                dup_excl += int((~keep & dup).sum())
                dup_seen += int(dup.sum())
                uniq_excl += int((~keep & ~dup).sum())
                uniq_seen += int((~dup).sum())
                progress.update(f"{'round ' + str(rnd) if averaged else 'fine-tuning'} shard {k} "
                                f"loss {losses[-1]:.3f}")
            history.append({
                "round": rnd, "phase": "iet" if averaged else "fine-tune", "shard": k,
                "mean_loss": sum(losses) / len(losses),
                "last_loss": losses[-1], "exclusion_rate": 1 - kept / total,
                "excluded_duplicates": dup_excl, "seen_duplicates": dup_seen,
                "excluded_unique": uniq_excl, "seen_unique": uniq_seen,
                "exclusion_rate_duplicates": dup_excl / dup_seen if dup_seen else None,
                "exclusion_rate_unique": uniq_excl / uniq_seen if uniq_seen else None,
            })
        if averaged:
            iet.average_()  # every shard restarts from the average; optimizers/banks kept
            if rnd == cfg.rounds:
                average_state = {k: v.detach().clone() for k, v in models[0].state_dict().items()}
        last = history[-cfg.shards:]
        say((f"round {rnd}/{cfg.rounds}" if averaged else "fine-tuning") + ": mean loss "
            + ", ".join(f"{h['mean_loss']:.3f}" for h in last)
            + f"; AGC excluded {sum(h['exclusion_rate'] for h in last) / len(last):.0%} of samples"
            + ("; shard models averaged" if averaged else
               "; each shard model fine-tuned on its own style, kept apart for the soup"))
    progress.close()
    train_seconds = time.perf_counter() - t_start

    # --- soup with the streaming merge engine
    shard_dirs = fs.train.save_shard_models(models, os.path.join(out_dir, "shards"))
    soup_dir = os.path.join(out_dir, "soup")
    report = fs.train.soup_shard_models(shard_dirs, soup_dir, weights=iet.weights,
                                        overwrite=True, quiet=True)
    soup = UNet2DModel.from_pretrained(soup_dir, low_cpu_mem_usage=False).to(device)
    say(f"souped {len(shard_dirs)} shard models into {soup_dir} "
        f"({report.bytes_to_write / 1e6:.1f} MB written)")

    # --- sample every model from the same noise
    noise = torch.randn(cfg.samples, 3, cfg.size, cfg.size,
                        generator=torch.Generator().manual_seed(cfg.seed + 2))
    names = [f"shard {k}" for k in range(cfg.shards)] + ["soup"]
    sampled = models + [soup]
    # each shard model is asked for its own style; the soup and the IET average for every
    # style in turn (the same noise, so rows differ only by the model and the label)
    every = torch.arange(cfg.samples) % len(style_ids)
    asked = [torch.full((cfg.samples,), style_ids.index(st), dtype=torch.long) for st in styles]
    asked.append(every)
    if average_state is not None:  # the IET average the last round started from
        avg_model = make_unet(cfg, len(style_ids)).to(device)
        avg_model.load_state_dict(average_state)
        names.append(AVERAGE_ROW)
        sampled.append(avg_model)
        asked.append(every)
    rows = [sample(m, cfg, device, noise, y) for m, y in zip(sampled, asked)]
    # the baseline for the soup: each shard model asked for every style, as the soup is
    shard_every = [sample(m, cfg, device, noise, every) for m in models]
    say(f"sampled {cfg.samples} images from each of {len(rows)} models, and every style from "
        f"each shard model ({cfg.sample_steps} DDIM steps)")

    # --- measure: styles, memorisation against a baseline of fresh images
    clf = StyleClassifier(cfg.size, seed=cfg.seed + 12345)
    heldout = {st: repaint(procedural_images(st, 32, cfg.size, seed=cfg.seed + 777), st)
               for st in set(styles)}
    held_nn = {st: nearest_neighbour_rms(x, train_all) for st, x in heldout.items()}
    copy_threshold = COPY_RMS
    dup_images = torch.stack([imgs[0] for imgs, dup in data if bool(dup.any())])
    models_out: Dict[str, Dict] = {}
    for k, (name, row, y) in enumerate(zip(names, rows, asked)):
        labels = clf.predict(row)
        wanted = [style_ids[i] for i in y.tolist()]
        d = nearest_neighbour_rms(row, train_all)
        d_dup = nearest_neighbour_rms(row, dup_images) if len(dup_images) else torch.full_like(d, math.inf)
        own = styles[k] if k < cfg.shards else None
        base_styles = [own] if own is not None else sorted(set(styles))
        base_d = torch.cat([held_nn[st] for st in base_styles])
        models_out[name] = {
            "style": own,
            "labels": labels,
            "counts": {c: labels.count(c) for c in clf.classes if labels.count(c)},
            "training_style_fraction": sum(lab in styles for lab in labels) / len(labels),
            "own_style_fraction": (labels.count(own) / len(labels)) if own else None,
            "asked": wanted,
            "asked_style_fraction": sum(a == b for a, b in zip(labels, wanted)) / len(labels),
            "asked_style_fraction_by_style": {
                st: sum(a == b == st for a, b in zip(labels, wanted)) / max(wanted.count(st), 1)
                for st in style_ids if st in wanted},
            "styles_covered": sorted({lab for lab in labels if lab in styles}),
            "nn_rms_mean": float(d.mean()), "nn_rms_min": float(d.min()),
            "heldout_nn_rms_mean": float(base_d.mean()),
            "heldout_copy_fraction": float((base_d < copy_threshold).float().mean()),
            "copies": int((d < copy_threshold).sum()),
            "copies_of_duplicate": int(((d_dup <= d + 1e-6) & (d < copy_threshold)).sum()),
        }
        if k < cfg.shards:   # the same model asked for every style in turn
            got = clf.predict(shard_every[k])
            asked_all = [style_ids[i] for i in every.tolist()]
            models_out[name]["every_style_asked_fraction"] = (
                sum(a == b for a, b in zip(got, asked_all)) / len(got))
            models_out[name]["every_style_covered"] = sorted(
                {a for a, b in zip(got, asked_all) if a == b})
    if AVERAGE_ROW in names:   # how far the soup's samples are from the IET average's
        soup_row, avg_row = rows[names.index("soup")], rows[names.index(AVERAGE_ROW)]
        models_out["soup"]["rms_to_average_samples"] = float(
            (soup_row - avg_row).square().mean(dim=(1, 2, 3)).sqrt().mean())

    # --- the grid: training rows (the duplicated image first), shard rows, the soup
    grid_rows = [torch.cat([imgs[:1], imgs[~dup]])[: cfg.samples] for imgs, dup in data] + rows
    grid_labels = [f"training data: {st} (1st: duplicated)" for st in styles] + [
        f"{n} ({models_out[n]['style']}): {models_out[n]['own_style_fraction']:.0%} {models_out[n]['style']}"
        if models_out[n]["style"] else
        f"{n}: {len(models_out[n]['styles_covered'])}/{len(set(styles))} styles, "
        f"{models_out[n]['training_style_fraction']:.0%} styled" for n in names]
    grid_path = os.path.join(out_dir, "grid.png")
    save_labelled_grid(grid_rows, grid_labels, grid_path)

    result = {
        "config": asdict(cfg), "device": str(device), "threads": threads if device.type == "cpu" else None,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": {"fastsoup": fs.__version__, "torch": torch.__version__,
                     "diffusers": __import__("diffusers").__version__,
                     "python": platform.python_version()},
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - t_start,
        "styles": styles, "history": history,
        "classifier": {"classes": clf.classes, "heldout_style_accuracy": clf.heldout_style_accuracy,
                       "heldout_images": clf.heldout_size, "heldout_accuracy": clf.heldout_accuracy,
                       "min_prob": clf.min_prob},
        "copy_threshold": copy_threshold,
        "models": models_out,
        "soup": {"path": soup_dir, "weights": iet.weights, "bytes": report.bytes_to_write,
                 "seconds": report.seconds},
        "grid": grid_path, "grid_rows": grid_labels,
    }
    result["findings"] = findings(result)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(result))
    for line in result["findings"]:
        say("* " + line)
    say(f"wrote {grid_path}, report.json and report.md in {time.perf_counter() - t_start:.0f} s")
    say(f"demo output: {out_dir}")
    return result


AVERAGE_ROW = "IET average"   # the averaged model the fine-tuning round starts from
COPY_RMS = 0.1                # a sample this close (RMS, images in [-1, 1]) to a training image is a copy


def _style_of(k: int) -> str:
    from .train.data import STYLES

    return STYLES[k % len(STYLES)]  # the style shard_datasets gives shard k


def findings(r: Dict) -> List[str]:
    """One sentence per finding, each with its baseline; measured values only."""
    out = []
    hist = r["history"]
    de, ds = sum(h["excluded_duplicates"] for h in hist), sum(h["seen_duplicates"] for h in hist)
    ue, us = sum(h["excluded_unique"] for h in hist), sum(h["seen_unique"] for h in hist)
    if ds and us:
        rd, ru = de / ds, ue / us
        verdict = ("more often" if rd > ru else "less often" if rd < ru else "as often")
        ratio = f" ({rd / ru:.1f}x)" if ru > 0 and rd > 0 else ""
        out.append(f"AGC excluded {rd:.0%} of the duplicated images' training samples "
                   f"({de}/{ds}) against {ru:.0%} of the unique images' ({ue}/{us}), the baseline: "
                   f"duplicates were dropped from the gradient {verdict}{ratio}"
                   + (" as unique images." if verdict == "as often" else " than unique images."))
    shard_models = {n: m for n, m in r["models"].items() if m["style"]}
    main = {n: m for n, m in r["models"].items() if n != AVERAGE_ROW}   # the shards and the soup
    c = r["classifier"]
    if shard_models:
        own = [m["own_style_fraction"] for m in shard_models.values()]
        each = ", ".join(f"{m['style']} {m['own_style_fraction']:.0%}" for m in shard_models.values())
        n_in = sum(m["training_style_fraction"] * len(m["labels"]) for m in main.values())
        n_all = sum(len(m["labels"]) for m in main.values())
        out.append(f"A style classifier ({c['heldout_style_accuracy']:.0%} accurate on "
                   f"{c['heldout_images']} held-out procedural images) puts {n_in / n_all:.0%} of the "
                   f"shard models' and the soup's samples in a training style (target 75%); each shard "
                   f"model, asked for its own style, gives it in {min(own):.0%}-{max(own):.0%} of cases ({each}).")
    soup = r["models"].get("soup")
    n_styles = len(set(r["styles"]))
    if soup and shard_models:
        by = soup.get("asked_style_fraction_by_style", {})
        every = [m["every_style_asked_fraction"] for m in shard_models.values()
                 if "every_style_asked_fraction" in m]
        cov = [len(m["every_style_covered"]) for m in shard_models.values() if "every_style_covered" in m]
        avg = r["models"].get(AVERAGE_ROW)
        line = (f"Asked for each style in turn, the soup gives the style asked in "
                f"{soup['asked_style_fraction']:.0%} of its samples ("
                + ", ".join(f"{st} {v:.0%}" for st, v in by.items())
                + f") and covers {len(soup['styles_covered'])} of the {n_styles} training styles from "
                f"one set of weights")
        if every:
            line += (f", where a single shard model asked the same gives the style asked in "
                     f"{min(every):.0%}-{max(every):.0%} of cases (covering {min(cov)}-{max(cov)} styles)")
        if avg:
            line += (f"; the IET average the shards were fine-tuned from gives it in "
                     f"{avg['asked_style_fraction']:.0%}"
                     + (f", and the soup's samples lie at a mean RMS of {soup['rms_to_average_samples']:.3f} "
                        f"from its (same noise and labels)" if "rms_to_average_samples" in soup else ""))
        out.append(line + ".")
    if main:
        samp = sum(m["nn_rms_mean"] for m in main.values()) / len(main)
        held = sum(m["heldout_nn_rms_mean"] for m in main.values()) / len(main)
        copies = sum(m["copies"] for m in main.values())
        dups = sum(m["copies_of_duplicate"] for m in main.values())
        total = sum(len(m["labels"]) for m in main.values())
        fresh = sum(m["heldout_copy_fraction"] for m in main.values()) / len(main)
        closer = "closer to" if samp < held else "farther from"
        out.append(f"Samples lie at a mean RMS distance of {samp:.3f} from their nearest training "
                   f"image, {closer} the training set than fresh images of the same styles "
                   f"({held:.3f}); {copies} of {total} samples ({copies / max(total, 1):.0%}) are copies "
                   f"(within {r['copy_threshold']:.2f} RMS of a training image; {dups} of them of a "
                   f"duplicated image) against {fresh:.0%} of fresh images, whose coincidences are the baseline.")
    return out


def save_labelled_grid(rows: List[Tensor], labels: List[str], path: str, scale: int = 4,
                       gutter: int = 2) -> None:
    """:func:`fastsoup.train.data.image_grid` with a text label left of every row (PNG)."""
    from PIL import Image, ImageDraw

    from .train.data import image_grid

    grid = Image.fromarray(image_grid(rows, scale=scale, gutter=gutter).numpy())
    h = rows[0].shape[-2] * scale
    draw0 = ImageDraw.Draw(grid)
    width = max(int(draw0.textlength(lab)) for lab in labels) + 12
    out = Image.new("RGB", (grid.width + width, grid.height), (255, 255, 255))
    out.paste(grid, (width, 0))
    draw = ImageDraw.Draw(out)
    for i, lab in enumerate(labels):
        y = gutter + i * (h + gutter) + h // 2 - 6
        draw.text((6, y), lab, fill=(0, 0, 0))
    out.save(path)


def _markdown(r: Dict) -> str:
    c = r["config"]
    lines = ["# fastsoup demo report", "",
             f"{c['shards']} shard models (tiny UNet2DModel, {c['size']}x{c['size']}, styles "
             f"{', '.join(r['styles'])}), {c['rounds']} IET rounds of {c['steps']} steps (learning rate {c['lr']:g}), then "
             f"{c['finetune_steps']} fine-tuning steps per shard (learning rate {c['finetune_lr']:g}, "
             f"not averaged), {c['prediction']} prediction, conditioned on the style (class labels), "
             f"AGC memory bank (ratio {c['agc_ratio']}), souped with the merge engine. Device: {r['device']}"
             + (f" ({r['threads']} torch threads)" if r.get("threads") else "")
             + f"; training {r['train_seconds']:.1f} s, total {r['total_seconds']:.1f} s.", "",
             "## Findings", ""]
    lines += [f"* {s}" for s in r["findings"]]
    lines += ["", "## Samples", "",
              "| model | style asked | style asked given | in a training style | styles covered | "
              "classified as | every style asked (shard) | nearest-training RMS (mean) | "
              "fresh images' (mean) | copies | fresh images' copies |",
              "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for name, m in r["models"].items():
        own = f"{m.get('asked_style_fraction', m['own_style_fraction'] or 0):.0%}"
        counts = ", ".join(f"{k} {v}" for k, v in m["counts"].items())
        every = (f"{m['every_style_asked_fraction']:.0%}" if "every_style_asked_fraction" in m else "-")
        lines.append(f"| {name} | {m['style'] or 'each in turn'} | {own} | {m['training_style_fraction']:.0%} | "
                     f"{', '.join(m['styles_covered'])} | {counts} | {every} | {m['nn_rms_mean']:.3f} | "
                     f"{m['heldout_nn_rms_mean']:.3f} | {m['copies']}/{len(m['labels'])} | "
                     f"{m['heldout_copy_fraction']:.0%} |")
    cl = r["classifier"]
    lines += ["", f"Style classifier: logistic regression on colour-invariant spectra, trained on fresh "
              f"procedural images plus an `other` class (colour noise, blends of two styles); "
              f"held-out accuracy " + ", ".join(f"{k} {v:.0%}" for k, v in cl["heldout_accuracy"].items())
              + f"; a prediction below probability {cl['min_prob']} counts as `other`. A copy is a "
              f"sample within RMS {r['copy_threshold']:.2f} of a training image; the fresh images (32 "
              f"per style, repainted like the training data) give the baseline. The `{AVERAGE_ROW}` "
              f"row samples the averaged model the fine-tuning round started from. Every model is "
              f"conditioned on a style label: a shard model is asked for its own style, the soup and "
              f"the IET average for each style in turn; `every style asked (shard)` asks a shard "
              f"model for each style in turn too (the baseline for the soup).", "",
              "## Training", "",
              "| round | shard | mean loss | AGC exclusion | on duplicates | on unique |",
              "|---:|---:|---:|---:|---:|---:|"]
    pct = lambda x: "-" if x is None else f"{x:.0%}"
    for h in r["history"]:
        lines.append(f"| {h['round']} | {h['shard']} | {h['mean_loss']:.4f} | {pct(h['exclusion_rate'])} | "
                     f"{pct(h['exclusion_rate_duplicates'])} | {pct(h['exclusion_rate_unique'])} |")
    lines += ["", f"Grid: `{os.path.basename(r['grid'])}` (rows: " + "; ".join(r["grid_rows"]) + ").", ""]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--shards", type=int, default=d.shards, help="shard models (IET shards, then one style each)")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="IET rounds (shard models averaged after each)")
    p.add_argument("--steps", type=int, default=d.steps, help="steps per shard per IET round")
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                   help="steps of the final round, where each shard model fine-tunes on its own "
                        "style and is not averaged (the soup's ingredients)")
    p.add_argument("--per-shard", type=int, default=d.per_shard, help="images per shard")
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels (multiple of 8)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr,
                   help="learning rate of the fine-tuning round")
    p.add_argument("--samples", type=int, default=d.samples, help="samples per model")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps")
    p.add_argument("--width", type=int, default=d.width, help="UNet base channels (multiple of 8)")
    p.add_argument("--prediction", default=d.prediction, choices=["sample", "epsilon", "v_prediction"],
                   help="what the UNet predicts")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads (default: OMP_NUM_THREADS, else 1 on machines with "
                        "<= 2 cores, else half the cores up to 4)")
    p.add_argument("--device", default=d.device, help="auto (GPU when present), cpu, cuda, cuda:N")
    p.add_argument("--out", default=d.out, help="output folder (created; files inside replaced)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def main_from_args(args: argparse.Namespace) -> int:
    cfg = DemoConfig(shards=args.shards, rounds=args.rounds, steps=args.steps,
                     per_shard=args.per_shard, size=args.size, batch=args.batch, lr=args.lr,
                     finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                     samples=args.samples, sample_steps=args.sample_steps, width=args.width,
                     prediction=args.prediction, seed=args.seed, threads=args.threads,
                     device=args.device, out=args.out, quiet=args.quiet)
    for name in ("shards", "rounds", "steps", "finetune_steps", "per_shard", "batch", "samples",
                 "sample_steps"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"fastsoup demo: --{name.replace('_', '-')} must be >= 1")
    if cfg.threads < 0:
        raise SystemExit("fastsoup demo: --threads must be >= 0 (0: automatic)")
    if cfg.width % 8:
        raise SystemExit("fastsoup demo: --width must be a multiple of 8")
    if cfg.per_shard < 2:
        raise SystemExit("fastsoup demo: --per-shard must be >= 2")
    if cfg.size % 8:
        raise SystemExit("fastsoup demo: --size must be a multiple of 8")
    run(cfg)
    return 0
