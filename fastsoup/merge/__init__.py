"""fastsoup.merge: streaming, memory-mapped averaging of large checkpoints.

``formats`` (resolve inputs from headers) → ``plan`` (validate, mirror the layout) →
``engine`` (stream the fused weighted sum) → ``writer`` (crash-safe output), with
``manifest`` (provenance) and ``report`` (what happened). ``api.merge`` ties them
together; ``cli`` is the ``fastsoup-merge`` command.
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
