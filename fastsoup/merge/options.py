"""The options of a merge: every choice written once, and the one frozen object
(:class:`MergeOptions`) that :func:`fastsoup.merge` builds and validates.

``fastsoup-merge`` takes its ``choices=`` from the tuples here and passes its arguments
to :func:`fastsoup.merge`, so the command line and the Python API accept and refuse the
same values with the same messages (:class:`~fastsoup.merge.errors.MergeError`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple, Union

from .errors import MergeError

# --dtype / dtype=: user name -> safetensors name (the first four are the CLI choices)
DTYPE_NAMES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "fp64": "F64"}
_DTYPE_ALIASES = {"float32": "F32", "float16": "F16", "half": "F16", "bfloat16": "BF16",
                  "float64": "F64"}
ACCUMULATE = ("fp32", "fp64")                       # --accumulate / accumulate=
KEY_POLICIES = ("strict", "intersection", "union")  # --keys / keys=
HASH_MODES = ("sha256", "none")                     # --hash / hash=
METHODS = ("average", "ties", "dare", "slerp")      # --method / method=
DEFAULT_DENSITY = 0.2                               # --density / density= (TIES, DARE)
# --memory / memory=: the streaming budget. On the CPU a small one is faster as well as
# leaner: a window of input read by one thread is still in the cache when the sum and the
# digest read it (measured: benchmarks/results/cpu-merge-2026-11-29-sd-4x400-budget.md). A GPU
# merge copies each run to the device, and larger runs copy at a better rate.
DEFAULT_MEMORY = 32 * 2**20
DEFAULT_MEMORY_TEXT = "32MiB"
DEFAULT_DEVICE_MEMORY = 256 * 2**20
DEFAULT_DEVICE_MEMORY_TEXT = "256MiB"


def user_dtype(name: str) -> str:
    """``"bf16"`` → ``"BF16"``; raises ValueError for a name --dtype does not accept."""
    key = name.strip().lower()
    found = DTYPE_NAMES.get(key) or _DTYPE_ALIASES.get(key)
    if found is None:
        raise ValueError(f"unknown output dtype {name!r} (choose fp32, fp16, bf16 or fp64)")
    return found


def dtype_user_name(name: str) -> str:
    """``"BF16"`` → ``"bf16"`` (a manifest's recorded dtype back to a ``dtype=`` value);
    MergeError for a name no merge writes."""
    for user, st in DTYPE_NAMES.items():
        if st == name:
            return user
    raise MergeError(f"the soup's manifest records an unknown output dtype {name!r} "
                     f"(known: {', '.join(DTYPE_NAMES.values())})")


def parse_size(text) -> int:
    """``"5GB"`` → 5·10⁹, ``"512MiB"`` → 512·2²⁰, ``"1e9"``/``1000`` → bytes. Decimal units
    (kB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, GiB, TiB) of 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().replace(" ", "")
        units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
                 "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
        low = s.lower()
        mult = 1
        for u in sorted(units, key=len, reverse=True):
            if low.endswith(u) and low[: -len(u)]:
                mult, low = units[u], low[: -len(u)]
                break
        try:
            value = int(float(low) * mult)
        except (ValueError, OverflowError):
            raise MergeError(f"cannot parse size {text!r} (examples: 5GB, 512MiB, 1000000)") from None
    if value <= 0:
        raise MergeError(f"size must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class MergeOptions:
    """How to merge (not what): validated, with sizes in bytes and ``dtype`` as a
    safetensors name (``"BF16"``) or None (each tensor keeps its input dtype)."""

    keys: str = "strict"
    dtype: Optional[str] = None
    accumulate: str = "fp32"
    variant: Optional[str] = None
    allow_pickle: bool = False
    max_shard_size: Optional[int] = None
    memory: int = DEFAULT_MEMORY
    threads: int = 1
    device: str = "cpu"
    dry_run: bool = False
    overwrite: bool = False
    quiet: Optional[bool] = None
    hash: str = "sha256"
    drop_cache: bool = False
    metadata: Tuple[Tuple[str, str], ...] = ()   # the user's --metadata KEY=VALUE entries
    method: str = "average"                      # a METHODS entry (see merge/methods.py)
    density: Optional[float] = None              # TIES/DARE: fraction of entries kept
    seed: int = 0                                # DARE: the drop masks' seed
    weights_for: Tuple[Tuple[str, Tuple[float, ...]], ...] = ()  # (glob, weights), first wins
    lora_rank: Optional[int] = None              # LoRA soups: compress to this rank (SVD)
    force: bool = False                          # merge inputs naming different bases

    @property
    def acc64(self) -> bool:
        return self.accumulate == "fp64"

    @classmethod
    def validate(cls, *, keys: str = "strict", dtype: Optional[str] = None,
                 accumulate: str = "fp32", variant: Optional[str] = None,
                 allow_pickle: bool = False, max_shard_size: Union[None, int, str] = None,
                 memory: Union[None, int, str] = None, threads: Optional[int] = None,
                 device: str = "cpu", dry_run: bool = False, overwrite: bool = False,
                 quiet: Optional[bool] = None, hash: str = "sha256",
                 drop_cache: bool = False,
                 metadata: Optional[Mapping[str, str]] = None, method: str = "average",
                 density: Optional[float] = None, seed: Optional[int] = None,
                 weights_for=None, lora_rank: Optional[int] = None,
                 force: bool = False) -> "MergeOptions":
        """The options of :func:`fastsoup.merge` as given (user names, sizes as text),
        checked; raises :class:`MergeError` naming the first bad value."""
        if hash not in HASH_MODES:
            raise MergeError(f"unknown hash mode {hash!r} (choose {', '.join(HASH_MODES)})")
        if accumulate not in ACCUMULATE:
            raise MergeError(f"accumulate must be 'fp32' or 'fp64', got {accumulate!r}")
        if dtype is not None and not isinstance(dtype, str):
            raise MergeError(f"dtype must be a name (fp32, fp16, bf16 or fp64), got {dtype!r}")
        try:
            out_dtype = user_dtype(dtype) if dtype is not None else None
        except ValueError as exc:
            raise MergeError(str(exc)) from None
        shard_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
        if device not in ("cpu", "cuda", "torch:cpu") and not device.startswith("cuda:"):
            raise MergeError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if memory is None:
            memory = DEFAULT_MEMORY if device == "cpu" else DEFAULT_DEVICE_MEMORY
        memory_bytes = parse_size(memory)
        if keys not in KEY_POLICIES:
            raise MergeError(f"unknown key policy {keys!r} (choose {', '.join(KEY_POLICIES)})")
        meta = check_metadata(metadata)
        from .keyweights import check_weights_for

        method_opts = dict(method=method, density=_check_density(method, density),
                           seed=_check_seed(method, seed), weights_for=check_weights_for(weights_for),
                           lora_rank=_check_rank(lora_rank), force=bool(force))
        return cls(**method_opts, keys=keys, dtype=out_dtype, accumulate=accumulate, variant=variant,
                   allow_pickle=allow_pickle, max_shard_size=shard_bytes, memory=memory_bytes,
                   threads=threads if threads is not None else (os.cpu_count() or 1),
                   device=device, dry_run=dry_run, overwrite=overwrite, quiet=quiet, hash=hash,
                   drop_cache=drop_cache, metadata=meta)


def _check_density(method: str, density) -> Optional[float]:
    """``density=`` (TIES, DARE): a number in (0, 1]; refused for the other methods."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r} (choose {', '.join(METHODS)})")
    if density is None:
        return DEFAULT_DENSITY if method in ("ties", "dare") else None
    if method not in ("ties", "dare"):
        raise MergeError(f"density applies to the ties and dare methods, not {method!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or \
            not 0.0 < float(density) <= 1.0:
        raise MergeError(f"density must be a number in (0, 1] (the fraction of task-vector "
                         f"entries kept), got {density!r}")
    return float(density)


def _check_seed(method: str, seed) -> int:
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MergeError(f"seed must be a non-negative integer, got {seed!r}")
    if method != "dare":
        raise MergeError(f"seed applies to the dare method (its random drop masks), not {method!r}")
    return seed


def _check_rank(rank) -> Optional[int]:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"lora_rank must be a positive integer, got {rank!r}")
    return rank


RESERVED_METADATA = ("format", "fastsoup")  # written by fastsoup itself


def check_metadata(metadata) -> Tuple[Tuple[str, str], ...]:
    """The soup's user metadata (``metadata=`` / ``--metadata KEY=VALUE``) as sorted pairs;
    MergeError for a non-string entry or a key fastsoup writes itself."""
    if metadata is None:
        return ()
    if not isinstance(metadata, Mapping):
        raise MergeError(f"metadata must map strings to strings, got {type(metadata).__name__}")
    out = []
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise MergeError(f"metadata must map non-empty strings to strings, got {k!r}: {v!r}")
        if k in RESERVED_METADATA:
            raise MergeError(f"metadata key {k!r} is written by fastsoup itself (the format tag "
                             "and the provenance manifest); choose another key")
        out.append((k, v))
    return tuple(sorted(out))


def parse_metadata_items(items) -> dict:
    """``["KEY=VALUE", ...]`` (the command line) → ``{KEY: VALUE}``."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MergeError(f"--metadata takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out
