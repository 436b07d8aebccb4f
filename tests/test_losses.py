"""Each loss against a direct computation; gBCE(t=0) = BCE; chunked CE = unchunked CE, also
under bf16 autocast; shared negatives and the logQ correction; popularity sampling; every loss
traced whole by torch.compile and free of host syncs; the registry, and the example loss of
docs/ARCHITECTURE.md trained through it."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, small_config, train_losses
from seqrec import config, losses
from seqrec.callbacks import Callback
from seqrec.cli import run
from seqrec.config import ConfigError, ModelConfig, TrainConfig, validate
from seqrec.data.sampling import ItemSampler, hash_ints
from seqrec.data.tensors import BatchPlan, Negatives
from seqrec.losses import LOSSES, BCELoss, FullCrossEntropyLoss, GBCELoss, SampledSoftmaxLoss, build_loss, register
from seqrec.models import build_model
from seqrec.tools.opcount import count_ops


class Table(torch.nn.Module):
    """Just an item table with the model scoring API (the references below read the table itself)."""

    def __init__(self, num_items=30, dim=8):
        super().__init__()
        self.item_emb = torch.nn.Embedding(num_items + 1, dim)

    def item_vectors(self, items=None):
        if items is None:
            return self.item_emb.weight
        return self.item_emb.weight[items] if isinstance(items, slice) else self.item_emb(items)

    def score(self, hidden, items):
        return (self.item_vectors(items) * hidden).sum(-1)

    def score_all(self, hidden, items=slice(None)):
        return hidden @ self.item_vectors(items).t()


def make_batch(k, seed=0, num_items=30):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(1, num_items + 1, (3, 5), generator=g)
    pos[0, :2] = 0  # padding
    neg = torch.randint(1, num_items + 1, (3, 5, k), generator=g)
    hidden = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    return hidden, {"pos": pos, "neg": neg if k > 1 else neg[..., 0]}


def reference_terms(model, hidden, batch):
    rows = []
    for b, l in zip(*torch.nonzero(batch["pos"] != 0, as_tuple=True)):
        h = hidden[b, l]
        negs = batch["neg"][b, l].reshape(-1)
        rows.append((h @ model.item_emb.weight[batch["pos"][b, l]], [h @ model.item_emb.weight[j] for j in negs]))
    return rows


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Table().double()


@pytest.mark.parametrize("k", [1, 4])
def test_bce_by_hand(model, k):
    hidden, batch = make_batch(k)
    total, count = BCELoss(Negatives(k))(model, hidden, batch)
    sig = torch.sigmoid
    expected = sum(-torch.log(sig(p)) - sum(torch.log(1 - sig(n)) for n in ns) for p, ns in reference_terms(model, hidden, batch))
    assert count == 13 and torch.allclose(total, expected.float(), rtol=1e-5)


def test_gbce_matches_its_definition_and_t0_is_bce(model):
    hidden, batch = make_batch(4)
    loss = GBCELoss(Negatives(4), num_items=30, t=0.75)
    beta = 0.75 * 4 / 29 + 0.25  # alpha (t (1 - 1/alpha) + 1/alpha) = t alpha + 1 - t
    sig = torch.sigmoid
    expected = sum(-beta * torch.log(sig(p)) - sum(torch.log(1 - sig(n)) for n in ns)
                   for p, ns in reference_terms(model, hidden, batch))
    assert torch.allclose(loss(model, hidden, batch)[0], expected.float(), rtol=1e-5)
    assert torch.allclose(GBCELoss(Negatives(4), 30, t=0.0)(model, hidden, batch)[0],
                          BCELoss(Negatives(4))(model, hidden, batch)[0])
    assert GBCELoss(Negatives(4), 30, t=1.0).beta == pytest.approx(4 / 29)  # t = 1: beta = alpha


def test_gbce_is_exact_and_keeps_its_gradient_at_extreme_scores():
    """Positive scores from -300 to 300 in float32: the loss is beta * softplus(-s) to float32
    precision, and its gradient -beta sigmoid(-s) does not vanish for a positive scored far too low."""
    model = Table()  # float32, as training runs
    pos = torch.arange(1, 13).reshape(2, 6)
    with torch.no_grad():
        model.item_emb.weight.zero_()
        model.item_emb.weight[1:13, 0] = 1.0
    s = torch.linspace(-300, 300, 12, dtype=torch.float32).reshape(2, 6)
    hidden = torch.zeros(2, 6, 8)
    hidden[..., 0] = s
    hidden.requires_grad_(True)
    batch = {"pos": pos, "neg": torch.full((2, 6, 3), 20)}  # item 20's vector is 0: softplus(0) each
    loss = GBCELoss(Negatives(3), num_items=30, t=0.75)
    total, _ = loss(model, hidden, batch)
    s64 = s.double()
    expected = (loss.beta * F.softplus(-s64) + 3 * math.log(2)).sum()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    grad = hidden.grad[..., 0].double()
    assert torch.allclose(grad, -loss.beta * torch.sigmoid(-s64), rtol=1e-5, atol=1e-30)
    assert grad[0, 0] == pytest.approx(-loss.beta)  # s = -300: the clamped float64 form gave 0 here


def test_sampled_softmax_by_hand(model):
    hidden, batch = make_batch(4)
    expected = sum(torch.logsumexp(torch.stack([p, *ns]), 0) - p for p, ns in reference_terms(model, hidden, batch))
    assert torch.allclose(SampledSoftmaxLoss(Negatives(4))(model, hidden, batch)[0], expected.float(), rtol=1e-5)


def shared_batch(k=6):
    """Per-position batch whose negatives are one shared [k] set; position (1, 0)'s positive is among them."""
    hidden, batch = make_batch(1)
    shared = torch.tensor([3, 9, 17, 22, 5, 30][:k])
    batch["pos"][1, 0] = 17
    return hidden, {"pos": batch["pos"], "neg": shared}


