"""Merge benchmark: fastsoup-merge against the I/O floor, a naive loop and its peers.

Two ways to run it:

* ``python benchmarks/bench_merge.py --run`` (the committed tables): every row measured in
  **interleaved rounds** (round 1 of every row, then round 2, ...), medians reported, in
  one process that generates the inputs, warms the page cache and times:

  - in-process rows (the call alone, imports not counted): ``floor``, ``fastsoup``
    (``fs.merge``: the first merge of these constituents, every input's sha256 computed
    in the run), ``fastsoup-hash-cached`` (digests from fastsoup's cache: any later merge
    of them), ``fastsoup-nohash`` (``hash="none"``), ``fastsoup-ties`` / ``fastsoup-dare``
    (the task-vector methods, the first input as the base, density 0.2, ``hash="none"``),
    ``naive`` (``safe_open`` +
    ``get_tensor`` + ``add_`` into fp32, divide, cast, ``save_file``, fsync);
  - whole-command rows (a fresh process, start-up and imports included, peak RSS and CPU
    time of that process from ``wait4``): ``floor (command)`` (the floor in a fresh
    Python), ``fastsoup-merge`` / ``--hash none`` / digests cached, ``fastsoup-merge
    --help``, ``naive (command)``, and the peers ``mergekit`` and ``sd-mecha`` when
    installed (each run as its users run it, output fsynced; skipped with the reason
    otherwise);
  - ``--cold``: before every round of every row the inputs are evicted from the page
    cache (``os.sync()`` then ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each input file:
    only these files' pages, no root needed and nothing else on the machine disturbed).
    On a VM the host may still cache the disk: the table says so.

* ``pytest benchmarks/bench_merge.py --benchmark-only`` (what ``benchmarks/report.py``
  runs): the in-process rows under pytest-benchmark, rounds of one row back to back.

The floor is the least I/O any merge must do, done the way the merge runs and no slower
than we know how: every input read (``readinto`` into 16 MiB buffers, as many reader
threads as usable cores) while a writer thread writes an output of the same size and
fsyncs it and its directory; same page-cache state and same fsync as the merges. A row
faster than the floor would mean the floor is wrong, and the table flags it.

Layouts (``FASTSOUP_BENCH_MERGE_LAYOUT``): ``sd`` (default: SD-like, ~85% of the bytes in
1280-column matrices, 320 small vectors) or ``moe`` (MoE-like: ~50,000 tensors per file,
``FASTSOUP_BENCH_MERGE_TENSORS``). Sizes: ``FASTSOUP_BENCH_MERGE_INPUTS`` (default 4),
``FASTSOUP_BENCH_MERGE_MB`` (per input, default 400; 8 with FASTSOUP_BENCH_SIZE=smoke),
``FASTSOUP_BENCH_MERGE_ROUNDS`` (default 3; a run of one round is labelled a smoke run),
``FASTSOUP_BENCH_MERGE_DIR`` (default a temporary directory; inputs are kept there and
reused).

Peers are never installed in fastsoup's environment. Install each in its own and point
the benchmark at it::

    python -m venv /opt/mergekit && /opt/mergekit/bin/pip install mergekit==0.1.5
    python -m venv /opt/sd-mecha && /opt/sd-mecha/bin/pip install sd-mecha==1.1.8
    FASTSOUP_BENCH_MERGEKIT=/opt/mergekit/bin/mergekit-yaml \
    FASTSOUP_BENCH_SD_MECHA_PYTHON=/opt/sd-mecha/bin/python \
        python benchmarks/bench_merge.py --run

(``mergekit-yaml`` on PATH is used too.) mergekit merges transformers checkpoints: each
input is given as a folder holding the weights and a ``config.json``; sd-mecha infers a
model config from the keys. A peer that refuses the synthetic checkpoints is listed with
its error, not timed.

    python benchmarks/bench_merge.py --run --out benchmarks/results/cpu-merge-DATE-sd
    python benchmarks/bench_merge.py --table merge.json      # pytest-benchmark json -> markdown
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SMOKE = os.environ.get("FASTSOUP_BENCH_SIZE") == "smoke"
N_INPUTS = int(os.environ.get("FASTSOUP_BENCH_MERGE_INPUTS", "4"))
MB = float(os.environ.get("FASTSOUP_BENCH_MERGE_MB", "8" if SMOKE else "400"))
ROUNDS = int(os.environ.get("FASTSOUP_BENCH_MERGE_ROUNDS", "1" if SMOKE else "3"))
LAYOUT = os.environ.get("FASTSOUP_BENCH_MERGE_LAYOUT", "sd")
N_TENSORS = int(os.environ.get("FASTSOUP_BENCH_MERGE_TENSORS", "50000"))
HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


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


def moe_layout(total_bytes: int, n_tensors: int = 50000):
    """MoE-like tensor list of bf16 tensors summing to about total_bytes in about
    ``n_tensors`` tensors: per layer 4 attention matrices, 2 norms, a router and 3 matrices
    per expert (experts dominate the count, as in 256-expert checkpoints)."""
    layers = 64
    experts = max(1, (n_tensors // layers - 7) // 3)
    h = 256
    per_layer = total_bytes // 2 // layers
    attn = 4 * h * h
    d = max(1, (per_layer - attn - 2 * h - experts * h) // (3 * experts * h))
    shapes = []
    for i in range(layers):
        p = f"model.layers.{i}"
        for m in ("q", "k", "v", "o"):
            shapes.append((f"{p}.self_attn.{m}_proj.weight", (h, h)))
        shapes.append((f"{p}.input_layernorm.weight", (h,)))
        shapes.append((f"{p}.post_attention_layernorm.weight", (h,)))
        shapes.append((f"{p}.mlp.gate.weight", (experts, h)))
        for e in range(experts):
            for m, shape in (("gate_proj", (d, h)), ("up_proj", (d, h)), ("down_proj", (h, d))):
                shapes.append((f"{p}.mlp.experts.{e}.{m}.weight", shape))
    return shapes


def _save(state, path: str) -> None:
    """Write a generated input under a temporary name, then rename it into place (an
    interrupted run never leaves a partial input that a later run would reuse)."""
    from safetensors.torch import save_file

    save_file(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def generate(folder: str, n: int, mb: float, kind: str = "sd"):
    import numpy as np
    import torch

    os.makedirs(folder, exist_ok=True)
    shapes = layout(int(mb * 1e6)) if kind == "sd" else moe_layout(int(mb * 1e6), N_TENSORS)
    rng = np.random.default_rng(0)
    flat = torch.from_numpy(rng.standard_normal(sum(int(np.prod(s)) for _, s in shapes),
                                                dtype=np.float32)).to(torch.bfloat16)
    base, pos = {}, 0
    for k, s in shapes:
        m = int(np.prod(s))
        base[k] = flat[pos:pos + m].reshape(s)
        pos += m
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"model{i}.safetensors")
        paths.append(path)
        if os.path.exists(path):
            continue
        noise = torch.from_numpy(rng.integers(0, 64, flat.numel(), dtype=np.int16))
        pert = (flat.view(torch.int16) ^ noise).view(torch.bfloat16)  # perturbed mantissas
        sd, pos = {}, 0
        for k, t in base.items():
            sd[k] = pert[pos:pos + t.numel()].reshape(t.shape).clone()
            pos += t.numel()
        _save(sd, path)
    return paths


def generate_lora(folder: str, n: int, mb: float, rank: int = 16):
    """``n`` PEFT-style LoRA adapters (bf16, rank ``rank``) over SD-like attention
    projections (1280 × 1280), ``mb`` MB each: the LoRA-soup row's inputs."""
    import torch

    os.makedirs(folder, exist_ok=True)
    d = 1280
    modules = max(1, int(mb * 1e6 // (2 * 2 * rank * d)))
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"lora{i}.safetensors")
        paths.append(path)
        if os.path.exists(path):
            continue
        g = torch.Generator().manual_seed(i)
        sd = {}
        for m in range(modules):
            prefix = f"unet.blocks.{m}.attn.to_q"
            sd[f"{prefix}.lora_A.weight"] = (torch.randn(rank, d, generator=g) * 0.02).to(torch.bfloat16)
            sd[f"{prefix}.lora_B.weight"] = (torch.randn(d, rank, generator=g) * 0.02).to(torch.bfloat16)
        _save(sd, path)
    return paths


def drop_output(out: str):
    import shutil

    for p in (out, out.replace(".safetensors", ".fastsoup.json")):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.unlink(p)


# ---------------------------------------------------------------------------- tools
def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_floor(inputs, out, out_bytes=None):
    """Read every input (one reader thread per usable core, ``readinto`` 16 MiB at a time)
    while a writer thread writes ``out_bytes`` (default: the first input's size) and
    fsyncs the file and its directory: the least I/O of a merge, overlapped."""
    size = os.path.getsize(inputs[0]) if out_bytes is None else out_bytes
    errors = []

    def reader(paths):
        try:
            buf = bytearray(16 << 20)
            for p in paths:
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def writer():
        try:
            mv = memoryview(bytearray(16 << 20))
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                left = size
                while left:
                    left -= os.write(fd, mv[: min(left, len(mv))])
                os.fsync(fd)
            finally:
                os.close(fd)
            dfd = os.open(os.path.dirname(os.path.abspath(out)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    n = max(1, min(_usable_cores(), len(inputs)))
    threads = [threading.Thread(target=reader, args=(inputs[i::n],)) for i in range(n)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


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



def run_method(inputs, out, method: str):
    """A task-vector method over the inputs, the first as the base (``--hash none``: the
    rows compare the methods' arithmetic with the average's, not hashing)."""
    import fastsoup as fs

    seed = {"seed": 0} if method == "dare" else {}
    fs.merge(inputs[1:], out, base=inputs[0], method=method, density=0.2, quiet=True,
             overwrite=True, hash="none", **seed)


TOOLS = {"floor": run_floor,
         "fastsoup": run_fastsoup,
         "fastsoup-hash-cached": lambda i, o: run_fastsoup(i, o, cache=True),
         "fastsoup-nohash": lambda i, o: run_fastsoup(i, o, "none"),
         "fastsoup-ties": lambda i, o: run_method(i, o, "ties"),
         "fastsoup-dare": lambda i, o: run_method(i, o, "dare"),
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
# pytest-benchmark mode only under pytest (a --child or --run process never imports it:
# the whole-command floor must not pay for it)
pytest = sys.modules.get("pytest")

if pytest is not None:
    @pytest.fixture(scope="module")
    def ckpts(tmp_path_factory):
        folder = os.environ.get("FASTSOUP_BENCH_MERGE_DIR") or str(tmp_path_factory.mktemp("merge"))
        paths = generate(os.path.join(folder, f"in-{LAYOUT}-{N_INPUTS}x{MB:g}MB"), N_INPUTS, MB,
                         LAYOUT)
        import fastsoup  # noqa: F401  (import time is not part of any tool's time)

        os.sync()  # no write-back of the generated inputs during the measurements
        run_floor(paths, os.path.join(folder, "warm.bin"))  # warm the page cache
        os.unlink(os.path.join(folder, "warm.bin"))
        return folder, paths

    @pytest.mark.parametrize("tool", list(TOOLS))
    def test_merge(benchmark, ckpts, tool):
        folder, inputs = ckpts
        benchmark.group = f"merge {N_INPUTS} x {MB:g} MB bf16" + ("" if LAYOUT == "sd" else f" {LAYOUT}")
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


# ------------------------------------------------------------- interleaved runs (--run)
TIME = shutil.which("time") or "/usr/bin/time"


def evict(paths) -> None:
    """Drop these files' pages from the page cache (clean pages; nothing else touched)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_command(argv, env=None) -> dict:
    """Run a whole command as a user does; wall time from here (process start included),
    peak RSS and CPU time of the command from GNU time (a small parent, so the peak is
    the command's own)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        res = subprocess.run([TIME, "-f", "%M %U %S", "-o", tf.name, *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             timeout=3600)
        dt = time.perf_counter() - t0
        fields = (tf.read().strip().splitlines() or ["0 0 0"])[-1].split()
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {res.returncode}: "
                           f"{(res.stderr or res.stdout).strip()[-600:]}")
    return {"seconds": dt, "peak_rss": int(fields[0]) * 1024,
            "cpu_seconds": float(fields[1]) + float(fields[2])}


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` (a file or a folder) and the folders themselves."""
    paths = [path]
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            paths += [os.path.join(root, n) for n in files + dirs]
    paths.append(os.path.dirname(os.path.abspath(path)))
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _mergekit_cmd():
    exe = os.environ.get("FASTSOUP_BENCH_MERGEKIT") or shutil.which("mergekit-yaml")
    if not exe or not os.path.exists(exe):
        return None, ("not installed (set FASTSOUP_BENCH_MERGEKIT to the mergekit-yaml of a "
                      "separate environment: pip install mergekit==0.1.5 there)")
    return exe, ""


def _sd_mecha_python():
    py = os.environ.get("FASTSOUP_BENCH_SD_MECHA_PYTHON")
    if not py or not os.path.exists(py):
        return None, ("not installed (set FASTSOUP_BENCH_SD_MECHA_PYTHON to the python of a "
                      "separate environment: pip install sd-mecha==1.1.8 there)")
    return py, ""


def peer_runner(name: str, inputs, folder: str):
    """``(callable(out) -> dict, reason)`` for a peer, or ``(None, why it is skipped)``."""
    if name == "mergekit":
        exe, why = _mergekit_cmd()
        if exe is None:
            return None, why
        models = []
        for i, p in enumerate(inputs):  # mergekit takes model folders (weights + config.json)
            d = os.path.join(folder, "mergekit-in", f"m{i}")
            os.makedirs(d, exist_ok=True)
            link = os.path.join(d, "model.safetensors")
            if not os.path.exists(link):
                os.symlink(os.path.abspath(p), link)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, f)
            models.append(d)
        cfg = os.path.join(folder, "mergekit.yml")
        with open(cfg, "w") as f:
            f.write("merge_method: linear\ndtype: bfloat16\nmodels:\n" + "".join(
                f"  - model: {m}\n    parameters:\n      weight: 1.0\n" for m in models))

        def run(out):
            r = run_command([exe, cfg, out, "--lazy-unpickle", "--no-copy-tokenizer"])
            fsync_tree(out)
            return r
        return run, ""
    if name == "sd-mecha":
        py, why = _sd_mecha_python()
        if py is None:
            return None, why
        script = ("import sys, torch, sd_mecha\n"
                  "models = [sd_mecha.model(p) for p in sys.argv[2:]]\n"
                  "sd_mecha.merge(sd_mecha.n_average(*models), output=sys.argv[1],\n"
                  "               merge_device='cpu', merge_dtype=torch.float32,\n"
                  "               output_dtype=torch.bfloat16)\n")

        def run(out):
            r = run_command([py, "-c", script, out, *inputs])
            fsync_tree(out)
            return r
        return run, ""
    raise KeyError(name)


def interleaved(inputs, folder: str, rounds: int, cold: bool, peers=("mergekit", "sd-mecha"),
                skip=()):
    """Every row once per round, rows in the same order each round; returns
    ``(rows, skipped)``: ``{row: {"kind", "times", "cpu", "rss", "load"}}``."""
    import resource

    py = sys.executable
    script = os.path.join(os.path.dirname(py), "fastsoup-merge")  # the installed command
    cli = [script] if os.path.exists(script) else [py, "-m", "fastsoup.merge.cli"]
    env_first = dict(os.environ, FASTSOUP_HASH_CACHE="0", OMP_NUM_THREADS="1", CI="1")
    cache_dir = os.path.join(folder, ".cache-cli")
    env_cached = dict(env_first, FASTSOUP_HASH_CACHE="1", FASTSOUP_CACHE_DIR=cache_dir)
    out = lambda name: os.path.join(folder, "out-" + name.replace(" ", "_").replace("/", "_")
                                    .replace("(", "").replace(")", "") + ".safetensors")
    rows = {}
    # the LoRA-soup row's inputs: adapters an eighth of an input's size (LoRAs are small)
    lora_inputs = generate_lora(os.path.join(folder, f"lora-{len(inputs)}x{MB / 8:g}MB"),
                                len(inputs), MB / 8)

    def in_process(fn):
        def run(o):
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            fn(inputs, o)
            dt = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            return {"seconds": dt, "cpu_seconds": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime}
        return run

    def command(argv, env=None):
        return lambda o: run_command([a if a != "{out}" else o for a in argv], env)

    plan = [
        ("floor", "in-process", in_process(run_floor)),
        ("fastsoup (first merge)", "in-process", in_process(TOOLS["fastsoup"])),
        ("fastsoup (digests cached)", "in-process", in_process(TOOLS["fastsoup-hash-cached"])),
        ("fastsoup (hash none)", "in-process", in_process(TOOLS["fastsoup-nohash"])),
        ("fastsoup TIES (density 0.2, hash none)", "in-process", in_process(TOOLS["fastsoup-ties"])),
        ("fastsoup DARE (density 0.2, hash none)", "in-process", in_process(TOOLS["fastsoup-dare"])),
        (f"fastsoup LoRA soup ({len(inputs)} × rank-16 adapters of {MB / 8:g} MB, hash none)",
         "in-process", in_process(lambda _, o: run_fastsoup(lora_inputs, o, "none"))),
        ("naive", "in-process", in_process(run_naive)),
        ("floor", "command", command([py, HERE, "--child", "floor", "{out}", *inputs], env_first)),
        ("fastsoup-merge --help", "command", lambda o: run_command(cli + ["--help"], env_first)),
        ("fastsoup-merge (first merge)", "command",
         command(cli + [*inputs, "-o", "{out}", "-q", "--overwrite"], env_first)),
        ("fastsoup-merge (digests cached)", "command",
         command(cli + [*inputs, "-o", "{out}", "-q", "--overwrite"], env_cached)),
        ("fastsoup-merge --hash none", "command",
         command(cli + [*inputs, "-o", "{out}", "-q", "--overwrite", "--hash", "none"], env_first)),
        ("naive", "command", command([py, HERE, "--child", "naive", "{out}", *inputs], env_first)),
    ]
    skipped = {name: "left out of this run (--skip)" for name in sorted({p[0] for p in plan} & set(skip))}
    plan = [p for p in plan if p[0] not in skip]
    for name in peers:
        fn, why = peer_runner(name, inputs, folder)
        if fn is None:
            skipped[name] = why
        else:
            plan.append((name, "command", fn))
    # digest caches filled once (the "cached" rows are any later merge of these inputs)
    os.environ.setdefault("FASTSOUP_CACHE_DIR", os.path.join(folder, ".cache"))
    TOOLS["fastsoup-hash-cached"](inputs, out("prime"))
    run_command(cli + [*inputs, "-o", out("prime-cli"), "-q", "--overwrite"], env_cached)
    drop_output(out("prime"))
    drop_output(out("prime-cli"))
    for r in range(rounds):
        for name, kind, fn in plan:
            key = f"{name} [{kind}]"
            row = rows.setdefault(key, {"name": name, "kind": kind, "times": [], "cpu": [],
                                        "rss": [], "load": [], "error": None})
            if row["error"]:
                continue
            o = out(f"{kind}-{name}")
            drop_output(o)
            os.sync()  # no dirty pages from the previous row
            if cold:
                evict(inputs)
            load = os.getloadavg()[0]
            try:
                res = fn(o)
            except RuntimeError as exc:
                row["error"] = str(exc)
                print(f"  {key}: failed: {exc}", file=sys.stderr, flush=True)
                continue
            finally:
                drop_output(o)
            row["times"].append(res["seconds"])
            row["cpu"].append(res.get("cpu_seconds"))
            row["rss"].append(res.get("peak_rss"))
            row["load"].append((load, os.getloadavg()[0]))
            print(f"  round {r + 1}/{rounds} {key}: {res['seconds']:.3f} s", flush=True)
    return rows, skipped


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("fastsoup", "numpy", "torch", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "-"
    try:
        out["fastsoup commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return out


def _machine() -> str:
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()} {model}, {os.cpu_count()} CPUs ({_usable_cores()} usable), "
            f"{mem:.0f} GiB RAM, Linux {platform.release()}")


def markdown(meta: dict, rows: dict, skipped: dict) -> str:
    floors = {kind: statistics.median(r["times"]) for r in rows.values()
              for kind in [r["kind"]] if r["name"] == "floor" and r["times"]}
    smoke = meta["rounds"] < 2
    la = meta["load_average"]
    lines = [f"# fastsoup-merge on CPU, {meta['layout_text']}: {meta['date']}", "",
             f"- machine: {meta['machine']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- command: `{meta['command']}`",
             f"- page cache: {meta['cache_text']}",
             f"- load average (1 / 5 / 15 min): before {la['before'][0]:.2f} / {la['before'][1]:.2f} / "
             f"{la['before'][2]:.2f}, after {la['after'][0]:.2f} / {la['after'][1]:.2f} / "
             f"{la['after'][2]:.2f} (other work shares these cores: timings are contended)",
             f"- rounds: {meta['rounds']}, interleaved (every row once per round, same order)"
             + (" — **smoke run: one round, no spread**" if smoke else ""),
             "",
             "*× floor*: median / the floor's median of the same kind (in-process against the "
             "in-process floor, whole commands against the floor run as a fresh Python). "
             "*CPU s*: user + system time of the process (all threads), median. *peak RSS*: "
             "of the whole command (GNU time), interpreter and imports included.",
             "",
             "| row | kind | median s | min–max s | × floor | CPU s | peak RSS MB | 1-min load at start |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        if r["error"] or not r["times"]:
            lines.append(f"| {r['name']} | {r['kind']} | failed | | | | | |")
            continue
        med = statistics.median(r["times"])
        fl = floors.get(r["kind"])
        ratio = "-" if r["name"] == "floor" or not fl or "--help" in r["name"] else f"{med / fl:.2f}"
        if ratio != "-" and med < fl:
            ratio += " (below the floor: the floor is wrong)"
        cpu = [c for c in r["cpu"] if c is not None]
        rss = [x for x in r["rss"] if x]
        spread = f"{min(r['times']):.3f}–{max(r['times']):.3f}" if not smoke else "(1 round)"
        loads = [a for a, _ in r["load"]]
        lines.append(f"| {r['name']} | {r['kind']} | {med:.3f} | {spread} | {ratio} | "
                     f"{statistics.median(cpu):.2f} | "
                     f"{(statistics.median(rss) / 1e6):.0f} | " if rss else
                     f"| {r['name']} | {r['kind']} | {med:.3f} | {spread} | {ratio} | "
                     f"{statistics.median(cpu):.2f} | - | ")
        lines[-1] += f"{min(loads):.1f}–{max(loads):.1f} |"
    for key, r in rows.items():
        if r["error"]:
            lines.append(f"\n{r['name']} ({r['kind']}) failed: `{r['error'][:300]}`")
    for name, why in skipped.items():
        lines.append(f"\n{name}: not measured: {why}.")
    return "\n".join(lines) + "\n"


def run_main(argv) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="bench_merge.py --run")
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--cold", action="store_true", help="evict the inputs before every round")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of row names to leave out "
                    "(e.g. naive: minutes on 50,000 tensors)")
    args = ap.parse_args(argv)
    folder = os.environ.get("FASTSOUP_BENCH_MERGE_DIR") or tempfile.mkdtemp(prefix="fsbench-")
    inputs = generate(os.path.join(folder, f"in-{LAYOUT}-{N_INPUTS}x{MB:g}MB"), N_INPUTS, MB, LAYOUT)
    from safetensors import safe_open

    with safe_open(inputs[0], "np") as f:
        n_tensors = len(list(f.keys()))
    os.sync()
    if not args.cold:
        run_floor(inputs, os.path.join(folder, "warm.bin"))  # warm the page cache
        os.unlink(os.path.join(folder, "warm.bin"))
    load_before = os.getloadavg()
    rows, skipped = interleaved(inputs, folder, ROUNDS, args.cold,
                                peers=() if args.no_peers else ("mergekit", "sd-mecha"),
                                skip=[x.strip() for x in args.skip.split(",") if x.strip()])
    import datetime

    size = os.path.getsize(inputs[0])
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(), "versions": _versions(), "rounds": ROUNDS, "layout": LAYOUT,
        "inputs": len(inputs), "input_bytes": size * len(inputs), "tensors_per_file": n_tensors,
        "layout_text": f"{len(inputs)} × {size / 1e6:.0f} MB bf16 {LAYOUT.upper()}-like inputs, "
                       f"{n_tensors} tensors each",
        "cache_text": ("cold: each input evicted (sync + POSIX_FADV_DONTNEED) before every row "
                       "of every round; the VM's host may still cache the disk" if args.cold else
                       "warm: inputs read once before the rounds; os.sync() before every row"),
        "command": " ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ)
                            if k.startswith("FASTSOUP_BENCH_MERGE_") and k != "FASTSOUP_BENCH_MERGE_DIR")
                   + " python benchmarks/bench_merge.py " + " ".join(argv),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
    }
    text = markdown(meta, rows, skipped)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows, "skipped": skipped}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(_table(sys.argv[2]))
    elif "--run" in sys.argv[1:]:
        sys.exit(run_main(sys.argv[1:]))
    else:
        print(__doc__)
