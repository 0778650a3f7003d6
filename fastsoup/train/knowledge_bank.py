"""The Diff-Tuning knowledge bank: samples of the pre-trained model, replayed while fine-tuning.

Retention trains on samples the pre-trained model generated *before* fine-tuning, on its
unconditional branch. :class:`KnowledgeBank` generates ``N`` of them once
(:meth:`KnowledgeBank.generate`, any ``generate(n, generator)`` callable: a diffusers
pipeline, a sampler loop), stores them in a deterministic safetensors file with provenance
metadata (:meth:`~KnowledgeBank.save`: :func:`fastsoup.io.safetensors.serialize`, written
atomically), loads them back with their content hash checked (:meth:`~KnowledgeBank.load`)
and streams shuffled replay batches (:meth:`~KnowledgeBank.stream`). The batches go to
:meth:`fastsoup.train.difftuning.DiffTuning.make_batch`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, Iterator, Optional, Union

import torch
from torch import Tensor

from ..io.atomic import atomic_write_file
from ..io.safetensors import serialize as serialize_safetensors
from ..io.safetensors import tensor_bytes
from ._checks import check_int

__all__ = ["KNOWLEDGE_BANK_FORMAT", "KnowledgeBank"]

KNOWLEDGE_BANK_FORMAT = "fastsoup.knowledge_bank"
_KB_VERSION = "1"


def _content_hash(latents: Tensor, labels: Optional[Tensor]) -> str:
    h = hashlib.sha256()
    h.update(str(latents.dtype).encode() + json.dumps(list(latents.shape)).encode())
    h.update(tensor_bytes(latents))
    if labels is not None:
        h.update(b"labels" + tensor_bytes(labels))
    return h.hexdigest()


def _as_tensor_output(out: Any, n: int) -> Tensor:
    """Normalise what a generate callable returned to a ``[n, ...]`` float tensor."""
    if hasattr(out, "images") and not isinstance(out, Tensor):
        out = out.images                       # a diffusers pipeline output
    elif isinstance(out, (tuple, list)) and out and not isinstance(out[0], (int, float)):
        out = out[0]                           # return_dict=False
    if not isinstance(out, Tensor):
        try:
            import numpy as np

            if isinstance(out, np.ndarray):
                out = torch.from_numpy(np.ascontiguousarray(out))
        except ImportError:  # pragma: no cover - numpy ships with torch wheels
            pass
    if not isinstance(out, Tensor):
        raise TypeError("generate(n, generator) must return a tensor (or a numpy array, or a "
                        "pipeline output whose .images is one), got "
                        f"{type(out).__name__}; for PIL images use output_type='latent', 'pt' "
                        "or 'np'")
    if not out.dtype.is_floating_point:
        raise TypeError(f"generate returned a {out.dtype} tensor; the knowledge bank stores "
                        "float latents")
    if out.dim() < 2 or out.shape[0] != n:
        raise ValueError(f"generate(n={n}, ...) returned shape {tuple(out.shape)}; expected "
                         f"[{n}, ...] (one sample per row)")
    return out


def _check_training_space(out: Tensor, done: int) -> None:
    """Samples must be in the model's training space, channels first: raise at once (on
    the first chunk, before hours of generation) for the two common slips with diffusers
    pipelines: ``output_type="np"`` (channels-last ``[n, H, W, C]``) and images in
    ``[0, 1]`` (``output_type="pt"``/``"np"``) where a pixel model trains on ``[-1, 1]``."""
    where = f"samples {done}..{done + out.shape[0] - 1}"
    if out.dim() == 4 and out.shape[-1] in (1, 3, 4) and out.shape[1] not in (1, 3, 4):
        raise ValueError(
            f"generate returned channels-last {where} of shape {tuple(out.shape)} "
            "([n, H, W, C], e.g. diffusers' output_type='np'); the bank stores [n, C, H, W] "
            "as the model sees it: return torch.from_numpy(images).permute(0, 3, 1, 2) "
            "(pass check_samples=False if this layout is really your model's)")
    if out.numel() >= 64:
        lo, hi = torch.stack([out.min(), out.max()]).float().tolist()
        if lo >= 0.0 and hi <= 1.0:
            raise ValueError(
                f"generate returned {where} with values in [{lo:.3g}, {hi:.3g}], i.e. images "
                "in [0, 1] (diffusers' output_type='pt' or 'np'); the bank stores the "
                "training space: pixels in [-1, 1] for a pixel model (return images * 2 - 1) "
                "or latents for a latent model (output_type='latent'). Pass "
                "check_samples=False if [0, 1] is really your model's training space")


class KnowledgeBank(torch.utils.data.Dataset):
    """Samples of the pre-trained model, replayed during Diff-Tuning (retention).

    A map-style dataset of ``N`` latents (``bank[i]`` is one ``[C, H, W]`` tensor) with
    optional integer ``labels`` (the classes the samples were generated for; provenance
    only: replay trains on the unconditional branch) and string ``metadata``.

    Build it once before fine-tuning with :meth:`generate`, :meth:`save` it, and
    :meth:`load` it in the training run. The file is a standard safetensors file
    (``safetensors.torch.load_file`` reads it) holding ``latents`` (and ``labels``) and
    metadata ``format``, ``version``, ``count``, ``shape`` (per sample, JSON), ``dtype``,
    ``seed``, ``batch_size``, ``source`` and ``content_sha256``; no timestamp, so the same
    generation writes the same bytes.
    """

    def __init__(self, latents: Tensor, labels: Optional[Tensor] = None,
                 metadata: Optional[Dict[str, str]] = None) -> None:
        if not isinstance(latents, Tensor) or not latents.dtype.is_floating_point:
            raise TypeError("latents must be a floating torch.Tensor of shape [N, ...]")
        if latents.dim() < 2 or latents.shape[0] < 1:
            raise ValueError(f"latents must have shape [N, ...] with N >= 1, got {tuple(latents.shape)}")
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.dtype.is_floating_point \
                    or labels.dtype == torch.bool:
                raise TypeError("labels must be an integer torch.Tensor of shape [N]")
            if labels.shape != (latents.shape[0],):
                raise ValueError(f"labels must have shape [N] = [{latents.shape[0]}], got "
                                 f"{tuple(labels.shape)}")
        self.latents = latents
        self.labels = labels
        self.metadata: Dict[str, str] = dict(metadata or {})

    # -------------------------------------------------------------- dataset protocol
    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.latents[index]

    def __repr__(self) -> str:
        src = self.metadata.get("source", "")
        return (f"KnowledgeBank(count={len(self)}, shape={tuple(self.latents.shape[1:])}, "
                f"dtype={self.latents.dtype}, source={src!r})")

    # -------------------------------------------------------------- generation
    @classmethod
    @torch.no_grad()
    def generate(cls, generate: Callable[[int, torch.Generator], Any], num_samples: int, *,
                 batch_size: int = 16, seed: int = 0, source: str = "",
                 dtype: Optional[torch.dtype] = None, generator_device: Union[str, torch.device] = "cpu",
                 labels: Optional[Tensor] = None, progress: Optional[Callable[[int, int], None]] = None,
                 check_samples: bool = True) -> "KnowledgeBank":
        """Generate ``num_samples`` samples with the pre-trained model, once.

        Args:
            generate: ``generate(n, generator) -> [n, ...]`` tensor in the model's training
                space (latents for a latent model, pixels in ``[-1, 1]`` for a pixel
                model). A numpy array or a diffusers pipeline output (``.images``) is
                accepted too. Called on chunks of at most ``batch_size``, in order, with
                one ``torch.Generator`` seeded with ``seed``, so the bank is reproducible.
            num_samples: ``N``.
            batch_size: samples per call.
            seed: seed of the generator passed to every call.
            source: free-text provenance (model id, revision, sampler settings).
            dtype: storage dtype (default: what ``generate`` returns).
            generator_device: device of the generator (``"cpu"`` is reproducible across
                machines; diffusers pipelines accept a CPU generator on any device).
            labels: optional integer ``[N]`` classes to generate (class-conditional
                models). ``generate`` is then called as ``generate(n, generator,
                labels_chunk)`` with the chunk's ``[n]`` labels, and the labels are stored
                with the samples.
            progress: optional ``progress(done, total)`` callback.
            check_samples: check every chunk as it arrives (before the next one is
                generated): channels first (a channels-last ``[n, H, W, C]`` array, as
                ``output_type="np"`` gives, raises) and not images in ``[0, 1]`` (as
                ``output_type="pt"``/``"np"`` give; a pixel model trains on ``[-1, 1]``);
                each error says what to return instead. ``False`` skips both.

        Examples (diffusers)::

            # latent model (Stable Diffusion): latents as the UNet sees them
            pipe = StableDiffusionPipeline.from_pretrained(model_id).to("cuda")
            gen = lambda n, g: pipe([""] * n, generator=g, num_inference_steps=50,
                                    output_type="latent").images
            bank = KnowledgeBank.generate(gen, 1000, batch_size=16, source=model_id)

            # pixel model (DDPMPipeline returns NHWC numpy in [0, 1])
            gen = lambda n, g: torch.from_numpy(pipe(batch_size=n, generator=g,
                               output_type="np").images).permute(0, 3, 1, 2) * 2 - 1

            # class-conditional latent model (DiTPipeline decodes; encode back to latents)
            classes = torch.arange(100).repeat_interleave(10)      # 10 samples per class
            def gen(n, g, y):
                images = pipe(class_labels=y.tolist(), generator=g, output_type="pt").images
                latents = pipe.vae.encode(images * 2 - 1).latent_dist.mean
                return latents * pipe.vae.config.scaling_factor
            bank = KnowledgeBank.generate(gen, 1000, labels=classes, source=model_id)
        """
        if not callable(generate):
            raise TypeError(f"generate must be callable as generate(n, generator), got "
                            f"{type(generate).__name__}")
        check_int("num_samples", num_samples, 1)
        check_int("batch_size", batch_size, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not isinstance(source, str):
            raise TypeError(f"source must be a str, got {type(source).__name__}")
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.dtype.is_floating_point \
                    or labels.dtype == torch.bool or labels.shape != (num_samples,):
                raise ValueError(f"labels must be an integer tensor of shape [num_samples] = "
                                 f"[{num_samples}], got {getattr(labels, 'shape', type(labels).__name__)}")
        generator = torch.Generator(device=generator_device)
        generator.manual_seed(seed)
        chunks = []
        done = 0
        while done < num_samples:
            n = min(batch_size, num_samples - done)
            if labels is None:
                raw = generate(n, generator)
            else:
                raw = generate(n, generator, labels[done:done + n])
            out = _as_tensor_output(raw, n).detach().to("cpu")
            if check_samples:
                _check_training_space(out, done)
            if chunks and out.shape[1:] != chunks[0].shape[1:]:
                raise ValueError(f"generate returned samples of shape {tuple(out.shape[1:])} after "
                                 f"{tuple(chunks[0].shape[1:])}")
            chunks.append(out if dtype is None else out.to(dtype))
            done += n
            if progress is not None:
                progress(done, num_samples)
        latents = torch.cat(chunks).contiguous()
        if not torch.isfinite(latents).all():
            raise ValueError("generate returned non-finite values (NaN/inf)")
        meta = {"seed": str(seed), "batch_size": str(batch_size), "source": source}
        return cls(latents, labels, meta)

    # -------------------------------------------------------------- storage
    def _full_metadata(self) -> Dict[str, str]:
        meta = {k: v for k, v in self.metadata.items()
                if k not in ("format", "version", "count", "shape", "dtype", "content_sha256")}
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
        meta.update({
            "format": KNOWLEDGE_BANK_FORMAT,
            "version": _KB_VERSION,
            "count": str(len(self)),
            "shape": json.dumps(list(self.latents.shape[1:])),
            "dtype": str(self.latents.dtype).replace("torch.", ""),
            "content_sha256": _content_hash(self.latents, self.labels),
        })
        return meta

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the bank to a safetensors file (atomically: a temporary name, then rename)."""
        tensors = {"latents": self.latents}
        if self.labels is not None:
            tensors["labels"] = self.labels.to(torch.int64)
        data = serialize_safetensors(tensors, self._full_metadata())
        atomic_write_file(os.fspath(path), data)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
             verify: bool = True) -> "KnowledgeBank":
        """Read a bank written by :meth:`save`.

        Checks the format marker, ``count``/``shape``/``dtype`` against the tensors and,
        with ``verify=True``, the content hash; raises ``ValueError`` naming the problem.
        """
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                keys = set(f.keys())
                if meta.get("format") != KNOWLEDGE_BANK_FORMAT:
                    raise ValueError(f"{path} is not a fastsoup knowledge bank (metadata format="
                                     f"{meta.get('format')!r})")
                if "latents" not in keys:
                    raise ValueError(f"{path} has no 'latents' tensor")
                latents = f.get_tensor("latents")
                labels = f.get_tensor("labels") if "labels" in keys else None
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for broken files
            raise ValueError(f"cannot read knowledge bank {path}: {e}") from e
        if meta.get("version") != _KB_VERSION:
            raise ValueError(f"{path}: unsupported knowledge bank version {meta.get('version')!r}")
        if meta.get("count") != str(latents.shape[0]) \
                or meta.get("shape") != json.dumps(list(latents.shape[1:])) \
                or meta.get("dtype") != str(latents.dtype).replace("torch.", ""):
            raise ValueError(f"{path}: metadata (count={meta.get('count')}, shape={meta.get('shape')}, "
                             f"dtype={meta.get('dtype')}) does not match the stored latents "
                             f"{tuple(latents.shape)} {latents.dtype}")
        if verify and meta.get("content_sha256") != _content_hash(latents, labels):
            raise ValueError(f"{path}: content hash mismatch (the file was modified or truncated)")
        bank = cls(latents.to(device), None if labels is None else labels.to(device), meta)
        return bank

    # -------------------------------------------------------------- replay
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` latents drawn uniformly with replacement (on the bank's device)."""
        check_int("n", n, 0)
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.latents[idx.to(self.latents.device)]

    def stream(self, batch_size: int, generator: Optional[torch.Generator] = None,
               ) -> Iterator[Tensor]:
        """Endless replay batches of ``batch_size`` latents.

        Each pass over the bank is a fresh random permutation (from ``generator``, a CPU
        generator); a pass ends when fewer than ``batch_size`` unused samples remain (the
        reference code's ``DataLoader(shuffle=True, drop_last=True)``, restarted when
        exhausted). Needs ``batch_size <= len(bank)``.
        """
        check_int("batch_size", batch_size, 1)
        if batch_size > len(self):
            raise ValueError(f"batch_size={batch_size} exceeds the bank's {len(self)} samples")
        return self._stream(batch_size, generator)

    def _stream(self, batch_size: int, generator: Optional[torch.Generator]) -> Iterator[Tensor]:
        n = len(self)
        while True:
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n - batch_size + 1, batch_size):
                yield self.latents[perm[start:start + batch_size].to(self.latents.device)]
