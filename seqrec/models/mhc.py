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
from torch import nn

from ..config import ModelConfig
from . import native


def _normalise(z: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The forward of _Normalise: the result and the normalisers its backward needs."""
    p = z.exp()
    sums = []
    for dim in dims:
        sums.append(p.sum(dim, keepdim=True))
        p.mul_(sums[-1].reciprocal())
    return p, sums


class _Normalise(torch.autograd.Function):
    """exp(z), then divide by its sums over dims[0], dims[1], ... in turn (z: [n, n, T]).

    Autograd through the unrolled loop records two ops and keeps two [n, n, T] tensors
    per step. This forward keeps only the normalisers ([n, 1, T] row or [1, n, T]
    column sums) and the backward walks the steps in reverse, rebuilding each iterate
    from the next by multiplying its normaliser back in. For Y = X / s with
    s = X.sum(dim): dX = (dY - sum(dY ⊙ Y, dim)) / s. Divisions are multiplications
    by the small reciprocal (a broadcast division costs 2.5x a multiplication on CPU).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        p, sums = _normalise(z, dims)
        ctx.dims = dims
        ctx.save_for_backward(p, *sums)
        return p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        p, *sums = ctx.saved_tensors
        g, y, gy = grad.clone(memory_format=torch.contiguous_format), p.clone(), torch.empty_like(p)
        for dim, s in zip(reversed(ctx.dims), reversed(sums)):
            g.sub_(torch.mul(g, y, out=gy).sum(dim, keepdim=True)).mul_(s.reciprocal())
            y.mul_(s)
        return g.mul_(y), None


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Doubly stochastic projection of exp(logits[..., n, n]): `iters` rounds of column
    then row normalisation, so rows sum to 1 exactly and columns to within the
    convergence error. Vectorised over all leading dims (one matrix per token).

    Each column's logits are shifted to max 0 (the first column normalisation removes
    such a shift exactly, so it needs no gradient) and floored at -60: exp() then has a
    1 in every column and nothing below 1e-26, so no normaliser can underflow to 0 (a
    global max shift gives 0/0 for a row far below the max in every column). The floor
    only moves entries under 1e-26 of their column's largest; a row made only of those
    comes out spread instead of NaN. Invariant to adding a constant to a matrix's (or a
    column's) logits.

    Computed in at least fp32 (bf16/fp16 inputs are cast up; fp64 stays fp64 so the
    backward can be gradchecked) and returned in that dtype. Tokens-last internally: the
    size-n sums are then contiguous vector adds over tokens, ~10x faster on CPU than
    reducing a trailing axis of size 4; tokens-last input (as MHCResidual passes) costs
    no copy.
    """
    n = logits.shape[-1]
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, n, n).permute(1, 2, 0)
    z = (z - z.amax(0, keepdim=True).detach()).clamp_min(-60.0)
    z, dims = z.contiguous(), (0, 1) * iters
    # A traced graph (seqrec.export) cannot hold a Python autograd.Function; it needs no backward.
    p = _normalise(z, dims)[0] if torch.jit.is_tracing() else _Normalise.apply(z, dims)
    return p.permute(2, 0, 1).reshape(logits.shape)


def _rms_projection(x: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward of _RMSProjection: the result, and the 1/rms and raw product its backward needs."""
    inv_rms = torch.linalg.vector_norm(x, dim=-1).square_().div_(x.shape[1]).add_(1e-6).rsqrt_()
    raw = torch.mm(phi.t(), x.t())
    return raw * inv_rms, inv_rms, raw


