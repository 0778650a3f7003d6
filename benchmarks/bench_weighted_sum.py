"""Multi-tensor weighted sum ``outs[p] = Σ_k w_k inputs[k][p]`` (``fs.weighted_sum_``).

The use case: averaging K model replicas (iterative ensemble training) or K checkpoints'
tensors, a list of P tensors of mixed sizes (SD-like: a few large matrices, many small
vectors), bf16 in and out. Moves K reads + 1 write of every element.

Implementations, same inputs (each row records what it is in ``extra_info["label"]``,
which ``report.py`` prints next to the impl name):

* ``fastsoup``: ``fs.weighted_sum_``, the public API, with the device's default backend:
  Triton on GPU; on CPU the ``fastsoup._C`` kernel, one call for the whole list
  (``weighted_sum_list``, by the tensors' addresses), behind the custom op and its argument
  and aliasing checks (the PyTorch reference only for lists the kernel does not take). On GPU also ``fastsoup-cuda`` (``fs.weighted_sum_`` on the CUDA
  kernel).
* ``cpu-C`` (CPU only): ``fastsoup._C.weighted_sum`` called directly per tensor from
  Python, without ``fs.weighted_sum_``'s checks: the merge engine's CPU kernel, not an API
  a user calls. The gap to ``fastsoup`` is the public API's per-call cost.
* ``foreach``: ``torch._foreach_mul`` / ``_foreach_add_`` in fp32, then a cast (what one
  writes with PyTorch's multi-tensor primitives).

    pytest benchmarks/bench_weighted_sum.py --benchmark-only
    FASTSOUP_BENCH_SIZE=smoke pytest benchmarks/bench_weighted_sum.py --benchmark-disable
"""
import pytest
import torch

import fastsoup as fs
import fastsoup.ops  # noqa: F401  (registers every op's backend policy before _backend.choose)
from fastsoup import _backend
from harness import DEVICE, SIZE, measure

K = 4


def _unet_shapes(config):
    """Parameter shapes of a diffusers UNet2DConditionModel built on the meta device (no
    memory), or None without diffusers."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return None
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return [tuple(p.shape) for p in unet.parameters()]


SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 layers_per_block=2, attention_head_dim=8)
SMALL_UNET = dict(block_out_channels=(64, 128, 256, 256), cross_attention_dim=256,
                  layers_per_block=1, attention_head_dim=8)
if SIZE == "full":   # the Stable Diffusion 1.5 UNet's 686 parameter tensors (860 M elements)
    CASES = _unet_shapes(SD15_UNET) or [(4096, 4096)] * 16 + [(4096,)] * 600
elif SIZE == "small":
    CASES = _unet_shapes(SMALL_UNET) or [(1024, 1024)] * 12 + [(1280,)] * 300
else:
    CASES = [(64, 64)] * 2 + [(33,)] * 5


def _lists(dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(0)
    ins = [[torch.randn(s, generator=g).to(dtype).to(DEVICE) for s in CASES] for _ in range(K)]
    outs = [torch.empty(s, dtype=dtype, device=DEVICE) for s in CASES]
    return outs, ins


def _bytes(outs):
    return sum(o.numel() * o.element_size() for o in outs) * (K + 1)


IMPLS = ["fastsoup", "foreach"] + (["fastsoup-cuda"] if DEVICE.type == "cuda" else ["cpu-C"])
LABELS = {
    "fastsoup": "`fs.weighted_sum_` (the public API)",
    "fastsoup-cuda": "`fs.weighted_sum_` (the public API) on the CUDA kernel",
    "cpu-C": "`fastsoup._C.weighted_sum` per tensor, no checks (the merge engine's kernel, not the public API)",
    "foreach": "`torch._foreach_mul` / `_foreach_add_` in fp32, then a cast",
}


def _backend_of(impl: str) -> str:
    """The backend that runs the row: ``fs.weighted_sum_``'s choice for this device (on CPU
    its reference path hands contiguous bf16 lists to the ``_C`` kernel)."""
    if impl == "fastsoup":
        chosen = _backend.choose("weighted_sum", DEVICE).backend
        if chosen == "reference" and DEVICE.type == "cpu":
            from fastsoup.kernels import cpu as cpu_kernels

            if cpu_kernels.extension() is not None:
                chosen = "_C"
        return chosen
    return {"fastsoup-cuda": "cuda", "cpu-C": "_C", "foreach": "torch"}[impl]


@pytest.mark.parametrize("impl", IMPLS)
def test_weighted_sum(benchmark, impl):
    benchmark.group = f"weighted_sum K={K} x {len(CASES)} bf16 tensors"
    outs, ins = _lists()
    w = [1.0 / K] * K
    if impl == "fastsoup":
        step = lambda: fs.weighted_sum_(outs, ins, w)  # noqa: E731
    elif impl == "fastsoup-cuda":
        def step():
            with fs.use_backend("cuda", op="weighted_sum"):
                fs.weighted_sum_(outs, ins, w)
    elif impl == "cpu-C":
        from fastsoup import _C

        def step():
            for p, o in enumerate(outs):
                _C.weighted_sum(o.view(torch.int16).numpy(), 2,
                                [ins[k][p].view(torch.int16).numpy() for k in range(K)],
                                [2] * K, w, o.numel())
    else:
        def step():
            acc = torch._foreach_mul([t.float() for t in ins[0]], w[0])
            for k in range(1, K):
                torch._foreach_add_(acc, [t.float() for t in ins[k]], alpha=w[k])
            for o, a in zip(outs, acc):
                o.copy_(a)
    measure(benchmark, step, bytes_moved=_bytes(outs), impl=impl, tensors=len(CASES), inputs=K,
            role="baseline" if impl == "foreach" else "", backend=_backend_of(impl),
            label=LABELS[impl])
