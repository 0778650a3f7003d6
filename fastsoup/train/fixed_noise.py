"""Fixed-noise data for ambient diffusion: one noise draw per example, for the whole run (SPEC §3).

Ambient training sees only ``x_n = α_n x_0 + σ_n η`` (VE: ``α_n = 1``). The noise ``η`` of
an example must be the same every time the example is read, for the whole run: drawing a
fresh ``η`` each epoch averages the noise away and leaks the clean ``x_0`` the method is
meant never to see.

:class:`FixedNoise` makes ``η`` a pure function of ``(seed, example index)``: each draw
comes from its own CPU ``torch.Generator`` seeded by a 64-bit mix of both, so it is the
same in every epoch, every DataLoader worker and every rank, whatever order the examples
are read in. Draws are cached in memory (bounded) and, with ``cache_dir``, on disk, which
pins the exact values across library versions and machines; a cache directory records its
seed and dtype and refuses to be reused with different ones. :class:`AmbientDataset`
wraps any map-style dataset and returns the noisy example in place of the clean one.
:mod:`fastsoup.train.ambient` builds both from a diffusers scheduler
(:func:`~fastsoup.train.ambient.ambient_vp_dataset`, :func:`~fastsoup.train.ambient.corrupt_batch`).

Apply the noise to the exact tensor the model is trained on (pixels, or latents for a
latent model) and before any random augmentation, so the example's ``x_n`` never changes.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._checks import check_int

_MASK64 = (1 << 64) - 1
_MANIFEST = "fixed_noise.json"
_FORMAT = 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def example_seed(seed: int, index: int) -> int:
    """The generator seed of example ``index`` (a 63-bit integer, well mixed)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 1


