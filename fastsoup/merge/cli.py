"""``fastsoup-merge`` (also ``fastsoup merge``): a thin command line over
:func:`fastsoup.merge`.

    fastsoup-merge A B C -o OUT                 uniform mean
    fastsoup-merge A B C -o OUT --weights 0.5,0.3,0.2
    fastsoup-merge A B -o OUT --base BASE --weights 0.7,0.3 (task arithmetic)
    fastsoup-merge add SOUP NEW -o OUT          add a constituent to a soup
    fastsoup-merge remove SOUP OLD -o OUT       remove one

Exit status: 0 success, 1 the merge was refused or failed (the message says why; nothing
is left at OUT), 2 bad usage, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import List, Optional

from .options import ACCUMULATE, DEFAULT_MEMORY_TEXT, DTYPE_NAMES, HASH_MODES, KEY_POLICIES

PROG = "fastsoup-merge"


def _weights(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be comma-separated numbers, got {text!r}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", help="output path (file or directory, mirroring the "
                   "first input's layout); optional with --dry-run")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES),
                   help="output dtype of floating tensors (default: each tensor's input dtype)")
    p.add_argument("--accumulate", choices=list(ACCUMULATE), default=None,
                   help="accumulation precision (default fp32)")
    p.add_argument("--keys", choices=list(KEY_POLICIES), default=None,
                   help="key policy (default strict: every input must hold every key)")
    p.add_argument("--variant", help="diffusers weight variant, e.g. fp16")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load .ckpt/.bin/.pt inputs with torch.load(weights_only=True)")
    p.add_argument("--max-shard-size", help="re-shard outputs: 5GB = 5e9 bytes, 5GiB = 5*2^30")
    p.add_argument("--memory", default=DEFAULT_MEMORY_TEXT,
                   help=f"streaming buffer budget (default {DEFAULT_MEMORY_TEXT}; units as "
                   "--max-shard-size)")
    p.add_argument("--threads", type=int, help="CPU threads for the sum (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--hash", choices=list(HASH_MODES), default=HASH_MODES[0],
                   help="content hashes of the inputs in the manifest (default sha256)")
    p.add_argument("--drop-cache", action="store_true",
                   help="drop consumed input ranges from the page cache (inputs larger than RAM)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, the validation report and estimates; write nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (only once the new one is complete; a "
                   "directory only if it is a previous fastsoup output)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "add":
        p = argparse.ArgumentParser(prog=f"{PROG} add", description="Add a constituent to a "
                                    "soup, recomputing it from the constituents in its manifest.")
        p.add_argument("soup")
        p.add_argument("new")
        p.add_argument("--weight", type=float, help="raw weight of the new constituent "
                       "(default: the soup's common raw weight)")
    elif command == "remove":
        p = argparse.ArgumentParser(prog=f"{PROG} remove", description="Remove a constituent "
                                    "from a soup, recomputing it from the others.")
        p.add_argument("soup")
        p.add_argument("old")
    else:
        p = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n\n")[0],
                                    epilog="Subcommands: `add SOUP NEW -o OUT`, "
                                    "`remove SOUP OLD -o OUT`.")
        p.add_argument("inputs", nargs="+", help=".safetensors files, sharded directories, "
                       "diffusers roots")
        p.add_argument("--weights", type=_weights, help="comma-separated raw weights, e.g. 0.5,0.3,0.2")
        norm = p.add_mutually_exclusive_group()
        norm.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                          help="divide the weights by their sum (default without --base)")
        norm.add_argument("--no-normalize", dest="normalize", action="store_false",
                          help="use the weights as given (default with --base)")
        p.add_argument("--base", help="θ0 for task arithmetic: θ0 + Σ w_i (θ_i − θ0)")
    _common(p)
    return p


def _options(args) -> dict:
    opts = dict(dtype=args.dtype, variant=args.variant, allow_pickle=args.allow_pickle,
                max_shard_size=args.max_shard_size, memory=args.memory, threads=args.threads,
                device=args.device, dry_run=args.dry_run, overwrite=args.overwrite,
                quiet=True if (args.quiet or args.json) else None, hash=args.hash,
                drop_cache=args.drop_cache)
    if args.keys is not None:
        opts["keys"] = args.keys
    if args.accumulate is not None:
        opts["accumulate"] = args.accumulate
    return opts


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("add", "remove") else "merge"
    parser = build_parser(command)
    args = parser.parse_args(argv[1:] if command != "merge" else argv)
    if args.output is None and not args.dry_run:
        parser.error("the following arguments are required: -o/--output")

    from .api import merge
    from .errors import MergeError, PlanError
    from .soup import soup_add, soup_remove

    previous = None
    try:  # SIGTERM cleans up like Ctrl-C (the temporary output is removed)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        opts = _options(args)
        if command == "add":
            if args.dtype is None:
                opts.pop("dtype")
            report = soup_add(args.soup, args.new, args.output, weight=args.weight, **opts)
        elif command == "remove":
            if args.dtype is None:
                opts.pop("dtype")
            report = soup_remove(args.soup, args.old, args.output, **opts)
        else:
            report = merge(args.inputs, args.output, args.weights, base=args.base,
                           normalize=args.normalize, **opts)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to {args.output}", file=sys.stderr)
        return 130
    except (MergeError, OSError) as exc:
        msg = str(exc) if isinstance(exc, MergeError) else \
            f"I/O error: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        if not isinstance(exc, MergeError):
            print(f"{PROG}: nothing was written to {args.output}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": msg,
                              "problems": exc.problems if isinstance(exc, PlanError) else []},
                             indent=2))
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for w in report.warnings:
        print(f"{PROG}: warning: {w}", file=sys.stderr)
    if args.json:
        print(report.to_json())
    elif not args.quiet:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
