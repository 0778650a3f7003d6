"""``fastsoup demo``: anti-memorisation training, iterative ensembles and a soup, end to end.

1. Builds a small procedural dataset, one style per shard, each shard holding a
   duplicated image (the kind of sample diffusion models memorise).
2. Trains a tiny diffusers ``UNet2DModel`` per shard with the AGC memory-bank loss
   (``fs.agc_loss``), averaging the shard models every round (iterative ensemble training,
   ``fastsoup.train.iet``); the last round is left un-averaged so the shards differ.
3. Saves every shard model in diffusers layout and soups them with the streaming merge
   engine (``fs.merge``).
4. Samples from every shard model and from the soup (same initial noise), and writes a
   PNG grid plus ``report.json`` / ``report.md``: losses, exclusion rates (duplicated vs
   unique images), and a memorisation measure (RMS distance of each sample to its nearest
   training image; near 0 means a copy).

Runs on CPU in a few minutes at the default size; uses the GPU when there is one. Needs
diffusers (``pip install fastsoup[diffusers]``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch


@dataclass
class DemoConfig:
    shards: int = 4
    rounds: int = 4
    steps: int = 100           # optimisation steps per shard per round
    per_shard: int = 24        # images per shard
    size: int = 16             # image side (pixels); a multiple of 8
    batch: int = 32
    lr: float = 3e-3
    timesteps: int = 100       # DDPM training timesteps (also the AGC bank length)
    agc_ratio: float = 2.0     # the pixel-model ratio of the reference code
    samples: int = 8           # samples per model
    sample_steps: int = 20     # DDIM steps
    width: int = 16            # UNet base channels
    seed: int = 0
    device: str = "auto"
    out: str = "fastsoup-demo-out"
    quiet: bool = False


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("fastsoup demo needs diffusers: pip install 'fastsoup[diffusers]' "
                         f"({exc})") from None
    return diffusers


def make_unet(cfg: DemoConfig):
    from .train.data import small_unet

    return small_unet(cfg.size, cfg.width, attention=False)


def make_scheduler(cfg: DemoConfig):
    """DDPM's linear schedule rescaled to ``cfg.timesteps`` steps (1e-4…0.02 at 1000), so
    that the last timestep is pure noise whatever the number of steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.timesteps, beta_start=0.1 / cfg.timesteps,
                         beta_end=20.0 / cfg.timesteps)


@torch.no_grad()
def sample(unet, cfg: DemoConfig, device, noise: torch.Tensor) -> torch.Tensor:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(make_scheduler(cfg).config)
    sched.set_timesteps(cfg.sample_steps)
    x = noise.to(device)
    unet.eval()
    for t in sched.timesteps:
        eps = unet(x, t.to(device)).sample
        x = sched.step(eps, t, x).prev_sample
    unet.train()
    return x.clamp(-1, 1).cpu()


