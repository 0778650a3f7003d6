"""Ambient diffusion: fused double-Tweedie losses and the one-step VP reverse sampler (SPEC §3).

Training data are noisy (``x_n = x_0 + σ_n η`` in VE, ``x_n = α_n x_0 + σ_n η`` in VP) with
one fixed noise draw per image (see :mod:`fastsoup.ambient_data`). The losses below compare
the network's implied ``E[x_n | x_t]`` with the observed ``x_n``; their minimiser is the
*clean* denoiser ``E[x_0 | x_t]`` at every level ``σ_t > σ_n``.

Public ops:

* :func:`ambient_loss_vp`: ε-network, VP schedule (x0-mode and ε-mode);
* :func:`ambient_loss_ve`: x0-network, VE / EDM schedule (pseudo-target form);
* :func:`vp_reverse_step` / :func:`vp_reverse_step_from_eps`: one DDPM ancestral step
  ``t → s`` (the reverse samples of the consistency loss, :mod:`fastsoup.ops.consistency`);
* :func:`vp_alpha_sigma` / :func:`vp_reverse_step_coefficients`: ``α``, ``σ``, ``c_o``,
  ``c_f`` from a diffusers-style scheduler's ``alphas_cumprod`` and integer timesteps.

Every loss is a row-wise bilinear form ``ℓ_i = c_i · mean_j (Σ_k A_ik x_k)(Σ_k B_ik x_k)``
and the sampler a row-wise linear map ``y_m = Σ_k C_imk x_k``. The per-sample coefficients
form one ``[B, 16]`` table computed from the schedule scalars in float64 by one op
(``fastsoup::ambient_coefficients``: the formulas below as PyTorch, or a single Triton
launch). The forms are ``torch.library.custom_op`` pairs (forward, backward) with a
PyTorch reference (the CPU path, the float64 path and the test oracle) and Triton kernels
(:mod:`fastsoup.triton.ambient`) that read each input once per pass, accumulate in fp32 and
never allocate a ``[B, D]`` temporary besides the outputs. A fused loss costs about five
launches forward (table, reduction kernel, a few ``[B]`` reductions) and one backward.

A VP training step (SDXL-style ε-network, data at level ``t_n``; ``scheduler`` is any
diffusers scheduler, ``x_n`` a batch from :class:`fastsoup.ambient_data.AmbientDataset`)::

    t = torch.randint(t_n, T, (B,), device=dev)
    alpha_t, sigma_t = fs.vp_alpha_sigma(scheduler, t)
    alpha_n, sigma_n = fs.vp_alpha_sigma(scheduler, torch.full_like(t, t_n))
    a = alpha_t / alpha_n
    b = (sigma_t**2 - a**2 * sigma_n**2).clamp_min(0).sqrt()
    z = torch.randn_like(x_n)
    x_t = a.view(-1, 1, 1, 1) * x_n + b.view(-1, 1, 1, 1) * z
    eps_pred = unet(x_t, t, cond).sample
    loss = fs.ambient_loss_vp(eps_pred, z, alpha_t, sigma_t, alpha_n, sigma_n, mode="x0")

Per-sample noise-schedule scalars (``alpha_t``, ``sigma_t``, ...) are constants of the
schedule: they may be Python numbers, 0-d tensors or ``[B]`` float tensors, but not tensors
that require grad (a ``ValueError`` says so; pass ``.detach()``). Gradients flow to the
data tensors and to ``weight``.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from ._checks import as_weight, check_float_tensor, check_same_shape
from ._rows import row_layout

OP_VP = "ambient_loss_vp"
OP_VE = "ambient_loss_ve"
OP_CONSISTENCY = "consistency_loss"
OP_STEP = "vp_reverse_step"
for _op in (OP_VP, OP_VE, OP_CONSISTENCY, OP_STEP):
    _backend.register_op(_op, ("reference", "triton"), default_gpu="triton")

_OPS = (OP_VP, OP_VE, OP_CONSISTENCY, OP_STEP)
MAX_BILINEAR_INPUTS = 6
MAX_LINEAR_INPUTS = 4
MAX_LINEAR_OUTPUTS = 4
Scalar = Union[float, Tensor]


# ----------------------------------------------------------------------------- helpers
COEF_COLS = 16
# The per-sample coefficient table ([B, 16]): bilinear A at 0..5, B at 6..11, the row scale
# c_i at 12 (ℓ_i = c_i · mean(u v), exactly 0 where c_i = 0), the validity flag at 13
# (the samples counted by the mean); row-linear C_mk at 4m + k.
COL_SCALE, COL_VALID = 12, 13
KINDS = ("vp_x0", "vp_eps", "ve", "consistency_eps", "step", "step_eps")


def _acc_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _bcast(c: Tensor, ndim: int) -> Tensor:
    return c.view((c.shape[0],) + (1,) * (ndim - 1))


def _backend_for(op: str, xs: Sequence[Tensor], acc: Optional[torch.dtype] = None) -> str:
    if acc == torch.float64 or any(x.dtype == torch.float64 for x in xs) or xs[0].shape[0] == 0:
        return "reference"  # float64 is the checking dtype: the reference handles it
    return _backend.choose(op, xs[0].device).backend


# ------------------------------------------------------------ coefficient table: reference
def vp_loss_coefficients(alpha_t: Tensor, sigma_t: Tensor, alpha_n: Tensor, sigma_n: Tensor,
                         mode: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-sample ``(a, b, k, c, valid, live)`` of the VP ambient loss (``[B]``).

    ``a = α_t/α_n``, ``b = sqrt(max(σ_t² − a²σ_n², 0))``, ``valid = σ_t ≥ σ_n`` (counted
    by the mean), ``live = valid ∧ b > 0``; ``k = b/σ_t`` and ``c = (b/a)²`` (x0-mode) or
    ``1`` (ε-mode) where live, 0 elsewhere (so no 0/0 is ever formed).
    """
    valid = sigma_t >= sigma_n
    a = alpha_t / alpha_n
    b = torch.sqrt(torch.clamp(sigma_t * sigma_t - a * a * sigma_n * sigma_n, min=0.0))
    live = valid & (b > 0)
    zero = torch.zeros_like(b)
    k = torch.where(live, b / torch.where(live, sigma_t, torch.ones_like(sigma_t)), zero)
    c = torch.where(live, (b / a) ** 2 if mode == "x0" else torch.ones_like(b), zero)
    return a, b, k, c, valid, live


