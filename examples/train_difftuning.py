"""Diff-Tuning transfer of a diffusers UNet2DModel with fastsoup: adapt to new data, retain the old.

    python examples/train_difftuning.py --source-style stripes --target-style rings
    python examples/train_difftuning.py --pretrained path/to/ddpm-model --data path/to/images
    python examples/train_difftuning.py --bank out/knowledge_bank.safetensors   # reuse a bank
    python examples/train_difftuning.py --smoke                    # a few steps on built-in data (CI)

Three stages, using only fastsoup's public API:

1. **Pre-trained model.** ``--pretrained DIR`` loads a diffusers ``UNet2DModel`` (a model
   folder, or a pipeline folder with ``unet/``; a pixel model with 3 channels and epsilon
   prediction). Without it, a tiny UNet is "pre-trained" here for ``--pretrain-steps`` on
   the built-in ``--source-style`` images with ``fs.train.diffusion_loss``.
2. **Knowledge bank.** ``fs.train.KnowledgeBank.generate`` draws ``--bank-size`` samples
   from the pre-trained model with a DDIM sampler loop (diffusers ``DDIMScheduler``,
   ``--bank-steps`` steps, eta 0) and saves them to a safetensors file (deterministic:
   the same model and seed write the same bytes). ``--bank FILE`` reuses a bank when the
   file exists (and writes it there otherwise).
3. **Diff-Tuning.** Fine-tuning on the target data (``--data`` folder, or the built-in
   ``--target-style``) with ``fs.train.DiffTuning.make_batch``: each batch of ``--batch``
   rows holds ``B_t`` target rows and ``B_r = floor(replay_share * batch)`` knowledge-bank
   rows (26 + 6 at batch 32 and share 0.2), target timesteps drawn from
   ``P_adapt(t) ~ (t + 1)^tau`` and replay timesteps from ``P_retain(t) ~ (T - t)^tau``
   (``--timestep-mode weight``: uniform timesteps and weights ``T P(t)`` instead), and
   per-sample weights giving ``L = mean(l_target) + lambda mean(l_replay)``
   (``--retention-weight`` lambda, default 0.1). The loss is
   ``fs.train.diffusion_loss(..., weight=batch.mean_weights)`` (default) or, with
   ``--loss weighted-sum``, ``batch.weighted_sum(fs.per_sample_mse(pred, noise))``: the
   same value.

The model is unconditional, so the "null condition" of the replay rows (the null label /
empty prompt that Diff-Tuning trains the knowledge bank on) is a no-op here: the replay
rows go through the same unconditional network as the target rows, and ``make_batch`` is
called without ``target_cond``/``null_cond`` (``batch.cond`` is ``None``). For a
class-conditional or text-to-image model pass ``target_cond=labels`` and
``null_cond=null_label`` (or the empty-prompt embedding) and feed ``batch.cond``.

Before and after fine-tuning the denoising loss (fixed noise and timesteps) is measured
on target images ("adaptation") and on knowledge-bank samples ("retention").
Outputs in ``--out``: the fine-tuned model as a diffusers ``DDPMPipeline`` folder
(``model_index.json``, ``unet/``, ``scheduler/``), ``pretrained/`` (the same, when
pre-trained here; ``--pretrained OUT/pretrained`` reuses it), ``knowledge_bank.safetensors``, ``grid.png``
(rows: target images, knowledge-bank samples, fine-tuned samples) and
``train_difftuning.json`` (summary). ``--smoke`` shrinks everything (16 px, width 8, 3
pre-training and 3 fine-tuning steps, 8 bank samples) and finishes in seconds on a CPU.
"""
import math
import os
import time

import torch

import fastsoup as fs
from fastsoup.train.data import STYLES, procedural_images, small_unet

from _common import (NUM_TRAIN_TIMESTEPS, add_run_args, add_training_args, check_at_least_one,
                     check_device, check_finite, check_model_args, check_style, fail,
                     folder_or_style, import_diffusers, log_step, make_parser, seed_run,
                     save_run, smoke_defaults)

PROG = "train_difftuning"


def load_pretrained(path: str):
    from diffusers import UNet2DModel

    if os.path.isfile(os.path.join(path, "unet", "config.json")):
        path = os.path.join(path, "unet")                 # a pipeline folder
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise fail(PROG, f"--pretrained {path!r} is not a diffusers UNet2DModel folder (no config.json, "
                   "and no unet/config.json)")
    try:
        unet = UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False)
    except Exception as e:
        raise fail(PROG, f"cannot load --pretrained {path!r} as a UNet2DModel: {e}") from None
    if unet.config.in_channels != 3 or unet.config.out_channels != 3:
        raise fail(PROG, f"--pretrained must be a 3-channel pixel model; {path} has in/out channels "
                         f"{unet.config.in_channels}/{unet.config.out_channels} (a latent model "
                         "needs its VAE; see fastsoup/train/knowledge_bank.py)")
    return unet


