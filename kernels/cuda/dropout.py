"""Counter-based dropout, dropout + residual add, and bias + activation + dropout in Numba CUDA.

Same math as kernels/cpu/dropout.pyx: element k of a tensor (its flat row-major index) is kept
when the keyed hash rand32(k, seed) >= p 2^32 (_common.py; fastseq/dropout.py's dropout_keep is
the oracle), and a kept element is scaled by 1 / (1 - p) (0 when p >= 1).  p == 0 draws no mask.
The mask is never stored: backward draws it again from (seed, k).

Elementwise kernels run a grid-stride loop over an int64 index (a tensor may hold more than 2^32
elements), at most MAX_BLOCKS blocks.  The backward of bias + activation + dropout with the bias
gradient runs over (column blocks x row chunks) instead: each thread writes dx down its column
within its chunk and sums it into a per-chunk partial, and a last kernel adds the partials in a
fixed order, so db is deterministic (as layer_norm's weight gradients).

Arrays are flat 1-D device arrays (anything with __cuda_array_interface__ or a Numba device
array); fp16, fp32 and fp64 data, computed in fp32 (fp64 for fp64) and stored in the data's type.
An absent residual / bias is any 1-element array with its flag off.  The launchers never
allocate: the caller passes every buffer, db's (chunks * n,) partial sums included
(partial_chunks gives their size).  Outputs may alias their input (y = x: in-place dropout).
"""
import math

import numpy as np
from numba import cuda

from ._common import MAX_THREADS, dropout_params, keep, make_col_sum, partial_chunks, per_accumulator

__all__ = ["dropout", "bias_act_forward", "bias_act_backward", "partial_chunks", "RELU", "GELU", "GELU_TANH",
           "SILU"]

# activation codes: the index into fastseq.dropout.ACTIVATIONS
RELU, GELU, GELU_TANH, SILU = 0, 1, 2, 3

