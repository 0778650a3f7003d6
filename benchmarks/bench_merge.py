"""Merge benchmark: fastsoup-merge against the I/O floor and a naive loop, same run.

Generated checkpoints (bf16, SD-like: many large weights plus hundreds of small ones),
warm page cache (every tool runs after the inputs were read once). Every tool's time
includes flushing its output to disk (fsync), since fastsoup's crash safety does.

* ``floor``: read every input sequentially (``readinto``) and write + fsync one output
  of the same size: the least I/O any merge must do.
* ``fastsoup``: ``fs.merge(inputs, out)`` (uniform mean, bf16 out, fp32 accumulation)
  with the manifest's sha256 of the inputs computed in the run (the first merge of these
  constituents); ``fastsoup-hash-cached``: the same with the digests in fastsoup's cache
  (any later merge of them); ``fastsoup-nohash``: ``hash="none"``.
* ``naive``: ``safe_open`` + ``get_tensor`` + ``add_`` into an fp32 state dict, divide,
  cast back, ``save_file``, fsync.
* mergekit and sd-mecha are not installed in this environment and not run here.

Peak RSS of each tool is measured in a fresh child process (``VmHWM`` of that process,
interpreter and imports included) and stored in ``extra_info`` with the child's time.

Sizes (environment): ``FASTSOUP_BENCH_MERGE_INPUTS`` (default 4),
``FASTSOUP_BENCH_MERGE_MB`` (per input, default 400; 8 with FASTSOUP_BENCH_SIZE=smoke),
``FASTSOUP_BENCH_MERGE_ROUNDS`` (default 3), ``FASTSOUP_BENCH_MERGE_DIR`` (default a
pytest temporary directory; it needs inputs × MB + 3 × MB free).

    pytest benchmarks/bench_merge.py --benchmark-only --benchmark-json merge.json
    python benchmarks/bench_merge.py --table merge.json      # markdown table
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

SMOKE = os.environ.get("FASTSOUP_BENCH_SIZE") == "smoke"
N_INPUTS = int(os.environ.get("FASTSOUP_BENCH_MERGE_INPUTS", "4"))
MB = float(os.environ.get("FASTSOUP_BENCH_MERGE_MB", "8" if SMOKE else "400"))
ROUNDS = int(os.environ.get("FASTSOUP_BENCH_MERGE_ROUNDS", "1" if SMOKE else "3"))
HERE = os.path.abspath(__file__)


# --------------------------------------------------------------------------- inputs
def layout(total_bytes: int):
    """SD-like tensor list (name, shape) of bf16 tensors summing to about total_bytes:
    ~85% in large matrices, the rest in 320 small vectors."""
    shapes = []
    small = 320
    small_elems = max(1, int(total_bytes * 0.15 / 2 / small))
    for i in range(small):
        shapes.append((f"blocks.{i // 4}.norm{i % 4}.weight", (small_elems,)))
    big_total = total_bytes // 2 - small * small_elems
    cols = 1280
    rows_per = max(1, min(5120, big_total // cols // 24))
    i = 0
    while big_total > 0:
        rows = max(1, min(rows_per, big_total // cols))
        shapes.append((f"blocks.{i}.proj.weight", (rows, cols)))
        big_total -= rows * cols
        i += 1
        if rows * cols == 0 or big_total < cols:
            break
    return shapes


def generate(folder: str, n: int, mb: float):
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    shapes = layout(int(mb * 1e6))
    rng = np.random.default_rng(0)
    base = {k: torch.from_numpy(rng.standard_normal(int(np.prod(s)), dtype=np.float32))
            .reshape(s).to(torch.bfloat16) for k, s in shapes}
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"model{i}.safetensors")
        paths.append(path)
        if os.path.exists(path):
            continue
        sd = {}
        for k, t in base.items():
            noise = torch.from_numpy(rng.integers(0, 64, t.numel(), dtype=np.int16)).reshape(t.shape)
            sd[k] = (t.view(torch.int16) ^ noise).view(torch.bfloat16)  # perturbed mantissas
        save_file(sd, path)
    return paths


def drop_output(out: str):
    import shutil

    for p in (out, out.replace(".safetensors", ".fastsoup.json")):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)


# ---------------------------------------------------------------------------- tools
def run_floor(inputs, out):
    buf = bytearray(16 << 20)
    mv = memoryview(buf)
    for p in inputs:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    size = os.path.getsize(inputs[0])
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left:
            n = os.write(fd, mv[: min(left, len(buf))])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)


def run_fastsoup(inputs, out, hash_mode="sha256", cache=False):
    """``cache=False``: the inputs' sha256 are computed in this run (first merge of these
    constituents); ``cache=True``: taken from fastsoup's digest cache (a later merge)."""
    import fastsoup as fs

    old = os.environ.get("FASTSOUP_HASH_CACHE")
    os.environ["FASTSOUP_HASH_CACHE"] = "1" if cache else "0"
    if cache:
        os.environ.setdefault("FASTSOUP_CACHE_DIR", os.path.join(os.path.dirname(out), ".cache"))
    try:
        fs.merge(inputs, out, quiet=True, overwrite=True, hash=hash_mode)
    finally:
        if old is None:
            del os.environ["FASTSOUP_HASH_CACHE"]
        else:
            os.environ["FASTSOUP_HASH_CACHE"] = old


