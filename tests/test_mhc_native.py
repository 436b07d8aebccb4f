"""The compiled CPU kernel for mHC (seqrec/models/native.py, mhc_kernels.c): its hand-written
backward against finite differences, its outputs and gradients against the PyTorch path
(what CUDA and autocast run) in whole models split over threads, the fallback without a
compiler, the pointer checks that keep a wrong tensor from being read past its end, and
failed allocations inside the kernel.
The block against the paper's formula token by token: tests/test_mhc.py."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from seqrec.config import ModelConfig
from seqrec.models import native
from seqrec.models.attention import SequenceContext
from seqrec.models.blocks import FeedForward
from seqrec.models.mhc import HyperStream, MHCResidual
from seqrec.models.sasrec import SASRec
from seqrec.models.tisasrec import TiSASRec

pytestmark = pytest.mark.skipif(native.library(torch.float64, 2) is None or native.library(torch.float32, 2) is None,
                                reason="no C compiler for the mHC kernel")
NUM_ITEMS = 50


def coefficient_parameters(n: int, dim: int, spread: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    """phi, alpha, bias in float64 with logits of a few units; `spread` scales the H_res
    biases (60+ puts some Sinkhorn entries on the exp floor)."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n * dim, 2 * n + n * n, generator=g, dtype=torch.float64) / (n * dim) ** 0.5
    alpha = torch.tensor([0.7, 1.3, 1.1], dtype=torch.float64)
    bias = torch.randn(2 * n + n * n, generator=g, dtype=torch.float64)
    bias[2 * n:] *= spread
    return [phi, alpha, bias]


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_kernel_gradcheck(n):
    """19 tokens: one full block of 16 and a partial one, whose unused lanes must not leak."""
    x = torch.randn(19, n, 3, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in [x, *coefficient_parameters(n, 3)]]
    assert torch.autograd.gradcheck(lambda *args: native.PreMix.apply(*args, 20), inputs)


def test_kernel_gradcheck_with_one_iteration():
    """The fewest iterations the config allows: the per-column max shift, treated as a
    constant, is exactly removed by the first column normalisation."""
    inputs = [t.requires_grad_() for t in [torch.randn(5, 3, 4, dtype=torch.float64), *coefficient_parameters(3, 4)]]
    assert torch.autograd.gradcheck(lambda *args: native.PreMix.apply(*args, 1), inputs)


def pytorch_block(n: int, dim: int, params: list[torch.Tensor], iters: int = 20) -> MHCResidual:
    cfg = ModelConfig(hidden_units=dim, mhc_expansion_rate=n, mhc_sinkhorn_iter=iters, mhc_native=False)
    block = MHCResidual(FeedForward(dim, 0.0), cfg).double()
    with torch.no_grad():
        for target, value in zip((block.phi, block.alpha, block.static), params):
            target.copy_(value)
    return block


def premix(block: MHCResidual, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H_res·x, H_pre·x, H_post) as the block computes them before its sub-layer, on the
    path it takes for x."""
    res, branch, h, gain = block.mix(x, block.runs_native(x))
    return res, branch, gain * h


@pytest.mark.parametrize("spread", [1.0, 80.0])
def test_kernel_equals_the_pytorch_path(spread):
    """Outputs and gradients of (H_res·x, H_pre·x, H_post) equal MHCResidual.mix on PyTorch
    ops (its twin), including Sinkhorn entries floored at exp(-60) (spread 80), which get no gradient."""
    n, dim = 4, 5
    params = coefficient_parameters(n, dim, spread)
    block = pytorch_block(n, dim, params)
    x = torch.randn(2, 21, n, dim, dtype=torch.float64, requires_grad=True)
    assert not block.runs_native(x)
    expected = premix(block, x)
    leaves = [t.requires_grad_() for t in params]
    got = native.PreMix.apply(x, *leaves, 20)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grads = [torch.randn_like(t) for t in expected]
    wanted = torch.autograd.grad(expected, [x, block.phi, block.alpha, block.static], grads)
    for a, b in zip(torch.autograd.grad(got, [x, *leaves], grads), wanted):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def post_inputs(tokens: int, n: int, dim: int) -> list[torch.Tensor]:
    """res, h_post, f, LayerNorm weight and bias in float64, all requiring gradients."""
    g = torch.Generator().manual_seed(2)
    shapes = [(tokens, n, dim), (tokens, n), (tokens, dim), (dim,), (dim,)]
    return [torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_() for shape in shapes]


@pytest.mark.parametrize("n", [1, 4])
def test_post_kernel_gradcheck(n):
    assert torch.autograd.gradcheck(lambda *args: native.PostNorm.apply(*args, 1e-8), post_inputs(7, n, 5))


def test_post_kernel_equals_the_pytorch_path():
    """LayerNorm(res + h_post ⊗ f) stream-wise, as MHCResidual's post-LN path computes it."""
    inputs = post_inputs(37, 4, 6)
    res, h_post, f, weight, bias = inputs
    expected = torch.nn.functional.layer_norm(torch.addcmul(res, h_post[..., None], f[:, None, :]), (6,),
                                              weight, bias, 1e-8)
    got = native.PostNorm.apply(*inputs, 1e-8)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_post_kernel_without_gradients_gives_the_same_output():
    """Evaluation writes no statistics (a NULL buffer to the kernel) and keeps no tensors."""
    inputs = post_inputs(37, 4, 6)
    assert torch.equal(native.PostNorm.apply(*inputs, 1e-8, False), native.PostNorm.apply(*inputs, 1e-8))