MAX_BLOCKS = 8192           # grid-stride kernels: ~60 blocks of 256 threads per SM on a 132-SM GPU

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@per_accumulator
def _kernels(acc):
    """Kernels specialized for the accumulator `acc` (built once per accumulator type)."""
    col_sum = make_col_sum(acc)

    @cuda.jit(device=True)
    def sigmoid_(u):
        """1 / (1 + exp(-u)) without overflow: exp of a non-positive argument only."""
        if u >= acc(0):
            return acc(1) / (acc(1) + math.exp(-u))
        e = math.exp(u)
        return e / (acc(1) + e)

    @cuda.jit(device=True)
    def normcdf_(u):
        """Phi(u) = (1 + erf(u / sqrt 2)) / 2; erfc(-u / sqrt 2) / 2 for u < 0, so the tail keeps
        its relative accuracy where 1 + erf would cancel."""
        if u < acc(0):
            return acc(0.5) * math.erfc(-u * acc(_INV_SQRT2))
        return acc(0.5) * (acc(1) + math.erf(u * acc(_INV_SQRT2)))

    @cuda.jit(device=True)
    def act_(u, act):
        """act(u) for the activation code `act` (the same formulas as activation_ref)."""
        if act == RELU:
            return acc(0) if u < acc(0) else u          # NaN stays NaN, as clamp(min=0)
        if act == GELU:
            return u * normcdf_(u)
        if act == GELU_TANH:
            t = math.tanh(acc(_GELU_K) * (u + acc(_GELU_A) * u * u * u))
            return acc(0.5) * u * (acc(1) + t)
        return u * sigmoid_(u)

    # The activations' derivatives (u = x + b):
    #   relu'(u)      = [not u <= 0]   (applied as a select: grad_in_)
    #   gelu'(u)      = Phi(u) + u phi(u),  Phi(u) = (1 + erf(u / sqrt 2)) / 2,  phi(u) = exp(-u^2 / 2) / sqrt(2 pi)
    #   gelu_tanh'(u) = (1 + t) / 2 + u (1 - t^2) k (1 + 3 a u^2) / 2,
    #                   k = sqrt(2 / pi), a = 0.044715, t = tanh(k (u + a u^3));  1 - t^2 as (1 - t)(1 + t)
    #   silu'(u)      = s (1 + u (1 - s)),  s = sigmoid(u)
    @cuda.jit(device=True)
    def act_grad_(u, act):
        """act'(u) for the activation code `act`."""
        if act == RELU:
            return acc(1) if u > acc(0) else acc(0)
        if act == GELU:
            return normcdf_(u) + u * (acc(_INV_SQRT_2PI) * math.exp(acc(-0.5) * u * u))
        if act == GELU_TANH:
            u2 = u * u
            t = math.tanh(acc(_GELU_K) * (u + acc(_GELU_A) * u2 * u))
            return acc(0.5) * ((acc(1) + t) + u * ((acc(1) - t) * (acc(1) + t))
                               * acc(_GELU_K) * (acc(1) + acc(3 * _GELU_A) * u2))
        s = sigmoid_(u)
        return s * (acc(1) + u * (acc(1) - s))

    @cuda.jit(device=True)
    def grad_in_(g, u, act):
        """g act'(u); relu selects (torch's threshold_backward: 0 where u <= 0, g elsewhere, NaN u
        included) rather than multiplying, so an inf or NaN g at u <= 0 gives 0 as torch does."""
        if act == RELU:
            return acc(0) if u <= acc(0) else g
        return g * act_grad_(u, act)

    @cuda.jit(device=True)
    def grid_stride_():
        """(first index, stride) of this thread's grid-stride loop, as int64."""
        start = np.int64(cuda.blockIdx.x) * np.int64(cuda.blockDim.x) + np.int64(cuda.threadIdx.x)
        return start, np.int64(cuda.gridDim.x) * np.int64(cuda.blockDim.x)

    @cuda.jit
    def _dropout_kernel(x, r, y, numel, has_r, drop, thr, scale, seed_lo, seed_hi):
        # x, r, y: (numel,);  y = x * Z * f (+ r);  Z = [rand32(k) >= thr], f = 1 / (1 - p)
        start, stride = grid_stride_()
        f = acc(scale)
        for k in range(start, numel, stride):
            v = acc(x[k])
            if drop:
                v = v * (f if keep(k, thr, seed_lo, seed_hi) else acc(0))
            if has_r:
                v += acc(r[k])
            y[k] = v

    @cuda.jit
    def _bias_act_fwd_kernel(x, b, y, numel, n, act, has_b, drop, thr, scale, seed_lo, seed_hi):
        # x, y: (m * n,);  b: (n,);  y = act(x + b) * Z * f
        start, stride = grid_stride_()
        f = acc(scale)
        for k in range(start, numel, stride):
            u = acc(x[k])
            if has_b:
                u += acc(b[k % n])
            v = act_(u, act)
            if drop:
                v = v * (f if keep(k, thr, seed_lo, seed_hi) else acc(0))
            y[k] = v

    # Backward of y = act(u) * Z * f, u = x + b (u recomputed, the mask drawn again):
    #     dx = dy * Z * f * act'(u)   (act' above),      db[j] = sum_i dx[i, j]
    # Memory traffic: reads x, dy (and b), writes dx; with db the same, plus (chunks, n) partials.

    @cuda.jit
    def _bias_act_bwd_kernel(x, b, dy, dx, numel, n, act, has_b, drop, thr, scale, seed_lo, seed_hi):
        # x, dy, dx: (m * n,);  b: (n,)
        start, stride = grid_stride_()
        f = acc(scale)
        for k in range(start, numel, stride):
            u = acc(x[k])
            if has_b:
                u += acc(b[k % n])
            g = acc(dy[k])
            if drop:
                g = g * (f if keep(k, thr, seed_lo, seed_hi) else acc(0))
            dx[k] = grad_in_(g, u, act)

    @cuda.jit
    def _bias_act_bwd_db_kernel(x, b, dy, dx, db_part, m, n, rows_per_chunk, act, has_b, drop, thr, scale,
                                seed_lo, seed_hi):
        # x, dy, dx: (m * n,);  b: (n,);  db_part: (chunks * n,) in acc;  grid (column blocks, chunks)
        j = np.int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x     # int64: k below may pass 2^32
        chunk = np.int64(cuda.blockIdx.y)
        if j >= n:
            return
        f = acc(scale)
        bj = acc(b[j]) if has_b else acc(0)
        lo = chunk * rows_per_chunk
        hi = min(m, lo + rows_per_chunk)
        a = acc(0)
        for i in range(lo, hi):                 # fixed order within the chunk
            k = i * n + j
            u = acc(x[k])
            if has_b:
                u += bj
            g = acc(dy[k])
            if drop:
                g = g * (f if keep(k, thr, seed_lo, seed_hi) else acc(0))
            d = grad_in_(g, u, act)
            dx[k] = d
            a += d
        db_part[chunk * n + j] = a

    return _dropout_kernel, _bias_act_fwd_kernel, _bias_act_bwd_kernel, _bias_act_bwd_db_kernel, col_sum


