"""Crash-safe output: a temporary sibling that is renamed into place only when complete,
and pre-sized safetensors files written header first.

Nothing is ever written at the final output path until every byte is on disk: files are
fsynced, the temporary is renamed over the output (``os.replace`` for a file; for a
directory replacing a previous output, an atomic ``renameat2(RENAME_EXCHANGE)`` on Linux,
else two renames with SIGINT/SIGTERM held back and undone on failure), and the parent
directory is fsynced. At every instant the final path holds the old or the new output.
:meth:`AtomicOutput.abort` removes the temporary; an existing output is left untouched by
a failed run. Only directories that are previous fastsoup outputs (holding
``fastsoup.json``) are replaced.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import platform
import shutil
import signal
import sys
import threading
from typing import Dict, List, Optional

from .errors import MergeError
from .plan import OutFile

TMP_MARK = ".fastsoup-tmp-"


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


FILE_MODE = 0o666 & ~_umask()   # what a plain `open(..., "w")` would give, set explicitly
DIR_MODE = 0o777 & ~_umask()


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries: renames, new files). Only EINVAL (a filesystem that
    cannot fsync directories) is ignored; other errors are real and raised."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


AT_FDCWD = -100
RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276,
                  "ppc64le": 357, "ppc64": 357, "s390x": 347, "i686": 353, "i386": 353}
_renameat2_fn = None


def _renameat2():
    """``(fn, via_syscall)`` for Linux ``renameat2``, or None where there is none."""
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            except OSError:
                lib = None
            if lib is not None:
                fn = getattr(lib, "renameat2", None)
                if fn is not None:
                    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                   ctypes.c_uint]
                    fn.restype = ctypes.c_int
                    _renameat2_fn = (fn, False)
                else:
                    nr = _SYS_RENAMEAT2.get(platform.machine().lower())
                    sc = getattr(lib, "syscall", None)
                    if nr is not None and sc is not None:
                        sc.restype = ctypes.c_long
                        _renameat2_fn = (lambda a, b, c, d, e, _sc=sc, _nr=nr: _sc(
                            ctypes.c_long(_nr), ctypes.c_int(a), ctypes.c_char_p(b), ctypes.c_int(c),
                            ctypes.c_char_p(d), ctypes.c_uint(e)), True)
    return _renameat2_fn or None


def exchange(a: str, b: str) -> bool:
    """Atomically swap paths ``a`` and ``b`` (``renameat2(RENAME_EXCHANGE)``). Returns False
    where that is not available (not Linux, old kernel, filesystem without support);
    raises OSError for real failures."""
    found = _renameat2()
    if found is None:
        return False
    fn, _ = found
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}", b)


_BLOCKED = {getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)} - {None}


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT/SIGTERM are held back for the duration: blocked in this thread
    (``pthread_sigmask``) and, in the main thread, recorded by a temporary handler (another
    thread may receive a process-directed signal); they are delivered on exit."""
    main = threading.current_thread() is threading.main_thread()
    received: List[int] = []
    previous_handlers = {}
    if main:
        for sig in _BLOCKED:
            try:
                previous_handlers[sig] = signal.signal(sig, lambda s, f: received.append(s))
            except (ValueError, OSError):
                pass
    can_block = hasattr(signal, "pthread_sigmask") and bool(_BLOCKED)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED) if can_block else None
    try:
        yield
    finally:
        if can_block:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


