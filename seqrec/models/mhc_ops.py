"""mHC's per-token math on PyTorch ops: Sinkhorn, the coefficient logits and the H_post
update, the last two with hand-written backwards (fewer ops than autograd's, which on a GPU
are kernel launches).

This is the reference the compiled CPU kernel (native.py) is tested against and the path
everything else runs: GPUs, low-precision autocast, tracing, export and torch.compile.
mhc.MHCResidual and mhc.HyperStream choose between the two.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


FLOOR = -60.0  # Sinkhorn's logits floor, relative to their column's max (as in mhc_kernels.c)


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """float64 stays, anything else computes in float32 (torch.promote_types(dtype, float32)
    for the real dtypes, without an aten call)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Doubly stochastic projection of exp(logits[..., n, n]): `iters` rounds of column
    then row normalisation, so rows sum to 1 exactly and columns to within the
    convergence error. Vectorised over all leading dims (one matrix per token).

    Each column's logits are shifted to max 0 (the first column normalisation removes
    such a shift exactly, so it needs no gradient) and floored at -60 (FLOOR): exp() then
    has a 1 in every column and nothing below 1e-26, so no normaliser can underflow to 0
    (a global max shift gives 0/0 for a row far below the max in every column). The floor
    only moves entries under 1e-26 of their column's largest; a row made only of those
    comes out spread instead of NaN, and floored entries get no gradient. Invariant to
    adding a constant to a matrix's (or a column's) logits.

    Normalised in the log domain: dividing exp(z) by its sums over a dim is
    exp(log_softmax(z, dim)), so each normalisation is one fused op (log_softmax; the last,
    rows, a softmax that leaves the exponent), and autograd's backward of each is one op
    too (g - exp(y)·Σg): 2·iters + 3 ops forward and 2·iters + 1 backward, the exact
    gradient of the unrolled iterations. On a GPU, where this model is bound by kernel
    launches, that is 4x fewer than normalising exp(z) in place (sum, reciprocal, multiply
    per step, and a backward replaying the steps at ~6 ops each). The cost: autograd keeps
    every iterate ([n, n, T] each, 2·iters of them) where the in-place form kept only the
    normalisers, and on CPU exp/log per entry make it ~1.3x slower there (a whole model's
    forward + backward on the PyTorch path 1.04x; the CPU runs the compiled kernel,
    native.PreMix, by default). The same numbers as the linear domain
    to ~1e-15 in float64; in float32 within a few float32 ulps absolute.

    Computed in at least fp32 (bf16/fp16 inputs are cast up; fp64 stays fp64 so the
    backward can be gradchecked) and returned in that dtype. Tokens-last internally
    ([n, n, T]: the size-n reductions run across contiguous token vectors); tokens-last
    input (as MHCResidual passes) costs no copy. Plain aten ops: jit.trace, torch.export
    and torch.compile(fullgraph=True) see through it.
    """
    n = logits.shape[-1]
    z = logits.to(_at_least_fp32(logits.dtype)).reshape(-1, n, n).permute(1, 2, 0).contiguous()
    # threshold, not clamp_min: one op backward (clamp_min's is three), and, like the kernel,
    # no gradient at the floor itself
    z = F.threshold(z - z.detach().amax(0, keepdim=True), FLOOR, FLOOR)
    for step in range(2 * iters - 1):  # columns (dim 0), rows (dim 1), ..., columns
        z = torch.log_softmax(z, step % 2)
    return torch.softmax(z, 1).permute(2, 0, 1).reshape(logits.shape)


def _rms_projection(x: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of _RMSProjection: the result, and the 1/rms and raw product its backward needs."""
    inv_rms = torch.linalg.vector_norm(x, dim=-1).square_().div_(x.shape[1]).add_(1e-6).rsqrt_()
    raw = torch.mm(phi.t(), x.t())
    return raw * inv_rms, inv_rms, raw