def _threads(threads):
    t = threads or MAX_THREADS
    if t > MAX_THREADS or t < 1 or t & (t - 1):
        raise ValueError(f"dropout cuda: threads must be a power of two <= {MAX_THREADS}, got {t}")
    return t


def _blocks(numel, t):
    return max(1, min(MAX_BLOCKS, -(-numel // t)))


def dropout(x, r, y, numel, p, seed, has_r, stream=0, threads=None):
    """y[k] = x[k] * Z_k * scale (+ r[k] when has_r) over numel elements; Z_k = [rand32(k, seed) >=
    p 2^32], scale = 1 / (1 - p) (0 when p >= 1); p == 0 draws nothing (y = x [+ r]).  The
    backward is the same launch on dy (no residual).  y may be x or r."""
    if numel == 0:
        return
    t = _threads(threads)
    _kernels(x.dtype)[0][_blocks(numel, t), t, stream](x, r, y, numel, bool(has_r), *dropout_params(p, seed))


def bias_act_forward(x, b, y, m, n, act, p, seed, has_b, stream=0, threads=None):
    """y = act(x + b) * Z * scale over (m, n) row-major, b (n,) broadcast over rows; act is the
    activation code (RELU, GELU, GELU_TANH, SILU: fastseq.dropout.ACTIVATIONS' index)."""
    numel = m * n
    if numel == 0:
        return
    t = _threads(threads)
    _kernels(x.dtype)[1][_blocks(numel, t), t, stream](x, b, y, numel, n, int(act), bool(has_b),
                                                       *dropout_params(p, seed))


def bias_act_backward(x, b, dy, dx, db, db_part, m, n, act, p, seed, has_b, want_db, stream=0, threads=None):
    """dx = dy * Z * scale * act'(x + b) (m * n,); with want_db, db[j] = sum_i dx[i, j] (n,), through
    the (chunks * n,) partial buffer in the accumulator type, chunks = partial_chunks(m)[1]."""
    if n == 0:
        return
    _, _, bwd, bwd_db, col_sum = _kernels(x.dtype)
    drop = dropout_params(p, seed)
    if not want_db:
        if m > 0:
            t = _threads(threads)
            bwd[_blocks(m * n, t), t, stream](x, b, dy, dx, m * n, n, int(act), bool(has_b), *drop)
        return
    rows, chunks = partial_chunks(m)
    tc = min(_threads(threads), 128)
    # (m == 0: one chunk of zero partials, so db = 0)
    bwd_db[(-(-n // tc), chunks), tc, stream](x, b, dy, dx, db_part, m, n, rows, int(act), bool(has_b), *drop)
    col_sum[-(-n // tc), tc, stream](db_part, chunks, n, db)