def parse_args(argv=None):
    ap = make_parser(PROG, __doc__)
    ap.add_argument("--pretrained", help="diffusers UNet2DModel (or pipeline) folder to start from")
    ap.add_argument("--source-style", default="stripes",
                    help=f"built-in pre-training style without --pretrained: {', '.join(STYLES)}")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--data", help="target image folder (default: built-in --target-style images)")
    ap.add_argument("--target-style", default="rings", help="built-in target style without --data")
    ap.add_argument("--num-images", type=int, default=64, help="built-in images per style")
    ap.add_argument("--bank", help="knowledge bank file: loaded if it exists, else written there "
                                   "(default: OUT/knowledge_bank.safetensors)")
    ap.add_argument("--bank-size", type=int, default=256, help="N samples in the knowledge bank")
    ap.add_argument("--bank-steps", type=int, default=50, help="DDIM steps per bank sample")
    ap.add_argument("--tau", type=float, default=1.0, help="exponent of P_adapt (target timesteps)")
    ap.add_argument("--retain-tau", type=float, default=None,
                    help="exponent of P_retain (replay timesteps; default --tau)")
    ap.add_argument("--replay-share", type=float, default=0.2, help="replay rows per batch (32 -> 26+6)")
    ap.add_argument("--retention-weight", type=float, default=0.1, help="lambda of the replay loss")
    ap.add_argument("--timestep-mode", choices=["sample", "weight"], default="sample",
                    help="power laws by sampling timesteps (reference) or by loss weights")
    ap.add_argument("--loss", choices=["diffusion", "weighted-sum"], default="diffusion",
                    help="fs.train.diffusion_loss with mean_weights, or batch.weighted_sum of "
                         "fs.per_sample_mse")
    add_training_args(ap, steps=1000, steps_help="fine-tuning steps", lr_help="pre-training learning rate")
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--samples", type=int, default=8, help="fine-tuned samples in the grid")
    add_run_args(ap, out="train-difftuning-out")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_defaults(ap, args, pretrain_steps=3, steps=3, batch=10, resolution=16, width=8,
                       num_images=8, bank_size=8, bank_steps=2, samples=4)
    check_args(args)
    return args


