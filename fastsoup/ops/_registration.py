"""One helper builds every differentiable fused op: a registered custom-op pair and its
eager twin, from one forward and one backward implementation.

* ``fastsoup::<name>`` and ``fastsoup::<name>_backward`` are ``torch.library`` custom ops
  with fake (meta) implementations and registered autograd: what ``torch.compile`` traces
  and ``torch.library.opcheck`` checks (the custom op is the leaf, as in flash-attention).
* In eager mode the same implementations run through a plain ``autograd.Function`` built
  here: the custom-op dispatcher costs more per call than the fused kernels at
  training-step sizes (``benchmarks/bench_dispatch.py`` measures both paths).

The backend is chosen once, in the forward pass, and handed to the backward: the backward
of CUDA tensors runs on autograd's device thread, which does not see the caller's
thread-local :func:`fastsoup.use_backend` override. The compiled path carries the choice as
the backward op's last argument (``backend: str``; empty means "choose now").
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .. import _backend


def _spec(args: Sequence[Any]):
    """How the custom op's (possibly nested) arguments map to flat autograd inputs."""
    spec, flat = [], []
    for a in args:
        if isinstance(a, Tensor):
            spec.append(("tensor", None))
            flat.append(a)
        elif isinstance(a, (list, tuple)) and a and all(isinstance(x, Tensor) for x in a):
            spec.append(("list", len(a)))
            flat.extend(a)
        else:
            spec.append(("const", a))
    return tuple(spec), flat


def _unflatten(spec, flat: Sequence[Any]) -> list:
    out, i = [], 0
    for kind, value in spec:
        if kind == "tensor":
            out.append(flat[i])
            i += 1
        elif kind == "list":
            out.append(list(flat[i:i + value]))
            i += value
        else:
            out.append(value)
    return out


def _flatten_grads(spec, grads: Sequence[Any]) -> tuple:
    flat = []
    for (kind, value), g in zip(spec, grads):
        if kind == "tensor":
            flat.append(g)
        elif kind == "list":
            flat.extend(g if g is not None else [None] * value)
    return tuple(flat)


class FusedOp:
    """A differentiable op built from:

    * ``forward(*args) -> out``: the implementation, annotated (its annotations are the
      custom op's schema); ``fake_forward`` its meta version;
    * ``backward(*bargs) -> grads`` and ``fake_backward``: the backward implementation and
      its meta version (annotated likewise), or ``backward=None`` when the gradient is the
      op itself applied to other arguments (a linear map);
    * ``setup(ctx, args, out)``: saves what the gradient needs (``ctx.save_for_backward``);
    * ``grad(ctx, needs, grads, run) -> per-argument gradients``: the autograd formula;
      ``needs`` mirrors the arguments (a list of bools for a tensor-list argument) and
      ``run`` is the backward to call (the custom op when compiled, the implementation in
      eager mode).
    """

    def __init__(self, name: str, forward: Callable, fake_forward: Callable, *,
                 setup: Callable, grad: Callable, backward: Optional[Callable] = None,
                 fake_backward: Optional[Callable] = None):
        self.name = name
        self.forward_impl = forward
        self.op = torch.library.custom_op(f"fastsoup::{name}", forward, mutates_args=())
        self.op.register_fake(fake_forward)
        if backward is not None:
            self.backward_impl = backward
            self.backward_op = torch.library.custom_op(f"fastsoup::{name}_backward", backward,
                                                       mutates_args=())
            self.backward_op.register_fake(fake_backward)
        else:
            self.backward_impl, self.backward_op = forward, self.op
        self._setup, self._grad = setup, grad
        self.op.register_autograd(self._compiled_grad, setup_context=setup)
        self._twin = self._make_twin()

    def _compiled_grad(self, ctx, *grads):
        return self._grad(ctx, ctx.needs_input_grad, grads[0] if len(grads) == 1 else grads,
                          self.backward_op)

    def _make_twin(self):
        fused = self

        class _Twin(torch.autograd.Function):
            @staticmethod
            def forward(ctx, spec, *flat):
                args = _unflatten(spec, flat)
                out = fused.forward_impl(*args)
                if isinstance(out, list):  # unused outputs get None (the formula skips them)
                    ctx.set_materialize_grads(False)
                fused._setup(ctx, args, out)
                ctx.fused_spec = spec
                return tuple(out) if isinstance(out, list) else out

            @staticmethod
            def backward(ctx, *grads):
                spec = ctx.fused_spec
                needs = _unflatten(spec, ctx.needs_input_grad[1:])
                out = fused._grad(ctx, needs, grads[0] if len(grads) == 1 else grads,
                                  fused.backward_impl)
                return (None,) + _flatten_grads(spec, out)

        # named after the op, so grad_fn reads e.g. PerSampleMseFunctionBackward
        name = f"{name_to_class(self.name)}Function"
        return type(name, (_Twin,), {"__qualname__": name})

    def __call__(self, *args):
        """The registered op while ``torch.compile`` traces, the eager twin otherwise."""
        if torch.compiler.is_compiling():
            return self.op(*args)
        spec, flat = _spec(args)
        out = self._twin.apply(spec, *flat)
        return list(out) if isinstance(out, tuple) else out


def name_to_class(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def chosen_backend(backend: str, choose: Callable[[], str]) -> str:
    """The backend a backward op was handed, or a fresh choice when it was given none."""
    return backend if backend in _backend.BACKENDS else choose()


def no_grads(needs: Sequence[Any]) -> bool:
    """True when no argument needs a gradient (``needs`` as :class:`FusedOp` gives it)."""
    return not any(any(n) if isinstance(n, (list, tuple)) else n for n in needs)


def grads_or_none(grads: Sequence[Optional[Tensor]], needs: Sequence[bool]) -> List[Optional[Tensor]]:
    """Gradients with ``None`` where none was requested (custom ops return placeholders)."""
    return [g if n else None for g, n in zip(grads, needs)]
