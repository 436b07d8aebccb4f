"""mHC residual: the Sinkhorn projection and its exact backward, coefficient ranges,
equivalence to the plain residual at initialisation, gradients, the PyTorch path's op count
(kernel launches on a GPU), torch.compile, bf16 autocast and learning, for both LayerNorm
orders (and the LiGR gate where it enters the formula) and expansion rates 1..8 (causality:
tests/test_model.py)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from seqrec.config import ModelConfig
from seqrec.models import native as native_kernels
from seqrec.models.attention import SequenceContext
from seqrec.models.blocks import FeedForward, Residual
from seqrec.models.mhc import MHCResidual, composite_gain, copies
from seqrec.models.mhc_ops import _Logits, _Update, sinkhorn
from seqrec.models.sasrec import SASRec
from seqrec.models.tisasrec import TiSASRec
from seqrec.tools.opcount import count_ops

RATES = [1, 2, 4, 8]
NO_CONTEXT = SequenceContext()  # what a FeedForward sub-layer is given (and ignores)
NUM_ITEMS = 30


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second intra-op thread only adds barriers, which cost
    milliseconds each when other processes hold the cores (measured 3 s vs 12-31 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unrolled_sinkhorn(logits: torch.Tensor, iters: int, constant_step: int | None = None) -> torch.Tensor:
    """The definition, differentiated by autograd: the reference for sinkhorn's backward.
    `constant_step` (0-based, columns first) treats that normalisation's sums as constants:
    a gradient with that step's term dropped, which the comparisons must catch."""
    p = (logits - logits.amax((-2, -1), keepdim=True)).exp()
    for step in range(2 * iters):
        sums = p.sum(-2 + step % 2, keepdim=True)
        p = p / (sums.detach() if step == constant_step else sums)
    return p


def model_config(n: int = 4, block: str = "post", **kw) -> ModelConfig:
    fields = dict(maxlen=12, hidden_units=16, num_heads=2, num_blocks=2, dropout_rate=0.0,
                  block=block, time=False, mhc=True, mhc_expansion_rate=n)
    return ModelConfig(**{**fields, **kw})


def left_padded(lengths: list[int], maxlen: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, NUM_ITEMS + 1, (len(lengths), maxlen), generator=g)
    pad = torch.arange(maxlen)[None, :] < (maxlen - torch.tensor(lengths))[:, None]
    return items.masked_fill(pad, 0)


def plain_and_mhc(cfg: ModelConfig, model_cls: type[SASRec] = SASRec) -> tuple[SASRec, SASRec]:
    """A plain model and an mHC model sharing every backbone weight."""
    torch.manual_seed(0)
    plain = model_cls(dataclasses.replace(cfg, mhc=False), NUM_ITEMS).eval()
    mhc = model_cls(cfg, NUM_ITEMS).eval()
    result = mhc.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    mhc_names = {name for name, _ in mhc.named_parameters() if name.startswith("stream.")
                 or name.rsplit(".", 1)[-1] in ("phi", "alpha", "static")}
    assert set(result.missing_keys) == mhc_names  # exactly the mHC coefficients are new
    return plain, mhc


def bce(model: SASRec, items: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pos, neg = (torch.randint(1, NUM_ITEMS + 1, items.shape, generator=g) for _ in range(2))
    hidden = model({"items": items})
    per_position = F.softplus(-model.score(hidden, pos)) + F.softplus(model.score(hidden, neg))
    return per_position[items != 0].mean()


# ------------------------------------------------------------------ Sinkhorn

def test_sinkhorn_is_doubly_stochastic_and_converges():
    """Unit-scale logits. (Widely spread logits converge more slowly:
    at scale 2 the worst of 4096 matrices is still 3e-2 off after 20 iterations.)"""
    logits = torch.randn(256, 4, 4, generator=torch.Generator().manual_seed(0))
    errors = []
    for iters in (1, 3, 10, 20):
        p = sinkhorn(logits, iters)
        assert p.dtype == torch.float32 and (p >= 0).all()
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)  # the last step normalises rows
        errors.append((p.sum(-2) - 1).abs().max().item())
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-2
    assert errors[-1] < 1e-3


