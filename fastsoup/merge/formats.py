"""Resolving an input path to its checkpoint layout, from headers alone.

Three layouts are understood, and mixed inputs are fine when they resolve to the same
components and keys:

* ``file``: one ``.safetensors`` file (or, with ``allow_pickle``, one ``.ckpt`` /
  ``.bin`` / ``.pt`` / ``.pth`` file loaded with ``torch.load(weights_only=True)``);
* ``dir``: a directory holding a Hugging Face sharded checkpoint (``*.index.json`` whose
  ``weight_map`` names the shards) or a single weights file, or a path to the index
  itself;
* ``diffusers``: a root with ``model_index.json`` whose components are folders, each with
  weights that may be sharded and may carry a variant (``diffusion_pytorch_model.fp16
  .safetensors``, ``model.safetensors.index.fp16.json``).

Tensor keys are qualified by component for diffusers roots (``unet/conv_in.weight``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from itertools import repeat
from typing import Dict, List, Mapping, Optional, Tuple

from ..io import safetensors
from ..io.safetensors import DTYPES, TORCH_NAMES, Header, TensorInfo
from .errors import HeaderError, MergeError, some

SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = (SAFETENSORS,) + PICKLE_SUFFIXES + (".msgpack", ".h5", ".onnx", ".gguf", ".pb")
MAX_INDEX_BYTES = 64 * 1000 * 1000


@dataclass
class WeightFile:
    """One weight file of an input. Exactly one of ``header`` / ``tensors`` is set."""

    path: str                          # absolute path
    name: str                          # file name inside its component folder
    header: Optional[Header] = None    # safetensors
    tensors: Optional[dict] = None     # pickle: key -> torch.Tensor (loaded, weights only)
    identity: Optional[tuple] = None   # (dev, inode, size, mtime_ns, ctime_ns) when planned

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)

    def infos(self) -> Dict[str, TensorInfo]:
        if self.header is not None:
            return self.header.tensors
        out = {}
        for k, t in self.tensors.items():
            dt = TORCH_NAMES.get(str(t.dtype))
            if dt is None:
                raise MergeError(f"{self.path}: tensor {k!r} has unsupported dtype {t.dtype}")
            n = t.numel() * DTYPES[dt].itemsize
            out[k] = TensorInfo(dt, tuple(t.shape), 0, n)
        return out


@dataclass
class Component:
    """The weights of one model (a flat checkpoint, or one diffusers component folder)."""

    name: str                                  # "" for flat layouts, else the folder name
    files: List[WeightFile]
    index_name: Optional[str] = None           # "model.safetensors.index.json" when sharded
    index_metadata: dict = field(default_factory=dict)
    tensors: Mapping[str, Tuple[WeightFile, TensorInfo]] = field(default_factory=dict)

    @property
    def infos_of_file(self) -> Optional[Mapping]:
        """The header mapping ``tensors`` reads when it is one file's (:class:`FileTensors`):
        the planner then reads the mapping, which identical headers share (see
        io.safetensors.shared_headers); None otherwise."""
        return self.tensors.infos if isinstance(self.tensors, FileTensors) else None

    @property
    def weight_stem(self) -> str:
        """Base name for re-sharded files: ``diffusion_pytorch_model`` / ``model``."""
        if self.index_name:
            return self.index_name.split(".safetensors", 1)[0]
        base = self.files[0].name
        return base.split(".", 1)[0] if "." in base else base


@dataclass
class Layout:
    """An input resolved from headers: its kind and components (in a stable order)."""

    path: str                       # absolute path as given
    kind: str                       # "file", "dir" or "diffusers"
    components: Dict[str, Component]
    variant: Optional[str] = None
    _keys: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def keys(self) -> Dict[str, Tuple[str, str]]:
        """Qualified key -> (component name, key inside the component). Built once per
        layout (the plan and its checks ask often); do not modify the result."""
        signature = [(cname, len(comp.tensors)) for cname, comp in self.components.items()]
        if self._keys is None or self._keys[0] != signature:
            out = {}
            for cname, comp in self.components.items():
                if cname:
                    out.update({f"{cname}/{k}": (cname, k) for k in comp.tensors})
                else:
                    out.update(zip(comp.tensors, zip(repeat(""), comp.tensors)))
            self._keys = (signature, out)
        return self._keys[1]

    def files(self) -> List[WeightFile]:
        return [f for c in self.components.values() for f in c.files]

    def file_mapping(self) -> Optional[dict]:
        """The header's tensor mapping when this layout is one flat safetensors file whose
        tensors are exactly that mapping's (``Component.infos_of_file``), else None.
        Byte-identical headers parsed in one :func:`fastsoup.io.safetensors.shared_headers`
        context share this object: such layouts have the same keys, infos and order."""
        comp = self.components.get("") if len(self.components) == 1 else None
        if comp is None or comp.files[0].header is None:
            return None
        return comp.infos_of_file

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files())


# ------------------------------------------------------------------------------ helpers
def _load_json(path: str, what: str) -> dict:
    try:
        if os.path.getsize(path) > MAX_INDEX_BYTES:
            raise MergeError(f"{path}: {what} larger than {MAX_INDEX_BYTES} bytes")
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, MergeError):
            raise
        raise MergeError(f"{path}: cannot read {what} ({exc})") from None
    if not isinstance(obj, dict):
        raise MergeError(f"{path}: {what} is not a JSON object")
    return obj


def _variant_of_file(name: str) -> Optional[str]:
    """``x.fp16.safetensors`` -> ``fp16``; ``x.safetensors`` -> None."""
    stem = name.rsplit(".", 1)[0]
    return stem.split(".", 1)[1] if "." in stem else None


def _variant_of_index(name: str) -> Optional[str]:
    """``x.safetensors.index.fp16.json`` -> ``fp16``; ``x.safetensors.index.json`` -> None."""
    middle = name.split(".index", 1)[1][: -len(".json")]
    return middle[1:] if middle.startswith(".") else None


def _is_index(name: str) -> bool:
    return ".index" in name and name.endswith(".json") and (
        ".safetensors.index" in name or ".bin.index" in name)


def _load_pickle(path: str) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise MergeError(f"{path}: torch.load(weights_only=True) failed: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MergeError(f"{path}: a pickle checkpoint must hold a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise MergeError(f"{path}: no tensors found in the pickle checkpoint")
    return {k: v.contiguous() for k, v in tensors.items()}


def _weight_file(path: str, name: str, allow_pickle: bool) -> WeightFile:
    if name.endswith(SAFETENSORS):
        try:
            header = safetensors.read_header(path)
        except safetensors.HeaderError as exc:
            raise HeaderError(str(exc)) from None
        return WeightFile(path=path, name=name, header=header, identity=header.identity)
    if name.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise MergeError(
                f"{path}: refusing to load a pickle checkpoint (it can run arbitrary code). "
                "Convert it to .safetensors, or pass --allow-pickle (allow_pickle=True) to "
                "load it with torch.load(weights_only=True)")
        ident = safetensors.file_identity(os.stat(path))
        return WeightFile(path=path, name=name, tensors=_load_pickle(path), identity=ident)
    raise MergeError(f"{path}: not a checkpoint file (expected .safetensors"
                     f"{' or ' + '/'.join(PICKLE_SUFFIXES) if allow_pickle else ''})")


class FileTensors(Mapping):
    """``{key: (wf, info)}`` of the one file ``wf`` of a component, over its header's
    ``infos`` mapping: keys, length, membership and lookups read the mapping (which
    identical headers share); the dict of pairs is built only to iterate over pairs, so
    a merge of inputs sharing a header never builds one per input."""

    __slots__ = ("wf", "infos", "_pairs")

    def __init__(self, wf: "WeightFile", infos: Mapping):
        self.wf, self.infos, self._pairs = wf, infos, None

    def _dict(self) -> dict:
        if self._pairs is None:
            self._pairs = dict(zip(self.infos, zip(repeat(self.wf), self.infos.values())))
        return self._pairs

    def __getitem__(self, key):
        return self.wf, self.infos[key]

    def get(self, key, default=None):
        info = self.infos.get(key)
        return default if info is None else (self.wf, info)

    def items(self):
        return self._dict().items()

    def values(self):
        return self._dict().values()

    def keys(self):
        return self.infos.keys()

    def __iter__(self):
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __contains__(self, key) -> bool:
        return key in self.infos


def _fill_tensors(comp: Component, where: str) -> None:
    if len(comp.files) == 1 and not comp.tensors:  # one file: no key can appear twice
        wf = comp.files[0]
        comp.tensors = FileTensors(wf, wf.infos())
        return
    for wf in comp.files:
        for k, info in wf.infos().items():
            if k in comp.tensors:
                raise MergeError(f"{where}: tensor {k!r} appears in both "
                                 f"{comp.tensors[k][0].name} and {wf.name}")
            comp.tensors[k] = (wf, info)


def _sharded_component(index_path: str, name: str, allow_pickle: bool) -> Component:
    folder = os.path.dirname(index_path)
    index = _load_json(index_path, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise MergeError(f"{index_path}: 'weight_map' must map tensor names to file names")
    shard_names = list(dict.fromkeys(weight_map.values()))
    problems = []
    files = []
    for shard in shard_names:
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            problems.append(f"shard name {shard!r} is not a plain file name")
            continue
        p = os.path.join(folder, shard)
        if not os.path.isfile(p):
            problems.append(f"shard {shard!r} named in the index does not exist")
            continue
        files.append(_weight_file(p, shard, allow_pickle))
    if problems:
        raise MergeError(f"{index_path}: " + "; ".join(problems))
    comp = Component(name=name, files=files, index_name=os.path.basename(index_path),
                     index_metadata=index.get("metadata") if isinstance(index.get("metadata"), dict) else {})
    _fill_tensors(comp, index_path)
    bad = []
    for k, shard in weight_map.items():
        got = comp.tensors.get(k)
        if got is None:
            bad.append(f"{k!r} is mapped to {shard} but that shard has no such tensor")
        elif got[0].name != shard:
            bad.append(f"{k!r} is mapped to {shard} but is stored in {got[0].name}")
    for k, (wf, _) in comp.tensors.items():
        if k not in weight_map:
            bad.append(f"{k!r} is stored in {wf.name} but missing from the weight_map")
    if bad:
        raise MergeError(f"{index_path}: index and shards disagree: " + some(bad, 20))
    return comp


def resolve_folder(folder: str, name: str, variant: Optional[str],
                   allow_pickle: bool) -> Optional[Component]:
    """The weights of one folder (sharded or single-file, for ``variant``), or None when
    the folder has no weight files at all (a config-only component)."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError as exc:
        raise MergeError(f"{folder}: cannot list ({exc.strerror})") from None
    indexes = [e for e in entries if _is_index(e)]
    named_by_index = set()
    for e in indexes:
        try:
            wm = _load_json(os.path.join(folder, e), "shard index").get("weight_map") or {}
            named_by_index.update(v for v in wm.values() if isinstance(v, str))
        except MergeError:
            pass
    singles = [e for e in entries if e.endswith(SAFETENSORS) and e not in named_by_index
               and os.path.isfile(os.path.join(folder, e))]
    pickles = [e for e in entries if e.endswith(PICKLE_SUFFIXES) and e not in named_by_index
               and os.path.isfile(os.path.join(folder, e))]
    if not (indexes or singles or pickles):
        return None
    st_idx = [e for e in indexes if ".safetensors.index" in e and _variant_of_index(e) == variant]
    st_single = [e for e in singles if _variant_of_file(e) == variant]
    candidates = [("index", e) for e in st_idx] + [("file", e) for e in st_single]
    if not candidates:
        pk_idx = [e for e in indexes if ".bin.index" in e and _variant_of_index(e) == variant]
        if pk_idx:
            raise MergeError(f"{folder}: only a sharded pickle checkpoint ({pk_idx[0]}) for "
                             f"variant {variant or '(none)'}; convert it to safetensors first")
        candidates = [("file", e) for e in pickles if _variant_of_file(e) == variant]
    if not candidates:
        have = sorted({_variant_of_file(e) or "(none)" for e in singles + pickles}
                      | {_variant_of_index(e) or "(none)" for e in indexes})
        raise MergeError(f"{folder}: no weights for variant {variant or '(none)'} "
                         f"(variants present: {', '.join(have)})")
    if len(candidates) > 1:
        raise MergeError(f"{folder}: ambiguous weights for variant {variant or '(none)'}: "
                         f"{', '.join(e for _, e in candidates)}")
    kind, entry = candidates[0]
    path = os.path.join(folder, entry)
    if kind == "index":
        return _sharded_component(path, name, allow_pickle)
    comp = Component(name=name, files=[_weight_file(path, entry, allow_pickle)])
    _fill_tensors(comp, path)
    return comp