def shared_reference(model, hidden, batch):
    """(positive score, scores of the shared negatives other than the positive) per valid position."""
    rows = []
    for b, l in zip(*torch.nonzero(batch["pos"] != 0, as_tuple=True)):
        h, p = hidden[b, l], batch["pos"][b, l]
        rows.append((h @ model.item_emb.weight[p], [h @ model.item_emb.weight[j] for j in batch["neg"] if j != p]))
    return rows


def test_shared_negatives_by_hand(model):
    hidden, batch = shared_batch()
    rows = shared_reference(model, hidden, batch)
    assert sum(len(ns) for _, ns in rows) == 13 * 6 - 1  # the colliding negative is left out
    sig = torch.sigmoid
    bce = sum(-torch.log(sig(p)) - sum(torch.log(1 - sig(n)) for n in ns) for p, ns in rows)
    softmax = sum(torch.logsumexp(torch.stack([p, *ns]), 0) - p for p, ns in rows)
    shared = Negatives(6, shared=True)
    assert torch.allclose(BCELoss(shared)(model, hidden, batch)[0], bce.float(), rtol=1e-5)
    assert torch.allclose(SampledSoftmaxLoss(shared)(model, hidden, batch)[0], softmax.float(), rtol=1e-5)


def test_logq_correction_by_hand(model):
    counts = torch.arange(31) % 7
    counts[0] = 0
    sampler = ItemSampler(30, counts)
    q = counts.clamp_min(1).double() / counts.sum()
    for hidden, batch in [make_batch(4), shared_batch()]:
        per_position = batch["neg"].dim() == 3
        expected = 0
        for b, l in zip(*torch.nonzero(batch["pos"] != 0, as_tuple=True)):
            h, p = hidden[b, l], batch["pos"][b, l]
            negs = batch["neg"][b, l] if per_position else [j for j in batch["neg"] if j != p]
            logits = torch.stack([h @ model.item_emb.weight[j] - q[j].log() for j in [p, *negs]])
            expected = expected + torch.logsumexp(logits, 0) - logits[0]
        loss = SampledSoftmaxLoss(Negatives(batch["neg"].shape[-1], not per_position, sampler))
        assert torch.allclose(loss(model, hidden, batch)[0], expected.float(), rtol=1e-5)
    # Uniform draws: log q is a constant, the correction cancels.
    hidden, batch = make_batch(4)
    uniform = SampledSoftmaxLoss(Negatives(4, sampler=ItemSampler(30)))(model, hidden, batch)[0]
    assert torch.allclose(uniform, SampledSoftmaxLoss(Negatives(4))(model, hidden, batch)[0])


