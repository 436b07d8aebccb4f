"""Training losses behind one interface, and the registry that names them.

A loss returns (sum of per-position losses, number of valid positions) rather than a
mean, so the trainer can normalise by the count of the whole global batch: that makes
the averaged gradient equal to the one-process one under DDP and accumulation.
Padding positions (positive item 0) never contribute: every loss computes all [B, L]
positions and weights padding out, so no shape depends on the data, no op makes a GPU
wait for the host, and torch.compile(fullgraph=True) traces a loss whole.

A loss declares what it needs, and the trainer and the data layer serve it without knowing
which loss it is: `negatives` (a `Negatives`: how many, per position or shared by the step,
from which distribution) goes into every batch plan, so the batch holds them under "neg".
Per position ([B, L] for one, [B, L, k] for k) they are drawn outside the user's training
history, so they never equal the positive; shared ([k] for the whole step) they are scored
with one matmul and any that equals a position's positive is masked out there. A loss that
scores the whole catalogue asks for none. Scores come only through the model's scoring API
(`score`, `score_all`, and `item_vectors` where a hand-written backward needs the vectors the
scores are dot products with), so a loss works with every model that has that API.

Adding a loss is one class and one line: subclass `SampledLoss` (or `Loss`) and decorate it
with `@register("name")`; a config with loss "name" then builds it, in any process that
imported the class (docs/ARCHITECTURE.md, "Adding a loss").
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .data.sampling import ItemSampler
from .data.tensors import Negatives

if TYPE_CHECKING:
    from .config import TrainConfig

LOSSES: dict[str, type[Loss]] = {}  # --loss name -> class; config validation reads it too


def register(name: str) -> Callable[[type[Loss]], type[Loss]]:
    """Class decorator: `--loss name` builds the class (through its `from_config`)."""
    def add(cls: type[Loss]) -> type[Loss]:
        if name in LOSSES:  # a second class under one name would silently replace the first
            raise ValueError(f"loss {name!r} is already registered to {LOSSES[name].__qualname__}")
        LOSSES[name] = cls
        return cls
    return add


class Loss:
    """A training loss: `loss(model, hidden, batch)` -> (sum over valid positions, their count).

    `hidden` is the model's output [B, L, d], `batch` the training batch (items, pos, and neg
    when `negatives` asks for some).
    """

    negatives: Negatives = Negatives()  # what the data layer draws for this loss: none by default

    @classmethod
    def from_config(cls, cfg: TrainConfig, num_items: int, item_counts: torch.Tensor | None) -> Loss:
        """This loss for the run's flags; item_counts is the training popularity, [num_items + 1]."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class SampledLoss(Loss):
    """A loss over the positive and sampled negatives: `scores` gives both, whatever the kind of
    negatives the flags chose. A subclass declares `default_negatives`, the k of
    --num_negatives 0, and writes `__call__`; one with flags of its own overrides `from_config`."""

    default_negatives: ClassVar[int] = 1

    def __init__(self, negatives: Negatives = Negatives(1)):
        self.negatives = negatives

    @classmethod
    def requested(cls, cfg: TrainConfig) -> Negatives:
        """The negatives the flags ask for: --num_negatives (or the default), --shared_negatives."""
        return Negatives(cfg.num_negatives or cls.default_negatives, cfg.shared_negatives)

    @classmethod
    def from_config(cls, cfg, num_items, item_counts):
        return cls(cls.requested(cfg))

    def scores(self, model: nn.Module, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, ...]:
        """Scores (fp32) of the positives [B, L] and the negatives [B, L, k], and the valid-position mask.

        Per-position negatives go through `model.score`, a shared [k] set through one
        `model.score_all` against every position. A shared negative equal to the position's
        positive scores -inf: it then adds nothing to a loss that is 0 at -inf (softplus,
        exp, a hinge) and gets no gradient.
        """
        neg = negative_ids(batch)
        pos = model.score(hidden, batch["pos"]).float()
        if self.negatives.shared:
            negs = model.score_all(hidden, neg).float().masked_fill(neg == batch["pos"][..., None], -math.inf)
        else:
            negs = model.score(hidden[..., None, :], neg).float()
        return pos, negs, batch["pos"] != 0


def negative_ids(batch: dict) -> torch.Tensor:
    """The batch's negatives as [B, L, k] per position (one comes as [B, L]) or [k] shared."""
    return batch["neg"][..., None] if batch["neg"].dim() == 2 else batch["neg"]


