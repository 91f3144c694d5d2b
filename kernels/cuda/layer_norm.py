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

Dropout on the branch of the fused residual add (p > 0, seed): the row is x * Z * scale + r, the
mask Z drawn from each element's flat index (_common.py's keep(), fastseq/dropout.py's
dropout_keep) and drawn again wherever backward rebuilds the row; backward also writes the
dropped input's gradient dxd = dx * Z * scale in its dx pass.
"""
from numba import cuda

from ._common import (MAX_THREADS, block_size, dropout_params, keep, make_block_sum, make_branch_value,
                      make_col_sum, make_row_stats, partial_chunks, per_accumulator)


@per_accumulator
def _kernels(acc):
    """Kernels specialized for the accumulator `acc` (built once per accumulator type)."""
    block_sum = make_block_sum(acc)
    row_stats = make_row_stats(acc, block_sum, dropout=True)
    value = make_branch_value(acc)
    col_sum = make_col_sum(acc)

    # Dropout on the branch (drop: p > 0, with has_r): the row is v = x * Z * f + r, Z the mask of
    # the element's flat index row * n + j, f = 1 / (1 - p).  The mask is never stored: every
    # kernel that rebuilds v from x and r draws it again (value(), _common.py).

    @cuda.jit
    def _ln_fwd_kernel(x, r, w, b, y, s, mean, rstd, n, eps, center, has_r, write_s,
                       drop, thr, scale, seed_lo, seed_hi):
        # x, r, y, s: (m * n,);  w, b: (n,);  mean, rstd: (m,) in acc;  one block per row
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        red = cuda.shared.array(MAX_THREADS, acc)
        base = row * n
        mask = has_r and drop                   # dropout applies to the branch of x + r only
        f = acc(scale)
        if has_r and write_s:                   # s = x [* Z * f] + r, rounded to storage, then
            for j in range(tid, n, nt):         # normalize s (row_stats starts with a barrier)
                if mask:
                    s[base + j] = value(x, r, base + j, True, True, thr, f, seed_lo, seed_hi)
                else:
                    s[base + j] = x[base + j] + r[base + j]
        src = s if write_s else x
        add_r = has_r and not write_s
        drop_src = mask and add_r               # s already holds the dropped sum
        mu, rs = row_stats(red, src, r, base, n, eps, center, add_r, drop_src, thr, f, seed_lo, seed_hi)
        if tid == 0:
            mean[row] = mu
            rstd[row] = rs
        for j in range(tid, n, nt):
            v = value(src, r, base + j, add_r, drop_src, thr, f, seed_lo, seed_hi)
            y[base + j] = (v - mu) * rs * acc(w[j]) + acc(b[j])

    # dx is the gradient of the sum v = x [* Z * f] + r, i.e. of r (and of x when there is no
    # dropout): with xhat = (v - mean) rstd and g = dy w,
    #     dv = rstd (g - mean_j(g) [center] - xhat mean_j(g xhat))  (+ ds, the gradient at the
    # returned sum, which is v itself).  The dropped input's gradient is dxd = dx * Z * f (the
    # same mask: v depends on x only through x * Z * f), written in the same pass when want_dxd.
    # From the saved sum (has_r off, x is s) only dxd needs the mask.

    @cuda.jit
    def _ln_bwd_dx_kernel(x, r, dy, ds, w, mean, rstd, dx, dxd, n, center, has_r, has_ds, want_dxd,
                          drop, thr, scale, seed_lo, seed_hi):
        # x, r, dy, ds, dx, dxd: (m * n,);  w: (n,);  mean, rstd: (m,);  one block per row
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        red = cuda.shared.array(MAX_THREADS, acc)
        base = row * n
        nf = acc(n)
        mu = acc(mean[row])
        rs = acc(rstd[row])
        f = acc(scale)
        mask = has_r and drop
        sg = acc(0)
        sgx = acc(0)
        for j in range(tid, n, nt):
            v = value(x, r, base + j, has_r, mask, thr, f, seed_lo, seed_hi)
            g = acc(dy[base + j]) * acc(w[j])
            sg += g
            sgx += g * ((v - mu) * rs)
        c1 = block_sum(red, sg) / nf if center else acc(0)
        c2 = block_sum(red, sgx) / nf
        for j in range(tid, n, nt):
            v = value(x, r, base + j, has_r, mask, thr, f, seed_lo, seed_hi)
            d = rs * (acc(dy[base + j]) * acc(w[j]) - c1 - (v - mu) * rs * c2)
            if has_ds:
                d += acc(ds[base + j])
            dx[base + j] = d
            if want_dxd:
                if drop:
                    d = d * (f if keep(base + j, thr, seed_lo, seed_hi) else acc(0))
                dxd[base + j] = d

    @cuda.jit
    def _ln_bwd_wb_partial_kernel(x, r, dy, mean, rstd, dw_part, db_part, m, n, rows_per_chunk,
                                  has_r, want_dw, want_db, drop, thr, scale, seed_lo, seed_hi):
        # dw_part, db_part: (chunks * n,) in acc;  grid (column blocks, chunks)
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        chunk = cuda.blockIdx.y
        if j >= n:
            return
        lo = chunk * rows_per_chunk
        hi = min(m, lo + rows_per_chunk)
        f = acc(scale)
        mask = has_r and drop
        aw = acc(0)
        ab = acc(0)
        for i in range(lo, hi):
            g = acc(dy[i * n + j])
            if want_dw:
                v = value(x, r, i * n + j, has_r, mask, thr, f, seed_lo, seed_hi)
                aw += g * ((v - acc(mean[i])) * acc(rstd[i]))
            ab += g
        if want_dw:
            dw_part[chunk * n + j] = aw
        if want_db:
            db_part[chunk * n + j] = ab

    return _ln_fwd_kernel, _ln_bwd_dx_kernel, _ln_bwd_wb_partial_kernel, col_sum


def _threads(n, threads):
    t = threads or block_size(n // 4)
    if t > MAX_THREADS or t & (t - 1):
        raise ValueError(f"layer_norm cuda: threads must be a power of two <= {MAX_THREADS}, got {t}")
    return t


def forward(x, r, w, b, y, s, mean, rstd, m, n, eps, center, has_r, write_s, stream=0, threads=None,
            p=0.0, seed=0):
    """y = norm(x [+ r]) * w + b over m rows of n; mean/rstd (m,) in the accumulator type.
    With has_r and p > 0 the row is x * Z * scale + r (dropout on the branch x, Z the mask of the
    element's flat index, seed in [0, 2^63)); with write_s, s is that sum."""
    if m == 0 or n == 0:
        return
    fwd = _kernels(x.dtype)[0]
    fwd[m, _threads(n, threads), stream](x, r, w, b, y, s, mean, rstd, n, eps, bool(center), bool(has_r),
                                         bool(write_s), *dropout_params(p, seed))


def backward(x, r, dy, ds, w, mean, rstd, dx, dw, db, dw_part, db_part, m, n, center, has_r, has_ds,
             want_dw, want_db, stream=0, threads=None, dxd=None, p=0.0, seed=0):
    """Gradients of forward(): dx (m*n,), and dw / db (n,) when want_dw / want_db, through the
    (chunks * n,) partial buffers sized by partial_chunks(m).

    dx is the gradient of the sum (of r, and of x when p == 0), the gradient at the returned sum
    ds included.  With p > 0 the sum is rebuilt as x * Z * scale + r (has_r), or read as x (the
    saved sum, has_r off); dxd (m*n,), when given, receives the dropped input's gradient
    dx * Z * scale (dx itself when p == 0)."""
    if n == 0:
        return
    _, bwd_dx, bwd_wb, col_sum = _kernels(x.dtype)
    drop = dropout_params(p, seed)
    if m > 0:
        want_dxd = dxd is not None
        bwd_dx[m, _threads(n, threads), stream](x, r, dy, ds, w, mean, rstd, dx, dxd if want_dxd else dx, n,
                                                bool(center), bool(has_r), bool(has_ds), want_dxd, *drop)
    if not (want_dw or want_db):
        return
    rows, chunks = partial_chunks(m)
    tc = 128
    grid = (-(-n // tc), chunks)
    bwd_wb[grid, tc, stream](x, r, dy, mean, rstd, dw_part, db_part, m, n, rows, bool(has_r),
                             bool(want_dw), bool(want_db), *drop)
    if want_dw:
        col_sum[-(-n // tc), tc, stream](dw_part, chunks, n, dw)
    if want_db:
        col_sum[-(-n // tc), tc, stream](db_part, chunks, n, db)
