"""Train a diffusers UNet2DModel on noisy data only, with fastsoup's ambient (double-Tweedie) loss.

    python examples/train_ambient.py --data path/to/images --tn 100 --steps 5000
    python examples/train_ambient.py --tn 500 --consistency-weight 0.01 --consistency-after 2000
    python examples/train_ambient.py --mode eps --tn 100          # epsilon-mode ambient loss
    python examples/train_ambient.py --smoke                      # a few steps on built-in data (CI)

The model never sees a clean image. Every training example is observed once, at the
data noise level ``t_n`` of a 1000-step DDPM schedule: ``x_n = a_n x_0 + s_n eta`` with
``a_n = sqrt(alphas_cumprod[t_n])``, ``s_n = sqrt(1 - alphas_cumprod[t_n])`` and ONE fixed
noise draw ``eta`` per example for the whole run (``fs.train.ambient_vp_dataset``;
``--noise-cache DIR`` also pins the draws on disk). Uses only fastsoup's public API:

* ``fs.train.ambient_vp_batch``: draws ``t ~ U{t_n, ..., 999}`` and the extra noise ``z``
  and forms the network input ``x_t = (a_t/a_n) x_n + b z``;
* ``fs.ambient_loss_vp`` (through ``batch.loss``): the double-Tweedie loss of the
  epsilon-predicting UNet, ``--mode x0`` (default, the reference configs) or ``--mode eps``;
* optionally (``--consistency-weight c > 0``, from step ``--consistency-after`` on), the
  consistency loss below ``t_n``: from an anchor ``x_t`` (``t >= t_n``) two independent
  reverse samples ``x_s`` (``s < t_n``) are drawn in one fused call of
  ``fs.vp_reverse_step_from_eps`` (``--consistency-steps 2``: through an intermediate
  level, one model call per chain), and ``fs.consistency_loss_eps`` penalises
  ``mean[(h_1 - h_t)(h_2 - h_t)]`` (``h`` the x0-predictions, formed inside the kernel);
  the anchor is a constant unless ``--anchor-grad``. Total loss ``L_ambient + c L_c``;
* ``fs.train.sample_early_stop``: DDIM sampling down to ``t_n`` (``--sample-stop``, default
  ``t_n``; 0 samples all the way down, which makes sense after consistency training),
  then one Tweedie step.

Outputs in ``--out``: a diffusers ``DDPMPipeline`` folder (``model_index.json``, ``unet/``,
``scheduler/``; ``UNet2DModel.from_pretrained(out + "/unet")`` loads the model; sample it
with ``fs.train.sample_early_stop``, since the pipeline's own loop runs past ``t_n`` to 0),
``grid.png`` (first row: noisy training examples as the model saw them; then samples) and
``train_ambient.json`` (summary).

The image folder is read with Pillow (every .png/.jpg/.jpeg/.webp below it), resized to
``--resolution`` and scaled to [-1, 1]. Without ``--data``, built-in procedural images are
used (``--style``). ``--smoke`` shrinks everything (16 px, width 8, 3 steps, 2 sampler
steps) and switches the consistency loss on from step 1 (weight 0.01) so that every code
path runs; it finishes in seconds on a CPU.
"""
import math
import os
import time

import torch

import fastsoup as fs
from fastsoup.train.data import STYLES, nearest_neighbour_rms, small_unet

from _common import (NUM_TRAIN_TIMESTEPS, add_run_args, add_training_args, check_at_least_one,
                     check_device, check_finite, check_model_args, check_style, fail,
                     folder_or_style, import_diffusers, log_step, make_parser, seed_run,
                     save_run, smoke_defaults)

PROG = "train_ambient"


