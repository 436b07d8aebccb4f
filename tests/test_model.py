import pytest
import torch

from seqrec.config import ModelConfig
from seqrec.models import SASRec, build_model
from seqrec.models.attention import SequenceContext, attention_mask
from seqrec.models.dropout import Dropout


BLOCKS = ["post", "pre", "ligr"]


def make_model(block, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(maxlen=12, hidden_units=16, num_heads=2, num_blocks=2, dropout_rate=0.0,
                      block=block, **{"time": False, "mhc": False, **kw})
    model = build_model(cfg, num_items=30)
    if block == "ligr":  # the gates start constant (1/2): make them depend on the token, as after training
        for layer in model.layers:
            torch.nn.init.normal_(layer.gate.weight, std=0.5)
    return model.eval()


def left_padded(lengths, maxlen=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 31, (len(lengths), maxlen), generator=g)
    pad = torch.arange(maxlen)[None, :] < (maxlen - torch.tensor(lengths))[:, None]
    return items.masked_fill(pad, 0)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mhc", [False, True])
def test_causality_future_items_do_not_change_the_past(block, mhc):
    model = make_model(block, mhc=mhc)
    if mhc:  # strongly token-dependent coefficients: a leak through them would show
        with torch.no_grad():
            for layer in model.layers:
                layer.alpha.fill_(1.0)
    items = left_padded([12, 9, 5])
    base = model({"items": items})
    t = 8
    changed = items.clone()
    changed[:, t + 1:] = torch.randint(1, 31, changed[:, t + 1:].shape)
    out = model({"items": changed})
    past = (items != 0)[:, :t + 1]  # real positions up to t (padded outputs are unused and unconstrained)
    assert torch.allclose(base[:, :t + 1][past], out[:, :t + 1][past], atol=1e-5)
    assert not torch.allclose(base[:, t + 1:], out[:, t + 1:])


@pytest.mark.parametrize("block", BLOCKS)
def test_real_positions_never_attend_to_padding(block):
    """Replace the hidden states at padded positions with noise before every sub-layer:
    outputs at real positions must not move (they would if padded keys were visible)."""
    model = make_model(block)
    items = left_padded([12, 7, 3])
    real = items != 0
    base = model({"items": items})
    # SASRec's layers see each row rotated so that its items come first (SASRec.forward).
    inside = torch.arange(items.shape[1]) < real.sum(1, keepdim=True)

    def scramble(module, args):
        x, context = args
        return x.masked_scatter(~inside[..., None].expand_as(x), torch.randn_like(x)[~inside]), context

    handles = [layer.register_forward_pre_hook(scramble) for layer in model.layers]
    out = model({"items": items})
    for h in handles:
        h.remove()
    assert torch.allclose(base[real], out[real], atol=1e-5)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mhc", [False, True])
def test_rotated_rows_match_left_padded_masked_attention(block, mhc):
    """SASRec.forward rotates rows and uses plain causal attention; the reference is the
    left-padded input through the same layers with the explicit causal key-padding mask.
    Real positions must agree (float32 rounding only), for full and cut widths."""
    model = make_model(block, mhc=mhc)
    items = left_padded([9, 7, 5, 1])
    real = items != 0
    reference = model.encode(model.embed(items), SequenceContext(mask=attention_mask(items)))
    torch.testing.assert_close(model({"items": items})[real], reference[real], rtol=0, atol=1e-5)
    cut = items[:, -9:]  # the first 3 columns are padding in every row
    torch.testing.assert_close(model({"items": cut})[cut != 0], reference[:, -9:][cut != 0], rtol=0, atol=1e-5)


def test_attention_mask_rows():
    mask = attention_mask(torch.tensor([[0, 0, 5, 6]]))[0, 0]
    assert mask.tolist() == [[True, False, False, False],   # padded query sees only itself
                             [False, True, False, False],
                             [False, False, True, False],  # first real item: itself only
                             [False, False, True, True]]


def test_scoring_api_consistent():
    model = make_model("post")
    hidden = model({"items": left_padded([12, 4])})[:, -1]
    all_scores = model.score_all(hidden)
    assert all_scores.shape == (2, 31)
    cand = torch.tensor([[3, 7, 9], [1, 2, 30]])
    assert torch.allclose(model.score(hidden[:, None, :], cand), all_scores.gather(1, cand), atol=1e-5)


def test_embedding_padding_rows_are_zero():
    model = make_model("pre")
    assert isinstance(model, SASRec)
    assert model.item_emb.weight[0].abs().sum() == 0 and model.pos_emb.weight[0].abs().sum() == 0


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("time, mhc", [(False, False), (False, True), (True, False), (True, True)])
def test_input_without_its_padding_columns_gives_the_same_outputs(block, time, mhc):
    """Evaluation drops columns that are padding in the whole batch: a narrower input is the
    right end of the window, so real positions must come out exactly as in full width."""
    model = make_model(block, time=time, mhc=mhc)
    items = left_padded([7, 5, 2])
    times = torch.cumsum(torch.randint(0, 5000, items.shape), 1)
    full = model({"items": items, "times": times})
    cut = model({"items": items[:, -7:], "times": times[:, -7:]})
    valid = items[:, -7:] != 0
    assert torch.allclose(full[:, -7:][valid], cut[valid], atol=1e-6)


def test_dropout_keeps_one_minus_p_scaled_up_and_is_the_identity_in_eval():
    """The CPU mask (thresholded uniform noise) is Bernoulli(1 - p) with the 1/(1 - p) scale."""
    torch.manual_seed(0)
    dropout, x = Dropout(0.3), torch.ones(400, 500)
    y = dropout(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=5e-3)  # 200k draws: sd 1e-3
    assert torch.allclose(y[kept], torch.tensor(1 / 0.7))
    assert not torch.equal(dropout(x), y)  # a fresh mask per call
    assert torch.equal(dropout.eval()(x), x)


def test_parameter_names_and_shapes_are_the_checkpoint_layout():
    """Checkpoints store the state dict by name: these names and shapes are what earlier runs
    wrote (plain SASRec, and TiSASRec with mHC and LiGR blocks, one block each), so any change
    to them must come with a mapping in load_state_dict."""
    attention = {"qkv.weight": (48, 16), "qkv.bias": (48,), "out.weight": (16, 16), "out.bias": (16,)}
    norm = {"norm.weight": (16,), "norm.bias": (16,)}
    final = {"item_emb.weight": (31, 16), "final_norm.weight": (16,), "final_norm.bias": (16,)}
    sasrec = {**final, "pos_emb.weight": (13, 16),
              **{f"layers.0.sublayer.{k}": v for k, v in attention.items()},
              **{f"layers.0.{k}": v for k, v in norm.items()},
              **{f"layers.1.sublayer.{k}": v for k, v in {"net.0.weight": (16, 16), "net.0.bias": (16,),
                                                         "net.3.weight": (16, 16), "net.3.bias": (16,)}.items()},
              **{f"layers.1.{k}": v for k, v in norm.items()}}
    mhc = {"phi": (64, 24), "alpha": (3,), "static": (24,), "gate.weight": (16, 16), "gate.bias": (16,), **norm}
    tables = {"pos_k.weight": (12, 16), "pos_v.weight": (12, 16), "interval_k.weight": (101, 16),
              "interval_v.weight": (101, 16)}
    tisasrec = {**final, "stream.weights": (4,),
                **{f"layers.{i}.{k}": v for i in (0, 1) for k, v in mhc.items()},
                **{f"layers.0.sublayer.{k}": v for k, v in {**attention, **tables}.items()},
                **{f"layers.1.sublayer.{k}": (16, 16) for k in ("w1.weight", "w2.weight", "w3.weight")}}
    for variant, expected in ((dict(time=False, mhc=False, block="post"), sasrec),
                              (dict(time=True, mhc=True, block="ligr"), tisasrec)):
        cfg = ModelConfig(maxlen=12, hidden_units=16, num_heads=2, num_blocks=1, **variant)
        state = build_model(cfg, num_items=30).state_dict()
        assert {name: tuple(t.shape) for name, t in state.items()} == expected