class _RMSProjection(torch.autograd.Function):
    """RMSNorm(x) @ phi, tokens last: x [T, D], phi [D, K] -> [K, T], with a hand-written backward.
    (MHCResidual runs _Logits, which also applies α and b; only seqrec.tools.bench.mhc_parts
    still times this one.)

    The per-token 1/rms(x) is applied to the [K, T] product instead of to x (it
    commutes with the projection), so no normalised [T, D] copy is made. Autograd's
    backward of the norm makes several passes over the [T, D] stream (div, masked_fill,
    mul, then an add into the projection's gradient); the closed form folds it into the
    projection's input gradient as one in-place pass: with r = (‖x‖²/D + eps)^(-1/2)
    and y = r·(x·phi), dx = (r·g)·phiᵀ - (r²/D)·Σ_k(r·g_k·(x·phi)_k)·x.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        out, inv_rms, raw = _rms_projection(x, phi)
        ctx.save_for_backward(x, phi, inv_rms, raw)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, phi, inv_rms, raw = ctx.saved_tensors
        scaled = grad * inv_rms
        dot = (scaled * raw).sum(0)
        grad_x = torch.mm(scaled.t(), phi.t()).addcmul_(x, (inv_rms.square() * dot).div_(-x.shape[1])[:, None])
        # (scaled·x)ᵀ, not xᵀ·scaledᵀ: the same product, which MKL runs 1.4x (D = 200, K = 24) to
        # 6.7x (D = 50, K = 8) faster in this layout on CPU (3,200 tokens, one thread)
        return grad_x, torch.mm(scaled, x).t()


def _logits(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, static: torch.Tensor,
            n: int) -> tuple[torch.Tensor, ...]:
    """The forward of _Logits: the logits, and the 1/rms, raw product, row scales and
    scale ⊗ 1/rms its backward needs."""
    inv_rms = torch.add(1e-6, torch.linalg.vector_norm(x, dim=1).square_(), alpha=1 / x.shape[1]).rsqrt_()
    raw = torch.mm(phi.t(), x.t())
    scale = torch.cat([a.expand(m) for a, m in zip(alpha, (n, n, n * n)[:3 if phi.shape[1] > 2 * n else 2])])
    outer = torch.outer(scale, inv_rms)
    return torch.addcmul(static[:, None], outer, raw), inv_rms, raw, scale, outer


class _Logits(torch.autograd.Function):
    """H̃ = α·(RMSNorm(x)·φ) + b tokens last: x [T, D], phi [D, k], alpha [3], static [k] -> [k, T],
    for the k = 2n + n² coefficient logits of n streams, or their first 2n (the widening
    block), with a hand-written backward.

    The per-token r = 1/rms(x) is applied to the [k, T] product instead of to x (it
    commutes with the projection), so no normalised [T, D] copy is made. With
    s = (α_pre·1_n, α_post·1_n, α_res·1_n²) and y = b + (s ⊗ r) ⊙ (φᵀxᵀ):
      db = Σ_t g,  ds = (g ⊙ φᵀxᵀ)·r (summed per α),  d(φᵀxᵀ) = g ⊙ (s ⊗ r),
      dx = d(φᵀxᵀ)ᵀφᵀ - (r³/D)·((g ⊙ φᵀxᵀ)ᵀs) ⊙ x,
    the norm's part folded into the projection's input gradient as one in-place pass.
    8 ops forward and 13 (12 for 2n rows) backward, where _RMSProjection with autograd's
    α and b around it took 9 and 20 (addcmul's backward alone is 6, α's expand/cat 4).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, static: torch.Tensor,
                n: int) -> torch.Tensor:
        logits, *saved = _logits(x, phi, alpha, static, n)
        ctx.n = n
        ctx.save_for_backward(x, phi, *saved)
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, phi, inv_rms, raw, scale, outer = ctx.saved_tensors
        n = ctx.n
        weighted = grad * raw
        grad_scale = torch.mv(weighted, inv_rms)
        gates = grad_scale[:2 * n].view(2, n).sum(1)
        grad_alpha = (torch.cat([gates, grad_scale[2 * n:].sum(0, keepdim=True)]) if grad_scale.shape[0] > 2 * n
                      else F.pad(gates, (0, 1)))  # the widening block has no H_res: α_res gets exactly 0
        scaled = grad * outer
        norm_part = inv_rms.pow(3).mul_(torch.mv(weighted.t(), scale))
        grad_x = torch.mm(scaled.t(), phi.t()).addcmul_(x, norm_part[:, None], value=-1 / x.shape[1])
        # All k = 2n + n² columns: φ is the Parameter, whose gradient is kept in its own layout
        # (a transposed one would be copied into it, a second op). The widening block's Σ_j φ_j
        # [C, 2n] has its gradient expanded and copied into φ's anyway, and on CPU (where this
        # block runs with the compiled kernel too) MKL runs (scaled·x)ᵀ 2-4x faster there.
        grad_phi = torch.mm(x.t(), scaled.t()) if phi.shape[1] > 2 * n else torch.mm(scaled, x).t()
        return grad_x, grad_phi, grad_alpha, grad.sum(1), None