def parse_args(argv=None):
    ap = make_parser(PROG, __doc__)
    ap.add_argument("--data", help="image folder (default: built-in procedural images)")
    ap.add_argument("--style", default="rings", help=f"built-in style without --data: {', '.join(STYLES)}")
    ap.add_argument("--num-images", type=int, default=64, help="built-in images to generate")
    ap.add_argument("--tn", type=int, default=100,
                    help="data noise timestep t_n in [0, 999] of the DDPM schedule (default 100)")
    ap.add_argument("--mode", choices=["x0", "eps"], default="x0", help="ambient loss mode")
    ap.add_argument("--max-timestep", type=int, default=NUM_TRAIN_TIMESTEPS - 1,
                    help="largest training timestep of the ambient loss (x0-mode weights grow "
                         "like 1/alphas_cumprod[t] near the end of the schedule)")
    ap.add_argument("--consistency-weight", type=float, default=None,
                    help="weight c of the consistency loss below t_n (default 0: off)")
    ap.add_argument("--consistency-after", type=int, default=None,
                    help="first step with the consistency loss (default 0)")
    ap.add_argument("--consistency-steps", type=int, choices=[1, 2], default=1,
                    help="reverse steps from the anchor t down to s")
    ap.add_argument("--max-steps-diff", type=int, default=100,
                    help="largest t - s of the consistency loss (in schedule timesteps)")
    ap.add_argument("--anchor-grad", action="store_true",
                    help="let the consistency gradient reach the anchor prediction")
    add_training_args(ap, steps=2000)
    ap.add_argument("--samples", type=int, default=16, help="samples in the grid")
    ap.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the sampler")
    ap.add_argument("--sample-stop", type=int, default=None,
                    help="timestep where sampling stops with a Tweedie step (default t_n)")
    ap.add_argument("--noise-cache", help="directory that pins the fixed noise draws on disk")
    add_run_args(ap, out="train-ambient-out")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_defaults(ap, args, steps=3, batch=4, resolution=16, width=8, num_images=8,
                       samples=4, sample_steps=2)
        if args.consistency_weight is None:
            args.consistency_weight = 0.01
        if args.consistency_after is None:
            args.consistency_after = 1
    if args.consistency_weight is None:
        args.consistency_weight = 0.0
    if args.consistency_after is None:
        args.consistency_after = 0
    if args.sample_stop is None:
        args.sample_stop = args.tn
    check_args(args)
    return args


def check_args(args) -> None:
    T = NUM_TRAIN_TIMESTEPS
    if not 0 <= args.tn < T:
        raise fail(PROG, f"--tn must be in [0, {T - 1}] (a timestep of the {T}-step schedule), "
                         f"got {args.tn}")
    if not args.tn <= args.max_timestep < T:
        raise fail(PROG, f"--max-timestep must be in [t_n={args.tn}, {T - 1}], got {args.max_timestep}")
    if not 0 <= args.sample_stop < T:
        raise fail(PROG, f"--sample-stop must be in [0, {T - 1}], got {args.sample_stop}")
    check_at_least_one(PROG, args, ("steps", "batch", "samples", "sample_steps", "num_images",
                                    "max_steps_diff"))
    check_model_args(PROG, args)
    if not (args.consistency_weight >= 0 and math.isfinite(args.consistency_weight)):
        raise fail(PROG, f"--consistency-weight must be a finite number >= 0, "
                         f"got {args.consistency_weight}")
    if args.consistency_after < 0:
        raise fail(PROG, f"--consistency-after must be >= 0, got {args.consistency_after}")
    if args.consistency_weight > 0 and args.tn == 0:
        raise fail(PROG, "the consistency loss acts below t_n: it needs --tn >= 1")
    if args.data is None:
        check_style(PROG, "--style", args.style)
    check_device(PROG, args.device)