@pytest.mark.parametrize("n", [1, 3])
def test_collapse_kernel_gradcheck(n):
    x, weights = torch.randn(2, 9, n, 5, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    assert torch.autograd.gradcheck(native.Collapse.apply, [x.requires_grad_(), weights.requires_grad_()])


def test_collapse_kernel_equals_the_pytorch_path():
    """HyperStream.collapse on the kernel (two threads' token ranges) and on PyTorch ops."""
    streams = [HyperStream(ModelConfig(hidden_units=6, mhc_expansion_rate=4, mhc_native=flag)).double()
               for flag in (True, False)]
    weights = torch.randn(4, dtype=torch.float64)
    x = torch.randn(3, 70, 4, 6, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 70, 6, dtype=torch.float64)
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for stream in streams:
            with torch.no_grad():
                stream.weights.copy_(weights)
            out = stream.collapse(x)
            results.append((out, *torch.autograd.grad(out, [x, stream.weights], grad)))
    finally:
        torch.set_num_threads(threads)
    assert type(results[0][0].grad_fn).__name__ == "CollapseBackward"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", ["post", "pre"])
@pytest.mark.parametrize("model_cls", [SASRec, TiSASRec])
def test_models_on_the_kernel_equal_the_pytorch_path(model_cls, block):
    """A whole model, forward and backward, with the kernel split over two threads (5,120
    tokens: two token ranges) and without it. float64: same hidden states and gradients to
    1e-9. float32: same hidden states to float32 rounding; its gradients are not compared,
    because the final LayerNorm makes some (the collapse weights, the embeddings) sums
    that cancel to below float32 rounding: there both paths differ from float64 by more
    than the gradient itself (measured), so neither can be the other's reference."""
    cfg = ModelConfig(maxlen=128, hidden_units=16, num_heads=2, num_blocks=2, dropout_rate=0.0,
                      block=block, time=model_cls is TiSASRec, time_unit="second", time_span=20,
                      mhc=True, mhc_init_gate=0.3)
    torch.manual_seed(0)
    models = [model_cls(dataclasses.replace(cfg, mhc_native=flag), NUM_ITEMS) for flag in (True, False)]
    models[1].load_state_dict(models[0].state_dict())
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 129, (40,), generator=g)
    items = torch.randint(1, NUM_ITEMS + 1, (40, 128), generator=g)
    items = items.masked_fill(torch.arange(128) < 128 - lengths[:, None], 0)
    batch = {"items": items, "times": torch.cumsum(torch.randint(0, 5, (40, 128), generator=g), 1)}

    def run(model: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.to(dtype).zero_grad()
        assert model.layers[0].runs_native(torch.zeros((), dtype=dtype)) == model.layers[0].native
        hidden = model(batch)[items != 0]
        hidden.square().sum().backward()
        return hidden, {name: p.grad for name, p in model.named_parameters()}

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert native.threads_for(40 * 128) == 2
        (kernel, kernel_grads), (pytorch, pytorch_grads) = (run(model, torch.float64) for model in models)
        torch.testing.assert_close(kernel, pytorch, rtol=1e-9, atol=1e-9)
        for name, grad in kernel_grads.items():
            torch.testing.assert_close(grad, pytorch_grads[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda m, name=name: f"{name}: {m}")
        (kernel, kernel_grads), (pytorch, _) = (run(model, torch.float32) for model in models)
        torch.testing.assert_close(kernel, pytorch, rtol=1e-4, atol=1e-4)
        assert all(torch.isfinite(grad).all() for grad in kernel_grads.values())
    finally:
        torch.set_num_threads(threads)


def test_no_amp_under_autocast_runs_the_kernel():
    """--mhc_no_amp keeps all of mHC in fp32, which is what the kernel computes, so it runs
    under bf16 autocast too (and equals the PyTorch path's fp32 result); without the flag
    the mixing belongs to autocast and the PyTorch path runs it in bf16."""
    n, dim = 4, 8
    params = coefficient_parameters(n, dim)
    blocks = []
    for flag in (True, False):
        cfg = ModelConfig(hidden_units=dim, mhc_expansion_rate=n, mhc_no_amp=True, mhc_native=flag)
        block = MHCResidual(FeedForward(dim, 0.0), cfg)
        with torch.no_grad():
            for target, value in zip((block.phi, block.alpha, block.static), params):
                target.copy_(value)
        blocks.append(block)
    x = torch.randn(3, 7, n, dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert blocks[0].runs_native(x) and not blocks[1].runs_native(x)
        results = [premix(block, x) for block in blocks]
        blocks[0].no_amp = False
        assert not blocks[0].runs_native(x)
    for a, b in zip(*results):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_without_a_compiler_the_pytorch_path_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SEQREC_CACHE_DIR", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no compiled CPU kernel"):
            assert native.library(torch.float32, 2) is None
        torch.manual_seed(0)
        block = MHCResidual(FeedForward(8, 0.0), ModelConfig(hidden_units=8, mhc_expansion_rate=2))
        torch.manual_seed(0)
        reference = MHCResidual(FeedForward(8, 0.0), ModelConfig(hidden_units=8, mhc_expansion_rate=2,
                                                                 mhc_native=False))
        x = torch.randn(2, 3, 2, 8)
        assert not block.runs_native(x)
        torch.testing.assert_close(block(x, SequenceContext()), reference(x, SequenceContext()))
    finally:
        native.library.cache_clear()


def test_a_compiled_kernel_is_reused(monkeypatch, tmp_path):
    """The second build of the same source finds the cached library instead of compiling."""
    monkeypatch.setenv("SEQREC_CACHE_DIR", str(tmp_path))
    first = native.build("float", 2)
    stamp = first.stat().st_mtime_ns
    assert native.build("float", 2) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def test_wrong_tensors_are_refused_before_the_kernel_sees_them():
    lib = native.library(torch.float32, 2)
    good = torch.zeros(16, 8)
    for bad in (good.double(), good.t(), torch.zeros(16, 8, dtype=torch.bfloat16)):
        with pytest.raises(TypeError, match="contiguous CPU torch.float32"):
            native.run(lib.mhc_pre_forward, 1, 1, torch.float32, 2, 20, good, bad)


def test_an_empty_micro_batch_runs_both_ways():
    """A rank with no rows still runs one empty micro-batch to join DDP's all-reduce."""
    x, params = torch.randn(0, 7, 4, 5, dtype=torch.float64), coefficient_parameters(4, 5)
    inputs = [t.requires_grad_() for t in [x, *params]]
    outputs = native.PreMix.apply(*inputs, 20)
    assert [tuple(o.shape) for o in outputs] == [(0, 7, 4, 5), (0, 7, 5), (0, 7, 4)]
    grads = torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs])
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, inputs))
    res, h_post, f, weight, bias = post_inputs(0, 4, 5)
    out = native.PostNorm.apply(res, h_post, f, weight, bias, 1e-8)
    out.sum().backward()
    assert out.shape == (0, 4, 5) and not weight.grad.any() and not bias.grad.any()


