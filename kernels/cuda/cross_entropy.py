"""Softmax cross-entropy over rows of logits in Numba CUDA: forward and backward, one read of the
logits each (fastseq/cross_entropy.py calls the launchers; kernels/cpu/cross_entropy.pyx is the
CPU twin, its top comment has the same math).

Row i of z (V logits), target t = t_i, class weights w (w = 1 without weights, W = sum_c w_c,
passed in):
    lse  = m + log(sum_c exp(z_c - m)),  m = max_c z_c
    loss = A w_t (lse - z_t) + B (W lse - sum_c w_c z_c) + Z lse^2
(the B term only when B != 0, the Z term only when Z != 0).  A and B carry the label smoothing
(torch's or fairseq's convention, fastseq/cross_entropy.py's smoothing_coefficients), Z is the
z-loss coefficient.  A row whose target is ignore_index, or outside [0, V), has loss 0 and
weight 0; its target never indexes z or w.  Forward writes per row: loss, lse and w_t (the
mean's denominator), all three in the accumulator type.

One block per row.  Forward reads the row once: each thread keeps an online (running max m,
sum s of exp(z - m)) pair over its columns j = tid, tid + nt, ... (coalesced), rescaling s when
its max grows, plus sum_c w_c z_c when B != 0; a shared-memory tree merges the pairs.  The two
reads of the CPU kernel (max, then exponentials) would re-read the row from memory here: one
256-thread block per 128 KiB row (V = 32000, fp32) and ~1000 blocks resident on an H100 / H200
(132 SMs x 8) is ~130 MiB of rows in flight, more than the L2 (50 MiB) holds between the reads.
Traffic per row: V reads of z (and of w when weighted and B != 0), 3 writes.

NaN and infinities, as torch's logsumexp: a NaN logit never becomes the max but poisons s, so
lse and the loss are NaN (an all-NaN row too: lse NaN, where the CPU kernel's NaN-skipping max
gives -inf; the loss is NaN in both); a -inf logit adds exp(-inf) = 0; an all -inf row has s = 0
and lse = -inf (its loss NaN, as torch's).  The running max only ever holds a non-NaN value.

Arrays: z and dz are 2-D device arrays (n, V) indexed z[i, j], any row stride (a column slice
of a wider tensor works; dz may be z itself); target (n,) int64; weight (V,); loss, lse, wrow,
g (n,) in the accumulator type (fp32 for fp16 / fp32 data, fp64 for fp64).  Without weights
(has_w False) or per-row scales (has_g False) `weight` / `g` is any dummy array, never read.
The launchers never allocate and run on the stream they are given (torch's current one).
"""
import math

from numba import cuda

from ._common import MAX_THREADS, block_size, per_accumulator