class _Update(torch.autograd.Function):
    """res + gain·H_post ⊗ out per token (the H_post update): res [..., n, C], h [..., n],
    out [..., C] -> [..., n, C], addcmul's numbers, with a backward of two batched products
    (dh = gain·Σ_c g⊙out, dout = gain·hᵀg; dres = g itself) where addcmul's is six ops
    (each factor times `value`, times g, summed). `gain` is H_post's 2 when h is the
    sigmoid (the PyTorch path), so it costs no op of its own. Under autocast out is
    low precision and the result promotes to fp32, as addcmul does."""

    @staticmethod
    def forward(ctx, res: torch.Tensor, h: torch.Tensor, out: torch.Tensor, gain: float) -> torch.Tensor:
        ctx.save_for_backward(h, out)
        ctx.gain = gain
        return torch.addcmul(res, h[..., None], out[..., None, :], value=gain)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, out = ctx.saved_tensors
        n, dim = grad.shape[-2:]
        g, h3, out3 = grad.reshape(-1, n, dim), h.reshape(-1, n, 1), out.to(grad.dtype).reshape(-1, 1, dim)
        # beta = 0: baddbmm's first argument is ignored (only its shape is used), so `gain` is
        # applied inside the product
        grad_h = torch.baddbmm(h3, g, out3.transpose(1, 2), beta=0, alpha=ctx.gain).view(h.shape)
        grad_out = torch.baddbmm(out3, h3.transpose(1, 2), g, beta=0, alpha=ctx.gain).view(out.shape)
        return grad, grad_h, grad_out, None


def coefficient_logits(x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, static: torch.Tensor,
                       n: int) -> torch.Tensor:
    """H̃ = α·(RMSNorm(x)·φ) + b tokens last ([k, T]) for x [T, D], phi [D, k] and the k biases
    `static`, in at least fp32 (call with autocast off): _Logits, or its forward alone where
    a traced graph (seqrec.export) cannot hold a Python autograd.Function."""
    x = x.to(_at_least_fp32(x.dtype))
    if torch.jit.is_tracing():
        return _logits(x, phi, alpha, static, n)[0]
    return _Logits.apply(x, phi, alpha, static, n)


def update(res: torch.Tensor, h: torch.Tensor, out: torch.Tensor, gain: float) -> torch.Tensor:
    """res + gain·h ⊗ out: _Update, or addcmul where a traced graph cannot hold it."""
    if torch.jit.is_tracing():
        return torch.addcmul(res, h[..., None], out[..., None, :], value=gain)
    return _Update.apply(res, h, out, gain)


def full_precision(x: torch.Tensor):
    """Autocast switched off for x's device while it is on, else nothing: an unconditional
    ``torch.autocast(device, enabled=False)`` would export as a region bound to the exporting
    device (``wrap_with_autocast('cpu', ...)``) and tie the graph to it."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()

