"""--block and --ffn_mult (seqrec/models/blocks.py): the LiGR layer equals its formula written out
plainly, its gate starts at 1/2, the FFN widths, and LiGR under TiSASRec attention, mHC, bf16
autocast, export and training (causality and padding: tests/test_model.py, test_tisasrec.py;
the mHC combination token by token: tests/test_mhc.py; torch.compile: tests/test_compile.py)."""
from __future__ import annotations


import pytest
import torch

from conftest import small_config, train_losses
from seqrec import checkpoint as ckpt
from seqrec import export as ex
from seqrec.cli import run
from seqrec.config import ModelConfig
from seqrec.models import build_model
from seqrec.models.attention import SequenceContext, attention_mask
from seqrec.models.blocks import FeedForward, Gate, Residual, SwiGLU

DIM, ITEMS = 16, 30


def config(**kw) -> ModelConfig:
    fields = dict(maxlen=10, hidden_units=DIM, num_heads=2, num_blocks=2, dropout_rate=0.0, block="ligr",
                  time=False, mhc=False)
    return ModelConfig(**{**fields, **kw})


def left_padded(lengths: list[int], maxlen: int = 10, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, ITEMS + 1, (len(lengths), maxlen), generator=g)
    items = items.masked_fill(torch.arange(maxlen) < maxlen - torch.tensor(lengths)[:, None], 0)
    times = 1_600_000_000 + torch.randint(0, 5000, items.shape, generator=g).cumsum(1)
    return {"items": items, "times": times.masked_fill(items == 0, 0)}


def randomise_gates(model: torch.nn.Module) -> None:
    """Gates that vary by token and channel (they start constant)."""
    with torch.no_grad():
        for gate in (m for m in model.modules() if isinstance(m, Gate)):
            gate.weight.normal_(0, 0.5)
            gate.bias.normal_()


# ------------------------------------------------------------------ the formula, written out


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ligr_reference(layer: Residual, x: torch.Tensor, context: SequenceContext) -> torch.Tensor:
    """x + σ(x W_gᵀ + b_g) ⊙ F(LN(x)), with F = W_2(SiLU(W_1 h) ⊙ W_3 h) for the FFN; the attention
    sub-layer is the module's own (its formula is tested in test_model.py / test_tisasrec.py)."""
    h = layer_norm(x, layer.norm)
    f = layer.sublayer
    if isinstance(f, SwiGLU):
        w1, w2, w3 = f.w1.weight, f.w2.weight, f.w3.weight
        a = h @ w1.t()
        out = ((a / (1 + torch.exp(-a))) * (h @ w3.t())) @ w2.t()
    else:
        out = f(h, context)
    gate = 1 / (1 + torch.exp(-(x @ layer.gate.weight.t() + layer.gate.bias)))
    return x + gate * out


@pytest.mark.parametrize("time", [False, True])
def test_ligr_model_equals_the_formula_layer_by_layer(time):
    """The whole ligr stack (SASRec or TiSASRec attention, ffn_mult 4, random gates) in float64:
    every sub-layer's output equals the reference, and so does the encoder's output."""
    torch.manual_seed(0)
    model = build_model(config(time=time, ffn_mult=4, time_span=20, time_unit="minute"), ITEMS).double().eval()
    randomise_gates(model)
    batch = left_padded([10, 6, 3])
    context = model.context(batch) if time else SequenceContext(mask=attention_mask(batch["items"]))
    x = model.embed(batch["items"]).double()
    expected = x
    for layer in model.layers:
        reference = ligr_reference(layer, expected, context)
        torch.testing.assert_close(layer(expected, context), reference, rtol=1e-12, atol=1e-12)
        expected = reference
    expected = layer_norm(expected, model.final_norm)
    real = batch["items"] != 0
    torch.testing.assert_close(model.encode(x, context)[real], expected[real], rtol=1e-12, atol=1e-12)


def test_gate_is_one_half_at_step_0():
    """W_g = 0, b_g = 0 survive the model's Xavier pass, so g ≡ σ(0) = 1/2 for every token and
    channel, in the plain and the mHC residual, with and without TiSASRec attention."""
    for time in (False, True):
        for mhc in (False, True):
            model = build_model(config(time=time, mhc=mhc, time_span=20), ITEMS)
            gates = [layer.gate for layer in model.layers]
            assert len(gates) == 4 and all(isinstance(g, Gate) for g in gates)
            x = 5 * torch.randn(3, 10, DIM)
            for gate in gates:
                assert not gate.weight.any() and not gate.bias.any()
                assert torch.equal(gate(x), torch.full_like(x, 0.5))