class AtomicOutput:
    """The output being built: ``tmp`` is a sibling of ``final`` (same filesystem)."""

    def __init__(self, final: str, is_dir: bool, overwrite: bool = False):
        self.final = os.path.abspath(final)
        self.is_dir = is_dir
        parent = os.path.dirname(self.final)
        if not os.path.isdir(parent):
            raise MergeError(f"{final}: the parent directory {parent} does not exist")
        if os.path.lexists(self.final) and not overwrite:
            raise MergeError(f"{final}: already exists (pass --overwrite to replace it; it is "
                             "only replaced once the new output is complete)")
        if os.path.exists(self.final) and os.path.isdir(self.final) != is_dir:
            raise MergeError(f"{final}: exists and is a {'directory' if not is_dir else 'file'}; "
                             f"this merge writes a {'directory' if is_dir else 'file'}")
        if is_dir and os.path.isdir(self.final) and \
                not os.path.isfile(os.path.join(self.final, "fastsoup.json")):
            raise MergeError(f"{final}: exists and is not a previous fastsoup output (no "
                             "fastsoup.json in it); --overwrite only replaces fastsoup outputs. "
                             "Remove it yourself or choose another output path")
        self.tmp = os.path.join(parent, f".{os.path.basename(self.final)}{TMP_MARK}"
                                        f"{os.getpid()}-{secrets.token_hex(4)}")
        self._extra: List[str] = []
        self.committed = False
        self.old: Optional[str] = None
        if is_dir:
            os.mkdir(self.tmp, DIR_MODE)
            os.chmod(self.tmp, DIR_MODE)

    def path(self, *parts: str) -> str:
        """Where to write ``parts`` (relative to the output root) inside the temporary."""
        if not self.is_dir:
            assert not parts
            return self.tmp
        p = os.path.join(self.tmp, *parts)
        d = os.path.dirname(p)
        if not os.path.isdir(d):
            os.makedirs(d, DIR_MODE, exist_ok=True)
        return p

    def commit(self) -> None:
        """fsync the tree, then put it in place: a file with ``os.replace``; a directory
        over an existing one with an atomic exchange (Linux ``renameat2``), else two
        renames with SIGINT/SIGTERM blocked between them (the old one is renamed back if
        the second fails). At every instant the final path holds the old or the new
        output. Sets ``committed``; the previous output (if any) is left at ``old`` for
        :meth:`remove_old`."""
        if self.is_dir:
            for root, dirs, files in os.walk(self.tmp, topdown=False):
                fsync_dir(root)
        parent = os.path.dirname(self.final)
        if self.is_dir and os.path.isdir(self.final):
            with _signals_deferred():  # `committed` must be set with the swap
                if exchange(self.tmp, self.final):
                    self.committed = True
                    self.old = self.tmp  # the temporary's name now holds the previous output
                else:
                    self._commit_two_renames(parent)
        else:
            with _signals_deferred():
                os.replace(self.tmp, self.final)
                self.committed = True
        fsync_dir(parent)

    def _commit_two_renames(self, parent: str) -> None:
        old = os.path.join(parent, f".{os.path.basename(self.final)}{TMP_MARK}old-"
                                   f"{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(self.final, old)  # signals are deferred by the caller
        try:
            os.rename(self.tmp, self.final)
        except BaseException:
            os.rename(old, self.final)
            raise
        self.committed = True
        self.old = old

    def remove_old(self) -> None:
        """Remove the previous output replaced by :meth:`commit` (errors are raised: the
        new output is in place whatever happens here)."""
        if self.old is not None and os.path.lexists(self.old):
            shutil.rmtree(self.old)
        self.old = None

    def abort(self) -> None:
        """Remove the temporary (never the final output; nothing once committed)."""
        if self.committed:
            return
        try:
            if self.is_dir:
                shutil.rmtree(self.tmp, ignore_errors=True)
            elif os.path.lexists(self.tmp):
                os.unlink(self.tmp)
        except OSError:
            pass


def write_small_file(path: str, data: bytes) -> None:
    """Write ``data`` to a new file with explicit mode, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(final: str, data: bytes) -> None:
    """Replace ``final`` with ``data`` through a temporary sibling (for sidecar files)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(final)),
                       f".{os.path.basename(final)}{TMP_MARK}{secrets.token_hex(4)}")
    try:
        write_small_file(tmp, data)
        os.replace(tmp, final)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------- safetensors files
def header_bytes(out_file: OutFile, metadata: Optional[Dict[str, str]],
                 reserve: int = 0) -> (bytes, Dict[str, int]):
    """Serialise the header of ``out_file``: returns (8-byte length + JSON, padded to a
    multiple of 8 and to at least ``reserve`` bytes) and each tensor's data offset."""
    obj: Dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    offsets = {}
    pos = 0
    for t in out_file.tensors:
        obj[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.key] = pos
        pos += t.nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    n = max(len(text), reserve - 8)
    n += (-(8 + n)) % 8
    text += b" " * (n - len(text))
    return len(text).to_bytes(8, "little") + text, offsets


_libc = None


def _sync_file_range(fd: int, offset: int, nbytes: int) -> None:
    """Start write-back of a range now (Linux), so the final fsync has less to wait for."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fn = lib.sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _libc = fn
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


class SafetensorsFileWriter:
    """A pre-sized output file: header at offset 0, tensor data written with ``pwrite``.

    The full size is allocated up front (``posix_fallocate``), so a full disk is reported
    before any tensor is computed where the filesystem supports it.
    """

    def __init__(self, path: str, out_file: OutFile, metadata: Optional[Dict[str, str]]):
        self.path = path
        self.out_file = out_file
        self.header, offsets = header_bytes(out_file, metadata, reserve=0)
        self.data_start = len(self.header)
        self.offsets = {k: self.data_start + v for k, v in offsets.items()}
        self.size = self.data_start + out_file.data_bytes
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                          FILE_MODE)
        try:
            os.fchmod(self.fd, FILE_MODE)
            self._preallocate()
            self.pwrite(self.header, 0)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def _preallocate(self) -> None:
        if self.size == 0:
            return
        fallocate = getattr(os, "posix_fallocate", None)  # Linux, not macOS
        if fallocate is not None:
            try:
                fallocate(self.fd, 0, self.size)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
                    raise OSError(exc.errno, f"cannot allocate {self.size} bytes: "
                                  f"{exc.strerror}", self.path) from None
        os.ftruncate(self.fd, self.size)

    def pwrite(self, data, offset: int, start_writeback: bool = False) -> None:
        view = memoryview(data).cast("B")
        total = len(view)
        pos = offset
        while view:
            try:
                n = os.pwrite(self.fd, view, pos)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, self.path) from None
            if n <= 0:
                raise OSError(errno.EIO, f"short write to {self.path}")
            view = view[n:]
            pos += n
        if start_writeback and total:
            _sync_file_range(self.fd, offset, total)

    def rewrite_header(self, metadata: Optional[Dict[str, str]]) -> None:
        """Replace the header with one carrying ``metadata``; it must fit the space the
        first header reserved (callers keep field lengths fixed, e.g. hex digests)."""
        new, _ = header_bytes(self.out_file, metadata, reserve=len(self.header))
        if len(new) != len(self.header):
            raise MergeError(f"{self.path}: internal error: final header is {len(new)} bytes, "
                             f"{len(self.header)} were reserved")
        self.pwrite(new, 0)
        self.header = new

    def finish(self) -> None:
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
