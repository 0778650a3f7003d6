"""Train a diffusers UNet2DModel with fastsoup's anti-memorisation loss.

    python examples/train_agc.py --data path/to/images --resolution 32 --steps 2000
    python examples/train_agc.py --smoke            # a few steps on built-in data (CI)

Uses only fastsoup's public API:
* ``fs.agc_loss`` with an ``fs.AGCMemoryBank`` (the reference rule; ``--rule topk`` drops
  the ``--exclude-fraction`` lowest losses instead, ``--rule none`` keeps everything);
* ``fastsoup.train.iet.IterativeEnsemble`` when ``--shards > 1`` (one model per data
  shard, averaged every ``--average-every`` steps);
* ``fs.merge`` to soup the shard models at the end (``--shards > 1``).

The image folder is read with Pillow (every .png/.jpg/.jpeg/.webp below it), resized to
``--resolution`` and scaled to [-1, 1]. Checkpoints go to ``--out`` in diffusers layout
(``UNet2DModel.from_pretrained`` loads them); the AGC bank is saved beside each model.
"""
import argparse
import os
import time

import torch

import fastsoup as fs
from fastsoup.train.data import shard_datasets, small_unet
from fastsoup.train.iet import IterativeEnsemble
from fastsoup.train.soup import save_shard_models, soup_shard_models

from _common import (add_run_args, add_training_args, load_folder, log_step, smoke_defaults,
                     write_summary)

PROG = "train_agc"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="image folder (default: built-in procedural images)")
    add_training_args(ap, steps=1000)
    ap.add_argument("--rule", choices=["bank", "topk", "none"], default="bank")
    ap.add_argument("--ratio", type=float, default=2.0, help="AGC bank ratio (2.0 pixel, 1.25 SD)")
    ap.add_argument("--exclude-fraction", type=float, default=0.1, help="for --rule topk")
    ap.add_argument("--shards", type=int, default=1, help="iterative ensemble: shard models")
    ap.add_argument("--average-every", type=int, default=200, help="IET round length in steps")
    add_run_args(ap, out="train-agc-out")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_defaults(ap, args, steps=3, batch=4, resolution=16, width=8, average_every=2)

    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.data:
        images = load_folder(PROG, args.data, args.resolution)
        per = -(-images.shape[0] // args.shards)
        shards = [images[i * per:(i + 1) * per] for i in range(args.shards)]
    else:
        shards = [d[0] for d in shard_datasets(args.shards, 16, args.resolution, seed=args.seed)]
    if any(s.shape[0] == 0 for s in shards):
        raise SystemExit("train_agc: more shards than images")

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    base = small_unet(args.resolution, args.width)
    models = []
    for _ in shards:
        m = small_unet(args.resolution, args.width)
        m.load_state_dict(base.state_dict())
        models.append(m.to(device).train())
    opts = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in models]
    banks = [fs.AGCMemoryBank(scheduler.config.num_train_timesteps, ratio=args.ratio).to(device)
             for _ in models]
    iet = IterativeEnsemble(models, shard_sizes=[s.shape[0] for s in shards],
                            average_every=args.average_every if len(models) > 1 else 0)

    t0 = time.time()
    for step in range(args.steps):
        for k, (model, opt, bank, data) in enumerate(zip(models, opts, banks, shards)):
            x0 = data[torch.randint(0, data.shape[0], (args.batch,))].to(device)
            noise = torch.randn_like(x0)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), device=device)
            noisy = scheduler.add_noise(x0, noise, t)
            model_pred = model(noisy, t).sample
            # ---- the loss block: one call replaces F.mse_loss(model_pred, noise) ----
            if args.rule == "bank":
                loss, stats = fs.agc_loss(model_pred, noise, timesteps=t, bank=bank)
            elif args.rule == "topk":
                loss, stats = fs.agc_loss(model_pred, noise, exclude_fraction=args.exclude_fraction)
            else:
                loss, stats = fs.agc_loss(model_pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        averaged = iet.step()
        if log_step(step, args.steps) or averaged:
            d = stats.as_dict()
            print(f"step {step:6d}  loss {loss.item():.4f}  kept {d['kept']}/{d['total']}"
                  f"{'  [shards averaged]' if averaged else ''}  {time.time() - t0:.0f}s", flush=True)

    os.makedirs(args.out, exist_ok=True)
    paths = save_shard_models(models, os.path.join(args.out, "shards"))
    for path, bank in zip(paths, banks):
        torch.save(bank.state_dict(), os.path.join(path, "agc_bank.pt"))
    result = {"shards": paths, "steps": args.steps}
    if len(models) > 1:
        report = soup_shard_models(paths, os.path.join(args.out, "soup"), weights=iet.weights,
                                   overwrite=True, quiet=True)
        result["soup"] = report.output
    write_summary(args.out, PROG, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
