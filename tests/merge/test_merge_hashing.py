"""The digest workers of a merge (:class:`fastsoup.merge.hashing.Hasher`): every file's
sha256 from the ranges the engine read, hashed in file order on a shared pool of workers
(a file's strand), files spread over the workers as they free up, and nothing left
waiting forever when a merge is cancelled."""
import hashlib
import os
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest

from fastsoup.merge import hashing
from fastsoup.merge.formats import resolve

from tests.helpers import make_state, save_file_layout


def _inputs(tmp_path, n):
    return [resolve(save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i)))
            for i in range(n)]


def _feed_in_order(hasher, layouts, pieces=5, threads=2):
    """Feed every file's data section in ``pieces`` ranges (as the engine would), from
    ``threads`` reader threads, windows interleaving the files."""
    futs = []
    per_file = []
    for lay in layouts:
        wf = lay.files()[0]
        data = open(wf.path, "rb").read()
        lo0 = wf.header.data_start
        cuts = np.linspace(lo0, len(data), pieces + 1).astype(int)
        per_file.append([(wf, int(a), memoryview(data)[a:b]) for a, b in zip(cuts[:-1], cuts[1:])])
    for window in zip(*per_file):
        for wf, lo, view in window:
            fut = hasher.feed(wf, lo, view)
            if fut is not None:
                futs.append(fut)
    for f in futs:
        f.result()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_digests_equal_sha256_of_the_files(tmp_path, workers):
    layouts = _inputs(tmp_path, 3)
    h = hashing.Hasher(layouts, "sha256", cache=hashing.HashCache(None), workers=workers).start()
    _feed_in_order(h, layouts)
    got = h.wait()
    for lay in layouts:
        p = lay.files()[0].path
        assert got[p] == hashlib.sha256(open(p, "rb").read()).hexdigest()
    assert h.bytes_from_merge > 0


def test_out_of_order_ranges_are_hashed_by_a_second_read(tmp_path):
    layouts = _inputs(tmp_path, 2)
    h = hashing.Hasher(layouts, "sha256", cache=hashing.HashCache(None), workers=2).start()
    wf = layouts[0].files()[0]
    data = open(wf.path, "rb").read()
    mid = (wf.header.data_start + len(data)) // 2
    h.feed(wf, mid, memoryview(data)[mid:]).result()
    h.feed(wf, wf.header.data_start, memoryview(data)[wf.header.data_start:mid]).result()
    got = h.wait()
    for lay in layouts:
        p = lay.files()[0].path
        assert got[p] == hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_a_strand_runs_its_calls_one_at_a_time_in_order():
    pool = ThreadPoolExecutor(max_workers=4)
    strand = hashing._Strand(pool)
    seen, active, overlap = [], [0], [False]
    lock = threading.Lock()

    def call(i):
        with lock:
            active[0] += 1
            overlap[0] |= active[0] > 1
        seen.append(i)
        with lock:
            active[0] -= 1
        return i

    futs = [strand.submit(call, i) for i in range(500)]
    assert [f.result(timeout=30) for f in futs] == list(range(500))
    assert seen == list(range(500)) and not overlap[0]
    pool.shutdown()


def test_strands_share_the_workers_as_they_free_up():
    """Strands 1 and 3 of 3 on 2 workers run at the same time (a fixed file -> worker
    assignment would put both on worker 1 and leave worker 2 idle, or here deadlock)."""
    pool = ThreadPoolExecutor(max_workers=2)
    a, b, c = (hashing._Strand(pool) for _ in range(3))
    c_ran = threading.Event()
    fa = a.submit(lambda: c_ran.wait(timeout=20))
    fb = b.submit(lambda: None)
    fb.result(timeout=20)
    fc = c.submit(c_ran.set)
    fc.result(timeout=20)
    assert fa.result(timeout=20) is True
    pool.shutdown()


def test_cancelled_strand_work_never_hangs_a_waiter():
    pool = ThreadPoolExecutor(max_workers=1)
    strand = hashing._Strand(pool)
    gate = threading.Event()
    first = strand.submit(gate.wait, 20)
    queued = [strand.submit(lambda: None) for _ in range(3)]
    strand.cancel()
    gate.set()
    assert first.result(timeout=20) is True
    for f in queued:
        with pytest.raises(CancelledError):
            f.result(timeout=20)
    pool.shutdown()
    late = strand.submit(lambda: None)  # after the pool is gone: cancelled, not lost
    with pytest.raises(CancelledError):
        late.result(timeout=5)


def test_hasher_cancel_ends_pending_ranges(tmp_path):
    layouts = _inputs(tmp_path, 2)
    h = hashing.Hasher(layouts, "sha256", cache=hashing.HashCache(None), workers=1).start()
    wf = layouts[0].files()[0]
    data = open(wf.path, "rb").read()
    futs = [h.feed(wf, wf.header.data_start, memoryview(data)[wf.header.data_start:])
            for _ in range(20)]
    h.cancel()
    for f in futs:  # each one finished, failed or was cancelled: none waits forever
        try:
            f.result(timeout=20)
        except (CancelledError, InterruptedError):
            pass


def test_default_workers_are_the_usable_cores():
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert hashing.default_workers() == max(1, min(8, n))


