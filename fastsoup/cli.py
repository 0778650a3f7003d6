"""Command line: ``fastsoup info``, ``fastsoup demo``, ``fastsoup merge`` (= ``fastsoup-merge``)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import List, Optional


def _info(args) -> int:
    import torch

    import fastsoup

    from . import _backend
    from .kernels import _ext

    lines = []
    data = {"fastsoup": fastsoup.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        import triton

        data["triton"] = triton.__version__
    except Exception as exc:  # pragma: no cover - depends on the machine
        data["triton"] = f"not available ({type(exc).__name__})"
    data["cuda_available"] = torch.cuda.is_available()
    data["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    c = _ext.cpu_ext(warn=False)
    if c is not None:
        data["_C"] = dict(c.build_info())
        if hasattr(c, "weighted_sum_simd"):  # the variant the merge kernel dispatches to
            data["_C"]["weighted_sum_simd"] = c.weighted_sum_simd()
    else:
        data["_C"] = f"not loaded ({_ext.load_error('_C')})"
    cu = _ext.cuda_ext(warn=False)
    data["_cuda"] = "loaded" if cu is not None else f"not loaded ({_ext.load_error('_cuda')})"
    data["FASTSOUP_BACKEND"] = __import__("os").environ.get("FASTSOUP_BACKEND", "")
    problems = _backend.backend_env_problems()
    if problems:
        data["FASTSOUP_BACKEND"] += "  [ignored: " + "; ".join(problems) + "]"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    import warnings

    with warnings.catch_warnings():  # the reasons are printed below instead
        warnings.simplefilter("ignore", RuntimeWarning)
        data["backends"] = {
            dev: {op: _what_runs(dev, op, ch, c is not None)
                  for op, ch in _backend.explain(dev).items()}
            for dev in devices
        }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    shown = dict(data)
    if isinstance(data["_C"], dict):
        b = data["_C"]
        simd = f"compiled for {b.get('simd')}"
        if b.get("weighted_sum_simd"):
            simd = (f"weighted_sum (merge) runs {b['weighted_sum_simd']} (chosen at run time), "
                    f"per_sample_mse runs the {b.get('simd')} build")
        shown["_C"] = (f"loaded ({b.get('compiler')}, {b.get('hardware_threads')} hardware threads); "
                       f"SIMD: {simd}")
    for key in ("fastsoup", "python", "torch", "torch_cuda", "triton", "cuda_available",
                "devices", "_C", "_cuda", "FASTSOUP_BACKEND"):
        lines.append(f"{key:>16}: {shown[key]}")
    for dev, ops in data["backends"].items():
        lines.append(f"backends for {dev} tensors (what runs, and why):")
        for op, ch in ops.items():
            lines.append(f"  {op:<22} {ch['runs']:<10} {ch['why']}")
    print("\n".join(lines))
    return 0


def _what_runs(device: str, op: str, choice, c_loaded: bool) -> dict:
    """``{"backend", "runs", "why"}`` for ``fastsoup info``: ``backend`` is the policy's
    choice; ``runs`` names the code that executes, which on CPU is the ``fastsoup._C``
    kernel inside the "reference" backend for the ops that have one."""
    from . import _backend

    runs, why = choice.backend, choice.reason
    note = _backend.CPU_NOTE.get(op, "")
    if device == "cpu" and choice.backend == "reference" and "fastsoup._C" in note:
        if c_loaded:
            runs = "_C"
        else:
            why = why.replace(note, "the PyTorch reference (fastsoup._C is not loaded)")
    return {"backend": choice.backend, "runs": runs, "why": why}


def _demo(args) -> int:
    from .demo import main_from_args

    return main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsoup", description=__doc__)
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"fastsoup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, devices and which backend each op uses, and why")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="train shard models with AGC + IET, soup them, sample; writes a report",
                       description=__import__("fastsoup.demo", fromlist=["_"]).__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    from .demo import add_arguments

    add_arguments(p)
    p.set_defaults(func=_demo)
    sub.add_parser("merge", add_help=False,
                   help="average checkpoints (same as fastsoup-merge; `fastsoup merge -h`)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":  # `fastsoup merge ...` == `fastsoup-merge ...`
        from .merge.cli import main as merge_main

        return merge_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
