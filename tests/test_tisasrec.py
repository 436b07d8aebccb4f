"""TiSASRec: the efficient attention equals the literal formula; interval buckets; masking."""
import copy
import dataclasses
import functools

import pytest
import torch

from seqrec.config import ModelConfig
from seqrec.models.intervals import time_intervals
from seqrec.models.tisasrec import TiSASRec, TimeIntervalAttention
from seqrec.models.tisasrec_reference import reference_attention

MAXLEN, DIM, ITEMS = 10, 20, 30
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_model(block, heads=2, unit="minute", span=6, dtype=torch.float64, dropout=0.0):
    torch.manual_seed(0)
    cfg = ModelConfig(maxlen=MAXLEN, hidden_units=DIM, num_heads=heads, num_blocks=2, dropout_rate=dropout,
                      attention_dropout=dropout, block=block, time=True, time_span=span,
                      time_unit=unit, mhc=False)
    model = TiSASRec(cfg, ITEMS)
    if block == "ligr":  # the gates start constant (1/2): make them depend on the token, as after training
        for layer in model.layers:
            torch.nn.init.normal_(layer.gate.weight, std=0.5)
    return model.to(dtype).eval()


def make_batch(lengths, seed=0):
    """Left-padded items; increasing timestamps with 0..4 minute gaps (repeats included), 0 at padding."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, ITEMS + 1, (len(lengths), MAXLEN), generator=g)
    pad = torch.arange(MAXLEN)[None, :] < (MAXLEN - torch.tensor(lengths))[:, None]
    times = 1_600_000_000 + torch.randint(0, 240, items.shape, generator=g).cumsum(1)
    return {"items": items.masked_fill(pad, 0), "times": times.masked_fill(pad, 0)}


def with_reference_attention(model):
    """A copy of the model whose attention layers run the literal [B, L, L, d] formula."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, TimeIntervalAttention):
            module.forward = functools.partial(reference_attention, module)
    return ref


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block", ["post", "pre"])
@pytest.mark.parametrize("heads", [1, 2, 5])
def test_efficient_attention_equals_reference(heads, block, dtype):
    """One layer and the whole model: outputs and gradients (input, every parameter)."""
    model = make_model(block, heads, dtype=dtype)
    batch = make_batch([10, 7, 3, 1])
    real = batch["items"] != 0
    weights = torch.randn(*real.shape, DIM, dtype=dtype)
    tol = TOLERANCE[dtype]

    layer = model.layers[0].sublayer
    context = model.context(batch)
    outs, grads = [], []
    for attend in (layer, functools.partial(reference_attention, layer)):
        x = torch.randn(*real.shape, DIM, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = attend(x, context)
        params = [x, *layer.parameters()]
        outs.append(out[real])
        grads.append(torch.autograd.grad((out * weights)[real].sum(), params))
    assert relative(*outs) < tol
    for name, g_eff, g_ref in zip(["x", *dict(layer.named_parameters())], *grads):
        assert relative(g_eff, g_ref) < tol, name

    reference = with_reference_attention(model)
    outs = []
    for m in (model, reference):
        out = m(batch)
        (out * weights)[real].sum().backward()
        outs.append(out[real])
    assert relative(*outs) < tol
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert relative(p.grad, ref_params[name].grad) < tol, name


def intervals(times, unit, span, valid=None):
    times = torch.tensor(times)
    return time_intervals(times, times != 0 if valid is None else torch.tensor(valid), unit, span)


def test_fixed_units_by_hand():
    row = [[0, 100, 160, 3760]]  # one padded slot, gaps 60 s and 3600 s
    assert intervals(row, "second", 1000)[0].tolist() == [[0, 0, 0, 0], [0, 0, 60, 1000],
                                                           [0, 60, 0, 1000], [0, 1000, 1000, 0]]
    assert intervals(row, "minute", 100)[0].tolist() == [[0, 0, 0, 0], [0, 0, 1, 61], [0, 1, 0, 60], [0, 61, 60, 0]]
    assert intervals(row, "minute", 60)[0, 1, 3] == 60  # clipped at time_span
    assert intervals(row, "hour", 100)[0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 1, 1, 0]]
    days = intervals([[10, 86409, 172810, 1_000_000]], "day", 10)[0]  # floor, then clip at 10
    assert days.tolist() == [[0, 0, 2, 10], [0, 0, 1, 10], [2, 1, 0, 9], [10, 10, 9, 0]]
    with pytest.raises(ValueError, match="unknown time unit"):
        intervals(row, "week", 10)


def test_personal_scale_by_hand():
    """Query i's scale: smallest non-zero gap between consecutive valid timestamps up to i."""
    r = intervals([[0, 100, 100, 130, 190, 200]], "personal", 8)[0]
    # scales per query: -, 1, 1 (the only gap is 0), 30, 30, 10; offsets from t0=100: -, 0, 0, 30, 90, 100
    expected = [[0, 0, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0],
                [0, 1, 1, 0, 0, 0],    # scale 30: positions 0, 0, 1
                [0, 3, 3, 2, 0, 0],    # scale 30: positions 0, 0, 1, 3
                [0, 8, 8, 7, 1, 0]]    # scale 10: positions 0, 0, 3, 9, 10; 10 clipped to 8
    assert r.tril().tolist() == expected
    assert r[0].eq(0).all() and r[:, 0].eq(0).all()  # padding pairs are 0
    # half-to-even rounding as Python's round(): scale 20, offsets 0, 20, 50, 70 -> 0, 1, 2 (2.5), 4 (3.5)
    assert intervals([[1000, 1020, 1050, 1070]], "personal", 99)[0, 3].tolist() == [4, 3, 2, 0]
    assert intervals([[5, 5, 5]], "personal", 9).eq(0).all()  # no non-zero gap: scale 1
    assert intervals([[0, 0, 0]], "personal", 9, valid=[[False] * 3]).eq(0).all()