def ve_loss_coefficients(sigma_t: Tensor, sigma_n: Tensor, sigma_data: float
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample ``(p, q, λ, valid)`` of the VE ambient loss (``[B]``).

    Pseudo-target ``y = p x_n + q x_t`` with ``p = σ_t²/(σ_t² − σ_n²)``,
    ``q = −σ_n²/(σ_t² − σ_n²)``; ``λ = (σ_t² + σ_d²)/(σ_t σ_d)²``; ``valid = σ_t > σ_n``
    (``p``, ``q``, ``λ`` are 0 where invalid, so nothing divides by zero).
    """
    valid = sigma_t > sigma_n
    one = torch.ones_like(sigma_t)
    zero = torch.zeros_like(sigma_t)
    st2, sn2 = sigma_t * sigma_t, sigma_n * sigma_n
    den = torch.where(valid, st2 - sn2, one)
    p = torch.where(valid, st2 / den, zero)
    q = torch.where(valid, -sn2 / den, zero)
    sd2 = float(sigma_data) ** 2
    lam = torch.where(valid, (st2 + sd2) / (torch.where(valid, st2, one) * sd2), zero)
    return p, q, lam, valid


def reference_coefficients(kind: str, scalars: Sequence[Tensor], param: float, n_out: int,
                           dtype: torch.dtype) -> Tensor:
    """The ``[B, 16]`` coefficient table of ``kind`` (float64 arithmetic, then ``dtype``)."""
    p = [x.to(torch.float64) for x in scalars]
    B = p[0].shape[0]
    T = torch.zeros((B, COEF_COLS), dtype=torch.float64, device=p[0].device)
    if kind in ("vp_x0", "vp_eps"):
        _, _, k, c, valid, live = vp_loss_coefficients(*p, mode=kind[3:])
        for col, v in ((0, -k), (1, live), (6, -k), (7, live), (COL_SCALE, c), (COL_VALID, valid)):
            T[:, col] = v
    elif kind == "ve":
        pp, q, lam, valid = ve_loss_coefficients(p[0], p[1], param)
        for col, v in ((0, valid), (1, -pp), (2, -q), (6, valid), (7, -pp), (8, -q),
                       (COL_SCALE, lam), (COL_VALID, valid)):
            T[:, col] = v
    elif kind == "consistency_eps":  # u = h_1 − h_t, v = h_2 − h_t, h = (x − σ ε̂)/α
        at, st, as_, ss = p
        for col, v in ((0, -1 / at), (1, st / at), (2, 1 / as_), (3, -ss / as_),
                       (6, -1 / at), (7, st / at), (10, 1 / as_), (11, -ss / as_),
                       (COL_SCALE, 1.0), (COL_VALID, 1.0)):
            T[:, col] = v
    elif kind in ("step", "step_eps"):
        if kind == "step":  # inputs (ĥ, ε̂, ξ_1[, ξ_2])
            cx, ce, cf = p
        else:               # inputs (x_t, ε̂, ξ_1[, ξ_2]), ĥ = (x_t − σ_t ε̂)/α_t
            at, st, as_, co, cf = p
            cx, ce = as_ / at, co - as_ * st / at
        for m in range(n_out):
            T[:, 4 * m], T[:, 4 * m + 1], T[:, 4 * m + 2 + m] = cx, ce, cf
    else:
        raise ValueError(f"unknown coefficient kind {kind!r}")
    return T.to(dtype)


def _coefficients_impl(op: str, kind: str, scalars: List[Tensor], param: float, n_out: int,
                       dtype: torch.dtype) -> Tensor:
    # float64 scalars are fine for the kernel (it computes in float64); the table's dtype
    # (float64 only for float64 data) decides whether the reference runs.
    if dtype == torch.float64 or scalars[0].shape[0] == 0 or \
            _backend.choose(op, scalars[0].device).backend == "reference":
        return reference_coefficients(kind, scalars, param, n_out, dtype)
    from ..triton import ambient as tamb

    return tamb.coefficients(KINDS.index(kind), [x.contiguous() for x in scalars],
                             scalars[0].shape[0], param, n_out)


@torch.library.custom_op("fastsoup::ambient_coefficients", mutates_args=())
def _coefficients_op(op: str, kind: str, scalars: List[Tensor], param: float, n_out: int,
                     dtype: torch.dtype) -> Tensor:
    return _coefficients_impl(op, kind, scalars, param, n_out, dtype)


@_coefficients_op.register_fake
def _(op, kind, scalars, param, n_out, dtype):
    return scalars[0].new_empty((scalars[0].shape[0], COEF_COLS), dtype=dtype)


def coefficient_table(op: str, kind: str, scalars: Sequence[Tensor], dtype: torch.dtype,
                      param: float = 0.0, n_out: int = 1) -> Tensor:
    """``[B, 16]`` table of ``kind`` from ``[B]`` schedule scalars (one launch when fused)."""
    assert kind in KINDS and not any(x.requires_grad for x in scalars)
    if torch.compiler.is_compiling():
        return _coefficients_op(op, kind, list(scalars), float(param), n_out, dtype)
    return _coefficients_impl(op, kind, list(scalars), float(param), n_out, dtype)


_CONSTANT_TABLES: dict = {}


def consistency_table(batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The constant table of the h-form consistency loss (``u = h_1 − h_t``,
    ``v = h_2 − h_t`` over inputs ``(h_t, h_1, h_2)``), expanded to ``[B, 16]``."""
    values = [0.0] * COEF_COLS
    values[0], values[1], values[6], values[8] = -1.0, 1.0, -1.0, 1.0
    values[COL_SCALE] = values[COL_VALID] = 1.0
    if torch.compiler.is_compiling():  # traced: a graph constant, never a cached tensor
        return torch.tensor(values, dtype=dtype, device=device).expand(batch, COEF_COLS)
    key = (device, dtype)
    row = _CONSTANT_TABLES.get(key)
    if row is None:  # eager: made once per device and dtype (no copy to the device per call)
        row = _CONSTANT_TABLES[key] = torch.tensor(values, dtype=dtype, device=device)
    return row.expand(batch, COEF_COLS)


# ---------------------------------------------------------------- bilinear: reference
def _row_combination(xs: Sequence[Tensor], coef: Tensor) -> Tensor:
    """``Σ_k coef[:, k] x_k`` in ``coef.dtype`` (one new tensor, accumulated in place)."""
    nd = xs[0].dim()
    out = xs[0].to(coef.dtype) * _bcast(coef[:, 0], nd)
    for k in range(1, len(xs)):
        out.addcmul_(xs[k].to(coef.dtype), _bcast(coef[:, k], nd))
    return out


def reference_bilinear(xs: Sequence[Tensor], coef: Tensor, square: bool) -> Tensor:
    """``ℓ_i = c_i · mean_j u_ij v_ij`` (exactly 0 where ``c_i = 0``), ``[B]``.

    ``u = Σ_k A_ik x_k``, ``v = Σ_k B_ik x_k`` with ``A``, ``B``, ``c`` read from the
    ``[B, 16]`` table ``coef`` (``square``: ``v = u``). Computed in ``coef.dtype``.
    """
    n = len(xs)
    u = _row_combination(xs, coef[:, 0:n])
    if square:
        u.square_()
    else:
        u.mul_(_row_combination(xs, coef[:, 6:6 + n]))
    B = xs[0].shape[0]
    raw = u.reshape(B, u.numel() // B if B else 1).mean(dim=1)
    scale = coef[:, COL_SCALE]
    return torch.where(scale == 0, torch.zeros_like(raw), scale * raw)


def reference_bilinear_backward(grad: Tensor, xs: Sequence[Tensor], coef: Tensor,
                                square: bool, needs: Sequence[bool]) -> List[Tensor]:
    """``∂ℓ_i/∂x_k = s_i (A_ik v + B_ik u)`` with ``s_i = g_i c_i / D``.

    Rows with ``s_i = 0`` get exact zeros, even where the inputs hold inf or NaN.
    """
    n = len(xs)
    acc = coef.dtype
    nd = xs[0].dim()
    B = xs[0].shape[0]
    D = xs[0][0].numel() if B else 1
    s = grad.to(acc) * coef[:, COL_SCALE] / D
    dead = _bcast(s == 0, nd)
    u = _row_combination(xs, coef[:, 0:n]).masked_fill_(dead, 0.0)
    v = None if square else _row_combination(xs, coef[:, 6:6 + n]).masked_fill_(dead, 0.0)
    out = []
    for k, (x, need) in enumerate(zip(xs, needs)):
        if not need:
            out.append(x.new_empty(0))
        elif square:
            out.append((u * _bcast(2 * s * coef[:, k], nd)).to(x.dtype))
        else:
            g = v * _bcast(s * coef[:, k], nd)
            g.addcmul_(u, _bcast(s * coef[:, 6 + k], nd))
            out.append(g.to(x.dtype))
    return out


# ---------------------------------------------------------------- bilinear: fused
def _fused_bilinear(xs: List[Tensor], coef: Tensor, square: bool) -> Tensor:
    from ..triton import ambient as tamb

    layout = row_layout(xs)
    if layout is None:  # rare: more than three inner dims that cannot merge
        xs = [x.contiguous() for x in xs]
        layout = row_layout(xs)
    return tamb.bilinear_forward(xs, coef, square, layout)


def _fused_bilinear_backward(grad: Tensor, xs: List[Tensor], coef: Tensor, square: bool,
                             needs: Sequence[bool]) -> List[Tensor]:
    from ..triton import ambient as tamb

    grad = grad.to(torch.float32).contiguous()
    grads = [torch.empty_like(x) if n else None for x, n in zip(xs, needs)]
    layout = row_layout(xs + [g if g is not None else x for g, x in zip(grads, xs)])
    if layout is not None:
        tamb.bilinear_backward(xs, coef, grad, grads, square, layout)
    else:  # rare: inner dims that cannot merge; compute on contiguous copies
        cxs = [x.contiguous() for x in xs]
        cgrads = [torch.empty_like(x) if n else None for x, n in zip(cxs, needs)]
        layout = row_layout(cxs + [g if g is not None else x for g, x in zip(cgrads, cxs)])
        tamb.bilinear_backward(cxs, coef, grad, cgrads, square, layout)
        for g, cg in zip(grads, cgrads):
            if g is not None:
                g.copy_(cg)
    return [g if g is not None else x.new_empty(0) for g, x in zip(grads, xs)]


# ---------------------------------------------------------------- bilinear: custom ops
# The backend is chosen once, in the forward pass, and handed to the backward pass: the
# backward of CUDA tensors runs on autograd's device thread, which does not see the
# caller's thread-local fs.use_backend() override. In eager mode the same implementations
# run through plain autograd.Functions (the custom ops' Python dispatch costs more than the
# kernels at small sizes); torch.compile traces the registered custom ops.
def _bilinear_impl(xs: List[Tensor], coef: Tensor, square: bool, backend: str) -> Tensor:
    if backend == "reference":
        return reference_bilinear(xs, coef, square)
    return _fused_bilinear(list(xs), coef, square)


def _bilinear_backward_impl(grad: Tensor, xs: List[Tensor], coef: Tensor, square: bool,
                            needs: Sequence[bool], backend: str) -> List[Tensor]:
    if backend == "reference":
        return reference_bilinear_backward(grad, xs, coef, square, needs)
    return _fused_bilinear_backward(grad, list(xs), coef, square, needs)


@torch.library.custom_op("fastsoup::ambient_row_bilinear", mutates_args=())
def _bilinear_op(op: str, xs: List[Tensor], coef: Tensor, square: bool) -> Tensor:
    return _bilinear_impl(xs, coef, square, _backend_for(op, xs, coef.dtype))


@_bilinear_op.register_fake
def _(op, xs, coef, square):
    return xs[0].new_empty((xs[0].shape[0],), dtype=coef.dtype)


@torch.library.custom_op("fastsoup::ambient_row_bilinear_backward", mutates_args=())
def _bilinear_backward_op(op: str, grad: Tensor, xs: List[Tensor], coef: Tensor,
                          square: bool, needs: List[bool], backend: str = "") -> List[Tensor]:
    if backend not in _backend.BACKENDS:
        backend = _backend_for(op, xs, coef.dtype)
    return _bilinear_backward_impl(grad, xs, coef, square, needs, backend)


@_bilinear_backward_op.register_fake
def _(op, grad, xs, coef, square, needs, backend=""):
    return [torch.empty_like(x) if n else x.new_empty(0) for x, n in zip(xs, needs)]


def _bilinear_setup(ctx, inputs, output):
    op, xs, coef, square = inputs
    ctx.op, ctx.square = op, square
    ctx.backend = _backend_for(op, xs, coef.dtype)
    ctx.save_for_backward(coef, *xs)


def _bilinear_autograd(ctx, grad):
    coef, *xs = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[1]]
    if not any(needs):
        return None, None, None, None
    gs = _bilinear_backward_op(ctx.op, grad, xs, coef, ctx.square, needs, ctx.backend)
    return None, [g if n else None for g, n in zip(gs, needs)], None, None


_bilinear_op.register_autograd(_bilinear_autograd, setup_context=_bilinear_setup)


class _BilinearFunction(torch.autograd.Function):
    """Eager-mode twin of ``fastsoup::ambient_row_bilinear``."""

    @staticmethod
    def forward(ctx, op, coef, square, *xs):
        ctx.square = square
        ctx.backend = _backend_for(op, xs, coef.dtype)
        ctx.save_for_backward(coef, *xs)
        return _bilinear_impl(list(xs), coef, square, ctx.backend)

    @staticmethod
    def backward(ctx, grad):
        coef, *xs = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[3:]]
        if not any(needs):
            return (None, None, None) + (None,) * len(xs)
        gs = _bilinear_backward_impl(grad, xs, coef, ctx.square, needs, ctx.backend)
        return (None, None, None) + tuple(g if n else None for g, n in zip(gs, needs))