def check_args(args) -> None:
    check_at_least_one(PROG, args, ("pretrain_steps", "steps", "batch", "num_images", "bank_size",
                                    "bank_steps", "samples"))
    check_model_args(PROG, args, rates=("lr", "finetune_lr"))
    for name in ("tau", "retain_tau", "retention_weight"):
        v = getattr(args, name)
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise fail(PROG, f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if not 0 <= args.replay_share < 1:
        raise fail(PROG, f"--replay-share must be in [0, 1), got {args.replay_share}")
    try:
        _, n_replay = fs.train.split_batch(args.batch, args.replay_share)
    except ValueError as e:
        raise fail(PROG, f"--batch/--replay-share: {e}") from None
    if n_replay > args.bank_size and not (args.bank and os.path.exists(args.bank)):
        raise fail(PROG, f"--bank-size {args.bank_size} is smaller than the {n_replay} replay rows "
                         f"of a batch of {args.batch} (replay share {args.replay_share})")
    if args.pretrained is None:
        check_style(PROG, "--source-style", args.source_style)
    if args.data is None:
        check_style(PROG, "--target-style", args.target_style)
    if args.pretrained is not None and not os.path.isdir(args.pretrained):
        raise fail(PROG, f"--pretrained {args.pretrained!r} is not a directory")
    check_device(PROG, args.device)


def ddim_sampler(unet, scheduler_config, num_steps: int, resolution: int, device):
    """``generate(n, generator)``: DDIM (eta 0) samples of ``unet`` in [-1, 1], for the bank."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler_config)
    ddim.set_timesteps(num_steps)

    @torch.no_grad()
    def generate(n: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.randn(n, 3, resolution, resolution, generator=generator).to(device)
        for t in ddim.timesteps:
            eps = unet(x, t.to(device)).sample
            x = ddim.step(eps, t, x, eta=0.0).prev_sample
        return x.clamp(-1, 1)

    return generate


@torch.no_grad()
def eval_loss(unet, scheduler, images: torch.Tensor, device, seed: int, n: int = 64) -> float:
    """Mean epsilon-MSE on ``n`` fixed (image, timestep, noise) triples (uniform timesteps)."""
    g = torch.Generator().manual_seed(seed)
    x0 = images[torch.randint(0, images.shape[0], (n,), generator=g)].to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    pred = unet(scheduler.add_noise(x0, noise, t), t).sample
    return fs.per_sample_mse(pred, noise).mean().item()


def pretrain(unet, scheduler, images, args, device, g) -> list:
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    losses = []
    t0 = time.time()
    for step in range(args.pretrain_steps):
        x0 = images[torch.randint(0, images.shape[0], (args.batch,), generator=g)].to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,),
                          generator=g).to(device)
        pred = unet(scheduler.add_noise(x0, noise, t), t).sample
        loss, _ = fs.train.diffusion_loss(scheduler, pred, latents=x0, noise=noise, timesteps=t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_step(step, args.pretrain_steps, times=5):
            print(f"pretrain step {step:6d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    return losses


def main(argv=None) -> int:
    args = parse_args(argv)
    diffusers = import_diffusers(PROG)

    t_start = time.time()
    device, g = seed_run(args.seed, args.device)     # g: CPU generator, same run on any device
    os.makedirs(args.out, exist_ok=True)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)   # epsilon prediction
    if args.pretrained and os.path.isfile(os.path.join(args.pretrained, "scheduler",
                                                       "scheduler_config.json")):
        # a pipeline folder: train with its noise schedule (DDPM form of its config)
        scheduler = diffusers.DDPMScheduler.from_pretrained(args.pretrained, subfolder="scheduler")
        if scheduler.config.prediction_type != "epsilon":
            raise fail(PROG, f"--pretrained {args.pretrained}: prediction_type "
                             f"{scheduler.config.prediction_type!r}; this example handles epsilon models")
    summary = {"script": PROG, "seed": args.seed, "device": str(device)}

    # ---- 1. the pre-trained model ----
    if args.pretrained:
        unet = load_pretrained(args.pretrained).to(device)
        if unet.config.sample_size != args.resolution:
            print(f"{PROG}: using the pre-trained model's resolution {unet.config.sample_size} "
                  f"(not --resolution {args.resolution})", flush=True)
            args.resolution = int(unet.config.sample_size)
        source = os.path.abspath(args.pretrained)
        source_images = None
        summary["pretrained"] = source
    else:
        source_images = procedural_images(args.source_style, args.num_images, args.resolution,
                                          seed=args.seed)
        unet = small_unet(args.resolution, args.width).to(device).train()
        print(f"{PROG}: pre-training on built-in '{args.source_style}' ({args.num_images} images, "
              f"{args.resolution}px) for {args.pretrain_steps} steps", flush=True)
        summary["pretrain_losses"] = pretrain(unet, scheduler, source_images, args, device, g)
        pre_dir = os.path.join(args.out, "pretrained")
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(pre_dir)
        source = f"built-in:{args.source_style} ({args.pretrain_steps} steps, seed {args.seed})"
        summary["pretrained"] = os.path.abspath(os.path.join(pre_dir, "unet"))
    target_images = folder_or_style(PROG, args.data, args.target_style, args.num_images,
                                    args.resolution, args.seed + 1)

    # ---- 2. the knowledge bank: N samples of the pre-trained model, generated once ----
    bank_path = args.bank or os.path.join(args.out, "knowledge_bank.safetensors")
    unet.eval()
    if args.bank and os.path.exists(args.bank):
        try:
            bank = fs.train.KnowledgeBank.load(bank_path)
        except ValueError as e:
            raise fail(PROG, f"--bank: {e}") from None
        if tuple(bank.latents.shape[1:]) != (3, args.resolution, args.resolution):
            raise fail(PROG, f"--bank {bank_path} holds samples of shape {tuple(bank.latents.shape[1:])}, "
                             f"the model needs (3, {args.resolution}, {args.resolution})")
        print(f"{PROG}: loaded {bank!r} from {bank_path}", flush=True)
    else:
        gen = ddim_sampler(unet, scheduler.config, args.bank_steps, args.resolution, device)
        t0 = time.time()

        def progress(done, total):
            print(f"knowledge bank {done}/{total} samples  {time.time() - t0:.0f}s", flush=True)

        bank = fs.train.KnowledgeBank.generate(
            gen, args.bank_size, batch_size=min(args.bank_size, 64), seed=args.seed,
            source=f"{source}; DDIM {args.bank_steps} steps eta 0", progress=progress)
        bank.save(bank_path)
        bank = fs.train.KnowledgeBank.load(bank_path)             # train from what the file holds
    summary["bank"] = {"path": os.path.abspath(bank_path), "count": len(bank),
                       "source": bank.metadata.get("source", ""),
                       "sha256": bank.metadata.get("content_sha256", "")}
    bank_images = bank.latents

    # ---- 3. Diff-Tuning on the target data ----
    dt = fs.train.DiffTuning(scheduler.config.num_train_timesteps, tau=args.tau, retain_tau=args.retain_tau,
                             replay_share=args.replay_share, retention_weight=args.retention_weight,
                             mode=args.timestep_mode)
    n_target, n_replay = dt.split(args.batch)
    if n_replay > len(bank):
        raise fail(PROG, f"the knowledge bank has {len(bank)} samples, fewer than the {n_replay} "
                         f"replay rows of a batch of {args.batch}")
    replay = bank.stream(n_replay, generator=torch.Generator().manual_seed(args.seed + 3)) \
        if n_replay else None
    before = {"target_loss": eval_loss(unet, scheduler, target_images, device, args.seed + 4),
              "retention_loss": eval_loss(unet, scheduler, bank_images, device, args.seed + 5)}
    print(f"{PROG}: {dt!r}; batch {args.batch} = {n_target} target + {n_replay} replay; "
          f"before: target loss {before['target_loss']:.4f}, retention loss "
          f"{before['retention_loss']:.4f}", flush=True)

    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.finetune_lr)
    history = []
    t0 = time.time()
    for step in range(args.steps):
        target = target_images[torch.randint(0, target_images.shape[0], (n_target,), generator=g)]
        rep = next(replay).to(device) if replay is not None else None
        # unconditional model: no target_cond / null_cond (the null condition is a no-op)
        b = dt.make_batch(target.to(device), rep, generator=g)
        noise = torch.randn(b.latents.shape, generator=g).to(device)
        noisy = scheduler.add_noise(b.latents, noise, b.timesteps)
        pred = unet(noisy, b.timesteps).sample
        if args.loss == "diffusion":
            # mean over the batch of mean_weights * l_i = mean(l_target) + lambda mean(l_replay)
            loss, _ = fs.train.diffusion_loss(scheduler, pred, latents=b.latents, noise=noise,
                                              timesteps=b.timesteps, weight=b.mean_weights)
            per_sample = fs.per_sample_mse(pred.detach(), noise)          # for logging
        else:
            per_sample = fs.per_sample_mse(pred, noise)
            loss = b.weighted_sum(per_sample)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        check_finite(PROG, loss, step, "--finetune-lr")
        l_t, l_r = b.group_means(per_sample)
        history.append({"step": step, "loss": loss.item(), "target": l_t.item(),
                        "replay": None if n_replay == 0 else l_r.item()})
        if log_step(step, args.steps):
            rep_txt = f"  replay {l_r.item():.4f}" if n_replay else ""
            print(f"finetune step {step:6d}  loss {loss.item():.4f}  target {l_t.item():.4f}"
                  f"{rep_txt}  {time.time() - t0:.0f}s", flush=True)

    unet.eval()
    after = {"target_loss": eval_loss(unet, scheduler, target_images, device, args.seed + 4),
             "retention_loss": eval_loss(unet, scheduler, bank_images, device, args.seed + 5)}
    print(f"{PROG}: after: target loss {after['target_loss']:.4f}, retention loss "
          f"{after['retention_loss']:.4f}", flush=True)
    gen = ddim_sampler(unet, scheduler.config, args.bank_steps, args.resolution, device)
    samples = gen(args.samples, torch.Generator().manual_seed(args.seed + 6)).cpu()

    summary.update({
        "source": source,
        "data": args.data or f"built-in:{args.target_style}",
        "num_target_images": target_images.shape[0],
        "steps": args.steps,
        "batch": args.batch,
        "num_target": n_target,
        "num_replay": n_replay,
        "tau": dt.adapt.tau,
        "retain_tau": dt.retain.tau,
        "replay_share": dt.replay_share,
        "retention_weight": dt.retention_weight,
        "timestep_mode": dt.mode,
        "loss_kind": args.loss,
        "resolution": args.resolution,
        "null_condition": "none (unconditional model: replay rows use the same unconditional input)",
        "before": before,
        "after": after,
        "final_loss": history[-1]["loss"],
        "losses": history,
    })
    k = args.samples
    save_run(PROG, args.out, unet, scheduler, [target_images[:k], bank_images[:k].cpu(), samples],
             summary, t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
