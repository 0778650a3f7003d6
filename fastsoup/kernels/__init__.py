"""The launch layer: compiled and Triton kernels behind plain launchers.

Buffers and layouts in, results out; no autograd, no backend policy, and nothing of
fastsoup above this package is imported here (``ops``, ``merge`` and ``train`` call it).

* :mod:`._ext`: loads the optional extensions ``fastsoup._C`` / ``fastsoup._cuda``;
* :mod:`.abi`: dtype codes, block sizes and table layouts shared with the C sources
  (the one Python copy of ``csrc/include/fastsoup_abi.h``);
* :mod:`.layout`: row layouts, chunk planning, the device guard and the contiguous retry;
* :mod:`.cpu` / :mod:`.cuda`: launchers of the ``_C`` and ``_cuda`` kernels;
* :mod:`.triton`: the ``@triton.jit`` kernels and their launchers (needs triton);
* :mod:`.inspect`: compiles every kernel for a GPU target without a GPU and reports.

:mod:`.abi`, :mod:`._ext` and :mod:`.cpu` import neither torch nor triton (the CPU merge
path runs without torch).
"""