def row_bilinear(op: str, xs: Sequence[Tensor], coef: Tensor, square: bool) -> Tensor:
    """Differentiable ``[B]`` row bilinear form (see :func:`reference_bilinear`).

    ``op`` names the public op for backend selection (``FASTSOUP_BACKEND=op=name``);
    ``coef`` is a ``[B, 16]`` table that does not require grad. Inputs are validated by
    the public wrappers.
    """
    assert op in _OPS and 1 <= len(xs) <= MAX_BILINEAR_INPUTS
    assert coef.shape == (xs[0].shape[0], COEF_COLS) and not coef.requires_grad
    if torch.compiler.is_compiling():
        return _bilinear_op(op, list(xs), coef, square)
    return _BilinearFunction.apply(op, coef, square, *xs)


# ---------------------------------------------------------------- row-linear map
def reference_linear(xs: Sequence[Tensor], coef: Tensor, n_out: int,
                     dtype: torch.dtype) -> List[Tensor]:
    """``y_m = Σ_k C_imk x_k`` (``C_mk`` at column ``4m + k``), computed in ``coef.dtype``."""
    n = len(xs)
    outs = []
    for m in range(n_out):
        out = torch.empty_like(xs[0], dtype=dtype)  # laid out like xs[0], as the kernels do
        out.copy_(_row_combination(xs, coef[:, 4 * m:4 * m + n]))
        outs.append(out)
    return outs


