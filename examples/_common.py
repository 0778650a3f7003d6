"""What the training examples share: arguments, checks, data, the loop's log cadence, outputs.

Imported by ``train_agc.py``, ``train_ambient.py`` and ``train_difftuning.py`` (run as
scripts, ``python examples/<script>.py``: Python puts ``examples/`` first on ``sys.path``).
Like the scripts, it uses only fastsoup's public API. Every error a script reports for a
bad flag is a ``SystemExit`` with ``"<prog>: error: <message>"`` (no traceback).
"""
import argparse
import json
import math
import os
import time
from typing import Iterable, List, Optional

import torch

from fastsoup.train.data import STYLES, load_image_folder, procedural_images, save_image_grid

NUM_TRAIN_TIMESTEPS = 1000       # the DDPM schedule every example trains with


def fail(prog: str, msg: str) -> SystemExit:
    """The ``SystemExit`` a script raises for a bad flag or input."""
    return SystemExit(f"{prog}: error: {msg}")


# ----------------------------------------------------------------------------- arguments
def make_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser described by the script's docstring: its first line, then the usage lines."""
    lines = doc.split("\n")
    return argparse.ArgumentParser(prog=prog, description=lines[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(lines[1:6]))


def add_training_args(ap: argparse.ArgumentParser, *, steps: int, steps_help: Optional[str] = None,
                      lr_help: Optional[str] = None) -> None:
    """``--steps --batch --resolution --width --lr`` (batch 32, 32 px, width 32, lr 2e-4)."""
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--width", type=int, default=32, help="UNet base channels (multiple of 8)")
    ap.add_argument("--lr", type=float, default=2e-4, help=lr_help)


def add_run_args(ap: argparse.ArgumentParser, out: str) -> None:
    """``--out --device --seed --smoke``."""
    ap.add_argument("--out", default=out)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny run on built-in data (CI)")


def smoke_defaults(ap: argparse.ArgumentParser, args: argparse.Namespace, **values) -> None:
    """``--smoke``: replace the options still at their parser default by tiny values
    (flags given explicitly, other than at their default, win)."""
    for name, value in values.items():
        if getattr(args, name) == ap.get_default(name):
            setattr(args, name, value)


# ----------------------------------------------------------------------------- checks
def check_at_least_one(prog: str, args: argparse.Namespace, names: Iterable[str]) -> None:
    """Each of the integer options ``names`` is ``>= 1``."""
    for name in names:
        if getattr(args, name) < 1:
            raise fail(prog, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def check_model_args(prog: str, args: argparse.Namespace, rates: Iterable[str] = ("lr",)) -> None:
    """``--resolution`` and ``--width`` fit the small UNet; the learning ``rates`` are > 0."""
    if args.resolution < 8 or args.resolution % 4:
        raise fail(prog, f"--resolution must be a multiple of 4 and >= 8 (the UNet halves it "
                         f"twice), got {args.resolution}")
    if args.width < 8 or args.width % 8:
        raise fail(prog, f"--width must be a positive multiple of 8 (GroupNorm groups), got {args.width}")
    for name in rates:
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            raise fail(prog, f"--{name.replace('_', '-')} must be a positive number, got {v}")


def check_style(prog: str, flag: str, style: str) -> None:
    """``style`` names a built-in procedural style (``flag`` is the option that gave it)."""
    if style not in STYLES:
        raise fail(prog, f"{flag} must be one of {', '.join(STYLES)}, got {style!r}")


def check_device(prog: str, name: str) -> None:
    """``--device`` parses and, for CUDA, a GPU is there."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise fail(prog, f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail(prog, "--device cuda but no CUDA GPU is available (use --device cpu)")


def check_finite(prog: str, loss: torch.Tensor, step: int, lr_flag: str) -> None:
    """Stop with a message (not a traceback) when the loss stops being finite."""
    if not math.isfinite(loss.item()):
        raise SystemExit(f"{prog}: non-finite loss at step {step}; lower {lr_flag}")


# ----------------------------------------------------------------------------- data
def load_folder(prog: str, folder: str, resolution: int) -> torch.Tensor:
    """Every image below ``folder`` in ``[-1, 1]`` (``fastsoup.train.data.load_image_folder``)."""
    try:
        return load_image_folder(folder, resolution)
    except ValueError as exc:
        raise fail(prog, f"--data: {exc}") from None


def folder_or_style(prog: str, folder: Optional[str], style: str, num_images: int,
                    resolution: int, seed: int) -> torch.Tensor:
    """The images of ``--data`` when given, else ``num_images`` built-in ``style`` images."""
    if folder:
        return load_folder(prog, folder, resolution)
    return procedural_images(style, num_images, resolution, seed=seed)


# ----------------------------------------------------------------------------- the run
def import_diffusers(prog: str):
    """The ``diffusers`` module, or a clear exit when it is not installed."""
    try:
        import diffusers
    except ImportError:
        raise fail(prog, "this example needs diffusers (pip install diffusers)") from None
    return diffusers


def seed_run(seed: int, device: str):
    """Seed torch's global RNG; return ``(device, g)`` with ``g`` a CPU generator seeded
    ``seed + 1`` (drawing from it gives the same run on any device)."""
    torch.manual_seed(seed)
    return torch.device(device), torch.Generator().manual_seed(seed + 1)


def log_step(step: int, steps: int, times: int = 10) -> bool:
    """Whether ``step`` of ``steps`` prints a progress line (about ``times`` lines, and the last)."""
    return step % max(1, steps // times) == 0 or step == steps - 1


def write_summary(out: str, prog: str, summary: dict) -> None:
    """``OUT/<prog>.json``, then the closing ``saved to`` line."""
    with open(os.path.join(out, f"{prog}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"saved to {os.path.abspath(out)}")


def save_run(prog: str, out: str, unet, scheduler, grid_rows: List[torch.Tensor], summary: dict,
             t_start: float) -> None:
    """A run's outputs in ``out``: a diffusers ``DDPMPipeline`` folder (``model_index.json``,
    ``unet/``, ``scheduler/``), ``grid.png`` (one row of images per entry of ``grid_rows``)
    and ``<prog>.json``: ``summary`` followed by ``model``, ``grid`` and ``seconds``."""
    from diffusers import DDPMPipeline

    os.makedirs(out, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out)
    grid = os.path.join(out, "grid.png")
    save_image_grid(grid_rows, grid)
    summary.update({
        "model": os.path.abspath(os.path.join(out, "unet")),
        "grid": os.path.abspath(grid),
        "seconds": round(time.time() - t_start, 2),
    })
    write_summary(out, prog, summary)
