"""Fixtures and helpers shared by the test packages (imported as ``tests.helpers``).

Test modules live in packages that mirror ``fastsoup/`` (``tests/kernels``, ``tests/ops``,
``tests/io``, ``tests/merge``, ``tests/train``, ``tests/gpu``); what several of them use
belongs here, what every test needs (the interpreter switch, the ``cuda`` marker) in
``tests/conftest.py``.
"""
import contextlib


# ============================================================== merge and io
# Random checkpoints in every layout, and the float64 / bit-exact fp32 oracles the
# merge engine is checked against.
import json
import os
import struct
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

SPEC = {
    "down.0.weight": ((32, 17), torch.bfloat16),
    "down.0.bias": ((17,), torch.float32),
    "mid.attn.qkv": ((9, 4, 3), torch.float16),
    "up.norm.weight": ((64,), torch.bfloat16),
    "position_ids": ((1, 12), torch.int64),
    "flags": ((5,), torch.bool),
    "empty": ((0, 3), torch.float32),
}


def make_state(seed: int, spec=SPEC, scale: float = 1.0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (shape, dtype) in spec.items():
        if dtype == torch.int64:
            out[k] = torch.arange(int(np.prod(shape)), dtype=torch.int64).reshape(shape)
        elif dtype == torch.bool:
            out[k] = torch.tensor([True, False, True, True, False])[: int(np.prod(shape))].reshape(shape)
        else:
            out[k] = (torch.randn(shape, generator=g) * scale).to(dtype)
    return out


def save_file_layout(path: str, state, metadata=None) -> str:
    save_file(state, path, metadata=metadata)
    return path


def save_sharded(folder: str, state, nshards: int = 2, stem: str = "model",
                 variant: Optional[str] = None) -> str:
    """A Hugging Face sharded checkpoint: shards + ``{stem}.safetensors.index.json``."""
    os.makedirs(folder, exist_ok=True)
    keys = list(state)
    groups = [keys[i::nshards] for i in range(nshards)]
    vpart = f".{variant}" if variant else ""
    weight_map = {}
    for i, g in enumerate(groups):
        name = f"{stem}{vpart}-{i + 1:05d}-of-{nshards:05d}.safetensors"
        save_file({k: state[k] for k in g}, os.path.join(folder, name))
        weight_map.update({k: name for k in g})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    with open(os.path.join(folder, f"{stem}.safetensors.index{vpart}.json"), "w") as f:
        json.dump(index, f)
    return folder


def save_diffusers(root: str, states: Dict[str, dict], variant: Optional[str] = None,
                   sharded: Sequence[str] = ()) -> str:
    """A diffusers root: model_index.json, weight components, and config-only folders."""
    os.makedirs(root, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "scheduler": ["diffusers", "DDPMScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "safety_checker": [None, None]}
    for comp, state in states.items():
        index[comp] = ["diffusers", "Model"]
        folder = os.path.join(root, comp)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"component": comp}, f)
        stem = "diffusion_pytorch_model" if comp != "text_encoder" else "model"
        if comp in sharded:
            save_sharded(folder, state, 2, stem=stem, variant=variant)
        else:
            vpart = f".{variant}" if variant else ""
            save_file(state, os.path.join(folder, f"{stem}{vpart}.safetensors"))
    for cfg in ("scheduler", "tokenizer"):
        os.makedirs(os.path.join(root, cfg), exist_ok=True)
        with open(os.path.join(root, cfg, f"{cfg}_config.json"), "w") as f:
            json.dump({"name": cfg}, f)
    with open(os.path.join(root, "tokenizer", "vocab.txt"), "w") as f:
        f.write("a\nb\n")
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f)
    return root