def _fused_linear(xs: List[Tensor], coef: Tensor, n_out: int, dtype: torch.dtype) -> List[Tensor]:
    from ..triton import ambient as tamb

    outs = [torch.empty_like(xs[0], dtype=dtype) for _ in range(n_out)]
    layout = row_layout(xs + outs)
    if layout is not None:
        tamb.linear_forward(xs, coef, outs, layout)
        return outs
    cxs = [x.contiguous() for x in xs]
    couts = [torch.empty_like(cxs[0], dtype=dtype) for _ in range(n_out)]
    tamb.linear_forward(cxs, coef, couts, row_layout(cxs + couts))
    for o, c in zip(outs, couts):
        o.copy_(c)
    return outs


def _linear_impl(xs: List[Tensor], coef: Tensor, n_out: int, dtype: torch.dtype,
                 backend: str) -> List[Tensor]:
    if backend == "reference":
        return reference_linear(xs, coef, n_out, dtype)
    return _fused_linear(list(xs), coef, n_out, dtype)


@torch.library.custom_op("fastsoup::ambient_row_linear", mutates_args=())
def _linear_op(op: str, xs: List[Tensor], coef: Tensor, n_out: int,
               dtype: torch.dtype, backend: str) -> List[Tensor]:
    # backend: "" chooses now; the backward passes the forward's choice explicitly
    if backend not in _backend.BACKENDS:
        backend = _backend_for(op, xs, coef.dtype)
    return _linear_impl(xs, coef, n_out, dtype, backend)