class _RMSProjection(torch.autograd.Function):
    """RMSNorm(x) @ phi, tokens last: x [T, D], phi [D, K] -> [K, T], with a hand-written backward.

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
        identical copies, which normalising only F's branch would not.

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
        self.n, self.norm_first, self.iters, self.no_amp = n, cfg.norm_first, cfg.mhc_sinkhorn_iter, cfg.mhc_no_amp
        self.native = cfg.mhc_native
        self.phi = nn.Parameter(torch.randn(n * dim, 2 * n + n * n) / math.sqrt(n * dim))
        self.alpha = nn.Parameter(torch.full((3,), cfg.mhc_init_gate))
        p_pre = 1.0 / n if n > 1 else 0.999
        b_pre = math.log(p_pre / (1.0 - p_pre))
        b_res = math.log(19.0 * (n - 1)) * torch.eye(n) if n > 1 else torch.zeros(1, 1)
        self.static = nn.Parameter(torch.cat([torch.full((n,), b_pre), torch.zeros(n), b_res.flatten()]))

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_pre [..., n], H_post [..., n], H_res [..., n, n] for x [..., n, C], in at least fp32."""
        n, lead = self.n, x.shape[:-2]
        with torch.autocast(x.device.type, enabled=False):
            logits = self.logits(x.reshape(-1, x.shape[-2] * x.shape[-1]), self.phi)  # [2n + n², T]
            h_res = sinkhorn(logits[2 * n:].view(n, n, -1).permute(2, 0, 1), self.iters)
        return *self.gates(logits, lead), h_res.reshape(*lead, n, n)

    def logits(self, flat: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """H̃ = α·(RMSNorm(flat)·φ) + b, tokens last ([k, T]) for flat [T, D] and phi [D, k]:
        all coefficients (phi = self.phi), or the first k. Call with autocast off."""
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        projected = (_rms_projection(flat, phi)[0] if torch.jit.is_tracing()  # see sinkhorn
                     else _RMSProjection.apply(flat, phi))
        n, k = self.n, phi.shape[1]
        scale = torch.cat([a.expand(m) for a, m in zip(self.alpha, (n, n, n * n))])[:k]
        return torch.addcmul(self.static[:k, None], scale[:, None], projected)

    def gates(self, logits: torch.Tensor, lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """H_pre = sigmoid, H_post = 2·sigmoid of the first 2n logits, each [*lead, n]."""
        n = self.n
        return (torch.sigmoid(logits[:n]).t().reshape(*lead, n),
                2 * torch.sigmoid(logits[n:2 * n]).t().reshape(*lead, n))

    def widen(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `mix` returns for n identical copies of x [..., C] (the embedding entering the
        first sub-layer), computed from the single copy.

        Every H_res has rows summing to 1 (Sinkhorn ends with rows), so H_res·x is x itself:
        no Sinkhorn, no mixing, and the H_res logits are not needed. The RMS of the n·C
        copies is the RMS of x, and vec(x, ..., x)·φ = x·Σ_j φ_j with φ_j the j-th block of C
        rows; H_pre·x = (Σ_j H_pre,j)·x. Exact up to rounding (tests/test_mhc.py), and this
        block's H_res parameters get exactly the zero gradient they have in exact
        arithmetic (the full computation leaves them rounding noise, ~1e-12). Forward +
        backward of the block at n=4, d=50 on 3,200 tokens, one thread: 8.9 → 6.3 ms.
        """
        n, dim = self.n, x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            phi = self.phi[:, :2 * n].reshape(n, dim, 2 * n).sum(0)
            h_pre, h_post = self.gates(self.logits(x.reshape(-1, dim), phi), x.shape[:-1])
        return copies(x, n), h_pre.sum(-1, keepdim=True) * x, h_post

    def mix(self, x: torch.Tensor, on_kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H_res·x [..., n, C], the sub-layer input H_pre·x [..., C] and H_post [..., n];
        `on_kernel` is `runs_native(x)`, passed by a caller that already knows it."""
        if self.runs_native(x) if on_kernel is None else on_kernel:
            return native.PreMix.apply(x, self.phi, self.alpha, self.static, self.iters)
        h_pre, h_post, h_res = self.coefficients(x)
        with torch.autocast(x.device.type, enabled=False) if self.no_amp else contextlib.nullcontext():
            # One batched product reads x once for H_res·x and H_pre·x; split (not
            # slicing) so the backward is one concatenation, not zero-filled copies.
            mixing = torch.cat([h_res, h_pre[..., None, :]], -2)
            res, branch = torch.einsum("...kn,...nc->...kc", mixing, x).split([self.n, 1], -2)
        return res, branch.squeeze(-2), h_post

    def runs_native(self, x: torch.Tensor) -> bool:
        """Whether `mix` uses the compiled CPU kernel (native.PreMix, the same numbers): for
        fp32/fp64 on CPU, unless autocast would run the mixing in low precision, or the
        model is being traced or compiled (neither can see into a ctypes call)."""
        return (self.native and x.dtype == self.phi.dtype and (self.no_amp or not torch.is_autocast_enabled("cpu"))
                and native.supports(x, self.n))

    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """x [..., n, C] -> [..., n, C]; a widening block takes the single stream x [..., C]."""
        on_kernel = self.runs_native(x)
        res, branch, h_post = self.widen(x) if self.widens else self.mix(x, on_kernel)
        out = self.sublayer(self.norm(branch) if self.norm_first else branch, ctx)
        if on_kernel and not self.norm_first and out.dtype == res.dtype:
            return native.PostNorm.apply(res, h_post, out, self.norm.weight, self.norm.bias, self.norm.eps,
                                         torch.is_grad_enabled())
        x = torch.addcmul(res, h_post[..., None], out[..., None, :])  # promotes to fp32 under autocast
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
