"""Training losses behind one interface.

A loss returns (sum of per-position losses, number of valid positions) rather than a
mean, so the trainer can normalise by the count of the whole global batch: that makes
the averaged gradient equal to the one-process one under DDP and accumulation.
Padding positions (positive item 0) never contribute: every loss computes all [B, L]
positions and weights padding out, so no shape depends on the data, no op makes a GPU
wait for the host, and torch.compile(fullgraph=True) traces a loss whole.

Sampled negatives come from the data layer as the loss asks for them (`num_negatives`,
`sampler`, `shared`): per position ([B, L] for one, [B, L, k] for k) they are drawn
outside the user's training history, so they never equal the positive; shared ([k] for
the whole step) they are scored with one matmul and any that equals a position's
positive is masked out there.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data.sampling import ItemSampler

DEFAULT_NEGATIVES = {"bce": 1, "gbce": 256, "sampled_softmax": 256, "ce": 0}


class Loss(Protocol):
    num_negatives: int
    sampler: ItemSampler | None  # distribution of the negatives (None: uniform)
    shared: bool  # one [k] set of negatives per step instead of one per position

    def __call__(self, model: nn.Module, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ...


def _positive_negative_scores(model, hidden, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of the positive [B, L] and the negatives [B, L, k], the valid-position mask, and
    the negative ids ([B, L, k], or [k] when shared) the scores belong to.

    A shared negative equal to the position's positive scores -inf: it then adds nothing
    to any of the losses below (softplus(-inf) = 0, exp(-inf) = 0) and gets no gradient.
    """
    neg = batch["neg"] if batch["neg"].dim() != 2 else batch["neg"][..., None]
    pos = model.score(hidden, batch["pos"]).float()
    if neg.dim() == 1:
        negs = (hidden @ model.item_emb(neg).t()).float()
        negs = negs.masked_fill(neg == batch["pos"][..., None], -math.inf)
    else:
        negs = model.score(hidden[..., None, :], neg).float()
    return pos, negs, batch["pos"] != 0, neg


class _Sampled:
    """What a sampled loss asks of the data layer: how many negatives, from which
    distribution, per position or shared by the step."""

    def __init__(self, num_negatives: int = 1, shared: bool = False, sampler: ItemSampler | None = None):
        self.num_negatives, self.shared, self.sampler = num_negatives, shared, sampler


class BCELoss(_Sampled):
    """Binary cross-entropy: the positive against each of k sampled negatives (SASRec: k = 1)."""

    def __call__(self, model, hidden, batch):
        pos, neg, valid, _ = _positive_negative_scores(model, hidden, batch)
        per_position = F.softplus(-pos) + F.softplus(neg).sum(-1)  # = BCE(pos, 1) + sum BCE(neg, 0)
        return (per_position * valid).sum(), valid.sum()


class GBCELoss(_Sampled):
    """gBCE (gSASRec, arXiv 2308.07192): BCE whose positive probability is raised to beta.

    With k negatives out of |I| - 1 items, alpha = k / (|I| - 1) and
    beta = alpha (t (1 - 1/alpha) + 1/alpha); t = 0 gives beta = 1 (plain BCE), t = 1
    calibrates the sampled model to full-softmax probabilities. The positive term
    -log sigmoid(s)^beta is computed as BCE(gamma, 1) with
    gamma = log(1 / (sigmoid(s)^-beta - 1)), in float64 as the paper's code does, because
    sigmoid(s)^-beta - 1 underflows in float32 for confident positives.
    """

    def __init__(self, num_negatives: int, num_items: int, t: float, shared: bool = False):
        super().__init__(num_negatives, shared)
        alpha = num_negatives / (num_items - 1)
        self.beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)

    def __call__(self, model, hidden, batch):
        pos, neg, valid, _ = _positive_negative_scores(model, hidden, batch)
        pos64 = pos.double().clamp(-40, 40)
        gamma = -torch.log(torch.expm1(-self.beta * F.logsigmoid(pos64)).clamp_min(1e-300))
        per_position = F.softplus(-gamma).float() + F.softplus(neg).sum(-1)
        return (per_position * valid).sum(), valid.sum()


