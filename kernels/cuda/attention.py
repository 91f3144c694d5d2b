"""Flash-style softmax attention in Numba CUDA: forward and backward.

Same algorithm and conventions as kernels/cpu/attention.pyx (see its comments for the math):
online softmax over key tiles, per-row logsumexp saved, masks read in place through strides,
key lengths, a (left, right) window with causal as right = 0, grouped-query heads.

Forward: one block per (batch, head, tile of blockDim queries), one thread per query row.  The
block stages each tile of keys and values in shared memory (32 KiB: 32 keys in fp32, 16 in fp64); every thread keeps its row's
running max, sum and output accumulator in registers (head dims up to MAX_D).
Backward, one thread per row and no atomics: a kernel for Delta = rowsum(dO o O), one for dQ
(a thread per query row, recomputing P = exp(s - lse) over the row's visible keys), one for dK
and dV (a thread per key row, over the queries of every head in its group that see it).
Memory is linear in T.  fp16 / fp32 / fp64 data, fp32 accumulation (fp64 for fp64).
The backward reads K, V, Q and dO straight from global memory: correct and race-free, not yet
tuned (no GPU has measured it).
"""
import math

from numba import cuda

from ._common import per_accumulator

MAX_D = 128          # largest head dim (D and Dv) the kernels take
SHARED_BYTES = 32 * 1024   # the forward's K and V tiles: within the 48 KiB static limit


def keys_per_tile(acc_bytes):
    """Keys per shared-memory tile: K and V tiles of (BK, MAX_D) accumulators in SHARED_BYTES
    (32 in fp32, 16 in fp64)."""
    return SHARED_BYTES // (2 * MAX_D * acc_bytes)