def run(cfg: DemoConfig) -> Dict:
    _require_diffusers()
    from diffusers import UNet2DModel

    import fastsoup as fs
    from fastsoup.train.data import nearest_neighbour_rms, save_image_grid, shard_datasets
    from fastsoup.train.iet import IterativeEnsemble
    from fastsoup.train.soup import save_shard_models, soup_shard_models

    if cfg.size % 8:
        raise ValueError(f"--size must be a multiple of 8, got {cfg.size}")
    device = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available())
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    out_dir = os.path.abspath(cfg.out)
    os.makedirs(out_dir, exist_ok=True)
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, flush=True))
    t_start = time.perf_counter()

    data = shard_datasets(cfg.shards, cfg.per_shard, cfg.size, seed=cfg.seed)
    train_all = torch.cat([d[0] for d in data])
    scheduler = make_scheduler(cfg)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    torch.manual_seed(cfg.seed)
    base = make_unet(cfg)
    models = [make_unet(cfg) for _ in range(cfg.shards)]
    for m in models:
        m.load_state_dict(base.state_dict())  # every shard starts from the same weights
        m.to(device).train()
    opts = [torch.optim.AdamW(m.parameters(), lr=cfg.lr) for m in models]
    banks = [fs.AGCMemoryBank(cfg.timesteps, ratio=cfg.agc_ratio).to(device) for _ in models]
    iet = IterativeEnsemble(models, shard_sizes=[len(d[0]) for d in data])
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)

    say(f"fastsoup demo: {cfg.shards} shards x {cfg.rounds} rounds x {cfg.steps} steps on {device} "
        f"({sum(p.numel() for p in base.parameters()) / 1e6:.2f}M-parameter UNet2DModel, "
        f"{cfg.size}x{cfg.size} images)")
    history: List[Dict] = []
    progress = None
    if not cfg.quiet:
        try:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.shards * cfg.rounds * cfg.steps, unit="step",
                            desc="training", disable=None, file=sys.stderr)
        except ImportError:  # pragma: no cover
            progress = None
    for rnd in range(cfg.rounds):
        for k, (model, opt, bank) in enumerate(zip(models, opts, banks)):
            images, is_dup = data[k]
            losses, kept, total, dup_excl, dup_seen, uniq_excl, uniq_seen = [], 0, 0, 0, 0, 0, 0
            for _ in range(cfg.steps):
                idx = torch.randint(0, images.shape[0], (cfg.batch,), generator=gen)
                x0 = images[idx].to(device)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                t = torch.randint(0, cfg.timesteps, (cfg.batch,), generator=gen).to(device)
                a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
                s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
                pred = model(a * x0 + s * noise, t).sample
                loss, stats = fs.agc_loss(pred, noise, timesteps=t, bank=bank)
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
                if progress is not None:
                    progress.set_postfix_str(f"round {rnd + 1} shard {k} loss {losses[-1]:.3f}", refresh=False)
                    progress.update(1)
            history.append({
                "round": rnd + 1, "shard": k, "mean_loss": sum(losses) / len(losses),
                "last_loss": losses[-1], "exclusion_rate": 1 - kept / total,
                "exclusion_rate_duplicates": dup_excl / dup_seen if dup_seen else None,
                "exclusion_rate_unique": uniq_excl / uniq_seen if uniq_seen else None,
            })
        averaged = rnd < cfg.rounds - 1
        if averaged:
            iet.average_()  # every shard restarts from the average; optimizers/banks kept
        last = history[-cfg.shards:]
        say(f"round {rnd + 1}/{cfg.rounds}: mean loss "
            + ", ".join(f"{h['mean_loss']:.3f}" for h in last)
            + f"; AGC excluded {sum(h['exclusion_rate'] for h in last) / len(last):.0%} of samples"
            + ("; shard models averaged" if averaged else "; left un-averaged for the soup"))
    if progress is not None:
        progress.close()
    train_seconds = time.perf_counter() - t_start

    # --- soup with the streaming merge engine
    shard_dirs = save_shard_models(models, os.path.join(out_dir, "shards"))
    soup_dir = os.path.join(out_dir, "soup")
    report = soup_shard_models(shard_dirs, soup_dir, weights=iet.weights, overwrite=True, quiet=True)
    soup = UNet2DModel.from_pretrained(soup_dir, low_cpu_mem_usage=False).to(device)
    say(f"souped {len(shard_dirs)} shard models into {soup_dir} "
        f"({report.bytes_to_write / 1e6:.1f} MB written)")

    # --- sample every model from the same noise
    noise = torch.randn(cfg.samples, 3, cfg.size, cfg.size,
                        generator=torch.Generator().manual_seed(cfg.seed + 2))
    rows, names = [], []
    for k, m in enumerate(models):
        rows.append(sample(m, cfg, device, noise))
        names.append(f"shard {k}")
    rows.append(sample(soup, cfg, device, noise))
    names.append("soup")
    memo = {}
    for name, row in zip(names, rows):
        d = nearest_neighbour_rms(row, train_all)
        memo[name] = {"nn_rms_mean": float(d.mean()), "nn_rms_min": float(d.min()),
                      "copies_below_0.05": int((d < 0.05).sum())}

    # training rows: the duplicated image once, then unique images
    grid_rows = [torch.cat([imgs[:1], imgs[~dup]])[: cfg.samples] for imgs, dup in data] + rows
    grid_path = os.path.join(out_dir, "grid.png")
    save_image_grid(grid_rows, grid_path)

    result = {
        "config": asdict(cfg), "device": str(device),
        "versions": {"fastsoup": fs.__version__, "torch": torch.__version__,
                     "diffusers": __import__("diffusers").__version__,
                     "python": platform.python_version()},
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - t_start,
        "history": history, "memorisation": memo,
        "soup": {"path": soup_dir, "weights": iet.weights, "bytes": report.bytes_to_write,
                 "seconds": report.seconds},
        "grid": grid_path,
        "grid_rows": [f"training images, shard {k}" for k in range(cfg.shards)] + [
            f"samples, {n}" for n in names],
    }
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(_markdown(result))
    say(f"wrote {grid_path}, report.json and report.md")
    say(f"demo output: {out_dir}")
    return result


