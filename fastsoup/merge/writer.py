"""Pre-sized safetensors output files, written header first.

:class:`SafetensorsFileWriter` reserves the header (serialised by
:mod:`fastsoup.io.safetensors`), allocates the whole file up front and takes tensor data
with ``pwrite`` at fixed offsets from the engine's writer thread; the header is
rewritten once the manifest is final (same length: its fields have fixed widths). The
files live inside the temporary output of :class:`.output.AtomicOutput`.
"""
from __future__ import annotations

import errno
import json
import operator
import os
from typing import Dict, Optional, Tuple

from ..io import atomic, safetensors
from ..io.atomic import FILE_MODE
from ..io.safetensors import encode_header, layout_header, tensors_json
from .errors import MergeError
from .plan import OutFile


_ENTRY = operator.attrgetter("key", "dtype", "shape", "nbytes")


def header_bytes(out_file: OutFile, metadata: Optional[Dict[str, str]],
                 reserve: int = 0, _tensors_json: Optional[list] = None) -> Tuple[bytes, Dict[str, int]]:
    """Serialise the header of ``out_file``: returns (8-byte length + JSON, padded to a
    multiple of 8 and to at least ``reserve`` bytes) and each tensor's data offset.
    ``_tensors_json`` (an empty list, filled on the first call) caches the tensors' part
    of the JSON and their offsets between calls: the header is rewritten with the final
    manifest, and re-encoding tens of thousands of entries costs more than the merge of
    small models."""
    if _tensors_json is not None:
        if not _tensors_json:
            text, pos = tensors_json(map(_ENTRY, out_file.tensors))
            _tensors_json.append(text)
            _tensors_json.append(dict(zip((t.key for t in out_file.tensors), pos)))
        body, offsets = _tensors_json[0], _tensors_json[1]
        if metadata:  # what encode_header writes for {"__metadata__": ..., **obj}
            meta = json.dumps({"__metadata__": dict(metadata)}, separators=(",", ":"),
                              ensure_ascii=False)
            body = meta[:-1] + ("," + body[1:] if body != "{}" else "}")
        return encode_text(body, reserve), offsets
    obj, offsets = layout_header(((t.key, t.dtype, t.shape, t.nbytes) for t in out_file.tensors),
                                 None)
    if metadata:
        obj = {"__metadata__": dict(metadata), **obj}
    return encode_header(obj, reserve=reserve), offsets


def encode_text(text: str, reserve: int = 0) -> bytes:
    """:func:`fastsoup.io.safetensors.encode_header` of an already serialised object."""
    data = text.encode("utf-8")
    n = max(len(data), reserve - 8)
    n += (-(8 + n)) % 8
    data += b" " * (n - len(data))
    return len(data).to_bytes(8, "little") + data


def check_header_size(path: str, nbytes: int) -> None:
    """Never write a header the format's readers refuse (safetensors: 100 MB)."""
    limit = safetensors.MAX_HEADER_BYTES
    if nbytes > limit:
        raise MergeError(f"{path}: the output header would be {nbytes} bytes, more than the "
                         f"{limit} bytes safetensors readers accept (too much metadata, or too "
                         "many constituents in the manifest); nothing was written")


class SafetensorsFileWriter:
    """A pre-sized output file: header at offset 0, tensor data written with ``pwrite``.

    The full size is allocated up front (``posix_fallocate``), so a full disk is reported
    before any tensor is computed where the filesystem supports it.
    """

    def __init__(self, path: str, out_file: OutFile, metadata: Optional[Dict[str, str]]):
        self.path = path
        self.out_file = out_file
        self._tensors_json: list = []
        self.header, offsets = header_bytes(out_file, metadata, reserve=0,
                                            _tensors_json=self._tensors_json)
        check_header_size(path, len(self.header) - 8)
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
        new, _ = header_bytes(self.out_file, metadata, reserve=len(self.header),
                              _tensors_json=self._tensors_json)
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