def run_naive(inputs, out):
    from safetensors import safe_open
    from safetensors.torch import save_file

    acc, dtypes = {}, {}
    for i, p in enumerate(inputs):
        with safe_open(p, "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if i == 0:
                    dtypes[k] = t.dtype
                    acc[k] = t.float()
                else:
                    acc[k].add_(t)
    result = {k: (v / len(inputs)).to(dtypes[k]) for k, v in acc.items()}
    del acc
    save_file(result, out)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)



TOOLS = {"floor": run_floor,
         "fastsoup": run_fastsoup,
         "fastsoup-hash-cached": lambda i, o: run_fastsoup(i, o, cache=True),
         "fastsoup-nohash": lambda i, o: run_fastsoup(i, o, "none"),
         "naive": run_naive}


def child_measure(tool: str, inputs, out) -> dict:
    """Run ``tool`` once in a fresh interpreter: its time (imports of torch etc. included,
    as the tool is imported lazily) and its peak RSS."""
    drop_output(out)
    res = subprocess.run([sys.executable, HERE, "--child", tool, out, *inputs],
                         capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- pytest side
try:
    import pytest
except ImportError:  # the --child / --table modes need no pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def ckpts(tmp_path_factory):
        folder = os.environ.get("FASTSOUP_BENCH_MERGE_DIR") or str(tmp_path_factory.mktemp("merge"))
        paths = generate(os.path.join(folder, f"in-{N_INPUTS}x{MB:g}MB"), N_INPUTS, MB)
        import fastsoup  # noqa: F401  (import time is not part of any tool's time)

        os.sync()  # no write-back of the generated inputs during the measurements
        run_floor(paths, os.path.join(folder, "warm.bin"))  # warm the page cache
        os.unlink(os.path.join(folder, "warm.bin"))
        return folder, paths

    @pytest.mark.parametrize("tool", list(TOOLS))
    def test_merge(benchmark, ckpts, tool):
        folder, inputs = ckpts
        benchmark.group = f"merge {N_INPUTS} x {MB:g} MB bf16"
        out = os.path.join(folder, f"out-{tool}.safetensors")
        fn = TOOLS[tool]
        def setup():
            drop_output(out)
            os.sync()  # each round starts with no dirty pages from the previous one

        if tool == "fastsoup-hash-cached":
            fn(inputs, out)  # fills the digest cache
        benchmark.pedantic(fn, args=(inputs, out), setup=setup,
                           rounds=ROUNDS, iterations=1, warmup_rounds=0)
        child = child_measure(tool, inputs, out)
        drop_output(out)
        benchmark.extra_info.update(
            impl=tool, role={"floor": "ceiling", "naive": "baseline"}.get(tool, ""),
            peak_rss_MiB=child["peak_rss"] / 2**20,
            tool=tool, inputs=len(inputs), input_bytes=sum(os.path.getsize(p) for p in inputs),
            output_bytes=os.path.getsize(inputs[0]), peak_rss_bytes=child["peak_rss"],
            child_seconds=child["seconds"], cpus=os.cpu_count(),
            loadavg_1min_after=os.getloadavg()[0])


# ----------------------------------------------------------------------------- CLI
def _table(path: str) -> str:
    data = json.load(open(path))
    rows = {b["extra_info"]["tool"]: b for b in data["benchmarks"]}
    floor = rows.get("floor", {}).get("stats", {}).get("median")
    lines = ["| tool | median s | min s | max s | median / floor median | peak RSS MB (child) | "
             "child s (incl. imports) | load avg (1 min) after |",
             "|---|---|---|---|---|---|---|---|"]
    for tool, b in rows.items():
        s, e = b["stats"], b["extra_info"]
        ratio = f"{s['median'] / floor:.2f}" if floor else "-"
        lines.append(f"| {tool} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {ratio} | "
                     f"{e['peak_rss_bytes'] / 1e6:.0f} | {e['child_seconds']:.3f} | "
                     f"{e.get('loadavg_1min_after', float('nan')):.2f} |")
    any_b = next(iter(rows.values()))["extra_info"]
    lines.append("")
    lines.append(f"{any_b['inputs']} inputs, {any_b['input_bytes'] / 1e6:.0f} MB in total, "
                 f"output {any_b['output_bytes'] / 1e6:.0f} MB; rounds per tool: "
                 f"{next(iter(rows.values()))['stats']['rounds']}")
    return "\n".join(lines)


def _child(tool: str, out: str, inputs) -> None:
    t0 = time.perf_counter()
    TOOLS[tool](inputs, out)
    dt = time.perf_counter() - t0
    rss = None
    with open("/proc/self/status") as f:  # VmHWM: this address space's peak (ru_maxrss
        for line in f:                    # would include the parent's, kept across exec)
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) * 1024
    print(json.dumps({"seconds": dt, "peak_rss": rss}))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(_table(sys.argv[2]))
    else:
        print(__doc__)