def _markdown(r: Dict) -> str:
    c = r["config"]
    lines = ["# fastsoup demo report", "",
             f"{c['shards']} shard models (tiny UNet2DModel, {c['size']}x{c['size']}), "
             f"{c['rounds']} IET rounds of {c['steps']} steps, AGC memory bank (ratio "
             f"{c['agc_ratio']}), souped with the merge engine. Device: {r['device']}; "
             f"training {r['train_seconds']:.1f} s, total {r['total_seconds']:.1f} s.", "",
             "## Training", "",
             "| round | shard | mean loss | AGC exclusion | on duplicates | on unique |",
             "|---:|---:|---:|---:|---:|---:|"]
    pct = lambda x: "-" if x is None else f"{x:.0%}"
    for h in r["history"]:
        lines.append(f"| {h['round']} | {h['shard']} | {h['mean_loss']:.4f} | {pct(h['exclusion_rate'])} | "
                     f"{pct(h['exclusion_rate_duplicates'])} | {pct(h['exclusion_rate_unique'])} |")
    lines += ["", "## Memorisation (RMS distance of samples to the nearest training image)", "",
              "| model | mean | min | samples closer than 0.05 |", "|---|---:|---:|---:|"]
    for name, m in r["memorisation"].items():
        lines.append(f"| {name} | {m['nn_rms_mean']:.3f} | {m['nn_rms_min']:.3f} | {m['copies_below_0.05']} |")
    lines += ["", f"Grid: `{os.path.basename(r['grid'])}` (rows: " + "; ".join(r["grid_rows"]) + ").", ""]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--shards", type=int, default=d.shards, help="shard models (one style each)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="IET rounds")
    p.add_argument("--steps", type=int, default=d.steps, help="steps per shard per round")
    p.add_argument("--per-shard", type=int, default=d.per_shard, help="images per shard")
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels (multiple of 8)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--samples", type=int, default=d.samples, help="samples per model")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps")
    p.add_argument("--width", type=int, default=d.width, help="UNet base channels (multiple of 8)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto (GPU when present), cpu, cuda, cuda:N")
    p.add_argument("--out", default=d.out, help="output folder (created; files inside replaced)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def main_from_args(args: argparse.Namespace) -> int:
    cfg = DemoConfig(shards=args.shards, rounds=args.rounds, steps=args.steps,
                     per_shard=args.per_shard, size=args.size, batch=args.batch, lr=args.lr,
                     samples=args.samples, sample_steps=args.sample_steps, width=args.width,
                     seed=args.seed, device=args.device, out=args.out, quiet=args.quiet)
    for name in ("shards", "rounds", "steps", "per_shard", "batch", "samples", "sample_steps"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"fastsoup demo: --{name.replace('_', '-')} must be >= 1")
    if cfg.width % 8:
        raise SystemExit("fastsoup demo: --width must be a multiple of 8")
    if cfg.per_shard < 2:
        raise SystemExit("fastsoup demo: --per-shard must be >= 2")
    if cfg.size % 8:
        raise SystemExit("fastsoup demo: --size must be a multiple of 8")
    run(cfg)
    return 0
