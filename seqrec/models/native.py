"""Compiled CPU kernels for mHC's per-token work (mhc_kernels.c), loaded through ctypes.

At d=50 the mHC coefficients, Sinkhorn and stream mixing are ~100 small PyTorch ops per
sub-layer over every token; on CPU their launches and intermediates cost as much as the
sub-layers themselves (docs/PERFORMANCE.md § mHC overhead). A small C kernel that does a
token's work in registers removes that (and the post-LN update after the sub-layer). It
needs no PyTorch headers, so it compiles in about a second with the system C compiler
(`$CC`, default `cc`) on first use for each dtype and expansion rate, and is cached per
source, flags and CPU under `$SEQREC_CACHE_DIR` (default ~/.cache/seqrec). Without a
compiler `library` returns None and MHCResidual keeps its PyTorch path.

What mhc.py uses: `supports` (can the kernels take this stream?) and three autograd
Functions, each with a PyTorch twin in mhc.py that is its reference (tests/test_mhc_native.py)
and the path everywhere else (GPU, low-precision autocast, tracing, torch.compile):
PreMix (MHCResidual._mix), PostNorm (the H_post update, then the LayerNorm) and Collapse
(HyperStream.collapse's weighted sum).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .mhc_ops import full_precision

SOURCE = importlib.resources.files("seqrec.models") / "mhc_kernels.c"  # package data, compiled from a real file
# -march=native: the cache key includes the CPU. The reassociation flags let gcc vectorise
# the kernel's dot products (their rounding differs from PyTorch's at float epsilon).
# -fopenmp links libgomp.so.1, which resolves to the copy PyTorch has loaded (same soname),
# so the kernel's threads are PyTorch's; a compiler without OpenMP builds a serial kernel.
FLAGS = ["-O3", "-march=native", "-std=c11", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
         "-fno-signed-zeros", "-fassociative-math", "-ffp-contract=fast"]
OPENMP = ["-fopenmp"]
REALS = {torch.float32: "float", torch.float64: "double"}
MIN_TOKENS_PER_THREAD = 64  # measured: 2 threads already halve a 128-token call (48 -> 29 us)


def _cpu_name() -> str:
    """What -march=native compiles for: the CPU model and its feature flags (a cache shared
    between machines must not hand one CPU's build to another)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def build(real: str, streams: int) -> Path:
    """The shared library for one element type and expansion rate, compiled unless already
    cached; written to a temporary name and renamed, so ranks compiling at once never load a
    partial file."""
    compiler = os.environ.get("CC", "cc")
    flags = [*FLAGS, f"-DREAL={real}", f"-DSTREAMS={streams}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *flags, _cpu_name()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SEQREC_CACHE_DIR", Path.home() / ".cache" / "seqrec"))
    target = cache / f"mhc_kernels_{real}_n{streams}_{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        try:
            with importlib.resources.as_file(SOURCE) as source:  # a temporary copy if zipped
                command = [compiler, *flags, str(source), "-o", str(partial), "-lm"]
                try:
                    subprocess.run([*command, *OPENMP], check=True, capture_output=True, text=True)
                except subprocess.CalledProcessError:
                    subprocess.run(command, check=True, capture_output=True, text=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


@functools.cache
def library(dtype: torch.dtype, streams: int) -> ctypes.CDLL | None:
    """The kernels for float32 or float64 tensors with `streams` residual streams, or None
    (with one warning) when they cannot be built here."""
    try:
        lib = ctypes.CDLL(str(build(REALS[dtype], streams)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None) or err
        warnings.warn(f"mHC: no compiled CPU kernel ({str(detail).strip()[:200]}); using the PyTorch path",
                      RuntimeWarning, stacklevel=2)
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mhc_pre_forward.argtypes = [i64, i32, i32, i32] + [pointer] * 7
    lib.mhc_pre_backward.argtypes = [i64, i32, i32, i32] + [pointer] * 11
    lib.mhc_post_forward.argtypes = [i64, i32, i32, ctypes.c_double] + [pointer] * 7
    lib.mhc_post_backward.argtypes = [i64, i32, i32] + [pointer] * 11
    lib.mhc_collapse_forward.argtypes = [i64, i32, i32] + [pointer] * 3
    lib.mhc_collapse_backward.argtypes = [i64, i32, i32] + [pointer] * 5
    lib.mhc_pre_backward.restype = lib.mhc_post_backward.restype = i32
    return lib


def supports(x: torch.Tensor, weights: torch.Tensor, streams: int) -> bool:
    """Whether the kernels can take x with `weights` (the parameters it meets there): float32
    or float64 CPU tensors of one dtype, outside tracing and torch.compile (neither can see
    into a ctypes call), with the library built here."""
    return (x.device.type == "cpu" and x.dtype in REALS and x.dtype == weights.dtype and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and library(x.dtype, streams) is not None)


def threads_for(tokens: int) -> int:
    """PyTorch's thread count, fewer when each thread would get little work."""
    return max(1, min(torch.get_num_threads(), tokens // MIN_TOKENS_PER_THREAD))


def run(function, tokens: int, threads: int, dtype: torch.dtype, *args) -> int:
    """Call a kernel of `dtype` on `tokens` tokens split over `threads` threads; `args` are
    numbers and CPU tensors. The kernel sees raw pointers, so every tensor is checked to be
    contiguous and of `dtype` first: a wrong one would be read or written past its end."""
    values = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if arg.dtype != dtype or not arg.is_contiguous() or arg.is_cuda:
                raise TypeError(f"mHC kernel: expected contiguous CPU {dtype}, got {arg.dtype} {tuple(arg.shape)}")
            arg = arg.data_ptr()
        values.append(arg)
    return function(tokens, threads, *values)


class PreMix(torch.autograd.Function):
    """MHCResidual's work before its sub-layer, on the compiled kernel.

    x [..., n, C] -> (H_res·x [..., n, C], H_pre·x [..., C], H_post [..., n]), the
    coefficients computed from x with phi [nC, 2n+n²], alpha [3] and the static biases
    [2n+n²] exactly as MHCResidual.coefficients does. The GEMMs with phi (forward, and the
    backward's x and phi gradients) stay with PyTorch's BLAS; the kernel does the rest. x·phi
    and its gradient are tokens-last, [2n+n², T], the layout in which MKL runs the forward
    product fastest (n=4, d=50, 3,200 tokens, one thread, the two layouts' Functions
    alternating: forward 423 -> 398 ns/token, forward + backward 1,691 -> 1,658). The
    backward recomputes the coefficients per token, so only x and x·phi are saved.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor,
                iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        *lead, n, dim = x.shape
        x = x.contiguous()
        tokens = x.numel() // (n * dim)
        with full_precision(x):  # under autocast only with --mhc_no_amp: all of mHC in x's dtype
            raw = phi.t() @ x.view(tokens, n * dim).t()
        res, branch, h_post = torch.empty_like(x), x.new_empty(*lead, dim), x.new_empty(*lead, n)
        run(library(x.dtype, n).mhc_pre_forward, tokens, threads_for(tokens), x.dtype, dim, iters, x, raw,
            alpha.contiguous(), bias.contiguous(), res, branch, h_post)
        ctx.save_for_backward(x, phi, alpha, bias, raw)
        ctx.iters = iters
        return res, branch, h_post

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_res: torch.Tensor, g_branch: torch.Tensor, g_post: torch.Tensor):
        x, phi, alpha, bias, raw = ctx.saved_tensors
        n, dim = x.shape[-2:]
        tokens = raw.shape[1]
        threads = threads_for(tokens)
        g_x, g_raw = torch.empty_like(x), torch.empty_like(raw)
        g_alpha, g_bias = x.new_zeros(threads, 3), x.new_zeros(threads, raw.shape[0])
        grads = [g.to(x.dtype).contiguous() for g in (g_res, g_branch, g_post)]
        if run(library(x.dtype, n).mhc_pre_backward, tokens, threads, x.dtype, dim, ctx.iters, x, raw,
               alpha.contiguous(), bias.contiguous(), *grads, g_x, g_raw, g_alpha, g_bias):
            raise MemoryError("mHC kernel: no memory for the Sinkhorn backward's scratch")
        with full_precision(x):
            g_x.view(tokens, n * dim).addmm_(g_raw.t(), phi.t())
            g_phi = (g_raw @ x.view(tokens, n * dim)).t()
        return g_x, g_phi, g_alpha.sum(0), g_bias.sum(0), None


class PostNorm(torch.autograd.Function):
    """The post-LN update after the sub-layer on the compiled kernel: res [..., n, C],
    h_post [..., n], the sub-layer output f [..., C] -> LayerNorm(res + h_post ⊗ f) per
    stream (weight, bias [C], eps). One pass each way instead of the update's and
    LayerNorm's several. The forward allocates only its output: it keeps res and each
    stream's mean and 1/std ([..., n, 2]), and the backward recomputes the normalised
    values from them (a copy of them would be one more [..., n, C] tensor to allocate and
    write). `save=False` (evaluation; grad mode is always off inside forward, so the caller
    says) keeps nothing."""

    @staticmethod
    def forward(ctx, res: torch.Tensor, h_post: torch.Tensor, f: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, eps: float, save: bool = True) -> torch.Tensor:
        n, dim = res.shape[-2:]
        res, h_post, f = res.contiguous(), h_post.contiguous(), f.contiguous()
        tokens = h_post.numel() // n
        out = torch.empty_like(res)
        stats = res.new_empty(*h_post.shape, 2) if save else None
        run(library(res.dtype, n).mhc_post_forward, tokens, threads_for(tokens), res.dtype, dim, eps, res, h_post,
            f, weight.contiguous(), bias.contiguous(), out, stats)
        if save:
            ctx.save_for_backward(res, stats, h_post, f, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        res, stats, h_post, f, weight = ctx.saved_tensors
        n, dim = res.shape[-2:]
        tokens = h_post.numel() // n
        threads = threads_for(tokens)
        g_res, g_post, g_f = torch.empty_like(res), torch.empty_like(h_post), torch.empty_like(f)
        g_w, g_b = res.new_empty(threads, dim), res.new_empty(threads, dim)
        if run(library(res.dtype, n).mhc_post_backward, tokens, threads, res.dtype, dim, res, stats, h_post, f,
               weight.contiguous(), grad.to(res.dtype).contiguous(), g_res, g_post, g_f, g_w, g_b):
            raise MemoryError("mHC kernel: no memory for the post-LN backward's sums")
        return g_res, g_post, g_f, g_w.sum(0), g_b.sum(0), None, None


class Collapse(torch.autograd.Function):
    """HyperStream's collapse on the compiled kernel: x [..., n, C], weights [n] ->
    sum_k weights[k] x[..., k, :] in one pass (and one pass back)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        *lead, n, dim = x.shape
        x, weights = x.contiguous(), weights.contiguous()
        tokens = x.numel() // (n * dim)
        out = x.new_empty(*lead, dim)
        run(library(x.dtype, n).mhc_collapse_forward, tokens, threads_for(tokens), x.dtype, dim, x, weights, out)
        ctx.save_for_backward(x, weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weights = ctx.saved_tensors
        n, dim = x.shape[-2:]
        tokens = x.numel() // (n * dim)
        threads = threads_for(tokens)
        g_x, g_w = torch.empty_like(x), x.new_zeros(threads, n)
        run(library(x.dtype, n).mhc_collapse_backward, tokens, threads, x.dtype, dim, x, weights,
            grad.to(x.dtype).contiguous(), g_x, g_w)
        return g_x, g_w.sum(0)
