"""Shared pieces of the fidelity experiments: a small MLP ε-network, a VP schedule,
Gaussian-mixture data with its closed-form Bayes-optimal denoiser, an ancestral sampler
built on ``fs.vp_reverse_step_from_eps``, and the results-table writer.

Everything runs on CPU with one torch thread, in float32. Each experiment is a script with
``--size smoke|full`` (default ``FASTSOUP_BENCH_SIZE`` or ``full``) writing
``benchmarks/results/fidelity-<name>-<date>.{md,json}`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

import fastsoup as fs

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
T = 1000


def linear_alphas_cumprod(num: int = T) -> Tensor:
    """DDPM's linear schedule (β from 1e-4 to 0.02 over 1000 steps): ``ᾱ_t``, float32 ``[T]``."""
    betas = torch.linspace(1e-4, 0.02, num, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


class MLPDenoiser(nn.Module):
    """ε-network for ``[B, D]`` data: ``(x_t, t) → ε̂``, with a sinusoidal embedding of
    ``t / T`` concatenated to the input of every hidden layer's first layer."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, freqs: int = 8):
        super().__init__()
        self.freqs = freqs
        layers: List[nn.Module] = []
        width = dim + 2 * freqs
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        u = (t.float() / T).unsqueeze(1) * (2.0 ** torch.arange(self.freqs, device=x.device)) * math.pi
        return self.net(torch.cat([x, torch.sin(u), torch.cos(u)], 1))


class GaussianMixture:
    """``K`` isotropic Gaussians ``N(μ_k, s² I)`` in ``D`` dimensions, equal weights."""

    def __init__(self, dim: int, components: int, spread: float, std: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.means = torch.randn(components, dim, generator=g) * spread
        self.std = std

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.randint(0, self.means.shape[0], (n,), generator=generator)
        return self.means[k] + self.std * torch.randn(n, self.means.shape[1], generator=generator)

    def posterior_mean(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """``E[x_0 | x_t]`` for ``x_t = α x_0 + σ ε`` (``alpha``, ``sigma``: ``[B]``)."""
        a, s = alpha.double().unsqueeze(1), sigma.double().unsqueeze(1)
        x = x_t.double()
        mu = self.means.double()
        var = a ** 2 * self.std ** 2 + s ** 2                                   # [B, 1]
        d2 = ((x.unsqueeze(1) - a.unsqueeze(1) * mu.unsqueeze(0)) ** 2).sum(-1)  # [B, K]
        w = torch.softmax(-d2 / (2 * var), dim=1)
        cond = mu.unsqueeze(0) + (a * self.std ** 2 / var).unsqueeze(1) * (
            x.unsqueeze(1) - a.unsqueeze(1) * mu.unsqueeze(0))                  # [B, K, D]
        return (w.unsqueeze(-1) * cond).sum(1)

    def optimal_eps(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The Bayes-optimal ε-prediction ``(x_t − α E[x_0|x_t]) / σ``."""
        x0 = self.posterior_mean(x_t, alpha, sigma)
        return ((x_t.double() - alpha.double().unsqueeze(1) * x0) / sigma.double().unsqueeze(1)).float()


@torch.no_grad()
def ancestral_sample(model: nn.Module, noise: Tensor, alphas_cumprod: Tensor, steps: int,
                     generator: torch.Generator, stop: int = 0) -> Tensor:
    """DDPM ancestral sampling on ``steps`` evenly spaced timesteps from ``T − 1`` down to
    ``stop`` with ``fs.vp_reverse_step_from_eps``, then one Tweedie step to ``x̂_0``."""
    num = alphas_cumprod.numel()
    ts = torch.linspace(num - 1, stop, steps + 1).round().long().tolist()
    x = noise.clone()
    B = x.shape[0]
    for t, s in zip(ts[:-1], ts[1:]):
        tt = torch.full((B,), t, dtype=torch.long)
        eps = model(x, tt)
        c = fs.vp_reverse_step_coefficients(alphas_cumprod, tt, torch.full((B,), s, dtype=torch.long))
        xi = torch.randn(x.shape, generator=generator)
        x = fs.vp_reverse_step_from_eps(x, eps, xi, c.alpha_t, c.sigma_t, c.alpha_s, c.c_o, c.c_f)
    tt = torch.full((B,), ts[-1], dtype=torch.long)
    a, s = fs.vp_alpha_sigma(alphas_cumprod, tt)
    return (x - s.unsqueeze(1) * model(x, tt)) / a.unsqueeze(1)


# ----------------------------------------------------------------------------- CLI and tables
def parse_args(description: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--size", choices=["smoke", "full"],
                    default=os.environ.get("FASTSOUP_BENCH_SIZE", "full")
                    if os.environ.get("FASTSOUP_BENCH_SIZE") in ("smoke", "full") else "full",
                    help="smoke: seconds, checks the pipeline (CI); full: the measured table")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default by size)")
    ap.add_argument("--out", default=None,
                    help="output stem (default benchmarks/results/fidelity-<name>-<date>)")
    return ap.parse_args(argv)


