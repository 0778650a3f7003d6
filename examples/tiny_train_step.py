"""A few training steps of a tiny denoiser with fastsoup's AGC loss.

Runs anywhere (CPU or GPU) in seconds and shows the two lines that replace a diffusers
training script's loss block:

    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")   # before
    loss, stats = fs.agc_loss(model_pred, target, timesteps=timesteps, bank=bank)  # after

Usage: python examples/tiny_train_step.py [--steps 20] [--batch 16] [--device cpu]
"""
import argparse
import time

import torch

import fastsoup as fs


def make_model(channels: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 32, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.SiLU(),
        torch.nn.Conv2d(32, channels, 3, padding=1),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=16, help="image side in pixels")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    # A coarse 50-step schedule so that the per-timestep bank fills within a few steps
    # (real models use 1000; the bank rule is the same).
    T = 50
    betas = torch.linspace(1e-4 * 20, 0.02 * 20, T, device=device).clamp(max=0.999)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)

    # A tiny dataset with four exact duplicates of one image: the "memorised" samples.
    data = torch.randn(64, 3, args.size, args.size, device=device)
    data[:4] = data[0]

    model = make_model(3).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    bank = fs.AGCMemoryBank(num_timesteps=T, ratio=2.0, decay=0.8).to(device)

    print(f"fastsoup {fs.__version__}: {args.steps} AGC training steps on {device}")
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, data.shape[0], (args.batch,), device=device)
        x0 = data[idx]
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, T, (args.batch,), device=device)
        a = alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
        model_pred = model(a * x0 + s * noise)

        loss, stats = fs.agc_loss(model_pred, noise, timesteps=timesteps, bank=bank)

        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            d = stats.as_dict()
            excl = d["mean_excluded_loss"]
            excl_s = f"{excl:.4f}" if excl == excl else "-"
            print(f"  step {step:4d}  loss {loss.item():.4f}  kept {d['kept']:3d}/{d['total']}"
                  f"  mean excluded loss {excl_s}")
    dt = time.perf_counter() - t0
    print(f"done in {dt:.2f} s; bank filled for {int((bank.count > 0).sum())} of {T} timesteps")


if __name__ == "__main__":
    main()
