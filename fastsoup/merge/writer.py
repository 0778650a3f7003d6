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

import errno
import os
import secrets
import shutil
from typing import Dict, List, Optional, Tuple

from ..io import atomic
from ..io.atomic import DIR_MODE, FILE_MODE, TMP_MARK
from ..io.safetensors import encode_header, layout_header
from .errors import MergeError
from .plan import OutFile

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
                atomic.fsync_dir(root)
        parent = os.path.dirname(self.final)
        if self.is_dir and os.path.isdir(self.final):
            with atomic.signals_deferred():  # `committed` must be set with the swap
                if atomic.exchange(self.tmp, self.final):
                    self.committed = True
                    self.old = self.tmp  # the temporary's name now holds the previous output
                else:
                    self._commit_two_renames(parent)
        else:
            with atomic.signals_deferred():
                os.replace(self.tmp, self.final)
                self.committed = True
        atomic.fsync_dir(parent)

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


# --------------------------------------------------------------------- safetensors files
def header_bytes(out_file: OutFile, metadata: Optional[Dict[str, str]],
                 reserve: int = 0) -> Tuple[bytes, Dict[str, int]]:
    """Serialise the header of ``out_file``: returns (8-byte length + JSON, padded to a
    multiple of 8 and to at least ``reserve`` bytes) and each tensor's data offset."""
    obj, offsets = layout_header(((t.key, t.dtype, t.shape, t.nbytes) for t in out_file.tensors),
                                 metadata or None)
    return encode_header(obj, reserve=reserve), offsets


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
            atomic.sync_file_range(self.fd, offset, total)

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