class SampledSoftmaxLoss(_Sampled):
    """Cross-entropy of the positive against itself and k sampled negatives (eSASRec).

    With `logq`, negatives are drawn in proportion to item popularity (`sampler`) and
    every logit, the positive's included, is corrected by -log q(item) (Yi et al., RecSys
    2019), so the sampled softmax estimates the full one despite the skewed draws. Under
    uniform draws log q is a constant that cancels, so no correction is applied.
    """

    def __init__(self, num_negatives: int, shared: bool = False, sampler: ItemSampler | None = None,
                 logq: bool = False):
        super().__init__(num_negatives, shared, sampler)
        self.logq = logq

    def __call__(self, model, hidden, batch):
        pos, neg, valid, neg_items = _positive_negative_scores(model, hidden, batch)
        if self.logq:
            pos = pos - self.sampler.log_q(batch["pos"])
            neg = neg - self.sampler.log_q(neg_items)
        logits = torch.cat([pos[..., None], neg], dim=-1)
        per_position = torch.logsumexp(logits, dim=-1) - pos
        return (per_position * valid).sum(), valid.sum()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum over rows r of weight_r (logsumexp(h_r E^T) - h_r e_target_r), excluding item 0,
    in item chunks.

    Neither direction holds the [M, |I|] logits: the forward keeps a running logsumexp,
    the backward recomputes each chunk's softmax and accumulates the gradients
    dh = w (sum_c softmax_c E_c - e_target) and dE_c = softmax_c^T (w h) (- w h at the
    targets). A row of weight 0 (padding) gets an exactly zero gradient and adds exactly
    zero to the table's, so every position can be computed with fixed shapes.

    Both directions run in the inputs' dtype with autocast off. They must agree: the
    backward turns the forward's logsumexp into probabilities of its own recomputed logits,
    and if those are not the same numbers the probabilities do not sum to one. (With the
    forward's matmuls autocast to bf16 and the backward in fp32, since a backward runs
    outside the autocast region, the gradient was 0.65-1.7% off at a trained model's logit
    range, up to 4x the error of plain autograd under the same autocast.) The inputs come in
    fp32 (FullCrossEntropyLoss casts them) rather than in the autocast dtype because a
    softmax over the whole catalogue is where bf16's 8-bit mantissa hurts most: a logit of
    16 is rounded by up to 0.06, its probability by 6%. The price, on hardware where bf16
    matmuls beat fp32 (TF32) ones, is paid in these matmuls only.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                chunk: int) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            lse = torch.full((h.shape[0],), -math.inf, dtype=h.dtype, device=h.device)
            for start in range(1, table.shape[0], chunk):
                lse = torch.logaddexp(lse, torch.logsumexp(h @ table[start:start + chunk].t(), dim=1))
            ctx.save_for_backward(h, table, targets, weight, lse)
            ctx.chunk = chunk
            return (weight * (lse - (h * table[targets]).sum(1))).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        h, table, targets, weight, lse = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            scale = (weight * grad)[:, None]
            scaled_h = h * scale
            grad_h = -table[targets]
            grad_table = torch.zeros_like(table).index_add_(0, targets, scaled_h, alpha=-1)
            for start in range(1, table.shape[0], ctx.chunk):
                rows = table[start:start + ctx.chunk]
                prob = torch.exp(h @ rows.t() - lse[:, None])
                grad_h += prob @ rows
                grad_table[start:start + ctx.chunk] += prob.t() @ scaled_h
            return grad_h * scale, grad_table, None, None, None


class FullCrossEntropyLoss:
    """Softmax cross-entropy over the whole catalogue ("SASRec+", arXiv 2309.07602).

    Computed in item chunks with a hand-written backward, so memory is O(positions x chunk)
    instead of O(positions x |I|): a catalogue of millions of items fits. Every position is
    computed and padding is weighted out (its target, item 0, is a row of the table like
    any other) rather than selected with `hidden[valid]`, whose shape depends on the data:
    that would force a device->host sync and break a torch.compile graph.
    """

    num_negatives, shared, sampler = 0, False, None

    def __init__(self, chunk_size: int = 8192):
        self.chunk_size = chunk_size

    def __call__(self, model, hidden, batch):
        targets = batch["pos"].reshape(-1)
        valid = targets != 0
        table = model.item_emb.weight
        dtype = torch.promote_types(table.dtype, torch.float32)  # fp32 under autocast, fp64 stays
        loss = _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]).to(dtype), table.to(dtype),
                                          targets, valid.to(dtype), self.chunk_size)
        return loss, valid.sum()


def build_loss(cfg: TrainConfig, num_items: int, item_counts: torch.Tensor | None = None) -> Loss:
    """The configured loss; item_counts (training popularity, [num_items + 1]) is needed for logq."""
    k = cfg.num_negatives or DEFAULT_NEGATIVES[cfg.loss]
    if cfg.loss == "bce":
        return BCELoss(k, cfg.shared_negatives)
    if cfg.loss == "gbce":
        return GBCELoss(k, num_items, cfg.gbce_t, cfg.shared_negatives)
    if cfg.loss == "sampled_softmax":
        sampler = ItemSampler(num_items, item_counts) if cfg.logq else None
        return SampledSoftmaxLoss(k, cfg.shared_negatives, sampler, cfg.logq)
    return FullCrossEntropyLoss(cfg.ce_chunk_size)
