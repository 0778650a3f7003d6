"""Streaming execution of a merge plan.

Data path, per output file: tensors are split into work items (whole small tensors,
chunks of large ones), consecutive items are fused into runs (:func:`make_runs`: one
kernel call over items contiguous in every file), a chunk of tensors at a time as the
stream takes them (:class:`PlannedRuns`), and runs are streamed one of two ways.

When the sum runs on the CPU and every input is safetensors, runs are cut into slices
(:func:`_stream_sliced`): each worker thread reads a slice of every input into its own
small buffer, sums it at once, while the bytes are in cache, and hashes it for the
digest (:class:`.hashing.Hasher`) in the file's turn, so that a file's digest takes its
bytes in file order (at most ``threads`` × ``SLICE_BYTES`` of input buffers). Otherwise
(a torch device, pickle inputs) runs are grouped into windows of about ``window_bytes``
of input: while window ``j`` is summed, a prefetch thread ``pread``s window ``j + 1`` of
every input into the other window buffer (:func:`.mmap.prefetch_window`; inputs are never
mapped, so a file truncated under the merge is an error, not SIGBUS) and hands those
bytes to the digest (:class:`.hashing.Hasher`), and a writer thread ``pwrite``s the
previous staging buffer into the pre-sized output file (:mod:`.writer`). The resident
set stays near

    2 × window_bytes (input buffers) + 2 × staging_bytes (output buffers)

whatever the model size and the number of inputs. The sum itself is one call per run
to :func:`fastsoup.kernels.cpu.weighted_sum` (the ``_C`` kernel: fused K-way, fp32 or
fp64 accumulation, GIL released), which reads each input element once and writes each
output element once; or, with a torch device, :func:`fastsoup.weighted_sum_` on that
device. Integer/bool tensors are copied, after :func:`check_equal_copies` has compared
them across inputs. The CPU path does not import torch.
"""
from __future__ import annotations

import operator
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..io.safetensors import DTYPES, ITEMSIZE, TORCH_NAMES
from ..kernels import cpu as cpu_kernels
from . import mmap as input_maps
from .errors import Diagnostics, MergeError, PlanError
from .formats import WeightFile
from .mmap import PAGE, InputFiles, WindowBuffer, align_down, anonymous_buffer
from .plan import OutTensor, Plan
from .writer import SafetensorsFileWriter

MIN_BUDGET = 4 << 10


@dataclass
class Item:
    """A slice ``[lo, hi)`` (elements) of one output tensor."""

    file_index: int
    tensor: OutTensor
    lo: int
    hi: int