@per_accumulator
def _kernels(acc):
    """Kernels specialized for the accumulator `acc` (built once per accumulator type)."""
    NEG_INF = -math.inf

    @cuda.jit(device=True)
    def live_(t, ignore_index, V):
        return t != ignore_index and t >= 0 and t < V

    @cuda.jit
    def _ce_fwd_kernel(z, target, weight, has_w, ignore_index, A, B, W, Z, loss, lse, wrow, V):
        # z: (n, V);  target: (n,) int64;  weight: (V,);  loss, lse, wrow: (n,) in acc;  one block per row
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        red_m = cuda.shared.array(MAX_THREADS, acc)
        red_s = cuda.shared.array(MAX_THREADS, acc)
        red_z = cuda.shared.array(MAX_THREADS, acc)
        use_b = B != 0
        ninf = acc(NEG_INF)
        m = ninf                                # running max of the thread's columns (never NaN)
        s = acc(0)                              # sum of exp(z_c - m) over them
        sz = acc(0)                             # sum of w_c z_c over them (B != 0)
        for j in range(tid, V, nt):
            v = acc(z[row, j])
            if v > m:                           # a new running max: rescale what we have
                s = s * acc(math.exp(m - v)) + acc(1)
                m = v
            elif v != ninf:                    # (NaN lands here and poisons s)
                s += acc(math.exp(v - m))
            if use_b:
                sz += acc(weight[j]) * v if has_w else v
        # merge the threads' (m, s) pairs and sz in a tree: (m1, s1) + (m2, s2) =
        # (M, s1 exp(m1 - M) + s2 exp(m2 - M)), M = max(m1, m2); equal maxes add directly
        # (so two -inf or two +inf maxes never form inf - inf)
        red_m[tid] = m
        red_s[tid] = s
        red_z[tid] = sz
        cuda.syncthreads()
        stride = nt // 2
        while stride > 0:
            if tid < stride:
                m1 = red_m[tid]
                m2 = red_m[tid + stride]
                s1 = red_s[tid]
                s2 = red_s[tid + stride]
                if m2 > m1:
                    red_s[tid] = s2 + s1 * acc(math.exp(m1 - m2))
                    red_m[tid] = m2
                elif m2 == m1:
                    red_s[tid] = s1 + s2
                else:
                    red_s[tid] = s1 + s2 * acc(math.exp(m2 - m1))
                red_z[tid] += red_z[tid + stride]
            cuda.syncthreads()
            stride //= 2
        if tid != 0:
            return
        m = red_m[0]
        s = red_s[0]
        if s > 0:
            l = m + acc(math.log(s))
        elif s == 0:                            # every logit -inf (or V == 0): lse = -inf
            l = m
        else:                                   # NaN reached the row
            l = s
        lse[row] = l
        t = target[row]
        if not live_(t, ignore_index, V):
            loss[row] = acc(0)
            wrow[row] = acc(0)
            return
        wt = acc(weight[t]) if has_w else acc(1)
        out = acc(A) * wt * (l - acc(z[row, t]))
        if use_b:
            out += acc(B) * (acc(W) * l - red_z[0])
        if Z != 0:
            out += acc(Z) * l * l
        loss[row] = out
        wrow[row] = wt

    # Backward, p_c = exp(z_c - lse) (the softmax), g the row's gradient scale:
    #     d/dz_c [w_t (lse - z_t)]          = w_t (p_c - [c = t])
    #     d/dz_c [W lse - sum_k w_k z_k]    = W p_c - w_c
    #     d/dz_c [lse^2]                    = 2 lse p_c
    # so  dz_c = g (p_c K - B w_c) - g A w_t [c = t],   K = A w_t + B W + 2 Z lse.
    # Each thread reads z[i, j] and then writes dz[i, j] (the target's term folded into the same
    # store), so dz may be z: no element is read after another thread wrote it.  Traffic per row:
    # V reads of z (and of w when weighted and B != 0), V writes of dz.  Ignored rows: dz = 0.

    @cuda.jit
    def _ce_bwd_kernel(z, target, weight, has_w, ignore_index, A, B, W, Z, lse, g, has_g, gs, dz, V):
        # z, dz: (n, V);  target: (n,) int64;  weight: (V,);  lse, g: (n,) in acc;  one block per row
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        t = target[row]
        if not live_(t, ignore_index, V):
            for j in range(tid, V, nt):
                dz[row, j] = acc(0)
            return
        gi = acc(g[row]) if has_g else acc(gs)
        l = acc(lse[row])
        wt = acc(weight[t]) if has_w else acc(1)
        K = gi * (acc(A) * wt + acc(B) * acc(W) + acc(2) * acc(Z) * l)
        Bg = gi * acc(B)
        Ag = gi * acc(A) * wt
        use_b = B != 0
        for j in range(tid, V, nt):
            d = acc(math.exp(acc(z[row, j]) - l)) * K
            if use_b:
                d -= Bg * acc(weight[j]) if has_w else Bg
            if j == t:
                d -= Ag
            dz[row, j] = d

    return _ce_fwd_kernel, _ce_bwd_kernel


def _threads(V, threads):
    t = threads or block_size(V // 4)
    if t > MAX_THREADS or t & (t - 1):
        raise ValueError(f"cross_entropy cuda: threads must be a power of two <= {MAX_THREADS}, got {t}")
    return t


def forward(z, target, weight, has_w, ignore_index, A, B, W, Z, loss, lse, wrow, n, V, stream=0, threads=None):
    """Per row of z (n, V): loss, lse and the target's weight w_t (0 for an ignored row), each (n,)
    in the accumulator type.  weight (V,) is read only when has_w; W = sum_c w_c (V without
    weights) is used only when B != 0."""
    if n == 0:
        return
    fwd = _kernels(z.dtype)[0]
    fwd[n, _threads(V, threads), stream](z, target, weight, bool(has_w), int(ignore_index), float(A), float(B),
                                         float(W), float(Z), loss, lse, wrow, V)


def backward(z, target, weight, has_w, ignore_index, A, B, W, Z, lse, g, has_g, gs, dz, n, V, stream=0,
             threads=None):
    """dz (n, V) = the gradient of the rows' losses times g[i] (has_g) or the scalar gs; lse is
    forward's.  dz may be z (in place)."""
    if n == 0 or V == 0:
        return
    bwd = _kernels(z.dtype)[1]
    bwd[n, _threads(V, threads), stream](z, target, weight, bool(has_w), int(ignore_index), float(A), float(B),
                                         float(W), float(Z), lse, g, bool(has_g), float(gs), dz, V)