@pytest.mark.parametrize("unit", ["personal", "hour"])
@pytest.mark.parametrize("block", ["post", "pre", "ligr"])
def test_future_items_and_times_do_not_change_the_past(block, unit):
    model = make_model(block, unit=unit, span=50)
    batch = make_batch([10, 8, 5], seed=2)
    base = model(batch)
    t = 6
    changed = {k: v.clone() for k, v in batch.items()}
    changed["items"][:, t + 1:] = torch.randint(1, ITEMS + 1, changed["items"][:, t + 1:].shape)
    gaps = torch.tensor([1, 3600, 7, 86400])[torch.randint(0, 4, (3, MAXLEN - t - 1))]
    changed["times"][:, t + 1:] = changed["times"][:, t:t + 1] + gaps.cumsum(1)
    out = model(changed)
    assert torch.allclose(base[:, :t + 1], out[:, :t + 1], atol=1e-12)
    assert not torch.allclose(base[:, t + 1:], out[:, t + 1:])


@pytest.mark.parametrize("block", ["post", "pre", "ligr"])
def test_padding_never_reaches_real_positions(block):
    """Noise in the hidden states at padded positions before every sub-layer, and garbage
    timestamps at padding: outputs at real positions must not move."""
    model = make_model(block, unit="personal")
    batch = make_batch([10, 6, 2])
    real = batch["items"] != 0
    base = model(batch)

    def scramble(module, args):
        x, context = args
        return x.masked_scatter(~real[..., None].expand_as(x), torch.randn_like(x)[~real]), context

    handles = [layer.register_forward_pre_hook(scramble) for layer in model.layers]
    noisy_times = batch["times"].masked_fill(~real, 1_234_567)
    out = model({"items": batch["items"], "times": noisy_times})
    for h in handles:
        h.remove()
    assert torch.allclose(base[real], out[real], atol=1e-12)


def test_single_item_row_and_query_without_visible_key_stay_finite():
    model = make_model("post", unit="personal")
    batch = make_batch([1, 10])
    out = model(batch)
    out[batch["items"] != 0].sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    layer = model.layers[0].sublayer
    context = model.context(batch)
    context = dataclasses.replace(context, mask=context.mask.clone())
    context.mask[1, :, 4] = False  # query 4 of row 1 sees no key at all
    x = torch.randn(2, MAXLEN, DIM, dtype=torch.float64, requires_grad=True)
    out = layer(x, context)
    out.sum().backward()
    assert torch.equal(out[1, 4], layer.out.bias)  # zero attention output, then the projection's bias
    assert torch.isfinite(x.grad).all()


def test_table_dropout_drops_table_elements_in_training_only():
    """pK, pV, rK, rV elements are dropped (with the 1/(1-p) scale) in training, and the
    attention output then changes; evaluation reads the tables as they are."""
    model = make_model("pre", dropout=0.3)
    attention = model.layers[0].sublayer
    table = attention.table(attention.interval_k, attention.interval_k.num_embeddings)
    assert torch.equal(table, attention.interval_k.weight.view(-1, 2, DIM // 2).transpose(0, 1))
    batch = make_batch([10, 4])
    expected = model(batch)
    attention.train()
    dropped = attention.table(attention.interval_k, attention.interval_k.num_embeddings)
    zeros = (dropped == 0).float().mean().item()
    assert 0.1 < zeros < 0.5 and torch.allclose(dropped[dropped != 0], table[dropped != 0] / 0.7)
    assert not torch.allclose(model(batch), expected)  # only layer 0's attention is in training mode


def test_every_parameter_is_trained():
    """No unused parameter (DistributedDataParallel would fail): positions live in the layers.
    Trained with every dropout on (outputs, tables, attention weights)."""
    model = make_model("pre", dropout=0.3).train()
    assert not hasattr(model, "pos_emb")
    batch = make_batch([10, 4])
    model(batch)[batch["items"] != 0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("unit", ["hour", "personal"])
def test_demo_run_trains_and_evaluates_both_protocols(tmp_path, unit):
    """Three epochs on the demo data beat the same run at lr 0 (its initial model) under both protocols."""
    from conftest import REPO, small_config
    from seqrec.cli import run

    def results(run_dir, **kw):
        return run(small_config(REPO / "data" / "demo.txt", tmp_path / run_dir, train__num_epochs=3,
                                train__batch_size=256, model__time=True, model__time_unit=unit,
                                model__time_span=64, model__maxlen=30, **kw))["test"]
    untrained, trained = results("lr0", train__lr=0.0), results("r")
    for metric in ("sampled/NDCG@10", "full/NDCG@10", "full/Recall@20"):
        assert untrained[metric] < trained[metric] < 1, metric