def setup_threads() -> None:
    torch.set_num_threads(1)


def start(doc: str, sizes: dict, argv: Optional[Sequence[str]] = None):
    """What every experiment's ``main`` begins with: ``(args, cfg, seeds, alphas_cumprod)``
    from the command line (one torch thread; ``cfg`` a copy of ``sizes[--size]``)."""
    args = parse_args(doc.split("\n")[0], argv)
    setup_threads()
    cfg = dict(sizes[args.size])
    return args, cfg, args.seeds or cfg["seeds"], linear_alphas_cumprod()


def environment() -> Dict:
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):  # pragma: no cover
        load = None
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.system()} {platform.release()}",
        "loadavg_at_end": load,
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "fastsoup": fs.__version__},
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
        if sys.argv and sys.argv[0].endswith(".py") else "(called from a test)",
    }


def write_results(name: str, args: argparse.Namespace, title: str, header: List[str],
                  rows: List[List], notes: List[str], data: Dict, timer: "Timer") -> str:
    """Write ``<stem>.md`` (a table with date, machine, versions, command, the run's wall
    and CPU time) and ``<stem>.json``; return the markdown path."""
    env = environment()
    seconds, cpu = timer.seconds, timer.cpu_seconds
    load = env["loadavg_at_end"]
    load_text = ("load average (1/5/15 min) at the end " + " / ".join(f"{x:.2f}" for x in load)
                 if load else "load average unknown")
    stem = args.out or os.path.join(RESULTS, f"fidelity-{name}-{env['date']}"
                                    + ("-smoke" if args.size == "smoke" else ""))
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    md = [f"# {title}", "",
          f"{env['date']}; {env['machine']}; {load_text}; "
          f"{env['torch_threads']} torch thread(s); python {env['versions']['python']}, torch "
          f"{env['versions']['torch']}, fastsoup {env['versions']['fastsoup']}; size `{args.size}`; "
          f"{seconds:.0f} s, {cpu:.0f} s of CPU (the process, all threads).", "",
          f"Command: `{env['command']}`", "",
          "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        md.append("| " + " | ".join(_fmt(v) for v in r) + " |")
    md += [""] + [f"* {n}" for n in notes] + [""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md))
    with open(stem + ".json", "w") as f:
        json.dump({"name": name, "title": title, "environment": env, "size": args.size,
                   "seconds": seconds, "cpu_seconds": cpu, "header": header, "rows": rows, "notes": notes,
                   "data": data}, f, indent=2)
    return stem + ".md"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def mean_sd(xs: Sequence[float]) -> str:
    xs = list(xs)
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:.4g}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.4g} ± {sd:.2g}"


class Timer:
    """Wall time (``seconds``) and the process's CPU time, every thread (``cpu_seconds``)."""

    def __enter__(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0
