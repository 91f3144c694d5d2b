"""LayerNorm / RMSNorm / fused residual-add + norm in Numba CUDA: forward and backward.

Same math as kernels/cpu/layer_norm.pyx (see its comments for the backward derivation).
One block per row for the forward and the input gradient; the weight/bias gradients are column
sums, computed as per-chunk partials (grid over column blocks x row chunks) that a last kernel
adds in a fixed order, so the result is deterministic.

Arrays are flat 1-D device arrays (anything with __cuda_array_interface__ or a Numba device
array); fp16, fp32 and fp64 data, accumulation in fp32 (fp64 for fp64).  Missing affine
parameters are passed as w = 1, b = 0; missing r / s / ds as any 1-element array with the flag off.
The launchers never allocate: the caller passes every buffer, the backward's (chunks * N,)
partial sums included (partial_chunks gives their size).
"""
import math

from numba import cuda

from ._common import MAX_THREADS, block_size, make_block_sum, make_row_stats, per_accumulator


@per_accumulator
def _kernels(acc):
    """Kernels specialized for the accumulator `acc` (built once per accumulator type)."""
    block_sum = make_block_sum(acc)
    row_stats = make_row_stats(acc, block_sum)

    @cuda.jit
    def _ln_fwd_kernel(x, r, w, b, y, s, mean, rstd, n, eps, center, has_r, write_s):
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        red = cuda.shared.array(MAX_THREADS, acc)
        base = row * n
        if has_r and write_s:                   # s = x + r, rounded to storage, then normalize s
            for j in range(tid, n, nt):         # (row_stats starts with a barrier)
                s[base + j] = x[base + j] + r[base + j]
        src = s if write_s else x
        add_r = has_r and not write_s
        mu, rs = row_stats(red, src, r, base, n, eps, center, add_r)
        if tid == 0:
            mean[row] = mu
            rstd[row] = rs
        for j in range(tid, n, nt):
            v = acc(src[base + j])
            if add_r:
                v += acc(r[base + j])
            y[base + j] = (v - mu) * rs * acc(w[j]) + acc(b[j])

    @cuda.jit
    def _ln_bwd_dx_kernel(x, r, dy, ds, w, mean, rstd, dx, n, center, has_r, has_ds):
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        red = cuda.shared.array(MAX_THREADS, acc)
        base = row * n
        nf = acc(n)
        mu = acc(mean[row])
        rs = acc(rstd[row])
        sg = acc(0)
        sgx = acc(0)
        for j in range(tid, n, nt):
            v = acc(x[base + j])
            if has_r:
                v += acc(r[base + j])
            g = acc(dy[base + j]) * acc(w[j])
            sg += g
            sgx += g * ((v - mu) * rs)
        c1 = block_sum(red, sg) / nf if center else acc(0)
        c2 = block_sum(red, sgx) / nf
        for j in range(tid, n, nt):
            v = acc(x[base + j])
            if has_r:
                v += acc(r[base + j])
            d = rs * (acc(dy[base + j]) * acc(w[j]) - c1 - (v - mu) * rs * c2)
            if has_ds:
                d += acc(ds[base + j])
            dx[base + j] = d

    @cuda.jit
    def _ln_bwd_wb_partial_kernel(x, r, dy, mean, rstd, dw_part, db_part, m, n, rows_per_chunk,
                                  has_r, want_dw, want_db):
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        chunk = cuda.blockIdx.y
        if j >= n:
            return
        lo = chunk * rows_per_chunk
        hi = min(m, lo + rows_per_chunk)
        aw = acc(0)
        ab = acc(0)
        for i in range(lo, hi):
            g = acc(dy[i * n + j])
            if want_dw:
                v = acc(x[i * n + j])
                if has_r:
                    v += acc(r[i * n + j])
                aw += g * ((v - acc(mean[i])) * acc(rstd[i]))
            ab += g
        if want_dw:
            dw_part[chunk * n + j] = aw
        if want_db:
            db_part[chunk * n + j] = ab

    @cuda.jit
    def _col_sum_kernel(part, chunks, n, out):
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if j >= n:
            return
        a = acc(0)
        for k in range(chunks):                 # fixed order: deterministic
            a += part[k * n + j]
        out[j] = a

    return _ln_fwd_kernel, _ln_bwd_dx_kernel, _ln_bwd_wb_partial_kernel, _col_sum_kernel


def _threads(n, threads):
    t = threads or block_size(n // 4)
    if t > MAX_THREADS or t & (t - 1):
        raise ValueError(f"layer_norm cuda: threads must be a power of two <= {MAX_THREADS}, got {t}")
    return t


def forward(x, r, w, b, y, s, mean, rstd, m, n, eps, center, has_r, write_s, stream=0, threads=None):
    """y = norm(x [+ r]) * w + b over m rows of n; mean/rstd (m,) in the accumulator type."""
    if m == 0 or n == 0:
        return
    fwd = _kernels(x.dtype)[0]
    fwd[m, _threads(n, threads), stream](x, r, w, b, y, s, mean, rstd, n, eps, bool(center), bool(has_r),
                                         bool(write_s))


def partial_chunks(m):
    """(rows per chunk, chunks) of the weight-gradient partial sums: ~64 chunks keep a GPU busy.
    The caller allocates the (chunks * n,) partial buffers in the accumulator type."""
    rows = max(1, min(256, -(-m // 64)))
    return rows, max(1, -(-m // rows))


def backward(x, r, dy, ds, w, mean, rstd, dx, dw, db, dw_part, db_part, m, n, center, has_r, has_ds,
             want_dw, want_db, stream=0, threads=None):
    """Gradients of forward(): dx (m*n,), and dw / db (n,) when want_dw / want_db, through the
    (chunks * n,) partial buffers sized by partial_chunks(m)."""
    if n == 0:
        return
    _, bwd_dx, bwd_wb, col_sum = _kernels(x.dtype)
    if m > 0:
        bwd_dx[m, _threads(n, threads), stream](x, r, dy, ds, w, mean, rstd, dx, n, bool(center), bool(has_r),
                                                bool(has_ds))
    if not (want_dw or want_db):
        return
    rows, chunks = partial_chunks(m)
    tc = 128
    grid = (-(-n // tc), chunks)
    bwd_wb[grid, tc, stream](x, r, dy, mean, rstd, dw_part, db_part, m, n, rows, bool(has_r),
                             bool(want_dw), bool(want_db))
    if want_dw:
        col_sum[-(-n // tc), tc, stream](dw_part, chunks, n, dw)
    if want_db:
        col_sum[-(-n // tc), tc, stream](db_part, chunks, n, db)