def test_sinkhorn_is_shift_invariant_and_stable():
    logits = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    shift = 50 * torch.randn(8, 3, 1, 1)  # a different constant per matrix
    assert torch.allclose(sinkhorn(logits + shift, 20), sinkhorn(logits, 20), atol=1e-6)
    assert torch.isfinite(sinkhorn(1e4 * logits, 20)).all()  # exp never overflows


def test_sinkhorn_runs_in_fp32_for_low_precision_input():
    logits = torch.randn(5, 4, 4)
    out = sinkhorn(logits.bfloat16(), 20)
    assert out.dtype == torch.float32
    assert torch.allclose(out, sinkhorn(logits.bfloat16().float(), 20))


def near_identity_logits(n: int, count: int, spread: float, seed: int) -> torch.Tensor:
    """float64 H_res logits like MHCResidual's: log(19(n-1))·I (b_res) plus N(0, spread²)."""
    g = torch.Generator().manual_seed(seed)
    bias = math.log(19 * (n - 1)) * torch.eye(n, dtype=torch.float64) if n > 1 else torch.zeros(1, 1)
    return bias + spread * torch.randn(count, n, n, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("n", RATES)
def test_sinkhorn_backward_is_the_unrolled_gradient(n):
    """sinkhorn normalises in the log domain (log_softmax per step) and autograd differentiates
    those steps: the exact gradient of the same 20-iteration map as the unrolled definition,
    not of its fixed point, so no convergence error enters and the two differ by float64
    rounding only. Tolerance 1e-13 absolute on gradients of size ~0.1-1 (measured ≤ 6e-16).

    It is tight enough to fail a wrong gradient: dropping one step's normaliser term (its sums
    taken as constants), or differentiating 19 iterations instead of 20, moves the gradient by
    > 1e-4 (1e9 x the tolerance) at near-identity H_res, the regime training starts in
    (b_res = log(19(n-1))·I: columns converge by a factor ~0.87 per iteration at n=4). Unit
    logits converge fast, and there the same mistakes can fall to ~1e-11. (The gradient at
    the exact doubly stochastic fixed point, which implicit differentiation computes, differs
    from this one by ~6% at n=4 near identity: the compiled kernel and this path both
    differentiate the iterations.) n = 1: the output is the constant 1, every gradient 0."""
    unit = torch.randn(2, 3, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    for logits in (unit, near_identity_logits(n, 6, 0.3, n).view(2, 3, n, n)):
        logits.requires_grad_()
        assert torch.autograd.gradcheck(lambda z: sinkhorn(z, 20), (logits,))
        weights = torch.randn(2, 3, n, n, dtype=torch.float64)

        def gradient(function):
            return torch.autograd.grad((function(logits) * weights).sum(), logits)[0]

        ours = gradient(lambda z: sinkhorn(z, 20))
        torch.testing.assert_close(ours, gradient(lambda z: unrolled_sinkhorn(z, 20)), rtol=0, atol=1e-13)
    if n > 1:  # logits: the near-identity ones
        for wrong in (lambda z: unrolled_sinkhorn(z, 20, constant_step=20),  # a middle column step
                      lambda z: unrolled_sinkhorn(z, 20, constant_step=39),  # the last (rows)
                      lambda z: unrolled_sinkhorn(z, 19)):
            assert (gradient(wrong) - ours).abs().max() > 1e-4


def test_sinkhorn_per_column_floor_gets_no_gradient():
    """Entries more than 60 below their column's max are floored (as in the compiled kernel)
    and get exactly zero gradient; the rest match the unrolled definition on the floored logits."""
    logits = torch.randn(5, 4, 4, dtype=torch.float64)
    logits[:, 0, 1] -= 100.0  # far below its column's max
    logits.requires_grad_()
    weights = torch.randn(5, 4, 4, dtype=torch.float64)
    grad = torch.autograd.grad((sinkhorn(logits, 20) * weights).sum(), logits)[0]
    assert (grad[:, 0, 1] == 0).all() and (grad[:, 1:] != 0).all()
    floored = torch.maximum(logits.detach(), logits.detach().amax(-2, keepdim=True) - 60)
    torch.testing.assert_close(sinkhorn(logits, 20), unrolled_sinkhorn(floored, 20), rtol=0, atol=1e-14)


# ------------------------------------------------------------------ one block

def block_pair(n: int, block: str, gate: float, native: bool = True) -> tuple[Residual, MHCResidual]:
    """A plain residual block and an mHC block wrapping the very same sub-layer (and, for
    ligr, the very same LiGR gate, drawn at random so that it varies by token and channel)."""
    torch.manual_seed(0)
    sublayer = FeedForward(16, 0.0)
    cfg = model_config(n, block, mhc_init_gate=gate, mhc_native=native)
    plain, mhc = Residual(sublayer, 16, block), MHCResidual(sublayer, cfg)
    if block == "ligr":
        with torch.no_grad():
            plain.gate.weight.normal_(0, 0.5)
            plain.gate.bias.normal_()
        mhc.gate = plain.gate
    return plain, mhc


def check_path(block: MHCResidual, x: torch.Tensor, native: bool) -> None:
    """The block takes the path a test names (the compiled kernel needs a C compiler)."""
    if native and native_kernels.library(x.dtype, block.n) is None:
        pytest.skip("no C compiler for the mHC kernel")
    assert block.runs_native(x) == native


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("order", ["post", "pre", "ligr"])
@pytest.mark.parametrize("n", [2, 4])
def test_block_equals_the_definition_token_by_token(n, order, native):
    """The block on distinct streams with random coefficient parameters equals the paper's
    formula evaluated one token at a time in float64: RMSNorm of the flattened streams,
    H̃ = α·(x⃗'φ) + b, H_pre = σ, H_post = 2σ, H_res = Sinkhorn (unrolled), then
    H_res·x + H_postᵀ·F(H_pre·x), with the LayerNorm where each order puts it, and for ligr
    F's output times the gate σ(W_g·H_pre·x + b_g). Both the compiled CPU kernel and the
    PyTorch path (what CUDA runs)."""
    _, block = block_pair(n, order, 0.01, native)
    block = block.double()
    with torch.no_grad():
        block.alpha.copy_(torch.tensor([0.7, 1.3, 1.0]))
        block.static.normal_()
    x = torch.randn(2, 5, n, 16, dtype=torch.float64)
    check_path(block, x, native)
    out = block(x, NO_CONTEXT)
    phi, alpha, static = block.phi.detach(), block.alpha.detach(), block.static.detach()
    scale = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])
    with torch.no_grad():
        for b in range(2):
            for t in range(5):
                streams = x[b, t]  # [n, C]
                flat = streams.flatten()
                logits = scale * ((flat / (flat.square().mean() + 1e-6).sqrt()) @ phi) + static
                h_pre, h_post = torch.sigmoid(logits[:n]), 2 * torch.sigmoid(logits[n:2 * n])
                h_res = unrolled_sinkhorn(logits[2 * n:].view(n, n), block.iters)
                branch = h_pre @ streams
                f = block.sublayer(branch if order == "post" else block.norm(branch), NO_CONTEXT)
                if order == "ligr":
                    f = torch.sigmoid(block.gate.weight @ branch + block.gate.bias) * f
                expected = h_res @ streams + h_post[:, None] * f[None, :]
                if order == "post":
                    expected = block.norm(expected)
                torch.testing.assert_close(out[b, t], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", RATES)
def test_coefficient_ranges(n):
    _, block = block_pair(n, "post", 0.01)
    with torch.no_grad():
        block.alpha.fill_(2.0)  # logits of a few units: the maps, not the biases, bound the values
    x = torch.randn(4, 6, n, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_pre, h_post, h_res = block.coefficients(x.bfloat16())
    assert {h_pre.dtype, h_post.dtype, h_res.dtype} == {torch.float32}
    assert h_pre.shape == h_post.shape == (4, 6, n) and h_res.shape == (4, 6, n, n)
    assert ((h_pre > 0) & (h_pre < 1)).all() and ((h_post > 0) & (h_post < 2)).all()
    assert (h_post > 1).any()  # 2 sigmoid: a plain sigmoid would also stay inside (0, 2)
    assert (h_res >= 0).all() and torch.allclose(h_res.sum(-1), torch.ones(()), atol=1e-5)
    # Columns: see the Sinkhorn tests (near-permutation matrices, as here, converge slowly).


@pytest.mark.parametrize("native", [True, False])
def test_block_backward_gradcheck(native):
    """The whole block in float64: the hand-written backwards (the compiled kernel's, or
    the RMS-normalised projection's and Sinkhorn's) together with everything autograd
    does around them."""
    _, block = block_pair(3, "pre", 0.5, native)
    block = block.double()
    x = torch.randn(2, 3, 3, 16, dtype=torch.float64, requires_grad=True)
    check_path(block, x, native)
    params = {name: p.detach().clone().requires_grad_() for name, p in block.named_parameters()
              if name in ("phi", "alpha", "static")}

    def run(x, phi, alpha, static):
        return functional_call(block, {"phi": phi, "alpha": alpha, "static": static}, (x, NO_CONTEXT))

    assert torch.autograd.gradcheck(run, (x, params["phi"], params["alpha"], params["static"]), fast_mode=True)


@pytest.mark.parametrize("k", ["all", "gates"])
def test_logits_backward_gradcheck(k):
    """The PyTorch path's coefficient logits (RMS norm, projection, α, b) and their
    hand-written backward, for all 2n + n² columns and for the first 2n (the widening block,
    whose α_res gradient is exactly 0)."""
    n, dim = 3, 5
    g = torch.Generator().manual_seed(0)
    columns = 2 * n + n * n if k == "all" else 2 * n
    inputs = [torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()
              for shape in [(7, n * dim), (n * dim, columns), (3,), (columns,)]]
    assert torch.autograd.gradcheck(lambda *args: _Logits.apply(*args, n), inputs)
    if k == "gates":
        _Logits.apply(*inputs, n).sum().backward()
        assert inputs[2].grad[2] == 0


def test_update_backward_gradcheck():
    """res + gain·h ⊗ out (the H_post update) and its two-product backward, with a stride-0
    res as the widening block passes (n copies of one stream)."""
    g = torch.Generator().manual_seed(0)
    res, h, out = (torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()
                   for shape in [(2, 3, 1, 5), (2, 3, 4), (2, 3, 5)])
    assert torch.autograd.gradcheck(lambda r, h, o: _Update.apply(r.expand(2, 3, 4, 5), h, o, 2.0), (res, h, out))


class _Same(nn.Module):
    """A sub-layer of no ops of its own: op counts are then the mHC block's alone."""

    def forward(self, x: torch.Tensor, context: SequenceContext) -> torch.Tensor:
        return x


@pytest.mark.parametrize("order", ["post", "pre"])
def test_pytorch_path_op_count(order):
    """One forward + backward of an mHC block on the PyTorch path (what a GPU runs; there each
    non-view aten op is an eager kernel launch, and this model is bound by launches), counted:
    121 ops at 20 Sinkhorn iterations (431 before the log-domain Sinkhorn and the fused
    logits/update backwards; the widening block 42, before 62), no host sync. Sinkhorn costs
    exactly 4 ops per iteration: a log_softmax and its backward per normalisation."""
    counts = {}
    for widens in (False, True):
        for iters in (20, 5):
            cfg = model_config(4, order, mhc_native=False, mhc_sinkhorn_iter=iters)
            block = MHCResidual(_Same(), cfg, widens=widens)
            x = torch.randn(2, 12, 16) if widens else torch.randn(2, 12, 4, 16)
            x.requires_grad_()
            grad = torch.randn(2, 12, 4, 16)
            with count_ops() as c:
                block(x, NO_CONTEXT).backward(grad)
            assert c.syncs == 0
            counts[widens, iters] = c
    assert counts[False, 20].ops <= 121 and counts[True, 20].ops <= 42
    assert counts[False, 20].ops - counts[False, 5].ops == 4 * 15
    assert counts[True, 20].ops == counts[True, 5].ops  # no Sinkhorn
    by_op = counts[False, 20].by_op
    assert by_op["_log_softmax"] == by_op["_log_softmax_backward_data"] == 2 * 20 - 1
    assert by_op["_softmax"] == by_op["_softmax_backward_data"] == 1


class _DtypeRecorder(TorchDispatchMode):
    """(op name, dtypes of its tensor arguments) of every op run."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
        self.seen.append((func.overloadpacket.__name__, dtypes))
        return func(*args, **(kwargs or {}))


def test_coefficients_and_sinkhorn_run_in_fp32_under_bf16_autocast():
    """On the PyTorch path under bf16 autocast, every op of the coefficients (norm,
    projection, gates) and of Sinkhorn, forward and backward, sees only fp32 tensors; the
    mixing product runs in bf16 (test_bf16_autocast_is_finite)."""
    _, block = block_pair(4, "post", 0.5, native=False)
    x = torch.randn(2, 12, 4, 16, requires_grad=True)
    watched = {"linalg_vector_norm", "rsqrt_", "mv", "sigmoid", "sigmoid_backward", "amax", "threshold",
               "_log_softmax", "_log_softmax_backward_data", "_softmax", "_softmax_backward_data"}
    with _DtypeRecorder() as recorder:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x, NO_CONTEXT)
        out.float().square().sum().backward()
    ops = [(name, dtypes) for name, dtypes in recorder.seen if name in watched]
    assert {name for name, _ in ops} == watched
    assert all(dtypes == {torch.float32} for _, dtypes in ops), [op for op in ops if op[1] != {torch.float32}]
    assert {torch.bfloat16} in [dtypes for name, dtypes in recorder.seen if name == "bmm"]


def test_pytorch_path_compiles_as_one_graph():
    """torch.compile(fullgraph=True) traces a whole mHC model on the PyTorch path (a graph
    break raises), forward and backward, with the same loss and gradients as eager. Backend
    aot_eager: Dynamo's trace and AOTAutograd's joint graph, without inductor's codegen."""
    torch.manual_seed(0)
    cfg = model_config(4, "post", mhc_native=False, mhc_init_gate=0.5, num_blocks=1, maxlen=6, hidden_units=8)
    model = SASRec(cfg, NUM_ITEMS)
    items = left_padded([6, 4], maxlen=6)
    weights = torch.randn(2, 6, 8)

    def loss(items):
        return (model({"items": items}) * weights).sum()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(items)
        compiled.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        eager = loss(items)
        eager.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("order", ["post", "pre", "ligr"])
@pytest.mark.parametrize("n", RATES)
def test_block_matches_plain_residual_at_init(n, order):
    """Fed n identical copies (the stream the first block widens), every output stream
    equals the plain block's output: exactly (float rounding) with α = 0, which tests
    the bias derivation, and to first order in α = 0.01 at the default initialisation.

    n = 1 post-LN is off by 1e-3 even at α = 0: sigmoid cannot reach H_pre = 1, the bias
    gives 0.999, which scales F's input (pre-LN's LayerNorm removes the scale, but not from
    the input of LiGR's gate).
    """
    x = torch.randn(3, 7, 16)
    for gate, tol in ((0.0, 2e-3 if n == 1 and order != "pre" else 1e-5), (0.01, 2e-2)):
        plain, block = block_pair(n, order, gate)
        expected = plain(x, NO_CONTEXT)
        out = block(copies(x, n), NO_CONTEXT)
        assert out.shape == (3, 7, n, 16)
        for stream in out.unbind(-2):
            assert (stream - expected).norm() / expected.norm() < tol


# ------------------------------------------------------------------ whole model

@pytest.mark.parametrize("order", ["post", "pre", "ligr"])
@pytest.mark.parametrize("n", RATES)
def test_sasrec_matches_plain_at_init_for_every_rate(n, order):
    """Tolerance 2e-2 relative: the α = 0.01 perturbations enter to first order, through
    four blocks (measured ≤ 5e-3)."""
    plain, mhc = plain_and_mhc(model_config(n, order))
    items = left_padded([12, 9, 5, 1])
    expected, out = plain({"items": items}), mhc({"items": items})
    assert out.shape == expected.shape == (4, 12, 16)
    assert (out - expected).norm() / expected.norm() < 2e-2


@pytest.mark.parametrize("order", ["post", "pre", "ligr"])
def test_tisasrec_with_mhc_matches_plain_at_init(order):
    """TiSASRec shares SASRec's stream strategy, so it gets the mHC residual unchanged."""
    plain, mhc = plain_and_mhc(model_config(4, order, time=True, time_span=6, time_unit="minute"), TiSASRec)
    items = left_padded([12, 9, 5])
    times = (1_600_000_000 + torch.randint(0, 240, items.shape).cumsum(1)) * (items != 0)
    expected, out = plain({"items": items, "times": times}), mhc({"items": items, "times": times})
    assert (out - expected).norm() / expected.norm() < 2e-2
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mhc.parameters())


def test_composite_gain():
    """At init the product of near-identity doubly stochastic H_res has gain ≈ 1 (rows
    exactly: the last Sinkhorn step normalises rows); the model's mode is restored."""
    _, mhc = plain_and_mhc(model_config(4))
    mhc.train()
    gain = composite_gain(mhc, {"items": left_padded([12, 9, 5, 1])})
    assert mhc.training
    assert set(gain) == {"mhc/gain_row", "mhc/gain_col"}
    assert abs(gain["mhc/gain_row"] - 1) < 1e-5 and abs(gain["mhc/gain_col"] - 1) < 1e-2
    with torch.no_grad():  # strongly token-dependent H_res: columns off by Sinkhorn's error only
        for layer in mhc.layers:
            layer.alpha.fill_(1.0)
    gain = composite_gain(mhc, {"items": left_padded([12, 9, 5, 1])})
    assert abs(gain["mhc/gain_row"] - 1) < 1e-5 and gain["mhc/gain_col"] < 1.1


@pytest.mark.parametrize("model_cls", [SASRec, TiSASRec])
def test_composite_gain_reads_only_real_tokens(model_cls):
    """The gain of a padded batch is the largest of its rows' gains, each row cut to its own
    history (no padding at all): padded tokens (which SASRec's layers see rotated to the end
    of a row) never count."""
    _, model = plain_and_mhc(model_config(4, time=model_cls is TiSASRec), model_cls)
    with torch.no_grad():  # strongly token-dependent H_res
        for layer in model.layers:
            layer.alpha.fill_(1.0)
    items = left_padded([9, 5, 2])  # every row padded (a full row would hold the maximum here)
    times = (1_600_000_000 + torch.randint(0, 240, items.shape).cumsum(1)) * (items != 0)
    lengths = (items != 0).sum(1).tolist()
    rows = [composite_gain(model, {"items": items[r:r + 1, -n:], "times": times[r:r + 1, -n:]})
            for r, n in enumerate(lengths)]
    gain = composite_gain(model, {"items": items, "times": times})
    for key in gain:
        assert gain[key] == pytest.approx(max(row[key] for row in rows), abs=1e-6)


def test_only_the_first_sub_layer_widens_and_collapse_starts_as_the_mean():
    model = SASRec(model_config(4), NUM_ITEMS)
    assert [layer.widens for layer in model.layers] == [True, False, False, False]
    x = torch.randn(2, 5, 16)
    assert torch.allclose(model.stream.collapse(copies(x, 4)), x, atol=1e-6)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("order", ["post", "pre", "ligr"])
@pytest.mark.parametrize("n", RATES)
def test_widening_equals_the_block_on_n_copies(n, order, native):
    """The first block's shortcut (`widen`: no Sinkhorn, no mixing, coefficients from one
    copy) against the full computation on the n copies, float64, random coefficient
    parameters: the same output and the same gradients of the input and every parameter.
    The full computation's H_res gradients are rounding noise (rows of every H_res sum to
    1, so H_res·copies does not depend on it); the shortcut's are exactly 0."""
    _, full = block_pair(n, order, 0.5, native)
    full = full.double()
    with torch.no_grad():
        full.static.normal_()
    wide = MHCResidual(full.sublayer, model_config(n, order, mhc_native=native), widens=True).double()
    wide.load_state_dict(full.state_dict())
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    check_path(full, x, native)
    weights = torch.randn(3, 7, n, 16, dtype=torch.float64)
    results = []
    for block, streams in ((full, copies(x, n)), (wide, x)):
        out = block(streams, NO_CONTEXT)
        grads = torch.autograd.grad((out * weights).sum(), [x, *block.parameters()])
        results.append((out, *grads))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    shortcut = dict(zip([name for name, _ in wide.named_parameters()], results[1][2:]))
    assert not shortcut["phi"][:, 2 * n:].any() and not shortcut["static"][2 * n:].any() and shortcut["alpha"][2] == 0


@pytest.mark.parametrize("order", ["post", "pre", "ligr"])
def test_gradients_reach_every_mhc_parameter(order):
    """Every parameter gets a finite, non-zero gradient. The first block's H_res part is
    the exception by construction: its input is n identical copies, which any row
    stochastic H_res maps to themselves, so it gets exactly 0 (the block never computes
    H_res: `widen`). Later blocks see streams that differ by O(α) and get ~1e-6 at
    initialisation."""
    _, mhc = plain_and_mhc(model_config(4, order))
    mhc.train()
    bce(mhc, left_padded([12, 9, 5])).backward()
    for name, p in mhc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    res_grads = [layer.static.grad[2 * 4:].abs().sum() + layer.phi.grad[:, 2 * 4:].abs().sum()
                 for layer in mhc.layers]
    assert res_grads[0] == 0 and min(res_grads[1:]) > 1e-8


@pytest.mark.parametrize("no_amp", [False, True])
@pytest.mark.parametrize("order", ["post", "pre", "ligr"])
def test_bf16_autocast_is_finite(order, no_amp, monkeypatch):
    """Finite under bf16 autocast; the stream stays fp32 in both modes (the H_post update
    promotes), and the mixing product H·x runs in bf16 unless --mhc_no_amp keeps it fp32.
    On the PyTorch path, whose einsum can be watched (the compiled kernel under
    --mhc_no_amp: tests/test_mhc_native.py)."""
    torch.manual_seed(0)
    model = SASRec(model_config(4, order, dropout_rate=0.2, mhc_no_amp=no_amp, mhc_native=False),
                   NUM_ITEMS).train()
    streams, mixing = [], []
    einsum = torch.einsum

    def recording_einsum(*args):
        out = einsum(*args)
        mixing.append(out.dtype)
        return out

    monkeypatch.setattr(torch, "einsum", recording_einsum)
    hooks = [layer.register_forward_hook(lambda m, args, out: streams.append(out.dtype)) for layer in model.layers]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bce(model, left_padded([12, 9, 5]))
    loss.backward()
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert set(streams) == {torch.float32}
    # the widening block has no mixing product
    assert len(mixing) == len(model.layers) - 1 and set(mixing) == {torch.float32 if no_amp else torch.bfloat16}


@pytest.mark.parametrize("order", ["post", "pre"])
def test_a_few_adam_steps_reduce_the_loss(order):
    torch.manual_seed(0)
    model = SASRec(model_config(4, order), NUM_ITEMS).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    items = left_padded([12, 10, 8, 12, 6, 11])
    losses = []
    for _ in range(15):
        loss = bce(model, items)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("time", [False, True])
def test_demo_run_with_mhc_logs_composite_gain(tmp_path, time):
    import json

    from conftest import REPO, small_config
    from seqrec.cli import run
    cfg = small_config(REPO / "data" / "demo.txt", tmp_path / "r", train__num_epochs=2, train__batch_size=256,
                       model__mhc=True, model__time=time, model__maxlen=30)
    results = run(cfg)
    assert 0 < results["test"]["sampled/NDCG@10"] < 1
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    gains = [r["mhc/gain_row"] for r in rows if r["type"] == "valid"]
    assert len(gains) == 2 and all(0.5 < g < 2.0 for g in gains)
