"""Durable file writes: fsync'd new files, atomic replacement, atomic directory swaps.

The building blocks of every crash-safe output fastsoup writes (merge outputs, manifests,
knowledge banks): a temporary sibling is written and fsynced, then renamed into place and
the parent directory fsynced, so the final path holds the old or the new bytes at every
instant.

* :func:`write_small_file` — a new file with an explicit mode, fsynced;
* :func:`atomic_write_file` — replace a file through a temporary sibling;
* :func:`exchange` — swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``);
* :func:`rename_noreplace` — rename that never replaces an existing path
  (``renameat2(RENAME_NOREPLACE)``; a file falls back to ``link`` + ``unlink``);
* :func:`short_name` — a name shortened to fit the filesystem's NAME_MAX with a suffix;
* :func:`signals_deferred` — hold SIGINT/SIGTERM back around a commit;
* :func:`fsync_dir`, :func:`sync_file_range`, :data:`FILE_MODE`, :data:`DIR_MODE`.

Standard library only.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import platform
import secrets
import signal
import sys
import threading
from typing import List

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
RENAME_NOREPLACE = 1
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


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist, atomically: raises
    ``FileExistsError`` when something is (or appears) there, so two writers racing for
    the same new path cannot both succeed. Linux ``renameat2(RENAME_NOREPLACE)``; where
    that is missing, a file is hard-linked then unlinked (``link`` refuses an existing
    target) and a directory is renamed after a last check (the one racy case: no
    portable primitive exists)."""
    found = _renameat2()
    if found is not None:
        fn, _ = found
        rc = fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)):
            raise OSError(err, os.strerror(err), dst)
    if not os.path.isdir(src) or os.path.islink(src):
        try:
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV,
                                 getattr(errno, "ENOTSUP", -1), errno.EMLINK):
                raise
        else:
            os.unlink(src)
            return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def name_max(folder: str) -> int:
    """The longest file name (bytes) ``folder``'s filesystem accepts (255 if unknown)."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def short_name(name: str, suffix: str, limit: int = 255) -> str:
    """``name + suffix``, with ``name`` cut (at a UTF-8 character boundary) so that the
    whole fits in ``limit`` bytes. Temporaries of a long final name stay valid names."""
    room = limit - len(os.fsencode(suffix))
    raw = os.fsencode(name)
    if len(raw) > room:
        raw = raw[:max(room, 0)]
        while raw:
            try:
                raw.decode("utf-8")
                break
            except UnicodeDecodeError:
                raw = raw[:-1]
    return os.fsdecode(raw) + suffix


_BLOCKED = {getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)} - {None}


@contextlib.contextmanager
def signals_deferred():
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
    parent = os.path.dirname(os.path.abspath(final))
    suffix = f"{TMP_MARK}{secrets.token_hex(4)}"
    tmp = os.path.join(parent, short_name(f".{os.path.basename(final)}", suffix,
                                          name_max(parent)))
    try:
        write_small_file(tmp, data)
        os.replace(tmp, final)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


_libc = None


def sync_file_range(fd: int, offset: int, nbytes: int) -> None:
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