@per_accumulator
def _kernels(acc):
    """The kernels for the accumulator `acc` (fp32 for fp16 / fp32 data, fp64 for fp64)."""
    NEG_INF = -math.inf
    BK = keys_per_tile(acc.bitwidth // 8)

    @cuda.jit(device=True)
    def score_(s, b, h, i, j, mask_add, mask_keep, s0, s1, s2, s3, has_add, has_keep, left, right, klen):
        """s plus the mask; -inf where query i may not see key j."""
        if j < i - left or j > i + right or j >= klen:
            return NEG_INF
        off = b * s0 + h * s1 + i * s2 + j * s3
        if has_keep and mask_keep[off] == 0:
            return NEG_INF
        if has_add:
            s += acc(mask_add[off])
        return s

    @cuda.jit(device=True)
    def dot_(a, ia, b, ib, n):
        """sum over d < n of a[ia + d] b[ib + d], in the accumulator."""
        s = acc(0)
        for d in range(n):
            s += acc(a[ia + d]) * acc(b[ib + d])
        return s

    @cuda.jit(device=True)
    def unflatten_(idx, inner, mid):
        """(batch, head, position) of a flat row index over (batch, mid heads, inner positions)."""
        return idx // (inner * mid), (idx // inner) % mid, idx % inner

    @cuda.jit
    def _attn_fwd_kernel(q, k, v, o, lse, mask_add, mask_keep, key_len, Hq, Hk, T, S, D, Dv, scale,
                         left, right, s0, s1, s2, s3, has_add, has_keep, has_kl):
        nqt = (T + cuda.blockDim.x - 1) // cuda.blockDim.x
        unit = cuda.blockIdx.x
        b = unit // (Hq * nqt)
        h = (unit // nqt) % Hq
        i0 = (unit % nqt) * cuda.blockDim.x
        i = i0 + cuda.threadIdx.x
        hk = h // (Hq // Hk)
        klen = min(S, key_len[b]) if has_kl else S
        ks = cuda.shared.array((BK, MAX_D), acc)
        vs = cuda.shared.array((BK, MAX_D), acc)
        qrow = cuda.local.array(MAX_D, acc)
        out = cuda.local.array(MAX_D, acc)
        active = i < T
        if active:
            for d in range(D):
                qrow[d] = acc(q[((b * Hq + h) * T + i) * D + d])
        for d in range(Dv):
            out[d] = acc(0)
        m = acc(NEG_INF)
        l = acc(0)
        i_last = min(T, i0 + cuda.blockDim.x) - 1
        jlo = max(0, i0 - left)
        jhi = min(klen, i_last + right + 1)
        for j0 in range(jlo, jhi, BK):
            nk = min(BK, jhi - j0)
            for e in range(cuda.threadIdx.x, nk * D, cuda.blockDim.x):        # stage the tile
                ks[e // D, e % D] = acc(k[((b * Hk + hk) * S + j0 + e // D) * D + e % D])
            for e in range(cuda.threadIdx.x, nk * Dv, cuda.blockDim.x):
                vs[e // Dv, e % Dv] = acc(v[((b * Hk + hk) * S + j0 + e // Dv) * Dv + e % Dv])
            cuda.syncthreads()
            if active:
                for jj in range(nk):
                    s = acc(0)
                    for d in range(D):
                        s += qrow[d] * ks[jj, d]
                    s = score_(s * acc(scale), b, h, i, j0 + jj, mask_add, mask_keep, s0, s1, s2, s3,
                               has_add, has_keep, left, right, klen)
                    if s == NEG_INF:
                        continue
                    if s > m:                     # new running max: rescale what we have
                        corr = math.exp(m - s)
                        l = l * corr + acc(1)
                        for d in range(Dv):
                            out[d] = out[d] * corr + vs[jj, d]
                        m = s
                    else:                         # (NaN lands here and poisons l and out)
                        p = math.exp(s - m)
                        l += p
                        for d in range(Dv):
                            out[d] += p * vs[jj, d]
            cuda.syncthreads()
        if active:
            row = (b * Hq + h) * T + i
            if l > 0:
                for d in range(Dv):
                    o[row * Dv + d] = out[d] / l
                lse[row] = m + math.log(l)
            elif l != l:                          # NaN reached the row
                for d in range(Dv):
                    o[row * Dv + d] = l
                lse[row] = l
            else:                                 # no visible key: 0, as torch
                for d in range(Dv):
                    o[row * Dv + d] = acc(0)
                lse[row] = acc(math.inf)

    @cuda.jit
    def _attn_delta_kernel(o, do, delta, rows, Dv):
        r = cuda.grid(1)
        if r < rows:
            a = acc(0)
            for d in range(Dv):
                a += acc(o[r * Dv + d]) * acc(do[r * Dv + d])
            delta[r] = a

    @cuda.jit
    def _attn_bwd_dq_kernel(q, k, v, do, lse, delta, dq, mask_add, mask_keep, key_len, B, Hq, Hk, T, S, D, Dv,
                            scale, left, right, s0, s1, s2, s3, has_add, has_keep, has_kl):
        row = cuda.grid(1)
        if row >= B * Hq * T:
            return
        b, h, i = unflatten_(row, T, Hq)
        hk = h // (Hq // Hk)
        klen = min(S, key_len[b]) if has_kl else S
        g = cuda.local.array(MAX_D, acc)
        for d in range(D):
            g[d] = acc(0)
        lr = acc(lse[row])
        dl = acc(delta[row])
        for j in range(max(0, i - left), min(klen, i + right + 1)):
            kb = ((b * Hk + hk) * S + j)
            s = score_(dot_(q, row * D, k, kb * D, D) * acc(scale), b, h, i, j, mask_add, mask_keep, s0, s1, s2, s3, has_add, has_keep,
                       left, right, klen)
            if s == NEG_INF:
                continue
            p = math.exp(s - lr)
            ds = p * (dot_(do, row * Dv, v, kb * Dv, Dv) - dl) * acc(scale)
            for d in range(D):
                g[d] += ds * acc(k[kb * D + d])
        for d in range(D):
            dq[row * D + d] = g[d]

    @cuda.jit
    def _attn_bwd_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, mask_add, mask_keep, key_len, B, Hq, Hk, T, S,
                              D, Dv, scale, left, right, s0, s1, s2, s3, has_add, has_keep, has_kl):
        krow = cuda.grid(1)
        if krow >= B * Hk * S:
            return
        b, hk, j = unflatten_(krow, S, Hk)
        klen = min(S, key_len[b]) if has_kl else S
        gk = cuda.local.array(MAX_D, acc)
        gv = cuda.local.array(MAX_D, acc)
        for d in range(D):
            gk[d] = acc(0)
        for d in range(Dv):
            gv[d] = acc(0)
        if j < klen:
            group = Hq // Hk
            for h in range(hk * group, (hk + 1) * group):
                for i in range(max(0, j - right), min(T, j + left + 1)):
                    row = (b * Hq + h) * T + i
                    s = score_(dot_(q, row * D, k, krow * D, D) * acc(scale), b, h, i, j, mask_add, mask_keep, s0, s1, s2, s3, has_add,
                               has_keep, left, right, klen)
                    if s == NEG_INF:
                        continue
                    p = math.exp(s - acc(lse[row]))
                    dp = acc(0)
                    for d in range(Dv):
                        gv[d] += p * acc(do[row * Dv + d])
                        dp += acc(do[row * Dv + d]) * acc(v[krow * Dv + d])
                    ds = p * (dp - acc(delta[row])) * acc(scale)
                    for d in range(D):
                        gk[d] += ds * acc(q[row * D + d])
        for d in range(D):
            dk[krow * D + d] = gk[d]
        for d in range(Dv):
            dv[krow * Dv + d] = gv[d]

    return _attn_fwd_kernel, _attn_delta_kernel, _attn_bwd_dq_kernel, _attn_bwd_dkdv_kernel


def forward(q, k, v, o, lse, mask_add, mask_keep, key_len, B, Hq, Hk, T, S, D, Dv, scale, left, right,
            strides, has_add, has_keep, has_kl, stream=0, threads=64):
    """o (B*Hq*T*Dv,), lse (B*Hq*T,) from flat q, k, v.  Absent masks / key_len: any 1-element
    array with its flag off.  left / right: the visible-key window (T + S for unbounded)."""
    if D > MAX_D or Dv > MAX_D:
        raise ValueError(f"attention cuda: head dims up to {MAX_D}, got D={D}, Dv={Dv}")
    if B * Hq * T == 0:
        return
    fwd = _kernels(q.dtype)[0]
    blocks = B * Hq * ((T + threads - 1) // threads)
    fwd[blocks, threads, stream](q, k, v, o, lse, mask_add, mask_keep, key_len, Hq, Hk, T, S, D, Dv, scale,
                                 left, right, *strides, bool(has_add), bool(has_keep), bool(has_kl))


def backward(q, k, v, o, do, lse, delta, dq, dk, dv, mask_add, mask_keep, key_len, B, Hq, Hk, T, S, D, Dv,
             scale, left, right, strides, has_add, has_keep, has_kl, stream=0, threads=64):
    """dq, dk, dv of forward(); delta: (B*Hq*T,) scratch in the accumulator type."""
    _, delta_k, dq_k, dkdv_k = _kernels(q.dtype)
    rows, krows = B * Hq * T, B * Hk * S
    args = (mask_add, mask_keep, key_len, B, Hq, Hk, T, S, D, Dv, scale, left, right, *strides,
            bool(has_add), bool(has_keep), bool(has_kl))
    if rows:
        delta_k[(rows + threads - 1) // threads, threads, stream](o, do, delta, rows, Dv)
        dq_k[(rows + threads - 1) // threads, threads, stream](q, k, v, do, lse, delta, dq, *args)
    if krows:
        dkdv_k[(krows + threads - 1) // threads, threads, stream](q, k, v, do, lse, delta, dk, dv, *args)
