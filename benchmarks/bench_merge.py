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
  - ``--memory-limit 1GiB``: larger than memory. Only the whole commands ``floor
    (command)``, ``fastsoup-merge (first merge)``, ``fastsoup-merge --hash none`` and the
    peers run, each in a fresh cgroup v1 memory group of that limit (created under
    ``/sys/fs/cgroup/memory``, the command put in it before it executes, removed after;
    page cache is charged to it, so inputs larger than the limit cannot stay cached), the
    inputs evicted before every row; the table adds the group's peak charge and its OOM
    kills, and a command that fails (an OOM kill) is reported with its exit status and
    peak. Without a writable cgroup v1 memory hierarchy the run says why and measures
    nothing.

* ``pytest benchmarks/bench_merge.py --benchmark-only`` (what ``benchmarks/report.py``
  runs): the in-process rows under pytest-benchmark, rounds of one row back to back.

The floor is the least I/O any merge must do, done the way the merge does it and no
slower than we know how (:func:`run_floor`): every input read in windows of the merge's
default budget by two threads into buffers allocated as the merge allocates them, while
a writer thread writes an output of the same size into a preallocated file, starting
write-back as it goes, and fsyncs it and its directory; same page-cache state and same
fsync as the merges. A row faster than the floor would mean the floor is wrong, and the
table flags it.

Layouts (``FASTSOUP_BENCH_MERGE_LAYOUT``): ``sd`` (default: SD-like, ~85% of the bytes in
1280-column matrices, 320 small vectors), ``moe`` (MoE-like: ~50,000 tensors per file,
``FASTSOUP_BENCH_MERGE_TENSORS``) or ``llama`` (each input a transformers model folder:
``model.safetensors`` with Llama keys and a ``config.json`` (``LlamaForCausalLM``) whose
sizes match the tensors: the layout mergekit merges; every row takes the folders, the
floor, naive and sd-mecha the ``model.safetensors`` in them: the same bytes). Sizes: ``FASTSOUP_BENCH_MERGE_INPUTS`` (default 4),
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

(``mergekit-yaml`` on PATH is used too.) mergekit merges transformers architectures it
knows: it is given the llama layout's folders as they are (a linear merge, equal
weights, ``dtype: bfloat16``, ``--lazy-unpickle --no-copy-tokenizer``), and refuses the
``sd`` and ``moe`` layouts (each file wrapped in a folder with a ``LlamaForCausalLM``
config.json: "Tensor model.layers.0.self_attn.o_proj.weight required but not present");
sd-mecha infers a model config from the keys. A peer that refuses the synthetic
checkpoints is listed with its error, not timed.

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


LLAMA_WEIGHTS = "model.safetensors"