def test_popularity_sampler_follows_the_counts():
    counts = torch.tensor([0, 5, 0, 1, 10, 4])
    draws = ItemSampler(5, counts)(hash_ints(7, torch.arange(200_000)))
    frequency = torch.bincount(draws, minlength=6).double() / len(draws)
    assert frequency[0] == 0 and frequency[2] == 0  # padding and never-seen items are never drawn
    assert torch.allclose(frequency, counts.double() / counts.sum(), atol=3e-3)


def test_shared_negatives_depend_on_the_step_only(data_file):
    from seqrec.data import load_sequences
    from seqrec.data.tensors import SequenceTensors
    data = SequenceTensors(load_sequences(small_config(data_file, data_file.parent).data), 20, "cpu")
    users = data.epoch_order(1, 1)
    shared = Negatives(16, shared=True)
    first, other = (data.train_batch(BatchPlan(u, 1, 1, step=3, negatives=shared))["neg"]
                    for u in (users[:8], users[8:12]))
    assert first.shape == (16,) and torch.equal(first, other)  # every rank and micro-batch of step 3
    assert not torch.equal(first, data.train_batch(BatchPlan(users[:8], 1, 1, step=4, negatives=shared))["neg"])


def test_shared_negatives_and_logq_validation(data_file, tmp_path):
    with pytest.raises(ConfigError, match="logq"):
        validate(small_config(data_file, tmp_path, train__logq=True))  # loss bce
    with pytest.raises(ConfigError, match="shared_negatives"):
        validate(small_config(data_file, tmp_path, train__loss="ce", train__shared_negatives=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 7, 30, 1000])
def test_chunked_cross_entropy_equals_unchunked(model, chunk, dtype):
    model.to(dtype)
    hidden, batch = make_batch(1)
    h1 = hidden.to(dtype).requires_grad_()
    h2 = hidden.to(dtype).requires_grad_()
    total, count = FullCrossEntropyLoss(chunk)(model, h1, batch)
    total.backward()
    grad_table = model.item_emb.weight.grad.clone()
    model.item_emb.weight.grad = None
    valid = batch["pos"] != 0
    logits = h2[valid] @ model.item_emb.weight.t()
    logits[:, 0] = -math.inf  # padding is not a class
    direct = torch.nn.functional.cross_entropy(logits, batch["pos"][valid], reduction="sum")
    direct.backward()
    tol = dict(rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-8)
    assert torch.allclose(total, direct, **tol) and count == 13
    assert torch.allclose(h1.grad, h2.grad, **tol) and torch.allclose(grad_table, model.item_emb.weight.grad, **tol)
    assert grad_table[0].abs().sum() == 0 and h1.grad[0, :2].abs().sum() == 0  # padding: exactly nothing


def tiny_sasrec(num_items=40, maxlen=6, dim=8):
    torch.manual_seed(0)
    cfg = ModelConfig(maxlen=maxlen, hidden_units=dim, num_blocks=1, num_heads=2, dropout_rate=0.0, time=False,
                      mhc=False)
    return build_model(cfg, num_items)


