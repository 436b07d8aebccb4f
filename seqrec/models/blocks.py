"""The transformer block's residual wrapper and feed-forward network, by ``--block``.

Each sub-layer F (attention, then the FFN) of a block is wrapped one of three ways:

    post:  x' = LN(x + F(x))                   the SASRec port's order (the seed's default)
    pre:   x' = x + F(LN(x))                   pre-LayerNorm (alias --norm_first)
    ligr:  x' = x + g(x) ⊙ F(LN(x)),   g(x) = σ(x W_g + b_g)

Every sub-layer is called as F(x, context) with the batch's ``attention.SequenceContext``
(the FFNs ignore it), so a wrapper (Residual here, MHCResidual in mhc.py) hands it on
without knowing which sub-layer reads what.

``ligr`` is the LiGR layer (LinkedIn, arXiv 2502.03417: pre-norm with a gated residual) as
eSASRec (arXiv 2508.06450) trains it, through RecTools' ``LiGRLayer``
(rectools/models/nn/transformers/ligr.py), which the eSASRec authors used:
  * the gate is a d -> d linear map with bias, then a sigmoid, one gate per sub-layer, applied
    elementwise to the sub-layer's (dropped-out) output; it reads the sub-layer's input x
    itself, before the LayerNorm (RecTools: ``sigmoid(gating_linear_k(seqs))``);
  * the FFN is SwiGLU without biases, W_2 (SiLU(x W_1) ⊙ x W_3), hidden width
    ffn_mult · d (RecTools: ``ff_activation="swiglu"``, ``bias_in_ff=False``; eSASRec's
    ML-1M and ML-20M settings use ffn_mult 4: the benchmark repository's
    hyperparameter table, blondered/transformer_benchmark).
Initialisation: W_g = 0 and b_g = 0, so g ≡ σ(0) = 1/2 for every token and channel at step
0 (tests/test_blocks.py). RecTools re-initialises every matrix Xavier-normal
(transformers/lightning.py) and leaves nn.Linear's U(±1/√d) bias, so there g starts near 1/2
too, as σ of a small random x W_g + b_g, tilted differently per channel and per seed; the zero
start is the centre of that distribution and the same for every seed. W_g still learns from
step 1: its gradient Σ_tokens (∂L/∂g ⊙ g(1 - g)) xᵀ does not vanish at W_g = 0.
The backbone's final LayerNorm stays for every block (RecTools' LiGR stack has none): a
pre-norm stream is otherwise unnormalised where it meets the item embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import SequenceContext
from .dropout import Dropout


class FeedForward(nn.Module):
    """Point-wise two-layer ReLU FFN d -> mult·d -> d (the reference's kernel-1 convolutions, mult 1)."""

    def __init__(self, dim: int, dropout: float, mult: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, mult * dim), nn.ReLU(), Dropout(dropout),
                                 nn.Linear(mult * dim, dim), Dropout(dropout))

    def forward(self, x: torch.Tensor, context: SequenceContext) -> torch.Tensor:
        return self.net(x)


class SwiGLU(nn.Module):
    """LiGR's FFN: W_2 · Dropout(SiLU(x W_1) ⊙ x W_3), then dropout; no biases, hidden width mult·d.
    W_1 and W_3 are separate Linears (not one fused [d, 2·mult·d] matmul) so that each gets
    its own Xavier initialisation, as in RecTools."""

    def __init__(self, dim: int, dropout: float, mult: int):
        super().__init__()
        self.w1 = nn.Linear(dim, mult * dim, bias=False)
        self.w3 = nn.Linear(dim, mult * dim, bias=False)
        self.w2 = nn.Linear(mult * dim, dim, bias=False)
        self.hidden_dropout, self.dropout = Dropout(dropout), Dropout(dropout)

    def forward(self, x: torch.Tensor, context: SequenceContext) -> torch.Tensor:
        return self.dropout(self.w2(self.hidden_dropout(F.silu(self.w1(x)) * self.w3(x))))


def feed_forward(cfg: ModelConfig) -> nn.Module:
    """The block's FFN: SwiGLU for ligr, the ReLU FFN otherwise, both ffn_mult·d wide."""
    if cfg.block == "ligr":
        return SwiGLU(cfg.hidden_units, cfg.dropout_rate, cfg.ffn_mult)
    return FeedForward(cfg.hidden_units, cfg.dropout_rate, cfg.ffn_mult)


class Gate(nn.Module):
    """g(x) = σ(x W_g + b_g) ∈ (0, 1)^d per token, zero-initialised (g ≡ 1/2; module docstring).

    Raw Parameters rather than an nn.Linear, so SASRec.reset_parameters' Xavier pass over
    nn.Linear weights leaves the zero start alone."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x, self.weight, self.bias))


class Residual(nn.Module):
    """One sub-layer with its LayerNorm and residual sum in the order `block` names (module docstring)."""

    def __init__(self, sublayer: nn.Module, dim: int, block: str):
        super().__init__()
        self.sublayer = sublayer
        self.norm = nn.LayerNorm(dim, eps=1e-8)
        self.norm_first = block != "post"
        self.gate = Gate(dim) if block == "ligr" else None

    def forward(self, x: torch.Tensor, context: SequenceContext) -> torch.Tensor:
        if not self.norm_first:
            return self.norm(x + self.sublayer(x, context))
        out = self.sublayer(self.norm(x), context)
        return x + (out if self.gate is None else self.gate(x) * out)