@pytest.mark.parametrize("memory", [9000, 40000, 1 << 20])
def test_two_thread_prefetch_reads_and_digests_what_one_thread_does(tmp_path, memory):
    """A window read by two threads (its bytes cut in two halves at a page boundary,
    ranges split across the cut) lands the same bytes in the same views, and feeds the
    digest the same ranges in the same order, as a window read by one."""
    from fastsoup.merge import engine, mmap as input_maps
    from fastsoup.merge.plan import build_plan

    import torch

    from tests.helpers import SPEC

    spec = dict(SPEC, big=((3000, 7), torch.float32), half=((4099,), torch.bfloat16))
    layouts = [resolve(save_file_layout(str(tmp_path / f"m{i}.safetensors"), make_state(i, spec)))
               for i in range(3)]
    plan = build_plan(layouts)
    window, staging = engine.budget_split(memory)
    files = [(0, plan.components[0].files[0].tensors)]
    writers = [type("W", (), {"offsets": {t.key: i * 10 ** 9 for i, t in enumerate(files[0][1])}})()]
    runs = engine.make_runs(engine.make_items(files, window, staging), writers, window, staging)
    maps = input_maps.InputFiles()
    maps.open_all(plan)

    class Log:
        def __init__(self):
            self.fed = []

        def feed(self, wf, lo, view):
            self.fed.append((wf.path, lo, bytes(view)))

    pool = ThreadPoolExecutor(max_workers=1)
    split = 0
    try:
        for win in engine.make_windows(runs, window):
            got = []
            for helper in (None, pool):
                log = Log()
                wb = input_maps.prefetch_window(maps, win, input_maps.WindowBuffer(window), log, helper)
                got.append(({k: bytes(v) for k, v in wb.views.items()}, log.fed))
                split += helper is not None and sum(len(v) for v in wb.views.values()) >= 8192
            assert got[0] == got[1]
            by_id = {id(r): r for r in win}
            assert len(got[1][0]) == sum(len(r.sources) for r in win if r.n > 0)
            for (rid, k), view in got[1][0].items():
                s = by_id[rid].sources[k]
                assert view == open(s.file.path, "rb").read()[s.lo:s.hi]
    finally:
        pool.shutdown()
        maps.close()
    assert split or memory < 20000


def _pieces(layouts, pieces=6):
    """Every file's data section in ``pieces`` ranges: ``[(wf, lo, view), ...]`` per file."""
    out = []
    for lay in layouts:
        wf = lay.files()[0]
        data = open(wf.path, "rb").read()
        cuts = np.linspace(wf.header.data_start, len(data), pieces + 1).astype(int)
        out.append([(wf, int(a), memoryview(data)[a:b]) for a, b in zip(cuts[:-1], cuts[1:])])
    return out


def test_ranges_hashed_in_turn_from_many_threads_take_file_order(tmp_path):
    """Tickets taken in file order; the ranges then handed over by threads that start in
    the reverse order: each file still digests its ranges in order, every byte from the
    ranges (no second read)."""
    layouts = _inputs(tmp_path, 3)
    h = hashing.Hasher(layouts, "sha256", cache=hashing.HashCache(None), workers=2).start()
    jobs = [(wf, h.ticket(wf), lo, view) for window in zip(*_pieces(layouts)) for wf, lo, view in window]
    assert [t for wf, t, _, _ in jobs if wf is jobs[0][0]] == list(range(6))
    pool = ThreadPoolExecutor(max_workers=len(jobs))
    futs = [pool.submit(h.update_in_turn, *job) for job in reversed(jobs)]
    for f in futs:
        f.result(timeout=30)
    pool.shutdown()
    got = h.wait()
    data_bytes = 0
    for lay in layouts:
        wf = lay.files()[0]
        assert got[wf.path] == hashlib.sha256(open(wf.path, "rb").read()).hexdigest()
        data_bytes += os.path.getsize(wf.path) - wf.header.data_start
    assert h.bytes_from_merge == data_bytes


def test_abort_wakes_a_thread_waiting_for_its_turn(tmp_path):
    """Ticket 0 never comes (its read failed): :meth:`abort` ends the wait of ticket 1
    with InterruptedError instead of leaving it waiting forever."""
    layouts = _inputs(tmp_path, 1)
    h = hashing.Hasher(layouts, "sha256", cache=hashing.HashCache(None), workers=1).start()
    (first, second, *_), = _pieces(layouts)
    assert h.ticket(first[0]) == 0 and h.ticket(second[0]) == 1
    pool = ThreadPoolExecutor(max_workers=1)
    waiting = pool.submit(h.update_in_turn, second[0], 1, second[1], second[2])
    with pytest.raises(TimeoutError):
        waiting.result(timeout=0.2)
    h.abort()
    with pytest.raises(InterruptedError):
        waiting.result(timeout=10)
    h.cancel()
    pool.shutdown()


def test_a_failed_range_stops_the_later_turns(tmp_path, monkeypatch):
    """Hashing a range fails (the file was truncated): that error, and the threads
    waiting for later turns of any file end instead of waiting."""
    layouts = _inputs(tmp_path, 2)
    h = hashing.Hasher(layouts, "sha256", cache=hashing.HashCache(None), workers=2).start()
    (a0, a1, *_), (b0, b1, *_) = _pieces(layouts)
    jobs = [(wf, h.ticket(wf), lo, view) for wf, lo, view in (a0, b0, a1, b1)]
    real = hashing._FileDigest.update

    def update(self, lo, view):
        if self.wf.path == a0[0].path and lo == a0[1]:
            raise OSError(5, "injected")
        return real(self, lo, view)

    monkeypatch.setattr(hashing._FileDigest, "update", update)
    pool = ThreadPoolExecutor(max_workers=4)
    later = [pool.submit(h.update_in_turn, *job) for job in jobs[2:]]
    with pytest.raises(OSError, match="injected"):
        h.update_in_turn(*jobs[0])
    for fut in later:
        with pytest.raises(InterruptedError):
            fut.result(timeout=10)
    h.cancel()
    pool.shutdown()