def test_the_gate_learns_from_step_1():
    """The zero start is not a fixed point: one Adam step moves W_g and b_g of every gate."""
    torch.manual_seed(0)
    model = build_model(config(dropout_rate=0.1), ITEMS).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = left_padded([10, 8, 5, 9])
    model(batch).square().mean().backward()
    for layer in model.layers:
        assert layer.gate.weight.grad.abs().sum() > 0 and layer.gate.bias.grad.abs().sum() > 0
    optimizer.step()
    assert all(layer.gate.weight.any() for layer in model.layers)


# ------------------------------------------------------------------ FFN width


@pytest.mark.parametrize("block", ["post", "pre", "ligr"])
@pytest.mark.parametrize("mult", [1, 4])
def test_ffn_width_is_ffn_mult_times_d(block, mult):
    model = build_model(config(block=block, ffn_mult=mult), ITEMS)
    ffn = model.layers[1].sublayer
    shapes = {name: tuple(p.shape) for name, p in ffn.named_parameters()}
    if block == "ligr":  # SwiGLU, no biases
        assert isinstance(ffn, SwiGLU)
        assert shapes == {"w1.weight": (mult * DIM, DIM), "w3.weight": (mult * DIM, DIM),
                          "w2.weight": (DIM, mult * DIM)}
    else:  # the ReLU FFN; mult 1 is the seed's d -> d, parameter for parameter
        assert isinstance(ffn, FeedForward)
        assert shapes == {"net.0.weight": (mult * DIM, DIM), "net.0.bias": (mult * DIM,),
                          "net.3.weight": (DIM, mult * DIM), "net.3.bias": (DIM,)}
    assert any("gate" in name for name, _ in model.named_parameters()) == (block == "ligr")


# ------------------------------------------------------------------ AMP, mHC


@pytest.mark.parametrize("time, mhc", [(False, False), (True, False), (False, True), (True, True)])
def test_ligr_under_bf16_autocast(time, mhc):
    """Forward and backward under CPU bf16 autocast are finite and close to fp32 (bf16's 8-bit
    mantissa through 4 sub-layers: a few percent), for every attention and residual."""
    torch.manual_seed(0)
    model = build_model(config(time=time, mhc=mhc, ffn_mult=4, time_span=20), ITEMS)
    randomise_gates(model)
    batch = left_padded([10, 7, 2])
    real = batch["items"] != 0
    full = model(batch)[real]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(batch)[real]
    low.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (low.float() - full).norm() / full.norm() < 0.05


def test_ligr_with_mhc_starts_as_plain_ligr():
    """With α = 0 the mHC ligr model (the gate reads H_pre·x = x on identical copies) is the
    plain ligr model with the same weights, random gates included."""
    torch.manual_seed(0)
    plain = build_model(config(ffn_mult=2), ITEMS).eval()
    randomise_gates(plain)
    mhc = build_model(config(ffn_mult=2, mhc=True, mhc_init_gate=0.0), ITEMS).eval()
    missing = mhc.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert not [name for name in missing if "gate" in name]
    batch = left_padded([10, 7, 4, 1])
    expected, out = plain(batch), mhc(batch)
    real = batch["items"] != 0
    assert (out[real] - expected[real]).norm() / expected[real].norm() < 1e-5


# ------------------------------------------------------------------ training and export


@pytest.mark.parametrize("variant", [{}, {"model__time": True, "model__mhc": True}], ids=["sasrec", "tisasrec+mhc"])
def test_ligr_trains_and_exports(variant, data_file, tmp_path):
    """A two-epoch ligr run with AMP requested (bf16 on CPU) lowers its loss, then `seqrec export`
    to TorchScript and torch.export: each export is checked against the eager model by export itself."""
    cfg = small_config(data_file, tmp_path / "run", train__num_epochs=2, model__block="ligr", model__ffn_mult=2,
                       train__amp="bf16", **variant)
    results = run(cfg)
    first, last = train_losses(tmp_path / "run")
    assert last < first and 0 < results["test"]["sampled/NDCG@10"] < 1  # a NaN model would rank every target first
    checkpoint = tmp_path / "run" / "best.pt"
    assert ckpt.load(checkpoint)["config"]["model"]["block"] == "ligr"
    for fmt in ("torchscript", "pt2"):
        assert ex.export(checkpoint, tmp_path / f"model.{fmt}", fmt).exists()