def consistency_timesteps(B: int, t_n: int, max_diff: int, g: torch.Generator):
    """Anchor ``t >= t_n`` and target ``s < t_n`` with ``t - s <= max_diff`` (per sample, CPU)."""
    lo = max(0, t_n - max_diff)
    s = torch.randint(lo, t_n, (B,), generator=g)
    hi = torch.clamp(s + max_diff, max=NUM_TRAIN_TIMESTEPS - 1)     # >= t_n since s >= t_n - max_diff
    t = t_n + (torch.rand(B, generator=g) * (hi - t_n + 1)).floor().long()
    return torch.minimum(t, hi), s


def consistency_term(unet, x_n, scheduler, args, g: torch.Generator, device):
    """``fs.consistency_loss_eps`` between the anchor and two reverse samples below ``t_n``."""
    B = x_n.shape[0]
    t, s = consistency_timesteps(B, args.tn, args.max_steps_diff, g)
    t, s = t.to(device), s.to(device)
    # the anchor: x_t from the noisy data exactly as in the ambient loss (t >= t_n)
    anchor = fs.train.ambient_vp_batch(x_n, scheduler, args.tn, timesteps=t, generator=g)
    x_t = anchor.x_t
    with torch.set_grad_enabled(args.anchor_grad):
        eps_t = unet(x_t, t).sample
    with torch.no_grad():                          # reverse samples carry no gradient
        if args.consistency_steps == 1:
            path = [t, s]
        else:                                       # t -> m -> s, m drawn between them
            u = torch.rand(B, generator=g).to(device)
            m = torch.minimum(s + 1 + (u * (t - s - 1).clamp_min(0)).floor().long(), t)
            path = [t, m, s]
        c = fs.vp_reverse_step_coefficients(scheduler, path[0], path[1])
        xi = [torch.randn(x_t.shape, generator=g).to(device, x_t.dtype) for _ in range(2)]
        # one fused call writes both samples from the shared (x_t, eps_t)
        x1, x2 = fs.vp_reverse_step_from_eps(x_t, eps_t.detach(), xi, c.alpha_t, c.sigma_t,
                                             c.alpha_s, c.c_o, c.c_f)
        if len(path) == 3:
            m, s2 = path[1], path[2]
            c = fs.vp_reverse_step_coefficients(scheduler, m, s2)
            eps_m = unet(torch.cat([x1, x2]), torch.cat([m, m])).sample
            xi = torch.randn((2 * B,) + x_t.shape[1:], generator=g).to(device, x_t.dtype)
            xs = fs.vp_reverse_step_from_eps(torch.cat([x1, x2]), eps_m, xi,
                                             c.alpha_t.repeat(2), c.sigma_t.repeat(2),
                                             c.alpha_s.repeat(2), c.c_o.repeat(2), c.c_f.repeat(2))
            x1, x2 = xs[:B], xs[B:]
    eps_s = unet(torch.cat([x1, x2]), torch.cat([s, s])).sample     # with gradient
    a_s, s_s = fs.vp_alpha_sigma(scheduler, s)
    return fs.consistency_loss_eps(x_t, eps_t, anchor.alpha_t, anchor.sigma_t,
                                   x1, eps_s[:B], x2, eps_s[B:], a_s, s_s,
                                   stop_anchor_grad=not args.anchor_grad)


def sampler_timesteps(num_steps: int, stop: int) -> list:
    """``num_steps + 1`` evenly spaced, strictly decreasing timesteps from ``T - 1`` to ``stop``."""
    ts = torch.linspace(NUM_TRAIN_TIMESTEPS - 1, stop, num_steps + 1).round().long()
    return torch.unique_consecutive(ts).tolist()


