"""fastsoup.merge: streaming, memory-mapped averaging of large checkpoints.

``options`` (every choice, validated once) → ``formats`` (resolve inputs from headers,
read with :mod:`fastsoup.io.safetensors`) → ``plan`` (validate, mirror the layout) →
``engine`` (stream the fused weighted sum over ``mmap`` windows) → ``writer`` (pre-sized
files) inside ``output`` (the temporary output, side files, indexes, the commit), with
``manifest`` (provenance) and ``report`` (what happened). ``api.merge`` is the
transaction that ties them together; ``soup`` adds and removes constituents; ``cli`` is
the ``fastsoup-merge`` command.
"""
from .api import merge
from .errors import HeaderError, MergeError, PlanError
from .report import FilePlan, MergeReport
from .soup import soup_add, soup_remove

__all__ = ["merge", "soup_add", "soup_remove", "MergeError", "HeaderError", "PlanError",
           "MergeReport", "FilePlan"]

import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    """``fastsoup.merge`` is both this package and the function :func:`merge`
    (``fs.merge(inputs, output, weights)``, SPEC §6), so that submodules such as
    ``fastsoup.merge.cli`` stay importable under their names."""

    def __call__(self, *args, **kwargs):
        return merge(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