def sasrec_batch(num_items=40, maxlen=6, users=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    items, pos = (torch.randint(1, num_items + 1, (users, maxlen), generator=g) for _ in range(2))
    items[0, :3] = pos[0, :3] = 0  # padding
    return {"items": items, "pos": pos}


def relative_error(grads, exact):
    return max(float((g.double() - e).norm() / e.norm()) for g, e in zip(grads, exact))


def test_chunked_cross_entropy_under_bf16_autocast():
    """Autocast must not reach inside the chunks: the forward's logsumexp and the backward's
    recomputed softmax then come from the same fp32 logits. Hidden states x10 give the logits a
    trained model's range (std 3.5, max 19). Here a bf16 forward against an fp32 backward was
    0.65% off in the gradient and autograd through F.cross_entropy on the full logits under the
    same autocast is 0.38% off; the chunked loss is now 5e-7 off, autocast or not."""
    model, batch = tiny_sasrec(500, 20, 32), sasrec_batch(500, 20, 8)
    with torch.no_grad():
        hidden = model(batch) * 10
    valid = batch["pos"] != 0
    table = model.item_emb.weight.detach()

    def grads(loss_fn, dtype, amp):
        h, t = hidden.to(dtype).clone().requires_grad_(), table.to(dtype).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss_fn(h, t).backward()
        return h.grad, t.grad

    def plain(h, t):
        logits = (h[valid] @ t.t()).masked_fill(torch.arange(501) == 0, -math.inf)
        return torch.nn.functional.cross_entropy(logits, batch["pos"][valid], reduction="sum")

    def chunked(h, t):
        table_only = SimpleNamespace(item_vectors=lambda: t)  # all the loss reads of a model
        return FullCrossEntropyLoss(64)(table_only, h, batch)[0]

    exact = grads(plain, torch.float64, amp=False)
    plain_error = relative_error(grads(plain, torch.float32, amp=True), exact)
    chunked_bf16 = grads(chunked, torch.float32, amp=True)
    assert 1e-3 < plain_error < 1e-2  # autocast does reach plain autograd's matmul
    assert relative_error(chunked_bf16, exact) < 1e-5
    for a, b in zip(chunked_bf16, grads(chunked, torch.float32, amp=False)):
        assert torch.equal(a, b)


LOSS_CASES = {"bce": dict(loss="bce"), "gbce": dict(loss="gbce", num_negatives=4),
              "sampled_softmax": dict(loss="sampled_softmax", num_negatives=4),
              "sampled_softmax_logq": dict(loss="sampled_softmax", num_negatives=4, logq=True),
              "ce": dict(loss="ce", ce_chunk_size=16),
              "bce_shared": dict(loss="bce", num_negatives=6, shared_negatives=True),
              "sampled_softmax_shared_logq": dict(loss="sampled_softmax", num_negatives=6, shared_negatives=True,
                                                  logq=True)}


@pytest.mark.parametrize("case", LOSS_CASES)
def test_each_loss_compiles_whole_and_never_syncs(case):
    """torch.compile(fullgraph=True) traces the loss and its backward without a graph break and
    matches eager; eager forward + backward has no op that would make a GPU wait for the host."""
    counts = torch.arange(41) % 5
    counts[0] = 0
    loss = build_loss(TrainConfig(**LOSS_CASES[case]), 40, counts)
    model, batch = tiny_sasrec(), sasrec_batch()
    g = torch.Generator().manual_seed(1)
    k = loss.negatives.count
    shape = (k,) if loss.negatives.shared else (3, 6, k) if k > 1 else (3, 6)
    batch["neg"] = torch.randint(1, 41, shape, generator=g)
    if loss.negatives.shared:
        batch["neg"][0] = batch["pos"][1, 0]  # a collision to mask
    with torch.no_grad():
        hidden = model(batch)

    def run_loss(loss_fn):
        h = hidden.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        total, count = loss_fn(model, h, batch)
        total.backward()
        return total, count, h.grad, model.item_emb.weight.grad

    with count_ops() as c:
        eager = run_loss(loss)
    assert c.syncs == 0, c.sync_by_op
    torch._dynamo.reset()
    compiled = run_loss(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    assert compiled[1] == eager[1] == 15
    for a, b in zip(compiled, eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert eager[2][0, :3].abs().sum() == 0  # padding positions get no gradient


@pytest.mark.parametrize("loss, extra", [("gbce", {}), ("sampled_softmax", {}), ("ce", {}),
                                         ("sampled_softmax", {"train__shared_negatives": True, "train__logq": True}),
                                         ("bce", {"train__shared_negatives": True})])
def test_each_loss_trains(data_file, tmp_path, loss, extra):
    """Eight epochs beat the same run with lr 0 (the initial model)."""
    kw = dict(train__loss=loss, train__num_negatives=8 if loss != "ce" else 0, train__num_epochs=8, **extra)
    untrained = run(small_config(data_file, tmp_path / "lr0", train__lr=0.0, **kw))
    results = run(small_config(data_file, tmp_path / "r", **kw))
    assert untrained["test"]["full/NDCG@10"] < results["test"]["full/NDCG@10"] < 1


def test_build_loss_follows_the_flags():
    counts = torch.arange(101)  # training popularity of items 0..100 (0: padding)
    build = lambda **kw: build_loss(TrainConfig(**kw), 100, counts)  # noqa: E731
    bce = build(loss="bce")
    assert type(bce) is BCELoss and bce.negatives == Negatives(count=1, shared=False, sampler=None)
    assert build(loss="bce", num_negatives=16, shared_negatives=True).negatives.shared
    gbce = build(loss="gbce", num_negatives=8, gbce_t=0.75)
    # alpha = 8/99: beta = alpha (t (1 - 1/alpha) + 1/alpha) = (8/99)(0.75 (1 - 12.375) + 12.375)
    assert type(gbce) is GBCELoss and gbce.beta == pytest.approx(0.310606, abs=1e-6)
    assert build(loss="gbce").negatives.count == 256
    plain, logq = build(loss="sampled_softmax"), build(loss="sampled_softmax", logq=True)
    assert type(plain) is SampledSoftmaxLoss and plain.negatives.sampler is None  # uniform draws, no correction
    assert logq.negatives.sampler.log_q(torch.tensor([100]))[0] == pytest.approx(math.log(100 / 5050))
    ce = build(loss="ce", ce_chunk_size=7)
    assert type(ce) is FullCrossEntropyLoss and ce.chunk_size == 7


def test_the_registry_holds_the_losses_the_config_lists():
    assert tuple(LOSSES) == config.LOSSES  # the built-ins, in the help text's order
    with pytest.raises(ValueError, match="already registered to BCELoss"):
        register("bce")(SampledSoftmaxLoss)


def documented_example() -> str:
    """The Python block of docs/ARCHITECTURE.md's "Adding a loss" section."""
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = doc.split("## Adding a loss\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


class LossSeen(Callback):
    def __init__(self):
        self.types = []

    def on_train_start(self, trainer, row):
        self.types.append(type(trainer.loss_fn))


def test_the_documented_example_loss_trains_through_the_registry(data_file, tmp_path, monkeypatch):
    """The example is run as the doc shows it, so the two cannot drift: its class and registry
    line alone make `loss="hinge"` a loss the config accepts and the trainer builds, and two
    epochs of it lower the loss and beat the untrained model."""
    monkeypatch.setattr(losses, "LOSSES", dict(LOSSES))  # the registration ends with the test
    example = {}
    exec(compile(documented_example(), "docs/ARCHITECTURE.md", "exec"), example)
    kw = dict(train__loss="hinge", train__num_negatives=8, train__num_epochs=2)
    untrained = run(small_config(data_file, tmp_path / "lr0", train__lr=0.0, **kw))
    seen = LossSeen()
    results = run(validate(small_config(data_file, tmp_path / "r", **kw)), [seen])  # validation reads the registry
    assert seen.types == [example["HingeLoss"]]
    first, last = train_losses(tmp_path / "r")
    assert last < first
    assert untrained["test"]["full/NDCG@10"] < results["test"]["full/NDCG@10"]