def llama_layout(total_bytes: int):
    """``(config, shapes)`` of a Llama-like bf16 checkpoint of about ``total_bytes``:
    head dim 64, grouped-query attention (4 query heads per key/value head), intermediate
    size 8/3 of the hidden size (a multiple of 64), untied embeddings; the hidden size is
    the largest that leaves at least 8 layers in ~75% of the bytes, the layer count fills
    that, and the vocabulary (a multiple of 64, at most 32,000) the rest. ``config`` is
    the ``config.json`` that transformers (and mergekit) read, consistent with the
    shapes."""
    params = total_bytes // 2

    def sizes(h):
        inter = -(-(8 * h // 3) // 64) * 64
        heads = h // 64
        kv = heads // 4 if heads % 4 == 0 else heads
        per_layer = 2 * h * h + 2 * kv * 64 * h + 3 * h * inter + 2 * h
        return inter, heads, kv, per_layer

    h = 128
    for cand in (256, 512, 768, 1024, 1536, 2048, 3072, 4096, 5120, 8192):
        if 8 * sizes(cand)[3] <= 0.75 * params:
            h = cand
    inter, heads, kv, per_layer = sizes(h)
    layers = max(1, int(0.75 * params) // per_layer)
    vocab = max(64, min(32000, (params - layers * per_layer - h) // (2 * h) // 64 * 64))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": 64,
              "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    shapes = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}"
        for m, rows in (("q", h), ("k", kv * 64), ("v", kv * 64), ("o", h)):
            shapes.append((f"{p}.self_attn.{m}_proj.weight", (rows, h)))
        shapes.append((f"{p}.mlp.gate_proj.weight", (inter, h)))
        shapes.append((f"{p}.mlp.up_proj.weight", (inter, h)))
        shapes.append((f"{p}.mlp.down_proj.weight", (h, inter)))
        shapes.append((f"{p}.input_layernorm.weight", (h,)))
        shapes.append((f"{p}.post_attention_layernorm.weight", (h,)))
    shapes.append(("model.norm.weight", (h,)))
    shapes.append(("lm_head.weight", (vocab, h)))
    return config, shapes


def weights_file(path: str) -> str:
    """The weights an input's merge reads: the file itself, or a folder's single
    ``model.safetensors`` (the llama layout's inputs are folders)."""
    return os.path.join(path, LLAMA_WEIGHTS) if os.path.isdir(path) else path


def _save(state, path: str) -> None:
    """Write a generated input under a temporary name, then rename it into place (an
    interrupted run never leaves a partial input that a later run would reuse)."""
    from safetensors.torch import save_file

    save_file(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def generate(folder: str, n: int, mb: float, kind: str = "sd"):
    import numpy as np
    import torch

    """``n`` inputs of layout ``kind`` (``sd``, ``moe``: ``.safetensors`` files; ``llama``:
    folders holding ``model.safetensors`` and ``config.json``), ``mb`` MB each, made
    once and reused; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    config = None
    if kind == "llama":
        config, shapes = llama_layout(int(mb * 1e6))
    elif kind == "moe":
        shapes = moe_layout(int(mb * 1e6), N_TENSORS)
    elif kind == "sd":
        shapes = layout(int(mb * 1e6))
    else:
        raise ValueError(f"FASTSOUP_BENCH_MERGE_LAYOUT={kind!r}: use sd, moe or llama")
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
        if config is not None:  # a transformers model folder
            model_dir = os.path.join(folder, f"model{i}")
            os.makedirs(model_dir, exist_ok=True)
            with open(os.path.join(model_dir, "config.json"), "w") as f:
                json.dump(config, f, indent=1)
            paths.append(model_dir)
            path = os.path.join(model_dir, LLAMA_WEIGHTS)
        else:
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
    """The least I/O of a merge, done the way the merge does it: every input read in
    windows of the merge's default budget (an equal piece of each input per window, the
    window's bytes cut in two halves read by two threads, ``preadv`` into reused buffers
    that stay in the cache), while a writer thread writes ``out_bytes`` (default: the
    first input's size) into a preallocated file as the windows arrive, starting
    write-back as it goes, then fsyncs the file and its directory. Same page-cache state
    and fsync as the merges. A folder input is its weights file (:func:`weights_file`):
    the bytes its merge reads."""
    from fastsoup.io.atomic import sync_file_range
    from fastsoup.merge.engine import budget_split
    from fastsoup.merge.mmap import anonymous_buffer
    from fastsoup.merge.options import DEFAULT_MEMORY

    inputs = [weights_file(p) for p in inputs]
    sizes = [os.path.getsize(p) for p in inputs]
    size = sizes[0] if out_bytes is None else out_bytes
    window = budget_split(DEFAULT_MEMORY)[0]
    piece = max(4096, window // len(inputs) // 4096 * 4096)
    total = sum(sizes)
    errors = []
    fds = [os.open(p, os.O_RDONLY) for p in inputs]
    done = [0]
    cond = threading.Condition()

    def reader(half):
        try:
            buf = memoryview(anonymous_buffer(piece * len(inputs)))
            for pos in range(0, max(sizes), piece):
                got = 0
                for j, (fd, n) in enumerate(zip(fds, sizes)):
                    lo, hi = pos + half * piece // 2, pos + (half + 1) * piece // 2
                    if lo < n:
                        got += os.preadv(fd, [buf[j * piece: j * piece + min(hi, n) - lo]], lo)
                with cond:
                    done[0] += got
                    cond.notify_all()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            with cond:
                done[0] = total
                cond.notify_all()

    def writer():
        try:
            mv = memoryview(anonymous_buffer(max(4096, size * piece // max(total, 1) * len(inputs))))
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if size:
                    os.posix_fallocate(fd, 0, size)
                pos = 0
                while pos < size:
                    n = min(size - pos, len(mv))
                    with cond:  # paced by the reads, as a merge's output follows its input
                        cond.wait_for(lambda: done[0] >= total * (pos + n) // size)
                    os.pwrite(fd, mv[:n], pos)
                    sync_file_range(fd, pos, n)
                    pos += n
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

    threads = [threading.Thread(target=reader, args=(h,)) for h in (0, 1)]
    threads.append(threading.Thread(target=writer))
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for fd in fds:
            os.close(fd)
    if errors:
        raise errors[0]


def run_fastsoup(inputs, out, hash_mode="sha256", cache=False, memory=None):
    """``cache=False``: the inputs' sha256 are computed in this run (first merge of these
    constituents); ``cache=True``: taken from fastsoup's digest cache (a later merge)."""
    import fastsoup as fs

    old = os.environ.get("FASTSOUP_HASH_CACHE")
    os.environ["FASTSOUP_HASH_CACHE"] = "1" if cache else "0"
    if cache:
        os.environ.setdefault("FASTSOUP_CACHE_DIR", os.path.join(os.path.dirname(out), ".cache"))
    try:
        fs.merge(inputs, out, quiet=True, overwrite=True, hash=hash_mode, memory=memory)
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
        with safe_open(weights_file(p), "pt") as f:
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
            tool=tool, inputs=len(inputs),
            input_bytes=sum(os.path.getsize(weights_file(p)) for p in inputs),
            output_bytes=os.path.getsize(weights_file(inputs[0])), peak_rss_bytes=child["peak_rss"],
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
        fd = os.open(weights_file(p), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


CGROUP_MEMORY = "/sys/fs/cgroup/memory"  # cgroup v1 memory hierarchy


def size_text(n: int) -> str:
    """``1073741824`` -> ``1 GiB``; ``157286400`` -> ``150 MiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n / 2**20:.1f} MiB"


def parse_bytes(text: str) -> int:
    """``1GiB`` / ``512MiB`` / ``2GB`` / ``1073741824`` -> bytes."""
    t = text.strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
             "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "b": 1}
    for u in sorted(units, key=len, reverse=True):
        if t.lower().endswith(u):
            return int(float(t[:-len(u)]) * units[u])
    return int(t)


class MemoryCgroup:
    """A fresh cgroup v1 memory group limited to ``limit`` bytes (memory and, where the
    kernel has swap accounting, memory + swap), for one command: page cache the command
    reads or writes is charged to it, so inputs larger than the limit cannot stay cached.
    :meth:`wrap` puts a command in it before it executes (a shell writes its own pid to
    ``cgroup.procs`` and execs the command: nothing runs in the benchmark's process
    between fork and exec); :meth:`remove` deletes the group once the command is gone."""

    _count = 0

    def __init__(self, limit: int):
        MemoryCgroup._count += 1
        self.path = os.path.join(CGROUP_MEMORY, f"fastsoup-bench-{os.getpid()}-{MemoryCgroup._count}")
        os.mkdir(self.path)
        try:
            self._write("memory.limit_in_bytes", limit)
            if os.path.exists(os.path.join(self.path, "memory.memsw.limit_in_bytes")):
                self._write("memory.memsw.limit_in_bytes", limit)
            self.limit = int(self._read("memory.limit_in_bytes"))
        except BaseException:
            self.remove()
            raise

    def _write(self, name: str, value) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(value))

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def wrap(self, argv):
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"',
                os.path.join(self.path, "cgroup.procs"), *argv]

    def stats(self) -> dict:
        """Peak charge of the group (memory.max_usage_in_bytes: page cache included), how
        often it hit its limit, and how many processes the OOM killer killed in it."""
        out = {"cgroup_peak": int(self._read("memory.max_usage_in_bytes")),
               "limit_hits": int(self._read("memory.failcnt"))}
        for line in self._read("memory.oom_control").splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                out["oom_kills"] = int(v)
        return out

    def remove(self) -> None:
        for _ in range(100):  # the last task's exit may take a moment to leave the group
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)
        os.rmdir(self.path)


def memory_cgroup_unavailable() -> str:
    """Why a command cannot be run in a memory cgroup here ("" when it can)."""
    if not os.path.isfile(os.path.join(CGROUP_MEMORY, "cgroup.procs")):
        return f"no cgroup v1 memory hierarchy at {CGROUP_MEMORY}"
    try:
        MemoryCgroup(1 << 30).remove()
    except OSError as exc:
        return f"cannot create a memory cgroup under {CGROUP_MEMORY}: {exc}"
    if not os.path.exists("/bin/sh"):
        return "no /bin/sh to put a command into the cgroup"
    return ""


class CommandFailed(RuntimeError):
    """A whole command exited non-zero; ``info`` holds what was measured of it."""

    def __init__(self, message: str, info: dict):
        super().__init__(message)
        self.info = info


def run_command(argv, env=None, memory_limit=None) -> dict:
    """Run a whole command as a user does; wall time from here (process start included),
    peak RSS and CPU time of the command from GNU time (``wait4``'s rusage; a small
    parent, so the peak is the command's own). With ``memory_limit`` (bytes) the command
    runs in a fresh memory cgroup of that limit (:class:`MemoryCgroup`), removed after;
    the result adds the group's peak charge and OOM kills."""
    group = MemoryCgroup(memory_limit) if memory_limit else None
    try:
        with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
            cmd = [TIME, "-f", "%M %U %S", "-o", tf.name, *argv]
            t0 = time.perf_counter()
            res = subprocess.run(group.wrap(cmd) if group else cmd, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 timeout=3600)
            dt = time.perf_counter() - t0
            lines = tf.read().strip().splitlines()
        fields = (lines or ["0 0 0"])[-1].split()
        out = {"seconds": dt, "peak_rss": int(fields[0]) * 1024,
               "cpu_seconds": float(fields[1]) + float(fields[2])}
        if group:
            out.update(group.stats(), memory_limit=group.limit)
    finally:
        if group:
            group.remove()
    if res.returncode != 0:
        signal = next((ln.rsplit(" ", 1)[-1] for ln in lines
                       if ln.startswith("Command terminated by signal")), None)
        out.update(returncode=res.returncode, signal=int(signal) if signal else None)
        facts = f"exit status {res.returncode}" + (f" (killed by signal {signal})" if signal else "")
        if group:
            facts += (f"; in a {size_text(group.limit)} memory cgroup: peak RSS "
                      f"{out['peak_rss'] / 1e6:.0f} MB, cgroup peak {out['cgroup_peak'] / 1e6:.0f} MB, "
                      f"OOM kills {out.get('oom_kills', '?')}, after {dt:.1f} s")
        said = (res.stderr or res.stdout).strip()[-600:]
        raise CommandFailed(f"{facts}; {' '.join(argv[:3])} ..." + (f": {said}" if said else
                                                                    " (printed nothing)"), out)
    return out


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


def peer_runner(name: str, inputs, folder: str, memory_limit=None):
    """``(callable(out) -> dict, reason)`` for a peer, or ``(None, why it is skipped)``;
    ``memory_limit``: run it in a memory cgroup of that many bytes (:func:`run_command`)."""
    if name == "mergekit":
        exe, why = _mergekit_cmd()
        if exe is None:
            return None, why
        models = []
        for i, p in enumerate(inputs):  # mergekit takes model folders (weights + config.json)
            if os.path.isfile(os.path.join(p, "config.json")):  # the llama layout: as they are
                models.append(os.path.abspath(p))
                continue
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
            # mergekit-yaml 0.1.5's flags: no tokenizer in these inputs to copy; the rest
            # its defaults (one output shard up to 5B parameters, model card written)
            r = run_command([exe, cfg, out, "--lazy-unpickle", "--no-copy-tokenizer"],
                            memory_limit=memory_limit)
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

        def run(out):  # sd-mecha takes weight files (a folder input: its model.safetensors)
            r = run_command([py, "-c", script, out, *[weights_file(p) for p in inputs]],
                            memory_limit=memory_limit)
            fsync_tree(out)
            return r
        return run, ""
    raise KeyError(name)


# the rows run under --memory-limit: whole commands only (an in-process row would put
# the benchmark itself in the cgroup), each in its own fresh cgroup
MEMORY_LIMIT_ROWS = ("floor", "fastsoup-merge (first merge)", "fastsoup-merge --hash none")


def interleaved(inputs, folder: str, rounds: int, cold: bool, peers=("mergekit", "sd-mecha"),
                skip=(), memory_limit=None, budgets=()):
    """Every row once per round, rows in the same order each round; returns
    ``(rows, skipped)``: ``{row: {"kind", "times", "cpu", "rss", "load"}}``.

    ``memory_limit`` (bytes): only :data:`MEMORY_LIMIT_ROWS` and the peers, every one in a
    fresh memory cgroup of that limit, the inputs evicted before every row (pages
    already cached were charged to whoever read them first, not to the cgroup)."""
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
    lora_inputs = []

    def lora_soup(_, o):  # adapters an eighth of an input's size (LoRAs are small)
        run_fastsoup(lora_inputs, o, "none")

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
        return lambda o: run_command([a if a != "{out}" else o for a in argv], env,
                                     memory_limit=memory_limit)

    plan = [
        ("floor", "in-process", in_process(run_floor)),
        ("fastsoup (first merge)", "in-process", in_process(TOOLS["fastsoup"])),
        ("fastsoup (digests cached)", "in-process", in_process(TOOLS["fastsoup-hash-cached"])),
        ("fastsoup (hash none)", "in-process", in_process(TOOLS["fastsoup-nohash"])),
        ("fastsoup TIES (density 0.2, hash none)", "in-process", in_process(TOOLS["fastsoup-ties"])),
        ("fastsoup DARE (density 0.2, hash none)", "in-process", in_process(TOOLS["fastsoup-dare"])),
        (f"fastsoup LoRA soup ({len(inputs)} × rank-16 adapters of {MB / 8:g} MB, hash none)",
         "in-process", in_process(lora_soup)),
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
    at = [p[0] for p in plan].index("fastsoup (hash none)") + 1
    for budget in budgets:  # the streaming budget (--memory) swept, in process, after the default
        plan[at:at] = [(f"fastsoup (first merge, --memory {budget})", "in-process", in_process(
                         lambda i, o, b=budget: run_fastsoup(i, o, memory=b))),
                     (f"fastsoup (hash none, --memory {budget})", "in-process", in_process(
                         lambda i, o, b=budget: run_fastsoup(i, o, "none", memory=b)))]
    if memory_limit:
        plan = [p for p in plan if p[1] == "command" and p[0] in MEMORY_LIMIT_ROWS]
        cold = True
    left_out = lambda name: any(name == s or name.startswith(s + " ") for s in skip)
    skipped = {name: "left out of this run (--skip)" for name in sorted({p[0] for p in plan})
               if left_out(name)}
    plan = [p for p in plan if not left_out(p[0])]
    for name in peers:
        fn, why = peer_runner(name, inputs, folder, memory_limit)
        if fn is None:
            skipped[name] = why
        else:
            plan.append((name, "command", fn))
    names = {p[0] for p in plan}
    if any(n.startswith("fastsoup LoRA soup") for n in names):
        lora_inputs += generate_lora(os.path.join(folder, f"lora-{len(inputs)}x{MB / 8:g}MB"),
                                     len(inputs), MB / 8)
    # digest caches filled once (the "cached" rows are any later merge of these inputs)
    os.environ.setdefault("FASTSOUP_CACHE_DIR", os.path.join(folder, ".cache"))
    if "fastsoup (digests cached)" in names:
        TOOLS["fastsoup-hash-cached"](inputs, out("prime"))
        drop_output(out("prime"))
    if "fastsoup-merge (digests cached)" in names:
        run_command(cli + [*inputs, "-o", out("prime-cli"), "-q", "--overwrite"], env_cached)
        drop_output(out("prime-cli"))
    for r in range(rounds):
        for name, kind, fn in plan:
            key = f"{name} [{kind}]"
            row = rows.setdefault(key, {"name": name, "kind": kind, "times": [], "cpu": [],
                                        "rss": [], "load": [], "error": None})
            if memory_limit:
                row.setdefault("cgroup_peak", [])
                row.setdefault("oom_kills", [])
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
            except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
                row["error"] = str(exc) if isinstance(exc, RuntimeError) else \
                    f"{type(exc).__name__}: {exc}"
                row["failure"] = getattr(exc, "info", None)  # what was measured of it
                print(f"  {key}: failed: {exc}", file=sys.stderr, flush=True)
                continue
            finally:
                drop_output(o)
            row["times"].append(res["seconds"])
            row["cpu"].append(res.get("cpu_seconds"))
            row["rss"].append(res.get("peak_rss"))
            row["load"].append((load, os.getloadavg()[0]))
            if memory_limit:
                row["cgroup_peak"].append(res.get("cgroup_peak"))
                row["oom_kills"].append(res.get("oom_kills"))
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
    limit = meta.get("memory_limit")
    title = f"# fastsoup-merge on CPU, {meta['layout_text']}: {meta['date']}"
    if limit:
        title = (f"# fastsoup-merge on CPU under a {size_text(limit)} memory limit, "
                 f"{meta['layout_text']}: {meta['date']}")
    lines = [title, ""]
    legend = ("*× floor*: median / the floor's median of the same kind (in-process against the "
              "in-process floor, whole commands against the floor run as a fresh Python). "
              "*CPU s*: user + system time of the process (all threads), median. *peak RSS*: "
              "of the whole command (GNU time), interpreter and imports included.")
    if limit:
        fits = "do not fit" if meta["input_bytes"] > limit else "fit"
        lines += [f"- **memory limit: {size_text(limit)} ({limit} bytes) per command**: each "
                  "command runs in a fresh cgroup v1 memory group of that limit (page cache "
                  "charged to it; memory + swap limited alike where swap is accounted), "
                  f"removed after it; the inputs ({meta['input_bytes'] / 1e9:.2f} GB in all) "
                  f"{fits} in it",
                  "- rows: whole commands only, the floor (a fresh Python) run in the same "
                  "kind of cgroup as the merges"]
        legend += (" *cgroup peak*: the group's peak charge (memory.max_usage_in_bytes, page "
                   "cache included: at most the limit), median. *OOM kills*: processes the "
                   "kernel's OOM killer killed in the group, summed over the rounds.")
    lines += [f"- machine: {meta['machine']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- command: `{meta['command']}`",
             f"- page cache: {meta['cache_text']}",
             f"- bytecode: {meta.get('bytecode') or 'not recorded'}",
             f"- load average (1 / 5 / 15 min): before {la['before'][0]:.2f} / {la['before'][1]:.2f} / "
             f"{la['before'][2]:.2f}, after {la['after'][0]:.2f} / {la['after'][1]:.2f} / "
             f"{la['after'][2]:.2f} (other work shares these cores: timings are contended)",
             f"- rounds: {meta['rounds']}, interleaved (every row once per round, same order)"
             + (" — **smoke run: one round, no spread**" if smoke else ""),
             "",
             legend,
             "",
             "| row | kind | median s | min–max s | × floor | CPU s | peak RSS MB | 1-min load at start |"
             + (" cgroup peak MB | OOM kills |" if limit else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if limit else "")]
    for key, r in rows.items():
        if r["error"] or not r["times"]:
            f = r.get("failure") or {}
            if f:
                sig = f", signal {f['signal']}" if f.get("signal") else ""
                lines.append(f"| {r['name']} | {r['kind']} | failed after {f['seconds']:.3f} s "
                             f"(exit status {f.get('returncode')}{sig}) | | | {f['cpu_seconds']:.2f} | "
                             f"{f['peak_rss'] / 1e6:.0f} | |"
                             + (f" {f['cgroup_peak'] / 1e6:.0f} | {f.get('oom_kills', '?')} |"
                                if limit and "cgroup_peak" in f else (" | |" if limit else "")))
            else:
                lines.append(f"| {r['name']} | {r['kind']} | failed | | | | | |"
                             + (" | |" if limit else ""))
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
        if limit:
            peaks = [x for x in r.get("cgroup_peak", []) if x]
            kills = [x for x in r.get("oom_kills", []) if x is not None]
            lines[-1] += (f" {statistics.median(peaks) / 1e6:.0f} |" if peaks else " - |") + \
                         (f" {sum(kills)} |" if kills else " - |")
    for key, r in rows.items():
        if r["error"]:
            lines.append(f"\n{r['name']} ({r['kind']}) failed: `{r['error'][:300]}`")
    for name, why in skipped.items():
        lines.append(f"\n{name}: not measured: {why}.")
    return "\n".join(lines) + "\n"


def compile_bytecode() -> str:
    """Byte-compile fastsoup and this script before the rounds, as ``pip install`` does,
    so that the whole commands do not compile their modules from source on every start
    (an editable install under ``PYTHONDONTWRITEBYTECODE`` never keeps bytecode: about
    0.13 s of every merge command on this 2-core machine). Returns what the results
    say about it."""
    import compileall

    import fastsoup

    ok = all([compileall.compile_dir(os.path.dirname(fastsoup.__file__), quiet=2),
              compileall.compile_file(HERE, quiet=2)])
    if ok:
        return ("compiled before the rounds (compileall), as an installed package has it; "
                "the commands load it, never compile from source")
    return ("could not be written before the rounds (read-only install?): the commands may "
            "compile modules from source at every start")


def run_main(argv) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="bench_merge.py --run")
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--cold", action="store_true", help="evict the inputs before every round")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of row names, or of their first "
                    "words, to leave out (e.g. naive: minutes on 50,000 tensors; "
                    "'fastsoup TIES,fastsoup DARE')")
    ap.add_argument("--memory-limit", metavar="SIZE",
                    help="run the whole commands (floor, fastsoup-merge first merge and "
                    "--hash none, peers) each in a fresh cgroup v1 memory group of SIZE "
                    "(e.g. 1GiB), inputs evicted before every row; needs a writable "
                    f"{CGROUP_MEMORY}")
    ap.add_argument("--budgets", default="", metavar="SIZES",
                    help="comma list of streaming budgets (e.g. 8MiB,32MiB,256MiB): in-process "
                    "first-merge and --hash none rows at each --memory")
    args = ap.parse_args(argv)
    memory_limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    if memory_limit:
        why = memory_cgroup_unavailable()
        if why:
            print(f"--memory-limit {args.memory_limit}: not measured: {why}", file=sys.stderr)
            return 0
    folder = os.environ.get("FASTSOUP_BENCH_MERGE_DIR") or tempfile.mkdtemp(prefix="fsbench-")
    inputs = generate(os.path.join(folder, f"in-{LAYOUT}-{N_INPUTS}x{MB:g}MB"), N_INPUTS, MB, LAYOUT)
    from safetensors import safe_open

    with safe_open(weights_file(inputs[0]), "np") as f:
        n_tensors = len(list(f.keys()))
    os.sync()
    if not args.cold and not memory_limit:
        run_floor(inputs, os.path.join(folder, "warm.bin"))  # warm the page cache
        os.unlink(os.path.join(folder, "warm.bin"))
    bytecode = compile_bytecode()
    load_before = os.getloadavg()
    rows, skipped = interleaved(inputs, folder, ROUNDS, args.cold,
                                peers=() if args.no_peers else ("mergekit", "sd-mecha"),
                                skip=[x.strip() for x in args.skip.split(",") if x.strip()],
                                memory_limit=memory_limit,
                                budgets=[b.strip() for b in args.budgets.split(",") if b.strip()])
    import datetime

    size = os.path.getsize(weights_file(inputs[0]))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(), "versions": _versions(), "rounds": ROUNDS, "layout": LAYOUT,
        "inputs": len(inputs), "input_bytes": size * len(inputs), "tensors_per_file": n_tensors,
        "layout_text": f"{len(inputs)} × {size / 1e6:.0f} MB bf16 "
                       f"{'Llama' if LAYOUT == 'llama' else LAYOUT.upper()}-like inputs"
                       + (" (model folders with config.json)" if LAYOUT == "llama" else "") + ", "
                       f"{n_tensors} tensors each",
        "memory_limit": memory_limit,
        "cache_text": ("cold: each input evicted (sync + POSIX_FADV_DONTNEED) before every row "
                       "of every round; the VM's host may still cache the disk"
                       if args.cold or memory_limit else
                       "warm: inputs read once before the rounds; os.sync() before every row"),
        "command": " ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ)
                            if k.startswith("FASTSOUP_BENCH_MERGE_") and k != "FASTSOUP_BENCH_MERGE_DIR")
                   + " python benchmarks/bench_merge.py " + " ".join(argv),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "bytecode": bytecode,
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
