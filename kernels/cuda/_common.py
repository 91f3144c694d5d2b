"""Shared pieces of the Numba CUDA kernels: streams, zero-copy views, the per-accumulator kernel
cache, block reductions, row statistics, deterministic column sums and the dropout mask.

The simulator (NUMBA_ENABLE_CUDASIM=1) has no warp shuffles, so reductions go through shared
memory.  Block sizes are powers of two no larger than MAX_THREADS.
"""
import math

import numba
import numpy as np
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


def make_row_stats(acc, block_sum, dropout=False):
    """A device function row_stats(red, x, r, base, n, eps, center, add_r) -> (mean, rstd) of the
    row v = x[base : base + n] (+ r[base : base + n] when add_r) over the block, in `acc`:

        K = v[0];  mean = K + sum(v - K) / n  (0 unless center);  rstd = 1 / sqrt(sum((v - mean)^2) / n + eps)

    The shift by the row's own first value makes a constant row exact (v - K == 0, so mean == v[0]
    and the caller's (v - mean) * rstd is exactly 0 however large 1 / sqrt(eps) is), and a
    near-constant row with a large offset sums small exact differences; the kernels/cpu side
    does the same (_row_norm.pxd).  Two passes over the row (the thread's own columns), two
    block sums through `red` (MAX_THREADS accumulators of shared memory).  It starts with a
    barrier, so the row may have just been written by other threads of the block.

    With dropout=True the function takes five more arguments, (drop, thr, f, seed_lo, seed_hi),
    and the row is v = x * Z * f (+ r) where drop is set: the branch_value below, the mask of
    each element's flat index base + j regenerated in both passes."""
    value = make_branch_value(acc)

    @cuda.jit(device=True)
    def row_stats_drop(red, x, r, base, n, eps, center, add_r, drop, thr, f, seed_lo, seed_hi):
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        nf = acc(n)                             # (float32 / int64 would promote to float64)
        cuda.syncthreads()                      # the row (v[0] included) is complete
        mu = acc(0)
        if center:
            k = value(x, r, base, add_r, drop, thr, f, seed_lo, seed_hi)
            part = acc(0)
            for j in range(tid, n, nt):
                part += value(x, r, base + j, add_r, drop, thr, f, seed_lo, seed_hi) - k
            mu = k + block_sum(red, part) / nf
        part = acc(0)
        for j in range(tid, n, nt):
            d = value(x, r, base + j, add_r, drop, thr, f, seed_lo, seed_hi) - mu
            part += d * d
        return mu, acc(1) / math.sqrt(block_sum(red, part) / nf + acc(eps))

    if dropout:
        return row_stats_drop

    @cuda.jit(device=True)
    def row_stats(red, x, r, base, n, eps, center, add_r):
        return row_stats_drop(red, x, r, base, n, eps, center, add_r, False, np.uint64(0), acc(1),
                              np.uint64(0), np.uint64(0))

    return row_stats


def partial_chunks(m):
    """(rows per chunk, chunks) of a deterministic column sum over m rows (the weight / bias
    gradients): ~64 chunks keep a GPU busy.  The caller allocates the (chunks * n,) partial
    buffer in the accumulator type; each chunk's partial is summed over its rows in order, and
    make_col_sum's kernel adds the chunks in order, so the result never depends on scheduling."""
    rows = max(1, min(256, -(-m // 64)))
    return rows, max(1, -(-m // rows))


def make_col_sum(acc):
    """The kernel col_sum[grid, tc](part, chunks, n, out): out[j] = sum over c < chunks of
    part[c * n + j], in `acc`, in the fixed order c = 0, 1, ... (deterministic)."""

    @cuda.jit
    def _col_sum_kernel(part, chunks, n, out):
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if j >= n:
            return
        a = acc(0)
        for k in range(chunks):                 # fixed order: deterministic
            a += part[k * n + j]
        out[j] = a

    return _col_sum_kernel


# ---------------------------------------------------------------------------- the dropout mask
#
# Element k of a tensor (its flat row-major index, 64 bits) is kept when
#     rand32(k, seed) = mix32(mix32(lo32(k) ^ lo32(seed)) ^ hi32(k) ^ hi32(seed)) >= thr,
# thr = p 2^32 (capped at 2^32 - 1), and a kept element is scaled by f = 1 / (1 - p) (0 when
# p >= 1): x * (f if kept else 0), which is the references' (x * mask) * f exactly.  The same
# hash as kernels/cpu/_fastmath.h's fs_rand32 and fastseq/dropout.py's dropout_keep (the oracle).
#
# The arithmetic is uint64 throughout with explicit masks: a product of two 32-bit values fits
# in 64 bits, so (x * c) & M32 is the 32-bit wrapping product, the same in compiled code and in
# the simulator (where NumPy uint32 scalars would warn on overflow), and no operand is ever a
# signed int64 (Numba types uint64 op int64 as float64).  The seed enters as two uint64 halves.

def dropout_params(p, seed):
    """The kernels' dropout arguments (drop, thr, scale, seed_lo, seed_hi) for probability p and a
    seed in [0, 2^63): drop is p > 0 (p == 0 draws no mask at all, every element kept, scale 1)."""
    p = float(p)
    drop = p > 0
    thr = min(int(p * 4294967296.0), 0xFFFFFFFF) if drop else 0
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    seed = int(seed)
    return (drop, np.uint64(thr), scale, np.uint64(seed & 0xFFFFFFFF),
            np.uint64((seed >> 32) & 0xFFFFFFFF))


@cuda.jit(device=True)
def mix32(x):
    """The 32-bit "lowbias32" avalanche mix of x < 2^32 (held in a uint64), wrapping products."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(0xFFFFFFFF)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & np.uint64(0xFFFFFFFF)
    return x ^ (x >> np.uint64(16))


@cuda.jit(device=True)
def rand32(index, seed_lo, seed_hi):
    """The 32-bit draw (as a uint64 < 2^32) of the element with flat index `index` (int64, >= 0)
    under the seed (seed_lo, seed_hi): fs_rand32(index, seed)."""
    k = np.uint64(index)
    lo = k & np.uint64(0xFFFFFFFF)
    hi = k >> np.uint64(32)
    return mix32(mix32(lo ^ seed_lo) ^ hi ^ seed_hi)


@cuda.jit(device=True)
def keep(index, thr, seed_lo, seed_hi):
    """Whether dropout keeps the element with flat index `index`: rand32 >= thr (uint64)."""
    return rand32(index, seed_lo, seed_hi) >= thr


def make_branch_value(acc):
    """A device function value(x, r, k, add_r, drop, thr, f, seed_lo, seed_hi) -> x[k] (* Z_k * f
    when drop) (+ r[k] when add_r), in `acc`: the residual sum with dropout on the branch x,
    f the kept elements' scale as an `acc`."""

    @cuda.jit(device=True)
    def branch_value(x, r, k, add_r, drop, thr, f, seed_lo, seed_hi):
        v = acc(x[k])
        if drop:
            v = v * (f if keep(k, thr, seed_lo, seed_hi) else acc(0))
        if add_r:
            v += acc(r[k])
        return v

    return branch_value