def budget_split(memory: int) -> Tuple[int, int]:
    """(window_bytes, staging_bytes) for a streaming budget of ``memory`` bytes:
    2 windows + 2 staging buffers ≤ memory."""
    memory = max(memory, MIN_BUDGET)
    staging = max(memory // 8, 1024)
    window = max((memory - 2 * staging) // 2, 1024)
    return window, staging


def make_items(files: List[Tuple[int, List[OutTensor]]], window: int, staging: int) -> List[Item]:
    """Work items of each output file's tensors, in order: a tensor whole when its input
    and output bytes fit ``window`` and ``staging``, else cut into chunks that fit. The
    per-tensor sizes are computed on arrays (C-level attribute reads): checkpoints of
    10⁵ tensors spend no Python loop per input here."""
    size = ITEMSIZE
    items: List[Item] = []
    append = items.append
    for fi, tensors in files:
        m = len(tensors)
        if not m:
            continue
        # input bytes per element: an input set's width × its one dtype, or source by source
        per_elem_in = np.fromiter(
            (len(sh[0].indices) * size[sh[1].dtype] if sh is not None
             else sum(map(size.__getitem__, map(_INFO_DTYPE, t.sources)))
             for t, sh in zip(tensors, map(_SHARED, tensors))), np.int64, m)
        out_es = np.fromiter(map(size.__getitem__, map(attrgetter("dtype"), tensors)), np.int64, m)
        chunks = np.maximum(1, np.minimum(window // np.maximum(per_elem_in, 1), staging // out_es))
        numels = list(map(attrgetter("numel"), tensors))
        for t, n, chunk in zip(tensors, numels, chunks.tolist()):
            if n <= chunk:
                append(Item(fi, t, 0, n))
                continue
            for lo in range(0, n, chunk):
                append(Item(fi, t, lo, min(n, lo + chunk)))
    return items


@dataclass
class RunSource:
    """One input's bytes of a :class:`Run`: ``[lo, hi)`` of ``file`` (absolute offsets; a
    pickle input has no header and is read by ``key`` from byte ``start`` of its tensor)."""

    file: WeightFile
    dtype: str
    weight: float
    key: str
    start: int
    lo: int
    hi: int


@dataclass
class Run:
    """Consecutive work items computed as one: contiguous in the output file and, for every
    input, contiguous in its file, with the same op, dtypes and weights. A weighted sum
    is elementwise, so a run of many small tensors is one kernel call over their
    concatenation (one read and one digest range per input): per-tensor work leaves the
    loop, and checkpoints of tens of thousands of tensors stream like large ones."""

    file_index: int
    op: str
    out_dtype: str
    out_offset: int                 # byte offset in the output file
    n: int                          # elements
    sources: List[RunSource]        # the sources read (the first one only for a copy)
    items: List[Item]

    @property
    def out_nbytes(self) -> int:
        return self.n * DTYPES[self.out_dtype].itemsize

    @property
    def in_nbytes(self) -> int:
        return sum(s.hi - s.lo for s in self.sources)

    @property
    def last_key(self) -> str:
        return self.items[-1].tensor.qualified


def _run_sources(it: Item) -> List[RunSource]:
    t = it.tensor
    out = []
    for s in (t.sources[:1] if t.op == "copy" else t.sources):
        es = DTYPES[s.dtype].itemsize
        start, stop = it.lo * es, it.hi * es
        if s.file.header is not None:
            begin = s.file.header.data_start + s.info.begin
            lo, hi = begin + start, begin + stop
        else:  # a loaded pickle input: never fused
            lo, hi = 0, stop - start
        out.append(RunSource(s.file, s.dtype, s.weight, s.key, start, lo, hi))
    return out


def make_runs(items: List[Item], writers: List[SafetensorsFileWriter], window: int,
              staging: int) -> List[Run]:
    """Fuse consecutive ``items`` into :class:`Run` s of at most ``window`` input bytes and
    ``staging`` output bytes (items were cut to fit both). Item ``i`` joins the run of
    item ``i − 1`` when both go to the same output file, back to back, with the same op
    and output dtype, and every input's bytes of ``i`` follow its bytes of ``i − 1`` in the
    same file with the same dtype and weight (pickle inputs never join). The comparisons
    are done on arrays (one row per item, one column per input); the caps, greedily, in
    one pass over the items. Items of tensors planned from a shared header take their
    columns from their :class:`.plan.InputSet` (:func:`_fill_from_sets`): no Python work
    per input and item."""
    count = len(items)
    if count == 0:
        return []
    size = ITEMSIZE
    tensors = list(map(attrgetter("tensor"), items))
    shared = list(map(_SHARED, tensors))
    is_shared = np.fromiter(map(operator.is_not, shared, repeat(None)), bool, count)
    lo = np.fromiter(map(attrgetter("lo"), items), np.int64, count)
    n = np.fromiter(map(attrgetter("hi"), items), np.int64, count) - lo
    out_es = np.fromiter(map(size.__getitem__, map(attrgetter("dtype"), tensors)), np.int64, count)
    out_at = np.fromiter((writers[it.file_index].offsets[t.key] for it, t in zip(items, tensors)),
                         np.int64, count) + lo * out_es
    # one id per (output file, op, output dtype)
    kind = (np.fromiter(map(attrgetter("file_index"), items), np.int64, count) * 4096
            + _ids(list(map(attrgetter("op"), tensors))) * 64
            + _ids(list(map(attrgetter("dtype"), tensors))))

    # items read source by source (a copy reads its first source): one column per source
    plain = np.flatnonzero(~is_shared)
    srcs = [t.sources[:1] if t.op == "copy" else t.sources
            for t in map(tensors.__getitem__, plain.tolist())]
    p_per = np.fromiter(map(len, srcs), np.int64, len(srcs))
    flat = list(chain.from_iterable(srcs))
    total = len(flat)
    files = list(map(attrgetter("file"), flat))
    headers = list(map(attrgetter("header"), files))
    no_header = np.fromiter(map(operator.is_, headers, repeat(None)), bool, total)
    dts = list(map(_INFO_DTYPE, flat))
    es = np.fromiter(map(size.__getitem__, dts), np.int64, total)
    weight = np.fromiter(map(attrgetter("weight"), flat), np.float64, total)
    if no_header.any():
        begin = np.fromiter((h.data_start + s.info.begin if h is not None else 0
                             for h, s in zip(headers, flat)), np.int64, total)
    else:
        begin = (np.fromiter(map(attrgetter("data_start"), headers), np.int64, total)
                 + np.fromiter(map(_INFO_BEGIN, flat), np.int64, total))

    # items planned from a shared header: their input set's files and weights, one info
    rows_s = np.flatnonzero(is_shared)
    sh = list(map(shared.__getitem__, rows_s.tolist()))
    sets = list(map(itemgetter(0), sh))
    uniq = list(dict.fromkeys(sets))        # InputSet compares by identity
    sid = _ids(sets)                        # index into uniq
    infos = list(map(itemgetter(1), sh))
    s_dts = list(map(attrgetter("dtype"), infos))
    s_es = np.fromiter(map(size.__getitem__, s_dts), np.int64, len(sh))

    # ids common to both kinds of items
    set_files = [f for u in uniq for f in u.files]
    f_all = _ids(list(map(attrgetter("path"), files + set_files)))
    f_id, sf_id = f_all[:total], f_all[total:]
    f_id[no_header] = -1  # pickle inputs: never fused
    d_all = _ids(dts + s_dts)
    d_id, sd_id = d_all[:total], d_all[total:]

    per = np.zeros(count, dtype=np.int64)
    per[plain] = p_per
    widths = np.array([len(u.indices) for u in uniq], dtype=np.int64)
    per[rows_s] = widths[sid] if len(uniq) else 0
    width = int(per.max())
    g_file = np.full((count, width), -2, dtype=np.int64)
    g_dtype = np.full((count, width), -2, dtype=np.int64)
    g_weight = np.zeros((count, width), dtype=np.float64)
    g_start = np.zeros((count, width), dtype=np.int64)
    g_stop = np.zeros((count, width), dtype=np.int64)
    in_bytes = np.zeros(count, dtype=np.int64)

    row = np.repeat(plain, p_per)
    col = np.arange(total) - np.repeat(np.cumsum(p_per) - p_per, p_per)
    start = begin + lo[row] * es
    g_file[row, col], g_dtype[row, col], g_weight[row, col] = f_id, d_id, weight
    g_start[row, col], g_stop[row, col] = start, start + n[row] * es
    np.add.at(in_bytes, row, n[row] * es)

    if uniq:
        _fill_from_sets(uniq, sid, sf_id, sd_id, infos, s_es, rows_s, lo, n, per, in_bytes,
                        (g_file, g_dtype, g_weight, g_start, g_stop))

    pickled = np.zeros(count, dtype=bool)
    pickled[row[f_id < 0]] = True
    join = np.zeros(count, dtype=bool)
    join[1:] = ((kind[1:] == kind[:-1]) & (per[1:] == per[:-1])
                & (out_at[1:] == out_at[:-1] + n[:-1] * out_es[:-1])
                & ~pickled[1:] & ~pickled[:-1]
                & (g_file[1:] == g_file[:-1]).all(axis=1)
                & (g_dtype[1:] == g_dtype[:-1]).all(axis=1)
                & (g_weight[1:] == g_weight[:-1]).all(axis=1)
                & (g_start[1:] == g_stop[:-1]).all(axis=1))
    out_bytes = n * out_es
    runs: List[Run] = []
    first = 0
    cur_in = cur_out = 0
    joins, ins, outs = join.tolist(), in_bytes.tolist(), out_bytes.tolist()
    for i in range(count):
        if i and joins[i] and cur_in + ins[i] <= window and cur_out + outs[i] <= staging:
            cur_in += ins[i]
            cur_out += outs[i]
            continue
        if i:
            runs.append(_run(items, first, i, n, out_at, g_stop))
        first, cur_in, cur_out = i, ins[i], outs[i]
    runs.append(_run(items, first, count, n, out_at, g_stop))
    return runs


def _fill_from_sets(uniq, sid, sf_id, sd_id, infos, s_es, rows, lo, n, per, in_bytes, grids):
    """Fill :func:`make_runs`' grid rows ``rows`` (items planned from a shared header) from
    their input sets ``uniq[sid]``: each set's file ids ``sf_id`` (concatenated in set
    order) and weights, one dtype id ``sd_id`` and one :class:`TensorInfo` per item, the
    inputs' data sections at their headers' ``data_start``."""
    g_file, g_dtype, g_weight, g_start, g_stop = grids
    ws = max(len(u.indices) for u in uniq)
    t_file = np.full((len(uniq), ws), -2, dtype=np.int64)
    t_weight = np.zeros((len(uniq), ws), dtype=np.float64)
    t_data = np.zeros((len(uniq), ws), dtype=np.int64)
    at = 0
    for j, u in enumerate(uniq):
        k = len(u.indices)
        t_file[j, :k] = sf_id[at:at + k]
        t_weight[j, :k] = u.weights
        t_data[j, :k] = [f.header.data_start for f in u.files]
        at += k
    # (the columns past a set's width are compared only between rows of equal width)
    start = t_data[sid] + (np.fromiter(map(attrgetter("begin"), infos), np.int64, len(infos))
                           + lo[rows] * s_es)[:, None]
    g_file[rows, :ws] = t_file[sid]
    g_dtype[rows, :ws] = sd_id[:, None]
    g_weight[rows, :ws] = t_weight[sid]
    g_start[rows, :ws] = start
    g_stop[rows, :ws] = start + (n[rows] * s_es)[:, None]
    in_bytes[rows] = per[rows] * n[rows] * s_es


def _ids(values: list) -> "np.ndarray":
    """Small integer ids of hashable ``values``: equal values, equal ids."""
    index = {v: i for i, v in enumerate(dict.fromkeys(values))}
    return np.fromiter(map(index.__getitem__, values), np.int64, len(values))


_INFO_DTYPE = attrgetter("info.dtype")
_SHARED = attrgetter("shared")
_INFO_BEGIN = attrgetter("info.begin")


def _run(items: List[Item], a: int, b: int, n, out_at, stops) -> Run:
    """The run of ``items[a:b]`` (fused by :func:`make_runs`)."""
    it = items[a]
    sources = _run_sources(it)
    if b - a > 1:
        for k, src in enumerate(sources):
            src.hi = int(stops[b - 1, k])
    return Run(it.file_index, it.tensor.op, it.tensor.dtype,
               int(out_at[a]), int(n[a:b].sum()), sources, items[a:b])


def make_windows(runs: List[Run], window: int) -> List[List[Run]]:
    """Consecutive runs grouped into windows of about ``window`` input bytes."""
    windows, cur, size = [], [], 0
    for it in runs:
        if cur and size + it.in_nbytes > window:
            windows.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += it.in_nbytes
    if cur:
        windows.append(cur)
    return windows


class Staging:
    """Two output buffers: one is filled while the other is written by the writer thread
    (``pool``, one worker, so writes reach the file in order). A flush may give the
    writer a ``before`` callable to run first (the sliced stream: wait for the slices
    that fill the buffer), so that the producer goes on filling the other buffer."""

    def __init__(self, nbytes: int, pool: ThreadPoolExecutor):
        self.bufs = [anonymous_buffer(nbytes), anonymous_buffer(nbytes)]
        self.pending = [None, None]
        self.cur = 0
        self.fill = 0
        self.writer: Optional[SafetensorsFileWriter] = None
        self.offset = 0
        self.pool = pool
        self.wait_seconds = 0.0  # time the producer waited for the writer

    def would_flush(self, writer: SafetensorsFileWriter, offset: int, nbytes: int) -> bool:
        """Whether :meth:`reserve` of these bytes hands the current buffer to the writer."""
        return (writer is not self.writer or offset != self.offset + self.fill
                or self.fill + nbytes > len(self.bufs[0]))

    def reserve(self, writer: SafetensorsFileWriter, offset: int, nbytes: int) -> memoryview:
        if self.would_flush(writer, offset, nbytes):
            self.flush()
            self.writer, self.offset = writer, offset
        start = self.fill
        self.fill += nbytes
        return memoryview(self.bufs[self.cur])[start:start + nbytes]

    @staticmethod
    def _write(before, writer: SafetensorsFileWriter, buf, offset: int) -> None:
        if before is not None:
            before()
        writer.pwrite(buf, offset, True)

    def flush(self, before: Optional[Callable[[], None]] = None) -> None:
        if self.fill and self.writer is not None:
            buf = self.bufs[self.cur][: self.fill]
            self.pending[self.cur] = self.pool.submit(self._write, before, self.writer, buf,
                                                      self.offset)
            self.cur ^= 1
            fut = self.pending[self.cur]
            if fut is not None:
                self.pending[self.cur] = None
                t0 = time.perf_counter()
                fut.result()
                self.wait_seconds += time.perf_counter() - t0
        elif before is not None:
            before()
        self.offset += self.fill
        self.fill = 0

    def drain(self, before: Optional[Callable[[], None]] = None) -> None:
        self.flush(before)
        t0 = time.perf_counter()
        for i, fut in enumerate(self.pending):
            if fut is not None:
                self.pending[i] = None
                fut.result()
        self.wait_seconds += time.perf_counter() - t0


class CpuSummer:
    """Sums with ``fastsoup._C.weighted_sum`` (fp32/fp64 accumulation)."""

    def __init__(self, threads: int, acc64: bool):
        self.ext = cpu_kernels.extension(warn=True)
        if self.ext is None:
            raise MergeError("the compiled extension fastsoup._C is not available; rebuild with "
                             "`pip install --no-build-isolation -e .`")
        self.threads = threads
        self.acc64 = acc64

    def __call__(self, dst: memoryview, out_dtype: str, srcs, dtypes, weights, n: int,
                 threads: Optional[int] = None) -> None:
        """The sum on ``threads`` threads (default ``self.threads``; 1: the calling thread
        only, for callers that run several at once)."""
        cpu_kernels.weighted_sum(dst, out_dtype, srcs, dtypes, weights, n,
                                 self.threads if threads is None else threads, self.acc64,
                                 ext=self.ext)


# safetensors name -> torch dtype attribute ("BF16" -> "bfloat16")
_TORCH = {name: torch_name[len("torch."):] for torch_name, name in TORCH_NAMES.items()}


class TorchSummer:
    """Sums on a torch device with :func:`fastsoup.weighted_sum_` (the ``--device cuda``
    path), pipelined over two slots so the host and the device work at the same time.

    :meth:`submit` copies a run's input bytes into the next slot's staging buffers (pinned
    on CUDA), and enqueues on a side stream their copies to the device, the multi-tensor
    sum and the copy of the result back into the slot's pinned output buffer; it returns at
    once. :meth:`finish` waits for the oldest submission and copies its result into the
    output bytes bound to it. The engine submits run ``r``, then finishes ``r − 1`` (while
    the device works on ``r``), then reserves ``r``'s output bytes: a finished result is in
    place before the writer can be handed the bytes around it. A slot is reused only after
    its previous submission finished. On the CPU (``torch:cpu``, the tests' stand-in) the
    same order runs with the work done at submission."""

    asynchronous = True
    SLOTS = 2

    def __init__(self, device: str, acc64: bool):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergeError("--device cuda: no CUDA device is available")
        self.acc64 = acc64
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._host_bufs: Dict[tuple, object] = {}
        self.pending: List[list] = []   # [slot, event, result (pinned), nbytes, dst]
        self.submitted = 0

    def _staging(self, key: tuple, nbytes: int):
        buf = self._host_bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, pin_memory=self.cuda)
            self._host_bufs[key] = buf
        return buf[:nbytes]

    def _as_bytes(self, mv):
        if not len(mv):
            return self.torch.empty(0, dtype=self.torch.uint8)
        return self.torch.frombuffer(mv, dtype=self.torch.uint8)

    def submit(self, out_dtype: str, srcs, dtypes, weights, n: int) -> list:
        """Start one run's sum; the returned ticket's output bytes are bound later."""
        import contextlib
        import warnings

        from ..ops.weighted_sum import weighted_sum_

        torch = self.torch
        slot = self.submitted % self.SLOTS
        self.submitted += 1
        assert all(t[0] != slot for t in self.pending), "slot reused before it finished"
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        with warnings.catch_warnings(), ctx:
            warnings.simplefilter("ignore", UserWarning)  # frombuffer on read-only buffers
            ins = []
            for k, (mv, d) in enumerate(zip(srcs, dtypes)):
                host = self._staging((slot, k), len(mv))
                host.copy_(self._as_bytes(mv))            # host memcpy, overlaps the device
                dev = host.to(self.device, non_blocking=True)
                ins.append([dev.view(getattr(torch, _TORCH[d]))])
            out_t = getattr(torch, _TORCH[out_dtype])
            out = torch.empty(n, dtype=torch.float64 if self.acc64 else out_t, device=self.device)
            weighted_sum_([out], ins, list(weights))
            res = out.to(out_t).view(torch.uint8)
            nbytes = res.numel()
            result = self._staging((slot, "out"), nbytes)
            result.copy_(res, non_blocking=self.cuda)
            event = None
            if self.cuda:
                event = torch.cuda.Event()
                event.record(self.stream)
        ticket = [slot, event, result, nbytes, None]
        self.pending.append(ticket)
        return ticket

    def finish(self, keep: int = 0) -> None:
        """Complete submissions, oldest first, until at most ``keep`` are pending."""
        while len(self.pending) > keep:
            slot, event, result, nbytes, dst = self.pending.pop(0)
            if event is not None:
                event.synchronize()
            assert dst is not None and len(dst) == nbytes, "a result without its output bytes"
            self._as_bytes(dst).copy_(result)

    def __call__(self, dst: memoryview, out_dtype: str, srcs, dtypes, weights, n: int) -> None:
        """The synchronous form: submit, bind, finish."""
        self.finish()
        ticket = self.submit(out_dtype, srcs, dtypes, weights, n)
        ticket[4] = dst
        self.finish()


def _equal_chunked(files: InputFiles, a, b, nbytes: int, chunk: int) -> bool:
    """Whether two sources' bytes are equal, read and compared ``chunk`` bytes at a time
    into two reused buffers (the resident set stays within the budget)."""
    chunk = max(PAGE, align_down(chunk))
    bufs = [anonymous_buffer(min(chunk, max(nbytes, 1))) for _ in range(2)]
    for lo in range(0, nbytes, chunk):
        hi = min(nbytes, lo + chunk)
        va = files.read(a.file, a.key, lo, hi, bufs[0])
        vb = files.read(b.file, b.key, lo, hi, bufs[1])
        same = bool(np.array_equal(np.frombuffer(va, np.uint8), np.frombuffer(vb, np.uint8)))
        for s, v in ((a, va), (b, vb)):
            if s.file.header is not None:
                files.release(s.file, *files.absolute_range(s.file, s.key, lo, hi))
        if not same:
            return False
    return True


def check_equal_copies(plan: Plan, maps: InputFiles, chunk: int = 16 << 20) -> None:
    """Integer/bool tensors must be bit-identical across inputs. Reads only those tensors
    (before any output is written), ``chunk`` bytes at a time, and reports every
    difference, grouped by the pair of inputs."""
    found = Diagnostics()
    for t in plan.tensors():
        if t.op != "copy" or len(t.sources) < 2:
            continue
        nbytes = t.sources[0].info.nbytes
        first = t.sources[0]
        for other in t.sources[1:]:
            if not _equal_chunked(maps, first, other, nbytes, chunk):
                found.add("integer_values_differ",
                          f"integer/bool values differ between input {first.input_index + 1} "
                          f"and input {other.input_index + 1}", t.qualified,
                          f"{t.qualified!r}: {t.dtype} values differ between input "
                          f"{first.input_index + 1} and input {other.input_index + 1} "
                          "(integer/bool tensors are copied, so they must be equal)",
                          fix="such tensors (position ids, counters) are copied, not averaged, "
                          "so the inputs must agree; are they fine-tunes of the same base?")
    if found:
        raise PlanError("integer/bool tensors differ", [], found)


@dataclass
class RunStats:
    seconds: float
    bytes_written: int
    bytes_read: int
    items: int
    windows: int                         # windows read, or staging buffers filled by slices
    window_bytes: int
    staging_bytes: int
    prefetch_wait_seconds: float = 0.0   # waiting for the next window's pages
    sum_seconds: float = 0.0             # in the fused sum (and copies); sliced: the writer
    #                                      waiting for the slices (reads, sums, digests)
    write_wait_seconds: float = 0.0      # waiting for the writer thread
    runs: int = 0                        # kernel calls / copies (items fused into runs)


SLICED = True          # stream by slices on the CPU (tests compare with the windowed stream)
SLICE_BYTES = 4 << 20  # input bytes a worker reads, then sums while they are in cache


def _stream_sliced(runs: Iterable[Run], writers, maps: InputFiles, summer: "CpuSummer",
                   window: int, staging_bytes: int, progress, digest=None) -> dict:
    """Stream by slices: each run is cut into slices of about ``SLICE_BYTES`` of input,
    and each of ``summer.threads`` workers reads a slice of every input into its own
    buffer, sums it at once, while the bytes are still in cache (a window read by other
    threads and summed later is read from memory again), then hands them to ``digest``
    (a :class:`.hashing.Hasher`) in the file's turn (:meth:`~.hashing.Hasher.ticket`,
    taken here in file order). Slices of the runs that share a staging buffer run in
    parallel; the writer thread writes the buffer once all of them are done, while the
    workers go on with the slices of the other buffer (no pause between buffers).
    Returns the stream's figures for :class:`RunStats`."""
    workers = max(1, min(summer.threads, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastsoup-slice")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsoup-write")
    staging = Staging(staging_bytes, writer)
    local = threading.local()
    # the workers' buffers take the two windows' share of the memory budget
    budget = max(PAGE, min(SLICE_BYTES, 2 * window // workers))
    sum_time = 0.0          # the writer thread waiting for the slices
    pending: list = []      # the slices filling the current staging buffer
    causes: list = []       # the slices' errors, but the InterruptedErrors they caused
    if digest is not None and not digest.needs_bytes:
        digest = None

    def buffer(nbytes: int):
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = local.buf = anonymous_buffer(max(nbytes, budget))
        return memoryview(buf)

    def work(run: Run, sizes: List[int], dtypes: List[str], weights: List[float], lo: int,
             hi: int, dst: memoryview, tickets) -> None:
        """Elements ``[lo, hi)`` of ``run`` (``sizes``: each source's bytes per element)
        into ``dst``, the slice's output bytes; then the digest's turns ``tickets``."""
        try:
            if run.op == "copy":
                s = run.sources[0]
                views = [dst]
                maps.read_into(s.file, s.lo + lo * sizes[0], dst)
            else:
                buf = buffer((hi - lo) * sum(sizes))
                views, pos = [], 0
                for s, es in zip(run.sources, sizes):
                    view = buf[pos:pos + (hi - lo) * es]
                    maps.read_into(s.file, s.lo + lo * es, view)
                    views.append(view)
                    pos += len(view)
                summer(dst, run.out_dtype, views, dtypes, weights, hi - lo, threads=1)
            if tickets is not None:
                for s, es, view, t in zip(run.sources, sizes, views, tickets):
                    if t is not None:
                        digest.update_in_turn(s.file, t, s.lo + lo * es, view)
        except BaseException as exc:
            if not isinstance(exc, InterruptedError):
                causes.append(exc)
            if digest is not None:
                digest.abort()  # the slices waiting for this one's turns stop too
            raise

    def finish(futures: list, runs: List[Run]) -> None:
        """In the writer thread, before the staging buffer is written: wait for the
        slices that fill it; on an error, let the others end and raise the first cause,
        in whichever slice it was (not a slice stopped by it, waiting for a turn)."""
        nonlocal sum_time
        t = time.perf_counter()
        try:
            for fut in futures:
                fut.result()
        except BaseException as exc:
            for fut in futures:
                fut.cancel()
            for fut in futures:
                if not fut.cancelled():
                    fut.exception()
            raise (causes[0] if causes else exc) from None
        finally:
            sum_time += time.perf_counter() - t
        input_maps.release_window(maps, runs)  # with drop_cache: pages no longer needed

    def batch_done():
        """The ``before`` of the staging buffer being filled: its slices, its runs."""
        nonlocal batches, pending, batch
        batches += 1 if batch else 0
        futures, runs_in = pending, batch
        pending, batch = [], []
        return lambda: finish(futures, runs_in)

    batch: List[Run] = []  # the runs in the staging buffer being filled
    batches = 0
    try:
        for run in runs:
            nbytes = run.out_nbytes
            target = writers[run.file_index]
            if staging.would_flush(target, run.out_offset, nbytes):
                staging.flush(batch_done())  # written once its slices are done
            dst = staging.reserve(target, run.out_offset, nbytes)
            batch.append(run)
            if run.n > 0:
                sizes = [ITEMSIZE[s.dtype] for s in run.sources]
                dtypes, weights = [s.dtype for s in run.sources], [s.weight for s in run.sources]
                step = max(1, budget // (run.in_nbytes // run.n))
                out_es = ITEMSIZE[run.out_dtype]
                for lo in range(0, run.n, step):
                    hi = min(run.n, lo + step)
                    tickets = (None if digest is None
                               else [digest.ticket(s.file) for s in run.sources])
                    pending.append(pool.submit(work, run, sizes, dtypes, weights, lo, hi,
                                               dst[lo * out_es:hi * out_es], tickets))
            del dst
            if progress is not None:
                progress(run.last_key, nbytes)
        staging.drain(batch_done())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
    return dict(windows=batches, sum_seconds=sum_time, write_wait_seconds=staging.wait_seconds)


def execute(plan: Plan, writers: List[SafetensorsFileWriter], *, memory: int, threads: int,
            acc64: bool, device: str = "cpu", progress: Optional[Callable] = None,
            drop_cache: bool = False, maps: Optional[InputFiles] = None,
            digest=None) -> RunStats:
    """Compute every tensor of ``plan`` into ``writers`` (one per output file, in the
    order of ``plan.components[*].files``). Does not fsync or close the writers.
    ``digest`` (a :class:`.hashing.Hasher`) is fed every input range read, in order."""
    t0 = time.perf_counter()
    own_maps = maps is None
    maps = maps or InputFiles(drop_cache=drop_cache)
    summer = (CpuSummer(threads, acc64) if device == "cpu"
              else TorchSummer(device[len("torch:"):] if device.startswith("torch:") else device, acc64))
    window, staging_bytes = budget_split(memory)
    files = []
    fi = 0
    for c in plan.components:
        for f in c.files:
            files.append((fi, f.tensors))
            fi += 1
    assert len(writers) == fi
    maps.open_all(plan)
    runs = PlannedRuns(files, writers, window, staging_bytes)
    sliced = (SLICED and isinstance(summer, CpuSummer)
              and all(f.header is not None for f in input_maps.plan_files(plan)))
    try:
        if sliced:
            figures = _stream_sliced(runs, writers, maps, summer, window, staging_bytes, progress,
                                     digest)
        else:
            figures = _stream_windowed(list(runs), writers, maps, summer, window, staging_bytes,
                                       progress, digest)
    finally:
        if own_maps:
            maps.close()
    return RunStats(seconds=time.perf_counter() - t0, bytes_written=runs.out_bytes,
                    bytes_read=runs.in_bytes, items=runs.items, window_bytes=window,
                    runs=runs.runs, staging_bytes=staging_bytes, **figures)


class PlannedRuns:
    """The runs of ``files`` (``(output file index, tensors)``), computed a chunk of
    tensors at a time as the stream takes them (:func:`make_items`, :func:`make_runs`):
    the first bytes are read and written after the first chunk's runs, not after those
    of every tensor (tens of thousands of tensors take a few tenths of a second), and the
    rest are computed while the workers stream. A run never spans two chunks; chunks grow
    from ``FIRST_CHUNK`` tensors to ``MAX_CHUNK``. Counts what it yielded, for
    :class:`RunStats`. Iterable once."""

    FIRST_CHUNK = 1024
    MAX_CHUNK = 16384

    def __init__(self, files: List[Tuple[int, List[OutTensor]]], writers, window: int,
                 staging: int):
        self.files, self.writers, self.window, self.staging = files, writers, window, staging
        self.items = self.runs = self.out_bytes = self.in_bytes = 0

    def __iter__(self):
        chunk = self.FIRST_CHUNK
        for fi, tensors in self.files:
            a = 0
            while a < len(tensors):
                items = make_items([(fi, tensors[a:a + chunk])], self.window, self.staging)
                a += chunk
                runs = make_runs(items, self.writers, self.window, self.staging)
                self.items += len(items)
                self.runs += len(runs)
                for r in runs:
                    self.out_bytes += r.out_nbytes
                    self.in_bytes += r.in_nbytes
                    yield r
                chunk = min(2 * chunk, self.MAX_CHUNK)


def _stream_windowed(runs: List[Run], writers, maps: InputFiles, summer, window: int,
                     staging_bytes: int, progress, digest) -> dict:
    """Stream ``runs`` window by window: a prefetch thread (and a helper for half of each
    window) reads the next window while this thread sums the current one; the digest is
    fed every range read, in order. Returns the stream's figures for :class:`RunStats`."""
    windows = make_windows(runs, window)
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsoup-prefetch")
    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsoup-prefetch-half")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastsoup-write")
    staging = Staging(staging_bytes, writer)
    wbufs = [WindowBuffer(window), WindowBuffer(window)]
    prefetch_wait = sum_time = 0.0
    try:
        prefetch = (reader.submit(input_maps.prefetch_window, maps, windows[0], wbufs[0], digest,
                                  helper) if windows else None)
        for j, win in enumerate(windows):
            t_wait = time.perf_counter()
            wb = prefetch.result()
            prefetch_wait += time.perf_counter() - t_wait
            prefetch = (reader.submit(input_maps.prefetch_window, maps, windows[j + 1],
                                      wbufs[(j + 1) % 2], digest, helper)
                        if j + 1 < len(windows) else None)
            for run in win:
                nbytes = run.out_nbytes
                t_sum = time.perf_counter()
                if run.n > 0 and run.op != "copy" and getattr(summer, "asynchronous", False):
                    # submit r, finish r − 1 while the device works on r, then reserve r's
                    # bytes (the writer may take r − 1's bytes only once they are final)
                    srcs = [wb.view(run, k, maps) for k in range(len(run.sources))]
                    ticket = summer.submit(run.out_dtype, srcs, [s.dtype for s in run.sources],
                                           [s.weight for s in run.sources], run.n)
                    del srcs
                    summer.finish(keep=1)
                    dst = staging.reserve(writers[run.file_index], run.out_offset, nbytes)
                    ticket[4] = dst
                else:
                    if getattr(summer, "asynchronous", False):
                        summer.finish()
                    dst = staging.reserve(writers[run.file_index], run.out_offset, nbytes)
                    if run.n > 0:
                        if run.op == "copy":
                            dst[:] = wb.view(run, 0, maps)
                        else:
                            srcs = [wb.view(run, k, maps) for k in range(len(run.sources))]
                            summer(dst, run.out_dtype, srcs, [s.dtype for s in run.sources],
                                   [s.weight for s in run.sources], run.n)
                            del srcs
                sum_time += time.perf_counter() - t_sum
                del dst
                if progress is not None:
                    progress(run.last_key, nbytes)
            input_maps.release_window(maps, win)  # submissions copied their inputs already
        if getattr(summer, "asynchronous", False):
            summer.finish()
        staging.drain()
        for wb in wbufs:  # digest work still running on the last windows' bytes
            for fut in wb.pending:
                fut.result()
            wb.pending = []
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        helper.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
    return dict(windows=len(windows), prefetch_wait_seconds=prefetch_wait, sum_seconds=sum_time,
                write_wait_seconds=staging.wait_seconds)