@register("bce")
class BCELoss(SampledLoss):
    """Binary cross-entropy: the positive against each of k sampled negatives (SASRec: k = 1)."""

    def __call__(self, model, hidden, batch):
        pos, neg, valid = self.scores(model, hidden, batch)
        per_position = F.softplus(-pos) + F.softplus(neg).sum(-1)  # = BCE(pos, 1) + sum BCE(neg, 0)
        return (per_position * valid).sum(), valid.sum()


@register("gbce")
class GBCELoss(SampledLoss):
    """gBCE (gSASRec, arXiv 2308.07192): BCE whose positive probability is raised to beta.

    With k negatives out of |I| - 1 items, alpha = k / (|I| - 1) and
    beta = alpha (t (1 - 1/alpha) + 1/alpha); t = 0 gives beta = 1 (plain BCE), t = 1
    calibrates the sampled model to full-softmax probabilities. The positive term
    -log sigmoid(s)^beta is beta * softplus(-s) exactly. (The paper's code feeds BCE the
    transformed logit log(1 / (sigmoid(s)^-beta - 1)) instead, which needs float64 and
    clamped scores to stay finite; this form is the same number in any dtype, and a positive
    scored far below its negatives keeps its gradient -beta.)
    """

    default_negatives = 256

    def __init__(self, negatives: Negatives, num_items: int, t: float):
        super().__init__(negatives)
        alpha = negatives.count / (num_items - 1)
        self.beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)

    @classmethod
    def from_config(cls, cfg, num_items, item_counts):
        return cls(cls.requested(cfg), num_items, cfg.gbce_t)

    def __call__(self, model, hidden, batch):
        pos, neg, valid = self.scores(model, hidden, batch)
        per_position = self.beta * F.softplus(-pos) + F.softplus(neg).sum(-1)
        return (per_position * valid).sum(), valid.sum()


@register("sampled_softmax")
class SampledSoftmaxLoss(SampledLoss):
    """Cross-entropy of the positive against itself and k sampled negatives (eSASRec).

    With `--logq`, the negatives' sampler draws in proportion to item popularity, and every
    logit, the positive's included, is corrected by -log q(item) (Yi et al., RecSys 2019), so
    the sampled softmax estimates the full one despite the skewed draws. The correction goes
    with the sampler: under uniform draws log q is a constant that cancels.
    """

    default_negatives = 256

    @classmethod
    def from_config(cls, cfg, num_items, item_counts):
        negatives = cls.requested(cfg)
        if cfg.logq:
            negatives = dataclasses.replace(negatives, sampler=ItemSampler(num_items, item_counts))
        return cls(negatives)

    def __call__(self, model, hidden, batch):
        pos, neg, valid = self.scores(model, hidden, batch)
        sampler = self.negatives.sampler
        if sampler is not None:
            pos = pos - sampler.log_q(batch["pos"])
            neg = neg - sampler.log_q(negative_ids(batch))
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


@register("ce")
class FullCrossEntropyLoss(Loss):
    """Softmax cross-entropy over the whole catalogue ("SASRec+", arXiv 2309.07602).

    Asks for no negatives. Computed in item chunks with a hand-written backward, so memory is
    O(positions x chunk) instead of O(positions x |I|): a catalogue of millions of items fits.
    That backward differentiates the scores by hand, so it takes the vectors they are dot
    products with (`model.item_vectors()`) rather than calling `score_all` per chunk. Every
    position is computed and padding is weighted out (its target, item 0, is a row of the
    table like any other) rather than selected with `hidden[valid]`, whose shape depends on
    the data: that would force a device->host sync and break a torch.compile graph.
    """

    def __init__(self, chunk_size: int = 8192):
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, cfg, num_items, item_counts):
        return cls(cfg.ce_chunk_size)

    def __call__(self, model, hidden, batch):
        targets = batch["pos"].reshape(-1)
        valid = targets != 0
        table = model.item_vectors()
        dtype = torch.promote_types(table.dtype, torch.float32)  # fp32 under autocast, fp64 stays
        loss = _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]).to(dtype), table.to(dtype),
                                          targets, valid.to(dtype), self.chunk_size)
        return loss, valid.sum()


def build_loss(cfg: TrainConfig, num_items: int, item_counts: torch.Tensor | None = None) -> Loss:
    """The loss registered under --loss, built from the flags; item_counts (training popularity,
    [num_items + 1]) is what --logq draws by."""
    return LOSSES[cfg.loss].from_config(cfg, num_items, item_counts)
