"""Shared pieces of the Numba CUDA kernels: streams, zero-copy views, the per-accumulator kernel
cache, block reductions and row statistics.

The simulator (NUMBA_ENABLE_CUDASIM=1) has no warp shuffles, so reductions go through shared
memory.  Block sizes are powers of two no larger than MAX_THREADS.
"""
import math

import numba
from numba import cuda

MAX_THREADS = 256


def torch_stream():
    """torch's current CUDA stream, as a Numba stream: our launches queue behind torch's work."""
    import torch

    return cuda.external_stream(torch.cuda.current_stream().cuda_stream)


def on_device(device):
    """Make `device` current for torch (streams) and for Numba (context) while launching."""
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.cuda.device(device))
    stack.enter_context(cuda.gpus[torch.device(device).index or 0])
    return stack


def as_array(t):
    """Zero-copy Numba view of a CUDA torch tensor (through __cuda_array_interface__)."""
    return cuda.as_cuda_array(t.detach(), sync=False)


def block_size(n, cap=MAX_THREADS):
    """The power of two >= min(n, cap), at least 32 (one warp)."""
    t = 32
    while t < n and t < cap:
        t *= 2
    return t


def accumulator(dtype):
    """fp64 accumulation for fp64 data, fp32 for fp32 and fp16 (DESIGN.md section 5)."""
    return numba.float64 if str(dtype) == "float64" else numba.float32


def make_block_sum(acc):
    """A device function summing one value per thread over the block, for accumulator `acc`.
    `red` is a shared array of MAX_THREADS accumulators; every thread gets the total."""

    @cuda.jit(device=True)
    def block_sum(red, val):
        tid = cuda.threadIdx.x
        red[tid] = val
        cuda.syncthreads()
        stride = cuda.blockDim.x // 2
        while stride > 0:
            if tid < stride:
                red[tid] += red[tid + stride]
            cuda.syncthreads()
            stride //= 2
        total = red[0]
        cuda.syncthreads()          # red is reused by the next call
        return total

    return block_sum


def per_accumulator(build):
    """Decorator for a family's kernel builder: `build(acc)` defines the kernels for one
    accumulator type and runs once per accumulator; the decorated function takes the data's
    dtype (fp16 and fp32 data share the fp32 kernels)."""
    cache = {}

    def kernels(dtype):
        acc = accumulator(dtype)
        k = cache.get(acc)
        if k is None:
            k = cache[acc] = build(acc)
        return k

    kernels.__doc__ = build.__doc__
    kernels.__name__ = build.__name__
    return kernels


def make_row_stats(acc, block_sum):
    """A device function row_stats(red, x, r, base, n, eps, center, add_r) -> (mean, rstd) of the
    row v = x[base : base + n] (+ r[base : base + n] when add_r) over the block, in `acc`:

        K = v[0];  mean = K + sum(v - K) / n  (0 unless center);  rstd = 1 / sqrt(sum((v - mean)^2) / n + eps)

    The shift by the row's own first value makes a constant row exact (v - K == 0, so mean == v[0]
    and the caller's (v - mean) * rstd is exactly 0 however large 1 / sqrt(eps) is), and a
    near-constant row with a large offset sums small exact differences; the kernels/cpu side
    does the same (_row_norm.pxd).  Two passes over the row (the thread's own columns), two
    block sums through `red` (MAX_THREADS accumulators of shared memory).  It starts with a
    barrier, so the row may have just been written by other threads of the block."""

    @cuda.jit(device=True)
    def row_stats(red, x, r, base, n, eps, center, add_r):
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        nf = acc(n)                             # (float32 / int64 would promote to float64)
        cuda.syncthreads()                      # the row (v[0] included) is complete
        mu = acc(0)
        if center:
            k = acc(x[base])
            if add_r:
                k += acc(r[base])
            part = acc(0)
            for j in range(tid, n, nt):
                v = acc(x[base + j])
                if add_r:
                    v += acc(r[base + j])
                part += v - k
            mu = k + block_sum(red, part) / nf
        part = acc(0)
        for j in range(tid, n, nt):
            v = acc(x[base + j])
            if add_r:
                v += acc(r[base + j])
            d = v - mu
            part += d * d
        return mu, acc(1) / math.sqrt(block_sum(red, part) / nf + acc(eps))

    return row_stats