class FixedNoise:
    """Deterministic, cached per-example Gaussian noise ``η_i ~ N(0, I)``.

    Args:
        seed: the run's noise seed (the whole dataset's ``η`` follows from it).
        dtype: dtype of the returned noise (drawn in float32, then cast).
        cache_dir: optional directory holding one file per example (``<index>.pt``),
            written atomically; reused on later runs.
        max_cached: number of draws kept in memory (``0`` disables the memory cache).

    ``noise(index, shape)`` returns the same tensor for the same ``(seed, index)`` every
    time; asking for an example with a different shape than before raises ``ValueError``.
    """

    def __init__(self, seed: int, dtype: torch.dtype = torch.float32,
                 cache_dir: Optional[Union[str, os.PathLike]] = None,
                 max_cached: int = 4096) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        check_int("max_cached", max_cached, 0)
        self.seed = seed
        self.dtype = dtype
        self.max_cached = max_cached
        self._memory: "OrderedDict[int, Tensor]" = OrderedDict()
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        if self.cache_dir is not None:
            self._open_cache_dir()

    # ------------------------------------------------------------------ disk cache
    def _manifest(self) -> dict:
        return {"format": _FORMAT, "seed": self.seed, "dtype": str(self.dtype)}

    def _open_cache_dir(self) -> None:
        os.makedirs(self.cache_dir, exist_ok=True)
        path = os.path.join(self.cache_dir, _MANIFEST)
        if os.path.exists(path):
            with open(path) as f:
                found = json.load(f)
            if found != self._manifest():
                raise ValueError(
                    f"noise cache {self.cache_dir} was made with {found}, not "
                    f"{self._manifest()}: use another directory (mixing draws would change "
                    "the noise of examples already seen)")
        else:
            self._atomic_write(path, json.dumps(self._manifest()).encode())

    def _atomic_write(self, path: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _file(self, index: int) -> str:
        return os.path.join(self.cache_dir, f"{index}.pt")

    # ------------------------------------------------------------------ draws
    def _draw(self, index: int, shape: Tuple[int, ...]) -> Tensor:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(example_seed(self.seed, index))
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(self.dtype)

    def noise(self, index: int, shape: Sequence[int]) -> Tensor:
        """``η`` of example ``index`` (CPU tensor of ``shape``, ``self.dtype``). Read-only use."""
        if isinstance(index, Tensor):
            index = int(index)
        check_int("index", index, 0)
        shape = tuple(int(s) for s in shape)
        eta = self._memory.get(index)
        if eta is None and self.cache_dir is not None and os.path.exists(self._file(index)):
            eta = torch.load(self._file(index), weights_only=True)
        if eta is None:
            eta = self._draw(index, shape)
            if self.cache_dir is not None:
                import io

                buf = io.BytesIO()
                torch.save(eta, buf)
                self._atomic_write(self._file(index), buf.getvalue())
        if tuple(eta.shape) != shape:
            raise ValueError(
                f"example {index} was given noise of shape {tuple(eta.shape)} but is now "
                f"{shape}: the fixed noise must be added before any shape-changing transform")
        if self.max_cached:
            self._memory[index] = eta
            self._memory.move_to_end(index)
            while len(self._memory) > self.max_cached:
                self._memory.popitem(last=False)
        return eta

    def batch(self, indices: Union[Sequence[int], Tensor], shape: Sequence[int],
              device: Optional[torch.device] = None) -> Tensor:
        """Stacked ``[B, *shape]`` noise of the examples ``indices`` (on ``device``)."""
        if isinstance(indices, Tensor):
            indices = indices.tolist()
        out = torch.stack([self.noise(i, shape) for i in indices])
        return out if device is None else out.to(device)

    def corrupt(self, x0: Tensor, index: int, sigma_n: float, alpha_n: float = 1.0) -> Tensor:
        """``x_n = α_n x_0 + σ_n η_index`` for one example ``x0`` (no batch dim)."""
        eta = self.noise(index, x0.shape).to(device=x0.device, dtype=torch.float32)
        return (alpha_n * x0.float() + sigma_n * eta).to(x0.dtype)


class AmbientDataset(torch.utils.data.Dataset):
    """A map-style dataset whose examples are replaced by their fixed-noise versions.

    Args:
        dataset: any map-style dataset (``len`` and ``__getitem__``).
        sigma_n: the data noise level ``σ_n`` (VE), or with ``alpha_n`` the VP pair.
        alpha_n: ``α_n`` (1 for VE; ``sqrt(ᾱ_{t_n})`` for VP, see
            :func:`fastsoup.vp_alpha_sigma`).
        seed, cache_dir: passed to :class:`FixedNoise` (or pass ``noise=`` directly).
        key: where the image sits in an example: ``None`` (the example is the tensor), an
            int (tuple/list position) or a str (dict key).

    ``dataset[i]`` gives ``x_n`` with ``η_i`` fixed for the run (float32 arithmetic, stored
    in the image's dtype); the rest of the example is returned unchanged.
    """

    def __init__(self, dataset, sigma_n: float, alpha_n: float = 1.0, seed: int = 0,
                 key: Optional[Union[int, str]] = None,
                 cache_dir: Optional[Union[str, os.PathLike]] = None,
                 noise: Optional[FixedNoise] = None) -> None:
        if not (sigma_n >= 0):
            raise ValueError(f"sigma_n must be >= 0, got {sigma_n!r}")
        if not (alpha_n > 0):
            raise ValueError(f"alpha_n must be > 0, got {alpha_n!r}")
        self.dataset = dataset
        self.sigma_n = float(sigma_n)
        self.alpha_n = float(alpha_n)
        self.key = key
        self.noise = noise if noise is not None else FixedNoise(seed, cache_dir=cache_dir)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if self.key is None:
            return self._corrupt(item, index)
        if isinstance(item, dict):
            item = dict(item)
            item[self.key] = self._corrupt(item[self.key], index)
            return item
        if isinstance(item, (tuple, list)):
            parts = list(item)
            parts[self.key] = self._corrupt(parts[self.key], index)
            return type(item)(parts) if isinstance(item, list) else tuple(parts)
        raise TypeError(f"key={self.key!r} given but the example is a {type(item).__name__}")

    def _corrupt(self, x0: Any, index: int) -> Tensor:
        if not isinstance(x0, Tensor) or not x0.dtype.is_floating_point:
            raise TypeError(f"example {index}: the image must be a float tensor, got "
                            f"{getattr(x0, 'dtype', type(x0).__name__)}")
        return self.noise.corrupt(x0, index, self.sigma_n, self.alpha_n)