@_linear_op.register_fake
def _(op, xs, coef, n_out, dtype, backend):
    return [torch.empty_like(xs[0], dtype=dtype) for _ in range(n_out)]


def _linear_transposed(coef: Tensor, grads, dtypes, needs, run) -> List[Optional[Tensor]]:
    """``∂/∂x_k = Σ_m C_imk g_m``: the same map on the output gradients with ``C``
    transposed, once per distinct input dtype (usually one). ``run(gs, table, n, dtype)``
    applies the map."""
    live = [m for m, g in enumerate(grads) if g is not None]
    result: List[Optional[Tensor]] = [None] * len(needs)
    if not live or not any(needs):
        return result
    B = coef.shape[0]
    C = coef.view(B, 4, 4)[:, live, :]                   # [B, M_live, 4 (k)]
    gs = [grads[m] for m in live]
    for dtype in dict.fromkeys(d for d, n in zip(dtypes, needs) if n):
        ks = [k for k, (d, n) in enumerate(zip(dtypes, needs)) if n and d == dtype]
        T = coef.new_zeros((B, 4, 4))
        T[:, :len(ks), :len(live)] = C[:, :, ks].transpose(1, 2)
        outs = run(gs, T.view(B, COEF_COLS), len(ks), dtype)
        for k, o in zip(ks, outs):
            result[k] = o
    return result


def _linear_setup(ctx, inputs, output):
    op, xs, coef, n_out, dtype, backend = inputs
    ctx.op = op
    ctx.backend = backend if backend in _backend.BACKENDS else _backend_for(op, xs, coef.dtype)
    ctx.dtypes = [x.dtype for x in xs]
    ctx.save_for_backward(coef)


def _linear_autograd(ctx, grads):
    (coef,) = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[1]]
    result = _linear_transposed(
        coef, grads, ctx.dtypes, needs,
        lambda gs, T, n, dtype: _linear_op(ctx.op, gs, T, n, dtype, ctx.backend))
    return None, result, None, None, None, None


_linear_op.register_autograd(_linear_autograd, setup_context=_linear_setup)


class _LinearFunction(torch.autograd.Function):
    """Eager-mode twin of ``fastsoup::ambient_row_linear``."""

    @staticmethod
    def forward(ctx, op, coef, n_out, dtype, *xs):
        ctx.set_materialize_grads(False)
        ctx.backend = _backend_for(op, xs, coef.dtype)
        ctx.dtypes = [x.dtype for x in xs]
        ctx.save_for_backward(coef)
        return tuple(_linear_impl(list(xs), coef, n_out, dtype, ctx.backend))

    @staticmethod
    def backward(ctx, *grads):
        (coef,) = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[4:]]
        result = _linear_transposed(
            coef, list(grads), ctx.dtypes, needs,
            lambda gs, T, n, dtype: _linear_impl(gs, T, n, dtype, ctx.backend))
        return (None, None, None, None) + tuple(result)


def row_linear(op: str, xs: Sequence[Tensor], coef: Tensor, n_out: int,
               dtype: torch.dtype) -> List[Tensor]:
    """Differentiable row-linear map ``y_m = Σ_k C_imk x_k`` (``coef``: ``[B, 16]`` table)."""
    assert op in _OPS and 1 <= len(xs) <= MAX_LINEAR_INPUTS and 1 <= n_out <= MAX_LINEAR_OUTPUTS
    assert coef.shape == (xs[0].shape[0], COEF_COLS) and not coef.requires_grad
    if torch.compiler.is_compiling():
        return _linear_op(op, list(xs), coef, n_out, dtype, "")
    return list(_LinearFunction.apply(op, coef, n_out, dtype, *xs))


