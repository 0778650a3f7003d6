"""fastsoup.merge: streaming, memory-mapped averaging of large checkpoints.

``options`` (every choice, validated once) → ``formats`` (resolve inputs from headers,
read with :mod:`fastsoup.io.safetensors`) → ``plan`` (validate, mirror the layout) →
``engine`` (stream the fused weighted sum over ``mmap`` windows) → ``writer`` (pre-sized
files) inside ``output`` (the temporary output, side files, indexes, the commit), with
``hashing`` (the inputs' sha256, fed the bytes the engine reads), ``manifest``
(provenance) and ``report`` (what happened). ``strategy`` chooses how tensors are made:
the weighted sum, per-key weights (``keyweights``), a task-vector method (``methods``) or
a LoRA soup (``lora``); ``fingerprint`` checks the inputs share a base; ``hub`` resolves
Hub ids. ``api.merge`` is the transaction that ties them together; ``soup`` adds and
removes constituents; ``cli`` is the ``fastsoup-merge`` command.

The names below are loaded on first use (PEP 562), so that ``fastsoup-merge --help``
imports neither numpy nor the engine, and nothing here ever imports torch on the CPU
path (``--device cuda`` and pickle inputs import it when they run).
"""
import importlib as _importlib
import sys as _sys
import types as _types

# public name -> the submodule that defines it
_LAZY = {
    "merge": "api",
    "soup_add": "soup",
    "soup_remove": "soup",
    "MergeError": "errors",
    "HeaderError": "errors",
    "PlanError": "errors",
    "MergeReport": "report",
    "FilePlan": "report",
}

__all__ = ["merge", "soup_add", "soup_remove", "MergeError", "HeaderError", "PlanError",
           "MergeReport", "FilePlan"]


def __getattr__(name: str):
    sub = _LAZY.get(name)
    if sub is None:  # AttributeError lets ``from fastsoup.merge import api`` import it
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"{__name__}.{sub}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _CallableModule(_types.ModuleType):
    """``fastsoup.merge`` is both this package and the function :func:`merge`
    (``fs.merge(inputs, output, weights)``, SPEC §6), so that submodules such as
    ``fastsoup.merge.cli`` stay importable under their names."""

    def __call__(self, *args, **kwargs):
        return __getattr__("merge")(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
