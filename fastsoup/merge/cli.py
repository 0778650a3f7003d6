"""fastsoup-merge: average safetensors checkpoints, streaming, and keep soups up to date.

usage:
  fastsoup-merge INPUT INPUT... -o OUT [--weights W W...] [--base BASE] [options]
  fastsoup-merge add SOUP NEW -o OUT [--weight W] [options]
  fastsoup-merge remove SOUP OLD -o OUT [options]

Inputs are .safetensors files, Hugging Face sharded folders (*.index.json) and diffusers
roots (model_index.json). The output mirrors the first input's layout, is written to a
temporary name and appears at OUT only when complete. add and remove recompute a soup
from the constituents listed in its manifest (verified by size and sha256).

examples:
  fastsoup-merge a.safetensors b.safetensors c.safetensors -o soup.safetensors
  fastsoup-merge a.safetensors b.safetensors --weights 0.7 0.3 -o soup.safetensors
  fastsoup-merge sd-a/ sd-b/ --variant fp16 -o soup/
  fastsoup-merge a.safetensors b.safetensors --base base.safetensors --weights 0.5 0.5 -o ta.safetensors
  fastsoup-merge add soup.safetensors d.safetensors -o soup2.safetensors
  fastsoup-merge remove soup2.safetensors b.safetensors -o soup3.safetensors
  fastsoup-merge remove soup.safetensors b.safetensors -o s.safetensors --search /new/models
  fastsoup-merge a b c --dry-run

exit status: 0 success, 1 the merge was refused or failed (the message says why; nothing
is left at OUT), 2 bad usage, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import List, Optional

from .._version import __version__
from .options import ACCUMULATE, DEFAULT_DEVICE_MEMORY_TEXT, DEFAULT_MEMORY_TEXT, DTYPE_NAMES, HASH_MODES, KEY_POLICIES, METHODS

PROG = "fastsoup-merge"
VERBS = ("add", "remove")


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _split_weights(tokens: List[str]):
    """``--weights`` tokens → (weights, tokens that are not weights). ``0.7,0.3`` and
    ``0.7 0.3`` both work; the first token that is not a number ends the weights (an input
    path written after them)."""
    weights, rest = [], []
    for i, tok in enumerate(tokens):
        parts = [p for p in tok.split(",") if p.strip()]
        values = [_number(p) for p in parts]
        if not parts or any(v is None for v in values):
            rest = tokens[i:]
            break
        weights.extend(values)
    return weights, rest


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
    p.add_argument("--memory", default=None,
                   help=f"streaming buffer budget (default {DEFAULT_MEMORY_TEXT} on the CPU, "
                   f"{DEFAULT_DEVICE_MEMORY_TEXT} with --device cuda; units as --max-shard-size)")
    p.add_argument("--threads", type=int, help="CPU threads for the merge (default: all "
                   "cores): on the CPU each reads a slice of every safetensors input, sums "
                   "it and hashes it for the digests")
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
    p.add_argument("--metadata", action="append", metavar="KEY=VALUE", default=[],
                   help="an entry of the soup's metadata (repeatable); the soup keeps only the "
                   "input metadata all inputs share")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (every warning in full)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress, no warnings, no summary (errors still print)")
    p.add_argument("--method", choices=list(METHODS), default=None,
                   help="average (default), ties or dare (task vectors over --base), slerp (two "
                   "models); LoRA adapters are always merged exactly as products")
    p.add_argument("--density", type=float, help="ties/dare: fraction of task-vector entries "
                   "kept (default 0.2)")
    p.add_argument("--seed", type=int, help="dare: seed of the drop masks (default 0)")
    p.add_argument("--weights-for", action="append", metavar="PATTERN=W,W...", default=[],
                   help="weights for the keys matching a glob (repeatable, first match wins; "
                   "--weights for the rest)")
    p.add_argument("--lora-rank", type=int, help="compress a LoRA soup to this rank "
                   "(truncated SVD; the relative error dropped is in the manifest)")
    p.add_argument("--force", action="store_true", default=None,
                   help="merge inputs whose metadata names different base models")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")


def _relocation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", action="append", metavar="DIR", default=[],
                   help="a folder to look in for constituents that moved (by their recorded "
                   "names; repeatable; verified by size and sha256)")
    p.add_argument("--remap", action="append", metavar="OLD=NEW", default=[],
                   help="replace the path prefix OLD of recorded constituents with NEW "
                   "(repeatable; verified by size and sha256)")


# soup upkeep verbs: (operand, description, example arguments)
_SOUP_VERBS = {
    "add": ("new", "Add constituent NEW to SOUP, recomputing the soup from the constituents "
            "in its manifest.", "soup.safetensors d.safetensors -o soup2.safetensors"),
    "remove": ("old", "Remove constituent OLD (a path, or a copy with the same content) from "
               "SOUP, recomputing the soup from the others.",
               "soup2.safetensors b.safetensors -o soup3.safetensors"),
}


def build_parser(command: str) -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    if command in _SOUP_VERBS:
        operand, description, example = _SOUP_VERBS[command]
        p = argparse.ArgumentParser(prog=f"{PROG} {command}", formatter_class=fmt,
                                    description=description,
                                    epilog=f"example:\n  fastsoup-merge {command} {example}")
        p.add_argument("soup")
        p.add_argument(operand)
        if command == "add":
            p.add_argument("--weight", type=float, help="raw weight of the new constituent "
                           "(default: the soup's common raw weight)")
        _relocation(p)
    else:
        doc = (__doc__ or "").split("\n\n")
        p = argparse.ArgumentParser(
            prog=PROG, formatter_class=fmt,
            usage="\n  ".join(["%(prog)s INPUT INPUT... -o OUT [--weights W W...] [options]",
                               "%(prog)s add SOUP NEW -o OUT [--weight W] [options]",
                               "%(prog)s remove SOUP OLD -o OUT [options]"]),
            description="Average safetensors checkpoints, streaming, and keep soups up to "
            "date.\n\n" + doc[2],
            epilog="\n\n".join(doc[3:]) + "\n\n'fastsoup-merge add -h' and "
            "'fastsoup-merge remove -h' describe the two verbs.")
        p.add_argument("inputs", nargs="*", metavar="INPUT", help=".safetensors files, sharded "
                       "directories, diffusers roots (two or more, or one with --base)")
        p.add_argument("--weights", nargs="+", metavar="W", help="raw weights, one per input: "
                       "0.7 0.3 or 0.7,0.3 (normalised to sum 1 unless --base or --no-normalize)")
        norm = p.add_mutually_exclusive_group()
        norm.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                          help="divide the weights by their sum (default without --base)")
        norm.add_argument("--no-normalize", dest="normalize", action="store_false",
                          help="use the weights as given (default with --base)")
        p.add_argument("--base", help="θ0 for task arithmetic: θ0 + Σ w_i (θ_i − θ0)")
    _common(p)
    return p


def _options(args) -> dict:
    from .options import parse_metadata_items

    opts = dict(dtype=args.dtype, variant=args.variant, allow_pickle=args.allow_pickle,
                max_shard_size=args.max_shard_size, memory=args.memory, threads=args.threads,
                device=args.device, dry_run=args.dry_run, overwrite=args.overwrite,
                quiet=True if (args.quiet or args.json) else None, hash=args.hash,
                drop_cache=args.drop_cache)
    if args.metadata:
        opts["metadata"] = parse_metadata_items(args.metadata)
    if args.keys is not None:
        opts["keys"] = args.keys
    if args.accumulate is not None:
        opts["accumulate"] = args.accumulate
    for name in ("method", "density", "seed", "lora_rank", "force"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.weights_for:
        opts["weights_for"] = list(args.weights_for)
    return opts


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in VERBS else "merge"
    parser = build_parser(command)
    args = parser.parse_args(argv[1:] if command != "merge" else argv)
    if command == "merge":
        weights, extra = _split_weights(args.weights) if args.weights else (None, [])
        if args.weights and not weights:
            parser.error(f"--weights takes numbers (0.7 0.3 or 0.7,0.3), got {args.weights[0]!r}")
        args.inputs = list(args.inputs) + extra
        args.weights = weights
        if not args.inputs:
            parser.error("the following arguments are required: INPUT")
    if args.output is None and not args.dry_run:
        parser.error("the following arguments are required: -o/--output")

    from .api import merge
    from .errors import MergeError, PlanError, cli_option_names
    from .soup import soup_add, soup_remove

    previous = None
    try:  # SIGTERM cleans up like Ctrl-C (the temporary output is removed)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        with cli_option_names():
            opts = _options(args)
            if command in VERBS:
                if args.dtype is None:
                    opts.pop("dtype")
                remap = {}
                for item in args.remap:
                    old, sep, new = item.partition("=")
                    if not sep or not old or not new:
                        raise MergeError(f"--remap takes OLD=NEW, got {item!r}")
                    remap[old] = new
                where = dict(search=args.search, remap=remap)
            if command == "add":
                report = soup_add(args.soup, args.new, args.output, weight=args.weight,
                                  **where, **opts)
            elif command == "remove":
                report = soup_remove(args.soup, args.old, args.output, **where, **opts)
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
                              "problems": exc.problems if isinstance(exc, PlanError) else [],
                              "diagnostics": [d.to_dict() for d in exc.diagnostics]
                              if isinstance(exc, PlanError) else []},
                             indent=2))
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    # -q / --json silence warnings (--json carries them, in full under "diagnostics"),
    # except a problem that followed the commit: the output is written, and the user must
    # hear what went wrong after it
    shown = report.warnings if not (args.quiet or args.json) else report.commit_warnings
    for w in shown:
        print(f"{PROG}: warning: {w}", file=sys.stderr)
    if args.json:
        print(report.to_json())
    elif not args.quiet:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
