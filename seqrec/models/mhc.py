"""mHC: manifold-constrained hyper-connections (DeepSeek-AI, arXiv 2512.24880).

The residual stream is widened to n copies x_l ∈ R^{n×C} per token and every sub-layer F
is wrapped as

    x_{l+1} = H_res · x_l + H_postᵀ · F(H_pre · x_l)

with per-token coefficients H_pre ∈ (0,1)^{1×n}, H_post ∈ (0,2)^{1×n} and a doubly
stochastic H_res (Sinkhorn-Knopp), so products of H_res over depth stay bounded.

Streams are [B, L, n, C]. Here: the wrapped sub-layer (MHCResidual), the stream strategy
the backbone builds its stack with (HyperStream) and the composite-gain diagnostic; the
per-token math on PyTorch ops is in mhc_ops.py, its compiled CPU twin in native.py.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterable

import torch
from torch import nn

from ..config import ModelConfig
from . import native
from .attention import SequenceContext
from .blocks import Gate
from .mhc_ops import coefficient_logits, full_precision, sinkhorn, update
# seqrec.tools.bench.mhc_parts still imports this one from here (see its docstring)
from .mhc_ops import _RMSProjection  # noqa: F401


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

    `widens` (HyperStream.stack sets it for the first sub-layer): the block the embedding
    enters takes it as the single stream [..., C] and returns the n streams; on its n
    identical copies H_res is the identity, so the block skips Sinkhorn and the mixing
    (`widen`), exactly.

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
        k = phi.shape[1]
        static = self.static if k == self.static.shape[0] else self.static[:k]
        return coefficient_logits(flat, phi, self.alpha, static, self.n)

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

    def mix(self, x: torch.Tensor, on_kernel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Everything before the sub-layer: H_res·x [..., n, C], the sub-layer input H_pre·x
        [..., C], and h [..., n] with its factor g, H_post = g·h. The compiled kernel
        (`on_kernel`: `runs_native(x)`) returns H_post itself (g = 1); the PyTorch ops
        return H_post / 2 (g = 2), whose 2 the update's multiply applies at no cost."""
        if self.widens:
            return *self.widen(x), 2.0
        if on_kernel:
            return *native.PreMix.apply(x, self.phi, self.alpha, self.static, self.iters), 1.0
        return *self._mix(x), 2.0

    def _mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """native.PreMix's twin on PyTorch ops (its reference), returning H_post / 2."""
        h_pre, half_post, h_res = self._coefficients(x)
        with full_precision(x) if self.no_amp else contextlib.nullcontext():
            # One batched product reads x once for H_res·x and H_pre·x; split (not
            # slicing) so the backward is one concatenation, not zero-filled copies.
            mixing = torch.cat([h_res, h_pre[..., None, :]], -2)
            res, branch = torch.einsum("...kn,...nc->...kc", mixing, x).split([self.n, 1], -2)
        return res, branch.squeeze(-2), half_post

    def runs_native(self, x: torch.Tensor) -> bool:
        """Whether `mix` and the post-LN update use the compiled CPU kernel (the same
        numbers): where native.supports the stream, unless autocast would run the mixing
        in low precision."""
        return (self.native and (self.no_amp or not torch.is_autocast_enabled("cpu"))
                and native.supports(x, self.phi, self.n))

    def forward(self, x: torch.Tensor, context: SequenceContext) -> torch.Tensor:
        """x [..., n, C] -> [..., n, C]; a widening block takes the single stream x [..., C]."""
        on_kernel = self.runs_native(x)
        res, branch, h_post, post_gain = self.mix(x, on_kernel)
        out = self.sublayer(self.norm(branch) if self.norm_first else branch, context)
        if self.gate is not None:
            out = self.gate(branch) * out
        if on_kernel and not self.norm_first and out.dtype == res.dtype:
            h_post = h_post if post_gain == 1.0 else post_gain * h_post  # the widening block's H_post / 2
            return native.PostNorm.apply(res, h_post, out, self.norm.weight, self.norm.bias, self.norm.eps,
                                         torch.is_grad_enabled())
        x = update(res, h_post, out, post_gain)  # promotes to fp32 under autocast
        return x if self.norm_first else self.norm(x)


def copies(x: torch.Tensor, n: int) -> torch.Tensor:
    """n identical streams of x [..., C] -> [..., n, C] (a view)."""
    return x[..., None, :].expand(*x.shape[:-1], n, x.shape[-1])


class HyperStream(nn.Module):
    """The mHC residual stream strategy for the backbone: n copies in, learned mean out.

    The first sub-layer of the stack (the one the embedding enters) widens the stream: it
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

    def stack(self, sublayers: Iterable[nn.Module]) -> nn.ModuleList:
        return nn.ModuleList(MHCResidual(sublayer, self.cfg, widens=i == 0) for i, sublayer in enumerate(sublayers))

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        """Collapse.apply where native.supports the stream (the kernel needs no autocast check:
        the stream is float32 or float64 under any autocast), else its twin below."""
        if self.cfg.mhc_native and native.supports(x, self.weights, self.n):
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