def diffusers_components(root: str) -> List[str]:
    """Folder names listed by ``model_index.json`` (entries ``[library, class]``)."""
    index = _load_json(os.path.join(root, "model_index.json"), "model_index.json")
    names = []
    for k, v in index.items():
        if k.startswith("_") or not isinstance(v, list) or len(v) != 2 or v[0] is None:
            continue
        if os.path.basename(k) != k or k in (".", ".."):
            raise MergeError(f"{root}/model_index.json: component {k!r} is not a plain folder name")
        names.append(k)
    return names


def resolve(path: str, variant: Optional[str] = None, allow_pickle: bool = False) -> Layout:
    """Resolve ``path`` into a :class:`Layout`, reading headers only (pickle inputs, when
    allowed, are loaded memory-mapped). Raises :class:`MergeError` naming the problem."""
    apath = os.path.abspath(path)
    if not os.path.exists(apath):
        raise MergeError(f"{path}: no such file or directory")
    if os.path.isfile(apath):
        name = os.path.basename(apath)
        if _is_index(name):
            comp = _sharded_component(apath, "", allow_pickle)
            return Layout(path=apath, kind="dir", components={"": comp})
        wf = _weight_file(apath, name, allow_pickle)
        comp = Component(name="", files=[wf])
        _fill_tensors(comp, apath)
        return Layout(path=apath, kind="file", components={"": comp})
    if os.path.isfile(os.path.join(apath, "model_index.json")):
        comps: Dict[str, Component] = {}
        for cname in diffusers_components(apath):
            folder = os.path.join(apath, cname)
            if not os.path.isdir(folder):
                continue
            comp = resolve_folder(folder, cname, variant, allow_pickle)
            if comp is not None:
                comps[cname] = comp
        if not comps:
            raise MergeError(f"{path}: diffusers root without any weights "
                             f"(variant {variant or '(none)'})")
        return Layout(path=apath, kind="diffusers", components=comps, variant=variant)
    comp = resolve_folder(apath, "", variant, allow_pickle)
    if comp is None:
        raise MergeError(f"{path}: no checkpoint found (no .safetensors file, no *.index.json, "
                         "no model_index.json)")
    return Layout(path=apath, kind="dir", components={"": comp}, variant=variant)