def main(argv=None) -> int:
    args = parse_args(argv)
    diffusers = import_diffusers(PROG)

    t_start = time.time()
    device, g = seed_run(args.seed, args.device)     # g: CPU generator, same run on any device

    clean = folder_or_style(PROG, args.data, args.style, args.num_images, args.resolution, args.seed)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)   # epsilon prediction

    # ---- the data: each example noised once, at t_n, with its own fixed draw ----
    dataset = fs.train.ambient_vp_dataset(clean, scheduler, args.tn, seed=args.seed,
                                          cache_dir=args.noise_cache)
    x_n_all = torch.stack([dataset[i] for i in range(len(dataset))])   # all the model ever sees
    # (`clean` is kept only for the memorisation measure after sampling; training never reads it)
    print(f"{PROG}: {len(dataset)} images at t_n={args.tn} (alpha_n={dataset.alpha_n:.4f}, "
          f"sigma_n={dataset.sigma_n:.4f}), {args.resolution}px, mode={args.mode}, "
          f"consistency weight {args.consistency_weight} from step {args.consistency_after}", flush=True)

    unet = small_unet(args.resolution, args.width).to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    history = []
    last_cons = None
    for step in range(args.steps):
        idx = torch.randint(0, x_n_all.shape[0], (args.batch,), generator=g)
        x_n = x_n_all[idx].to(device)
        # ---- the ambient loss: t >= t_n, x_t = a x_n + b z, double Tweedie on eps ----
        batch = fs.train.ambient_vp_batch(x_n, scheduler, args.tn, generator=g,
                                          max_timestep=args.max_timestep)
        eps = unet(batch.x_t, batch.timesteps).sample
        loss_amb = batch.loss(eps, mode=args.mode)
        loss = loss_amb
        use_cons = args.consistency_weight > 0 and step >= args.consistency_after
        if use_cons:
            loss_c = consistency_term(unet, x_n, scheduler, args, g, device)
            loss = loss + args.consistency_weight * loss_c
            last_cons = loss_c.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        check_finite(PROG, loss, step, "--lr")
        history.append({"step": step, "ambient": loss_amb.item(),
                        **({"consistency": last_cons} if use_cons else {})})
        if log_step(step, args.steps):
            extra = f"  consistency {last_cons:+.5f}" if use_cons else ""
            print(f"step {step:6d}  ambient {loss_amb.item():.4f}{extra}  "
                  f"{time.time() - t_start:.0f}s", flush=True)

    # ---- sampling: reverse steps down to the stop level, then one Tweedie step ----
    unet.eval()
    ts = sampler_timesteps(args.sample_steps, args.sample_stop)
    gs = torch.Generator().manual_seed(args.seed + 2)
    x_T = torch.randn(args.samples, 3, args.resolution, args.resolution, generator=gs).to(device)
    samples = fs.train.sample_early_stop(unet, x_T, scheduler, ts, args.sample_stop).cpu()
    nn_rms = nearest_neighbour_rms(samples.clamp(-1, 1), clean)
    print(f"sampled {args.samples} images in {len(ts)} model calls, stop at t={args.sample_stop}; "
          f"mean RMS to nearest clean training image {nn_rms.mean().item():.3f}", flush=True)

    summary = {
        "script": PROG,
        "t_n": args.tn,
        "alpha_n": dataset.alpha_n,
        "sigma_n": dataset.sigma_n,
        "mode": args.mode,
        "max_timestep": args.max_timestep,
        "consistency_weight": args.consistency_weight,
        "consistency_after": args.consistency_after,
        "consistency_steps": args.consistency_steps,
        "steps": args.steps,
        "batch": args.batch,
        "resolution": args.resolution,
        "num_images": len(dataset),
        "data": args.data or f"built-in:{args.style}",
        "seed": args.seed,
        "device": str(device),
        "final_ambient_loss": history[-1]["ambient"],
        "final_consistency_loss": last_cons,
        "losses": history,
        "samples": args.samples,
        "sample_stop": args.sample_stop,
        "sampler_timesteps": ts,
        "nearest_clean_rms_mean": nn_rms.mean().item(),
    }
    # a diffusers pipeline folder (model_index.json, unet/, scheduler/); note that
    # DDPMPipeline's own sampler runs down to t = 0, past the data noise level
    save_run(PROG, args.out, unet, scheduler, [x_n_all[:args.samples], samples], summary, t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