def load_any(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a file / sharded dir / diffusers root, keys qualified like the
    engine's (``component/key`` for diffusers)."""
    if os.path.isfile(path):
        return load_file(path)
    out = {}
    if os.path.exists(os.path.join(path, "model_index.json")):
        for comp in sorted(os.listdir(path)):
            folder = os.path.join(path, comp)
            if os.path.isdir(folder) and any(n.endswith(".safetensors") for n in os.listdir(folder)):
                out.update({f"{comp}/{k}": v for k, v in load_any(folder).items()})
        return out
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def f64_expected(states: List[dict], coefs: Sequence[float], key: str) -> np.ndarray:
    return sum(c * s[key].double().numpy() for c, s in zip(coefs, states))


def bf16_round(x32: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (round to nearest even) -> fp32, in numpy."""
    u = x32.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


def fp32_expected(states: List[dict], coefs: Sequence[float], key: str, out_dtype) -> np.ndarray:
    """The engine's exact arithmetic: acc = w0·x0, acc += wk·xk in fp32 (k in order), one
    rounding to the output dtype. Returned as float64 for comparison."""
    acc = np.float32(coefs[0]) * states[0][key].float().numpy()
    for c, s in zip(coefs[1:], states[1:]):
        acc = acc + np.float32(c) * s[key].float().numpy()
    acc = acc.astype(np.float32)
    if out_dtype == torch.bfloat16:
        acc = bf16_round(acc)
    elif out_dtype == torch.float16:
        acc = acc.astype(np.float16)
    return acc.astype(np.float64)


def ulp(dtype) -> float:
    return {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}[dtype]


def check_merged(out: Dict[str, torch.Tensor], states: List[dict], coefs: Sequence[float],
                 keys=None, exact: bool = True) -> None:
    """Floating tensors: bit-exact against the fp32 oracle and within one output ulp of
    the float64 average; integer/bool tensors: copied."""
    keys = keys if keys is not None else [k for k in states[0]]
    for k in keys:
        got = out[k]
        ref = states[0][k]
        assert got.shape == ref.shape, k
        if not ref.dtype.is_floating_point:
            assert got.dtype == ref.dtype and torch.equal(got, ref), k
            continue
        g = got.double().numpy()
        if exact:
            np.testing.assert_array_equal(g, fp32_expected(states, coefs, k, got.dtype), err_msg=k)
        e64 = f64_expected(states, coefs, k)
        tol = ulp(got.dtype) * np.maximum(np.abs(e64), 1e-3) + 1e-6
        assert np.all(np.abs(g - e64) <= tol), (k, float(np.max(np.abs(g - e64))))


def raw_safetensors(header: dict, data: bytes = b"", header_len: Optional[int] = None,
                    raw_header: Optional[bytes] = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(text) if header_len is None else header_len
    return struct.pack("<Q", n) + text + data


def bf16_from_f64(e: np.ndarray) -> torch.Tensor:
    """float64 -> bf16 with a single correct rounding (nearest even), as a torch tensor.
    (``torch.Tensor.to(torch.bfloat16)`` from float64 rounds twice, through fp32.)"""
    e = np.asarray(e, dtype=np.float64)
    f = e.astype(np.float32)
    back = f.astype(np.float64)
    inexact = back != e
    f = np.where(inexact & (np.abs(back) > np.abs(e)), np.nextafter(f, np.float32(0)), f)
    bits = f.view(np.uint32) | inexact.astype(np.uint32)  # round to odd: keeps the sticky bit
    r = bf16_round(bits.view(np.float32))
    return torch.from_numpy(r.astype(np.float32)).to(torch.bfloat16)


# ------------------------------------------------------------------ host syncs
# Python reads of a tensor's value: each waits for the device on a GPU.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def count_host_reads(monkeypatch, reads=HOST_READS):
    """Count calls of the ``torch.Tensor`` methods ``reads``; ``counter["where"]`` names
    each one."""
    counter = {"n": 0, "where": []}
    with monkeypatch.context() as m:
        for name in reads:
            original = getattr(torch.Tensor, name)

            def wrapper(self, *a, __original=original, __name=name, **k):
                counter["n"] += 1
                counter["where"].append(__name)
                return __original(self, *a, **k)

            m.setattr(torch.Tensor, name, wrapper)
        yield counter


def digest_bytes_fed(monkeypatch) -> Dict[str, int]:
    """``{path: bytes}`` the merge's own reads hand to each input's digest (not the bytes
    the digest reads itself), counted from now on."""
    from fastsoup.merge import hashing

    fed: Dict[str, int] = {}
    real = hashing._FileDigest.update

    def update(self, lo, view):
        fed[self.wf.path] = fed.get(self.wf.path, 0) + len(view)
        return real(self, lo, view)

    monkeypatch.setattr(hashing._FileDigest, "update", update)
    return fed


def cuda_syncs(call):
    """The synchronising CUDA calls ``call()`` makes after a warm-up call (sync-debug
    mode warns on each one, including those inside PyTorch's C++)."""
    import warnings

    call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


# ------------------------------------------------------------------ merge CLI
def run_quiet(argv, capsys):
    """``fastsoup-merge ARGV -q`` in process: ``(exit code, stderr)``."""
    from fastsoup.merge import cli

    code = cli.main([str(a) for a in argv] + ["-q"])
    return code, capsys.readouterr().err


def leftovers(folder):
    """Temporaries a merge left in ``folder``."""
    import os

    return [p for p in os.listdir(folder) if "fastsoup-tmp" in p]