@pytest.mark.skipif(not Path("/proc/sys/vm/overcommit_memory").exists()
                    or Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1",
                    reason="needs Linux refusing an allocation larger than memory")
def test_the_kernel_reports_a_failed_scratch_allocation():
    """The Sinkhorn backward's scratch is 2·iters·n·16 reals per thread: at 2^31 - 1
    iterations (~550 GB) malloc fails and the kernel returns 1. No tokens, so had the
    allocation succeeded there would be nothing to compute (0, and this test fails)."""
    lib = native.library(torch.float64, 2)
    x, raw, bias = (torch.zeros(*shape, dtype=torch.float64) for shape in [(0, 2, 3), (8, 0), (8,)])
    tensors = [x, raw, bias[:3], bias, x, x[:, 0], x[:, :, 0], x, raw, bias[:3], bias]  # as PreMix.backward passes
    assert native.run(lib.mhc_pre_backward, 0, 1, torch.float64, 3, 2**31 - 1, *tensors) == 1


@pytest.mark.parametrize("function", ["pre", "post"])
def test_a_failed_kernel_allocation_raises_memory_error(function, monkeypatch):
    """The backwards turn the kernel's failure flag into MemoryError instead of returning
    unset gradients."""
    real = native.library(torch.float64, 2)

    class Failing:  # the real forwards; the backwards report a failed allocation
        mhc_pre_forward, mhc_post_forward = real.mhc_pre_forward, real.mhc_post_forward
        mhc_pre_backward = mhc_post_backward = staticmethod(lambda *args: 1)

    monkeypatch.setattr(native, "library", lambda dtype, streams: Failing)
    if function == "pre":
        inputs = [t.requires_grad_() for t in [torch.randn(3, 2, 5, dtype=torch.float64),
                                               *coefficient_parameters(2, 5)]]
        outputs = native.PreMix.apply(*inputs, 20)
    else:
        outputs = (native.PostNorm.apply(*post_inputs(3, 2, 5), 1e-8),)
    with pytest.raises(MemoryError, match="mHC kernel: no memory"):
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
