"""fastsoup.io: checkpoint files on disk, below ``merge`` and ``train``.

* :mod:`.safetensors` — the one safetensors dtype table, the hostile-input header reader
  and the header/file writer (used by the merge engine and the knowledge bank);
* :mod:`.atomic` — fsync'd, atomic file writes and directory swaps.

Imports nothing of fastsoup above :mod:`fastsoup.kernels` (``ops``, ``merge`` and
``train`` call it), and neither torch nor numpy at import time: the CPU merge path runs
without torch.
"""