# ----------------------------------------------------------------------- validation
def check_data(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    """Float tensors of one shape ``[B, ...]`` with at least one element per sample."""
    for name, t in zip(names, tensors):
        check_float_tensor(name, t)
    for name, t in zip(names[1:], tensors[1:]):
        check_same_shape(names[0], tensors[0], name, t)
    first = tensors[0]
    if first.shape[0] > 0 and first[0].numel() == 0:
        raise ValueError(f"{names[0]} has no elements per sample (shape {tuple(first.shape)})")


def per_sample_scalar(name: str, value: Scalar, batch: int, device: torch.device) -> Tensor:
    """A schedule scalar as a contiguous float ``[B]`` tensor on ``device``.

    Accepts a Python number (made float64), a 0-d float tensor (any device) or a ``[B]``
    float tensor on ``device`` (kept in its dtype; the coefficient tables are computed in float64 from it). Integer
    and bool tensors, tensors that require grad and wrong shapes or devices are refused.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a float tensor, got bool")
    if isinstance(value, (int, float)):
        return torch.full((batch,), float(value), dtype=torch.float64, device=device)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a number or a float tensor of shape [B], "
                        f"got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype} "
                        "(convert integer timesteps with vp_alpha_sigma first)")
    if value.requires_grad:
        raise ValueError(f"{name} requires grad, but noise-schedule scalars are constants "
                         f"here (no gradient flows to them): pass {name}.detach()")
    if value.dim() == 0:  # a 0-d tensor is a number: any device
        return value.to(device).expand(batch).contiguous()
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the batch is on {device}")
    if value.dim() != 1 or value.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {tuple(value.shape)}")
    return value.contiguous()


_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(per_sample: Tensor, valid: Tensor, weight, reduction: str) -> Tensor:
    """Weight the ``[B]`` losses, then reduce; the mean divides by the ``valid`` count
    (``valid``: the 0/1 validity column of the table; the result is 0 when none is valid)."""
    w = as_weight(weight, per_sample.shape[0], per_sample.device)
    if w is not None:
        per_sample = per_sample * w.to(per_sample.dtype)  # fp32 results (fp64 for fp64 data)
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1)


# ----------------------------------------------------------------------- VP loss
def ambient_loss_vp(eps_pred: Tensor, extra_noise: Tensor, alpha_t: Scalar, sigma_t: Scalar,
                    alpha_n: Scalar, sigma_n: Scalar, mode: str = "x0",
                    weight: Optional[Scalar] = None, reduction: str = "mean") -> Tensor:
    """Ambient (double-Tweedie) loss for an ε-predicting network on a VP schedule.

    The data are ``x_n = α_n x_0 + σ_n η`` (``η`` fixed per image); training draws
    ``t ≥ t_n`` and ``z ~ N(0, I)`` and feeds the network ``x_t = a x_n + b z`` with

        ``a = α_t/α_n``,  ``b = sqrt(σ_t² − a² σ_n²)``,  ``r = z − (b/σ_t) ε̂``.

    Per sample (``mean`` over the ``D`` elements of a sample):

    * ``mode="x0"`` (the reference configs): ``ℓ = mean((b/a)² r²) = mean((x̂_n − x_n)²)``
      where ``x̂_n = α_n x̂_0 + (a σ_n²/σ_t) ε̂`` is the double-Tweedie estimate of ``x_n``;
    * ``mode="eps"``: ``ℓ = mean(r²) = mean((ẑ − z)²)`` with ``ẑ = (x_t − a x̂_n)/b``.

    Neither needs ``x_t`` or ``x_n``. Samples with ``σ_t < σ_n`` are masked: ``ℓ = 0``, no
    gradient, and they leave the denominator of the mean. At ``b = 0`` (``t = t_n``) the
    loss and its gradient are exactly zero in both modes (ε-mode would be 0/0); such a
    sample still counts in the denominator. Never NaN for finite inputs.

    Args:
        eps_pred: ``ε̂``, ``[B, ...]`` float16/bfloat16/float32 (any strides).
        extra_noise: ``z``, same shape (its dtype may differ).
        alpha_t, sigma_t, alpha_n, sigma_n: per-sample schedule values ``[B]`` (or numbers);
            constants, must not require grad. ``α > 0`` is assumed.
        mode: ``"x0"`` or ``"eps"``.
        weight: optional per-sample weight (number or ``[B]`` tensor; differentiable).
        reduction: ``"mean"`` (``Σ_i w_i ℓ_i / #valid``, 0 if none is valid), ``"sum"``,
            or ``"none"`` (fp32 ``[B]``, masked samples 0: compose it with
            :func:`fastsoup.low_loss_keep_mask`).

    Returns:
        float32 (float64 for float64 inputs): a scalar, or ``[B]`` for ``"none"``.
        Gradient: ``∂L/∂ε̂_ij = −2 c_i (b_i/σ_t,i) r_ij w_i / (D·V)`` (``V`` valid samples).
    """
    if mode not in ("x0", "eps"):
        raise ValueError(f"mode must be 'x0' or 'eps', got {mode!r}")
    _check_reduction(reduction)
    check_data(("eps_pred", "extra_noise"), (eps_pred, extra_noise))
    B, dev = eps_pred.shape[0], eps_pred.device
    scalars = [per_sample_scalar(n, v, B, dev) for n, v in (
        ("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_n", alpha_n), ("sigma_n", sigma_n))]
    # table: A = B = (−k, 1) over (ε̂, z) so u = r; scale c; see vp_loss_coefficients
    coef = coefficient_table(OP_VP, "vp_" + mode, scalars, _acc_dtype((eps_pred, extra_noise)))
    per_sample = row_bilinear(OP_VP, [eps_pred, extra_noise], coef, square=True)
    return _reduce(per_sample, coef[:, COL_VALID], weight, reduction)


# ----------------------------------------------------------------------- VE loss
def ambient_loss_ve(x0_pred: Tensor, x_t: Tensor, x_n: Tensor, sigma_t: Scalar,
                    sigma_n: Scalar, sigma_data: float = 0.5, weight: Optional[Scalar] = None,
                    reduction: str = "mean") -> Tensor:
    """Ambient (double-Tweedie) loss for an x0-predicting (EDM) network on a VE schedule.

    The data are ``x_n = x_0 + σ_n η`` (``η`` fixed per image); training draws
    ``σ_t > σ_n`` and feeds ``x_t = x_n + sqrt(σ_t² − σ_n²) z``. With ``D_θ`` the
    prediction, the double-Tweedie estimate ``x̂_n = (σ_n²/σ_t²) x_t + (1 − σ_n²/σ_t²) D_θ``
    and ``λ(σ_t) = (σ_t² + σ_d²)/(σ_t σ_d)²``, the loss per sample is

        ``λ · σ_t⁴/(σ_t² − σ_n²)² · mean((x̂_n − x_n)²) = λ · mean((D_θ − y)²)``,
        ``y = (σ_t² x_n − σ_n² x_t)/(σ_t² − σ_n²)``,

    normalised by the ``D`` elements of a sample (``mean``, not the sum ``‖·‖²``: multiply
    by ``D`` for the sum). Samples with ``σ_t ≤ σ_n`` are masked (``ℓ = 0``, no gradient,
    out of the denominator; ``σ_t = σ_n`` would divide by zero). Never NaN for finite
    inputs.

    Args:
        x0_pred: ``D_θ(x_t, σ_t)``, ``[B, ...]`` float16/bfloat16/float32 (any strides).
        x_t, x_n: the network input and the noisy data, same shape (dtypes may differ).
        sigma_t, sigma_n: per-sample noise levels ``[B]`` (or numbers), constants.
        sigma_data: ``σ_d`` of the EDM weighting (default 0.5).
        weight, reduction: as in :func:`ambient_loss_vp`.

    Returns:
        float32 (float64 for float64 inputs): a scalar, or ``[B]`` for ``"none"``.
        Gradient: ``∂L/∂D_θ = 2 λ_i w_i (D_θ − y)/(D·V)``; ``x_t`` and ``x_n`` receive
        gradients too when they require grad.
    """
    _check_reduction(reduction)
    check_data(("x0_pred", "x_t", "x_n"), (x0_pred, x_t, x_n))
    if not (isinstance(sigma_data, (int, float)) and not isinstance(sigma_data, bool)
            and math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"sigma_data must be a positive number, got {sigma_data!r}")
    B, dev = x0_pred.shape[0], x0_pred.device
    scalars = [per_sample_scalar("sigma_t", sigma_t, B, dev),
               per_sample_scalar("sigma_n", sigma_n, B, dev)]
    # table: A = B = (1, −p, −q) over (D_θ, x_n, x_t) so u = D_θ − y; scale λ
    coef = coefficient_table(OP_VE, "ve", scalars, _acc_dtype((x0_pred, x_t, x_n)),
                             param=sigma_data)
    per_sample = row_bilinear(OP_VE, [x0_pred, x_n, x_t], coef, square=True)
    return _reduce(per_sample, coef[:, COL_VALID], weight, reduction)


# ----------------------------------------------------------------------- reverse sampler
class ReverseStepCoefficients(NamedTuple):
    """Per-sample float32 ``[B]`` coefficients of one VP ancestral step ``t → s``."""

    alpha_t: Tensor
    sigma_t: Tensor
    alpha_s: Tensor
    sigma_s: Tensor
    c_o: Tensor   # sqrt(max(σ_s² − c_f², 0)): multiplies ε̂
    c_f: Tensor   # (σ_s/σ_t)·sqrt(1 − α_t²/α_s²): multiplies the fresh noise ξ


def _alphas_cumprod(schedule, name: str = "schedule") -> Tensor:
    """``alphas_cumprod`` of a diffusers-style scheduler (or the tensor itself), checked."""
    ac = getattr(schedule, "alphas_cumprod", schedule)
    if not isinstance(ac, Tensor):
        try:
            ac = torch.as_tensor(ac)
        except Exception:
            raise TypeError(f"{name} must be a scheduler with .alphas_cumprod or a 1-d "
                            f"tensor of alphas_cumprod, got {type(schedule).__name__}") from None
    if ac.dim() != 1 or not ac.dtype.is_floating_point or ac.numel() == 0:
        raise ValueError("alphas_cumprod must be a non-empty 1-d float tensor, got "
                         f"{ac.dtype} of shape {tuple(ac.shape)}")
    return ac


def _timesteps(name: str, t, num: int, device: Optional[torch.device]) -> Tensor:
    if isinstance(t, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(t, int):
        t = torch.tensor([t], device=device)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num):
        raise ValueError(f"{name} must lie in [0, {num - 1}] (the scheduler's timesteps), "
                         f"got values in [{int(t.min())}, {int(t.max())}]")
    return t


def vp_alpha_sigma(schedule, timesteps) -> Tuple[Tensor, Tensor]:
    """``α_t = sqrt(ᾱ_t)``, ``σ_t = sqrt(1 − ᾱ_t)`` as float32 ``[B]`` tensors.

    ``schedule`` is a diffusers-style scheduler (anything with ``.alphas_cumprod``) or the
    ``alphas_cumprod`` tensor itself (shape ``[T]``); ``timesteps`` an int or an integer
    ``[B]`` tensor in ``[0, T)``. Results live on the device of ``timesteps`` (computed
    in float64, then rounded once).
    """
    ac = _alphas_cumprod(schedule)
    device = timesteps.device if isinstance(timesteps, Tensor) else ac.device
    t = _timesteps("timesteps", timesteps, ac.numel(), device)
    abar = ac.to(device=t.device, dtype=torch.float64)[t]
    return abar.sqrt().float(), (1.0 - abar).clamp_min(0).sqrt().float()


def vp_reverse_step_coefficients(schedule, t, s) -> ReverseStepCoefficients:
    """Coefficients of the DDPM ancestral step ``t → s`` (``s ≤ t``), per sample.

        ``c_f = (σ_s/σ_t)·sqrt(1 − α_t²/α_s²)``,  ``c_o = sqrt(max(σ_s² − c_f², 0))``,
        ``x_s = α_s ĥ_t + c_o ε̂_t + c_f ξ``.

    ``schedule``: a scheduler with ``.alphas_cumprod`` or that tensor; ``t``, ``s``: ints
    or integer ``[B]`` tensors. ``s = t`` gives the identity step (``c_f = 0``).
    """
    ac = _alphas_cumprod(schedule)
    device = t.device if isinstance(t, Tensor) else (s.device if isinstance(s, Tensor) else ac.device)
    tt = _timesteps("t", t, ac.numel(), device)
    ss = _timesteps("s", s, ac.numel(), device)
    if tt.shape != ss.shape and tt.numel() != 1 and ss.numel() != 1:
        raise ValueError(f"t and s must have the same shape, got {tuple(tt.shape)} and {tuple(ss.shape)}")
    tt, ss = torch.broadcast_tensors(tt, ss.to(tt.device))
    if tt.numel() and bool((ss > tt).any()):
        raise ValueError("s must not exceed t (a reverse step goes from t down to s)")
    a = ac.to(device=tt.device, dtype=torch.float64)
    abar_t, abar_s = a[tt], a[ss]
    alpha_t, sigma_t = abar_t.sqrt(), (1 - abar_t).clamp_min(0).sqrt()
    alpha_s, sigma_s = abar_s.sqrt(), (1 - abar_s).clamp_min(0).sqrt()
    ratio = torch.where(sigma_t > 0, sigma_s / torch.where(sigma_t > 0, sigma_t, torch.ones_like(sigma_t)),
                        torch.zeros_like(sigma_t))
    c_f = ratio * (1 - abar_t / abar_s).clamp_min(0).sqrt()
    c_o = (sigma_s ** 2 - c_f ** 2).clamp_min(0).sqrt()
    return ReverseStepCoefficients(*(v.float() for v in (alpha_t, sigma_t, alpha_s, sigma_s, c_o, c_f)))


def _noise_list(noise) -> Tuple[List[Tensor], bool]:
    if isinstance(noise, Tensor):
        return [noise], True
    if isinstance(noise, (list, tuple)) and noise and all(isinstance(n, Tensor) for n in noise):
        if len(noise) > 2:
            raise ValueError(f"at most 2 noise tensors per call, got {len(noise)}")
        return list(noise), False
    raise TypeError("noise must be a tensor or a list/tuple of 1-2 tensors")


def _reverse_step(names, base: List[Tensor], noise, kind: str, scalars: List[Tensor]):
    noises, single = _noise_list(noise)
    noise_names = ["noise"] if single else [f"noise[{i}]" for i in range(len(noises))]
    check_data(list(names) + noise_names, base + noises)
    xs = base + noises
    out_dtype = xs[0].dtype
    for x in xs[1:]:
        out_dtype = torch.promote_types(out_dtype, x.dtype)
    coef = coefficient_table(OP_STEP, kind, scalars, _acc_dtype(xs), n_out=len(noises))
    outs = row_linear(OP_STEP, xs, coef, len(noises), out_dtype)
    return outs[0] if single else tuple(outs)


def vp_reverse_step(x0_pred: Tensor, eps_pred: Tensor, noise, alpha_s: Scalar, c_o: Scalar,
                    c_f: Scalar):
    """One VP ancestral step ``x_s = α_s ĥ + c_o ε̂ + c_f ξ``, fused (SPEC §3).

    Args:
        x0_pred: ``ĥ_t``, ``[B, ...]`` float tensor. eps_pred: ``ε̂_t``, same shape.
        noise: ``ξ`` (same shape), or a list/tuple of two such tensors: the two
            consistency samples are then written in one pass that reads ``ĥ`` and ``ε̂``
            once.
        alpha_s, c_o, c_f: ``[B]`` (or numbers), e.g. from :func:`vp_reverse_step_coefficients`.

    Returns:
        ``x_s`` (or a tuple of them) in the promoted dtype of the inputs, laid out like
        ``x0_pred``; differentiable with respect to every tensor input.
    """
    B, dev = _batch_device(x0_pred, "x0_pred")
    c = [per_sample_scalar(n, v, B, dev) for n, v in (("alpha_s", alpha_s), ("c_o", c_o), ("c_f", c_f))]
    return _reverse_step(("x0_pred", "eps_pred"), [x0_pred, eps_pred], noise, "step", c)


def vp_reverse_step_from_eps(x_t: Tensor, eps_pred: Tensor, noise, alpha_t: Scalar,
                             sigma_t: Scalar, alpha_s: Scalar, c_o: Scalar, c_f: Scalar):
    """:func:`vp_reverse_step` with ``ĥ = (x_t − σ_t ε̂)/α_t`` folded into the kernel.

    ``x_s = (α_s/α_t) x_t + (c_o − α_s σ_t/α_t) ε̂ + c_f ξ``: the x0-prediction is never
    materialised. Arguments as in :func:`vp_reverse_step` plus ``α_t``, ``σ_t`` (``[B]``).
    """
    B, dev = _batch_device(x_t, "x_t")
    c = [per_sample_scalar(n, v, B, dev) for n, v in (
        ("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_s", alpha_s), ("c_o", c_o), ("c_f", c_f))]
    return _reverse_step(("x_t", "eps_pred"), [x_t, eps_pred], noise, "step_eps", c)


def _batch_device(t, name: str):
    check_float_tensor(name, t)
    return t.shape[0], t.device
