"""Where a merge of many tensors spends its Python time before streaming.

    python benchmarks/merge_stages.py [--repeat 4] INPUT [INPUT ...]

Times, in process and with cyclic gc off (as :func:`fastsoup.merge.merge` runs), the
stages that cost per tensor: resolving the inputs (headers), planning (resolve
included), the report, the work items and the fused runs. Each stage's minimum over
``--repeat`` repetitions is printed, and the sum of the plan, report, items and runs.
Nothing is written: the runs are computed against the output offsets a writer would
use. A diagnostic for the per-tensor work of ``bench_merge.py``'s MoE-like layout
(``FASTSOUP_BENCH_MERGE_LAYOUT=moe``), not a benchmark of the merge: the merge's own
numbers come from ``bench_merge.py --run``.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import time


def stages(inputs, repeat: int) -> dict:
    from fastsoup.merge import api, engine, report
    from fastsoup.merge.options import MergeOptions

    opts = MergeOptions.validate(hash="none", quiet=True, dry_run=True)
    best: dict = {}
    for _ in range(repeat):
        times = {}
        t = time.perf_counter()
        api._resolve_all(inputs, None, False)
        times["resolve"] = time.perf_counter() - t
        t = time.perf_counter()
        _, plan, out = api._plan(inputs, "stages.safetensors", None, None, None, opts)
        times["plan (resolve included)"] = time.perf_counter() - t
        t = time.perf_counter()
        report.plan_report(plan, out, opts)
        times["report"] = time.perf_counter() - t
        files = [f for c in plan.components for f in c.files]
        offsets = [_Offsets(f) for f in files]
        window, staging = engine.budget_split(opts.memory)
        t = time.perf_counter()
        items = engine.make_items(list(enumerate(map(lambda f: f.tensors, files))), window, staging)
        times["items"] = time.perf_counter() - t
        t = time.perf_counter()
        engine.make_runs(items, offsets, window, staging)
        times["runs"] = time.perf_counter() - t
        for k, v in times.items():
            best[k] = min(best.get(k, v), v)
        del plan, items
    best["plan + report + items + runs"] = sum(v for k, v in best.items() if k != "resolve")
    return best


class _Offsets:
    """The data offsets a :class:`fastsoup.merge.writer.SafetensorsFileWriter` would give."""

    def __init__(self, out_file):
        ends = itertools.accumulate(t.nbytes for t in out_file.tensors)
        self.offsets = dict(zip((t.key for t in out_file.tensors),
                                itertools.chain([0], ends)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args(argv)
    was = gc.isenabled()
    gc.disable()
    try:
        best = stages(args.inputs, args.repeat)
    finally:
        if was:
            gc.enable()
    print(f"{len(args.inputs)} inputs, minimum of {args.repeat}:")
    for k, v in best.items():
        print(f"  {k:32s} {v:7.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
