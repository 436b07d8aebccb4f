"""mHC: manifold-constrained hyper-connections (DeepSeek-AI, arXiv 2512.24880).

The residual stream is widened to n copies x_l ∈ R^{n×C} per token and every sub-layer F
is wrapped as

    x_{l+1} = H_res · x_l + H_postᵀ · F(H_pre · x_l)

with per-token coefficients H_pre ∈ (0,1)^{1×n}, H_post ∈ (0,2)^{1×n} and a doubly
stochastic H_res (Sinkhorn-Knopp), so products of H_res over depth stay bounded.

Streams are [B, L, n, C]; coefficient logits are computed tokens-last ([K, B·L]) for
Sinkhorn (see `sinkhorn`).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import native
from .blocks import Gate


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
    (MHCResidual now runs _Logits, which also applies α and b; seqrec.bench.mhc_parts
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


def full_precision(x: torch.Tensor):
    """Autocast switched off for x's device while it is on, else nothing: an unconditional
    ``torch.autocast(device, enabled=False)`` would export as a region bound to the exporting
    device (``wrap_with_autocast('cpu', ...)``) and tie the graph to it."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class MHCResidual(nn.Module):
    """One sub-layer F wrapped as x_{l+1} = H_res·x_l + H_postᵀ·F(H_pre·x_l) on [B, L, n, C].

    Coefficients (per token, in fp32 with autocast off): x⃗ = vec(x_l) ∈ R^{nC} is
    RMS-normalised without a learnable scale (a scale γ would be absorbed by the
    learnable projection: (γ⊙x⃗')φ = x⃗'(diag(γ)φ)), and the normalisation is applied
    after the single fused projection x⃗φ, φ ∈ R^{nC×(2n+n²)}, since dividing by the
    per-token RMS commutes with it. Then H̃ = α·(x⃗'φ) + b with α = (α_pre, α_post, α_res).

    Initialisation equals the plain residual when the n streams are identical copies
    (they are at the input: the embedding, copied n times), up to the α·x⃗'φ terms:
      * b_pre = logit(1/n): H_pre·x = (Σ_i 1/n)·x = x, the plain sub-layer input.
        (Picking one stream as hyper-connections do would need a saturated sigmoid with
        vanishing gradients; averaging identical copies gives the same input. n = 1
        cannot reach 1 and uses 0.999.)
      * b_post = 0: H_post = 2·sigmoid(0) = 1, so every stream receives the full F
        output, as the plain residual does, and the copies stay identical.
      * b_res = c·I with c = log(19(n-1)): exp(b_res) has equal row and column sums,
        so it is already a Sinkhorn fixed point, H_res = 0.95·I + 0.05/(n-1)·(1-I):
        near the identity but not saturated, so H_res can still learn. Any row
        stochastic H_res maps identical copies to themselves.
    With α = 0 every stream is then exactly the plain block's output; α = mhc_init_gate
    (0.01) perturbs the logits by ~α (φ ~ N(0, 1/(nC)) gives x⃗'φ ~ N(0, 1)), i.e.
    the outputs by O(α).

    LayerNorm placement with n streams (one LayerNorm(C), the plain block's shape):
      * pre-LN:  x_{l+1} = H_res·x + H_postᵀ·F(LN(H_pre·x)), the mHC paper's form;
      * post-LN: x_{l+1} = LN(H_res·x + H_postᵀ·F(H_pre·x)) applied to each stream,
        i.e. the plain post-LN block stream-wise. This keeps every stream bounded (as
        post-LN keeps the single stream bounded) and equals the plain block exactly on
        identical copies, which normalising only F's branch would not;
      * LiGR:    x_{l+1} = H_res·x + H_postᵀ·(g(H_pre·x) ⊙ F(LN(H_pre·x))), the pre-LN form
        with the LiGR gate (blocks.Gate) on F's output: the gate reads the sub-layer's
        input H_pre·x, as in the plain LiGR layer it reads x, and scales F per channel
        before H_post spreads it over the streams (H_post: per stream, g: per channel, so
        neither subsumes the other). On identical copies H_pre·x = x, so the block equals
        the plain LiGR block there, as the other two orders do (tests/test_blocks.py).

    Parameters: phi [nC, 2n+n²] (columns: pre, post, res row-major), alpha [3] and
    static [2n+n²] (b, same column order); all raw Parameters, initialised here.

    `widens`: the block the embedding enters takes it as the single stream [..., C] and
    returns the n streams; on its n identical copies H_res is the identity, so the block
    skips Sinkhorn and the mixing (`widen`), exactly.

    Precision: coefficients and Sinkhorn always run in fp32. Under autocast the mixing
    product [H_res; H_pre]·x (a batched matmul; a widening block has none) runs in the
    autocast dtype; the H_post update promotes back, so the stream itself stays fp32.
    cfg.mhc_no_amp runs the product in fp32 too (the collapse and the H_post update are
    elementwise, fp32 anyway).

    On CPU, without low-precision autocast, everything before the sub-layer (coefficients,
    Sinkhorn, mixing) and the post-LN update after it run in a compiled kernel
    (`native.PreMix`, `native.PostNorm`; cfg.mhc_native) that computes the same numbers as
    the PyTorch ops below (tests/test_mhc_native.py).
    """

    def __init__(self, sublayer: nn.Module, cfg: ModelConfig, widens: bool = False):
        super().__init__()
        n, dim = cfg.mhc_expansion_rate, cfg.hidden_units
        self.sublayer, self.widens = sublayer, widens
        self.norm = nn.LayerNorm(dim, eps=1e-8)
        self.n, self.norm_first, self.iters, self.no_amp = n, cfg.block != "post", cfg.mhc_sinkhorn_iter, cfg.mhc_no_amp
        self.gate = Gate(dim) if cfg.block == "ligr" else None
        self.native = cfg.mhc_native
        self.phi = nn.Parameter(torch.randn(n * dim, 2 * n + n * n) / math.sqrt(n * dim))
        self.alpha = nn.Parameter(torch.full((3,), cfg.mhc_init_gate))
        p_pre = 1.0 / n if n > 1 else 0.999
        b_pre = math.log(p_pre / (1.0 - p_pre))
        b_res = math.log(19.0 * (n - 1)) * torch.eye(n) if n > 1 else torch.zeros(1, 1)
        self.static = nn.Parameter(torch.cat([torch.full((n,), b_pre), torch.zeros(n), b_res.flatten()]))

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_pre [..., n], H_post [..., n], H_res [..., n, n] for x [..., n, C], in at least fp32."""
        h_pre, half_post, h_res = self._coefficients(x)
        return h_pre, 2 * half_post, h_res

    def _coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_pre, H_post / 2 (the 2 is applied where H_post is used) and H_res: see coefficients."""
        n, lead = self.n, x.shape[:-2]
        with full_precision(x):
            # split (not slicing): the backward is one concatenation, not zero-filled copies added up
            gate_logits, res_logits = self.logits(x.reshape(-1, x.shape[-2] * x.shape[-1]), self.phi).split(
                [2 * n, n * n])  # [2n, T], [n², T]
            h_res = sinkhorn(res_logits.view(n, n, -1).permute(2, 0, 1), self.iters)
            return *self.gates(gate_logits, lead), h_res.reshape(*lead, n, n)

    def logits(self, flat: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """H̃ = α·(RMSNorm(flat)·φ) + b, tokens last ([k, T]) for flat [T, D] and phi [D, k]:
        all coefficients (phi = self.phi), or the first k = 2n. Call with autocast off."""
        flat, k = flat.to(_at_least_fp32(flat.dtype)), phi.shape[1]
        static = self.static if k == self.static.shape[0] else self.static[:k]
        if torch.jit.is_tracing():  # a traced graph (seqrec.export) cannot hold a Python autograd.Function
            return _logits(flat, phi, self.alpha, static, self.n)[0]
        return _Logits.apply(flat, phi, self.alpha, static, self.n)

    def gates(self, logits: torch.Tensor, lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """H_pre = sigmoid and H_post / 2 = sigmoid of the 2n gate logits [2n, T], each [*lead, n]
        (one sigmoid for both; callers apply H_post's factor 2 where they use it)."""
        n = self.n
        return torch.sigmoid(logits).t().reshape(*lead, 2 * n).split(n, -1)

    def widen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `_mix` returns for n identical copies of x [..., C] (the embedding entering the
        first sub-layer), computed from the single copy: the streams, H_pre·x and H_post / 2.

        Every H_res has rows summing to 1 (Sinkhorn ends with rows), so H_res·x is x itself:
        no Sinkhorn, no mixing, and the H_res logits are not needed. The RMS of the n·C
        copies is the RMS of x, and vec(x, ..., x)·φ = x·Σ_j φ_j with φ_j the j-th block of C
        rows; H_pre·x = (Σ_j H_pre,j)·x. Exact up to rounding (tests/test_mhc.py), and this
        block's H_res parameters get exactly the zero gradient they have in exact
        arithmetic (the full computation leaves them rounding noise, ~1e-12). Forward +
        backward of the block at n=4, d=50 on 3,200 tokens, one thread: 8.9 → 6.3 ms.
        """
        n, dim = self.n, x.shape[-1]
        with full_precision(x):
            phi = self.phi[:, :2 * n].reshape(n, dim, 2 * n).sum(0)
            h_pre, half_post = self.gates(self.logits(x.reshape(-1, dim), phi), x.shape[:-1])
        return copies(x, n), h_pre.sum(-1, keepdim=True) * x, half_post

    def mix(self, x: torch.Tensor, on_kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_res·x [..., n, C], the sub-layer input H_pre·x [..., C] and H_post [..., n];
        `on_kernel` is `runs_native(x)`, passed by a caller that already knows it."""
        if self.runs_native(x) if on_kernel is None else on_kernel:
            return native.PreMix.apply(x, self.phi, self.alpha, self.static, self.iters)
        res, branch, half_post = self._mix(x)
        return res, branch, 2 * half_post

    def _mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`mix` on PyTorch ops, returning H_post / 2."""
        h_pre, half_post, h_res = self._coefficients(x)
        with full_precision(x) if self.no_amp else contextlib.nullcontext():
            # One batched product reads x once for H_res·x and H_pre·x; split (not
            # slicing) so the backward is one concatenation, not zero-filled copies.
            mixing = torch.cat([h_res, h_pre[..., None, :]], -2)
            res, branch = torch.einsum("...kn,...nc->...kc", mixing, x).split([self.n, 1], -2)
        return res, branch.squeeze(-2), half_post

    def runs_native(self, x: torch.Tensor) -> bool:
        """Whether `mix` uses the compiled CPU kernel (native.PreMix, the same numbers): for
        fp32/fp64 on CPU, unless autocast would run the mixing in low precision, or the
        model is being traced or compiled (neither can see into a ctypes call)."""
        return (self.native and x.dtype == self.phi.dtype and (self.no_amp or not torch.is_autocast_enabled("cpu"))
                and native.supports(x, self.n))

    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """x [..., n, C] -> [..., n, C]; a widening block takes the single stream x [..., C]."""
        on_kernel = self.runs_native(x)
        if self.widens or not on_kernel:  # H_post / 2: the factor 2 goes into the update's multiply
            (res, branch, h_post), post_gain = self.widen(x) if self.widens else self._mix(x), 2.0
        else:
            (res, branch, h_post), post_gain = native.PreMix.apply(x, self.phi, self.alpha, self.static,
                                                                   self.iters), 1.0
        out = self.sublayer(self.norm(branch) if self.norm_first else branch, ctx)
        if self.gate is not None:
            out = self.gate(branch) * out
        if on_kernel and not self.norm_first and out.dtype == res.dtype:
            h_post = h_post if post_gain == 1.0 else post_gain * h_post  # the widening block's H_post / 2
            return native.PostNorm.apply(res, h_post, out, self.norm.weight, self.norm.bias, self.norm.eps,
                                         torch.is_grad_enabled())
        if torch.jit.is_tracing():  # see logits
            x = torch.addcmul(res, h_post[..., None], out[..., None, :], value=post_gain)
        else:
            x = _Update.apply(res, h_post, out, post_gain)  # promotes to fp32 under autocast
        return x if self.norm_first else self.norm(x)


def copies(x: torch.Tensor, n: int) -> torch.Tensor:
    """n identical streams of x [..., C] -> [..., n, C] (a view)."""
    return x[..., None, :].expand(*x.shape[:-1], n, x.shape[-1])


class HyperStream(nn.Module):
    """The mHC residual stream strategy for SASRec: n copies in, learned mean out.

    The first sub-layer wrapped (the one the embedding enters) widens the stream: it
    takes the embedding itself, whose n copies need not be built (MHCResidual.widen).
    collapse is a learned weighted sum over streams initialised to the mean (1/n): on
    identical copies it returns exactly the plain model's stream, so the final
    LayerNorm sees the same input as in the plain model, and its scale does not grow
    with n (a plain sum would give n·x; the final LayerNorm hides that in the forward
    but not in the eps or the weights' gradient scale). Where MHCResidual's kernel can
    run (cfg.mhc_native, a float32/64 CPU stream), so does the collapse's
    (`native.Collapse`, 2.1x faster forward + backward at n=4, d=50).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.n = cfg, cfg.mhc_expansion_rate
        self.weights = nn.Parameter(torch.full((self.n,), 1.0 / self.n))
        self.wrapped = 0

    def wrap(self, sublayer: nn.Module) -> MHCResidual:
        self.wrapped += 1
        return MHCResidual(sublayer, self.cfg, widens=self.wrapped == 1)

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.mhc_native and x.dtype == self.weights.dtype and native.supports(x, self.n):
            return native.Collapse.apply(x, self.weights)  # the same numbers (tests/test_mhc_native.py)
        # Not einsum: its backward is a batched outer-product bmm (12 vs 9 ms fwd+bwd, n=4 d=50).
        return (x * self.weights[:, None]).sum(-2)


@torch.no_grad()
def composite_gain(model: nn.Module, batch: dict) -> dict[str, float]:
    """Gain of the product of H_res over all mHC blocks, max over the batch's real tokens
    (`model.real_slots`: in the layers' order, which for SASRec is rotated).

    Returns the largest absolute row sum (forward gain: the most any stream can be
    amplified) and column sum (backward gain) of H_res^(L)···H_res^(1). Doubly stochastic
    factors keep both ≈ 1 (the paper: ≈ 1.6 for mHC vs ≈ 3000 for unconstrained HC).
    The model runs in eval mode; its training mode is restored afterwards.
    """
    h_res: list[torch.Tensor] = []

    def record(block: MHCResidual, args: tuple) -> None:
        x = args[0]
        h_res.append(block.coefficients(copies(x, block.n) if block.widens else x)[2])

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, MHCResidual)]
    was_training = model.training
    try:
        model.eval()
        model(batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    product = functools.reduce(lambda acc, h: h @ acc, h_res)[model.real_slots(batch["items"])].abs()
    return {"mhc/gain_row": product.sum(-1).max().item(), "mhc/gain_col": product.sum(-2).max().item()}
