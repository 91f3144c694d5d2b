"""Pointwise step kernels of the recurrent cells in Numba CUDA: forward and backward.

Cells (gate order as torch): LSTM (i, f, g, o), GRU (r, z, n), Elman RNN (tanh / relu), and the
layer-normalized LSTM and GRU (Ba et al. 2016).  Same math as kernels/cpu/recurrent.pyx.

Design.  The time loop lives in Python (fastseq/recurrent/cuda.py).  Per step t the caller runs the
recurrent GEMM with torch (cuBLAS) on torch's current stream, then one launcher of this module on
that same stream (`stream=_common.torch_stream()`), so the GEMM and the pointwise kernel queue
one behind the other with no host synchronization.  The input projection of all steps is one
GEMM before the loop, and the weight gradients are GEMMs over all steps after it (or per step):
none of that is here.  These kernels fuse everything between two GEMMs into one pass: the gate
nonlinearities, the cell update, the layer norms and their backward, the carries.

Buffers.  Every array is a flat, contiguous 1-D device array (the caller passes
`as_array(tensor_slice.reshape(-1))`); a (B, G H) buffer holds row b at [b G H, (b + 1) G H),
gate k of unit j at column k H + j.  Rows are batch elements.  Only the first B rows of every
buffer are touched, so a packed sequence passes its (B_0, H) carries with B = B_t.  fp32 and fp64
data; the per-row statistics (rstd) are in the data type, which is also the accumulator
(fp32 for fp32, fp64 for fp64).  The launchers never allocate and return nothing; B == 0 (or
H == 0) launches nothing.

Grids.  Plain cells: one thread per (row, unit), a 1-D grid over B H in blocks of 128; a thread
reads and writes the G gate columns of its unit, so consecutive threads touch consecutive
addresses of each gate block (coalesced).  Layer-norm cells: one block per row, block_size(H)
threads (or the launcher's `threads`, a power of two), columns strided by blockDim.x, row
reductions through make_block_sum in shared memory (the simulator has no warp shuffles).  Each
thread owns the units j = tid + k blockDim.x of its row in every pass, so what it writes in one
pass and reads back in the next is its own.

Carries.  The forward's cprev and c (hprev and h) may be the same buffer, and so may the
backward's dh and dhp: each element is read before it is written, by the same thread.  dc (the
LSTM's cell-gradient carry) is read and overwritten in place.

Memory traffic per step and row, in elements of H (weights of the norms, shared by the rows and
cached, left out):
  LSTM fwd     reads g, cprev (5);                  writes act, c, h (6)               11
  LSTM bwd     reads act, c, cprev, dy, dh, dc (9); writes dg, dc (5)                  14
  GRU fwd      reads xp, gh, hprev (7);             writes act, ghn, h (5)             12
  GRU bwd      reads act, ghn, hprev, dy, dh (7);   writes dxp, dgh, dhp (7)           14
  RNN          fwd reads g, writes h (2);           bwd reads h, dy, dh, writes dg (4)
  LN-LSTM fwd  reads xp, gh, cprev (9);             writes act, ghat, c, chat, h (11)  20
  LN-LSTM bwd  reads act, ghat, chat, cprev, dy, dh, dc (13); writes dg, dgh, dc, dcn (10)  23
  LN-GRU fwd   reads xp, gh, hprev (7);             writes act, ghat, ghn, h (8)       15
  LN-GRU bwd   reads act, ghat, ghn, hprev, dy, dh (10); writes dxp, da, dgh, dhp (10) 20
(the layer-norm kernels also re-read a few of their own row's values, from cache, for a second
pass over the row).  The same step written as torch ops, as users write a LayerNormLSTM today,
launches a kernel per elementwise op (a dozen or more per step, twice that in the backward),
each reading and writing whole (B, H) or (B, G H) buffers; here each step is one launch that
reads every input once and writes every output once.  The saved activations (act) let the
backward skip every gate transcendental but one tanh.  At large H the recurrent GEMM (reading
W_hh, G H^2 elements) dominates a step; at small B and H the launch count does.
"""
import math

from numba import cuda

from ._common import MAX_THREADS, block_size, make_block_sum, make_row_stats, per_accumulator

_THREADS = 128          # block of the plain (one thread per element) kernels


@per_accumulator
def _kernels(acc):
    """The kernels for the accumulator `acc` (fp32 or fp64), built once per accumulator."""
    block_sum = make_block_sum(acc)
    row_stats = make_row_stats(acc, block_sum)

    # ------------------------------------------------------------------ device helpers

    @cuda.jit(device=True)
    def sigmoid(x):
        """1 / (1 + exp(-x)), never exponentiating a positive argument (no overflow)."""
        one = acc(1)
        if x >= acc(0):
            return one / (one + math.exp(-x))
        e = math.exp(x)
        return e / (one + e)

    @cuda.jit(device=True)
    def lstm_cell_bwd(dce, i, f, gg, cprev):
        """Gate gradients of c = f cprev + i gg given dce = dL/dc, through the activations."""
        one = acc(1)
        return (dce * gg * i * (one - i),           # dL/dg_i
                dce * cprev * f * (one - f),        # dL/dg_f
                dce * i * (one - gg * gg))          # dL/dg_g

    @cuda.jit(device=True)
    def gru_cell(xr, xz, xn, ar, az, an, hp):
        """r, z, n, h of the GRU from the input part x* and the recurrent part a* of each gate."""
        one = acc(1)
        r = sigmoid(xr + ar)
        z = sigmoid(xz + az)
        n = math.tanh(xn + r * an)
        return r, z, n, (one - z) * n + z * hp

    # GRU backward.  h = (1 - z) n + z hprev, n = tanh(xn + r an), r = s(xr + ar), z = s(xz + az):
    #   dn = dhe (1 - z),  dz = dhe (hprev - n),  d(xn + r an) = dn (1 - n^2) =: da_n,
    #   dr = da_n an,  d(xr + ar) = dr r (1 - r) =: da_r,  d(xz + az) = dz z (1 - z) =: da_z,
    #   so dx* = [da_r, da_z, da_n], da* = [da_r, da_z, da_n r], and the direct path dhprev = dhe z.
    @cuda.jit(device=True)
    def gru_cell_bwd(dhe, r, z, n, an, hp):
        one = acc(1)
        da_n = dhe * (one - z) * (one - n * n)
        da_r = da_n * an * r * (one - r)
        da_z = dhe * (hp - n) * z * (one - z)
        return da_r, da_z, da_n

    # ------------------------------------------------------------------ LSTM

    @cuda.jit
    def _lstm_step_fwd_kernel(g, cprev, c, h, act, B, H):
        # g, act (B, 4H); cprev, c, h (B, H)
        k = cuda.grid(1)
        if k >= B * H:
            return
        row = k // H
        q = row * 4 * H + k - row * H                # gate i of unit j; gate n at q + n H
        i = sigmoid(acc(g[q]))
        f = sigmoid(acc(g[q + H]))
        gg = math.tanh(acc(g[q + 2 * H]))
        o = sigmoid(acc(g[q + 3 * H]))
        cn = f * acc(cprev[k]) + i * gg
        c[k] = cn
        h[k] = o * math.tanh(cn)
        act[q] = i
        act[q + H] = f
        act[q + 2 * H] = gg
        act[q + 3 * H] = o

    # LSTM backward.  h = o tanh(c), c = f cprev + i gg, (i, f, o) = s(g_*), gg = tanh(g_g).
    # The gradient reaching h_t is dhe = dy_t + dh (dh: from step t + 1 through W_hh); the one
    # reaching c_t is dce = dc + dhe o (1 - tanh(c)^2) (dc: from step t + 1 through f_{t+1}).
    #   dg_o = dhe tanh(c) o (1 - o),  dg_i = dce gg i (1 - i),  dg_f = dce cprev f (1 - f),
    #   dg_g = dce i (1 - gg^2),  and the carry to step t - 1: dc <- dce f.
    @cuda.jit
    def _lstm_step_bwd_kernel(act, c, cprev, dy, dh, dc, dg, B, H):
        # act, dg (B, 4H); c, cprev, dy, dh, dc (B, H)
        k = cuda.grid(1)
        if k >= B * H:
            return
        one = acc(1)
        row = k // H
        q = row * 4 * H + k - row * H
        i = acc(act[q])
        f = acc(act[q + H])
        gg = acc(act[q + 2 * H])
        o = acc(act[q + 3 * H])
        dhe = acc(dy[k]) + acc(dh[k])
        tc = math.tanh(acc(c[k]))
        dce = acc(dc[k]) + dhe * o * (one - tc * tc)
        dgi, dgf, dgg = lstm_cell_bwd(dce, i, f, gg, acc(cprev[k]))
        dg[q] = dgi
        dg[q + H] = dgf
        dg[q + 2 * H] = dgg
        dg[q + 3 * H] = dhe * tc * o * (one - o)
        dc[k] = dce * f

    # ------------------------------------------------------------------ GRU

    @cuda.jit
    def _gru_step_fwd_kernel(xp, gh, hprev, h, act, ghn, B, H):
        # xp, gh, act (B, 3H); hprev, h, ghn (B, H)
        k = cuda.grid(1)
        if k >= B * H:
            return
        row = k // H
        q = row * 3 * H + k - row * H
        an = acc(gh[q + 2 * H])
        r, z, n, hn = gru_cell(acc(xp[q]), acc(xp[q + H]), acc(xp[q + 2 * H]),
                               acc(gh[q]), acc(gh[q + H]), an, acc(hprev[k]))
        h[k] = hn
        ghn[k] = an
        act[q] = r
        act[q + H] = z
        act[q + 2 * H] = n

    # GRU backward: see gru_cell_bwd.  dhe = dy + dh; the caller adds dgh W_hh to dhp.
    @cuda.jit
    def _gru_step_bwd_kernel(act, ghn, hprev, dy, dh, dxp, dgh, dhp, B, H):
        # act, dxp, dgh (B, 3H); ghn, hprev, dy, dh, dhp (B, H)
        k = cuda.grid(1)
        if k >= B * H:
            return
        row = k // H
        q = row * 3 * H + k - row * H
        r = acc(act[q])
        z = acc(act[q + H])
        n = acc(act[q + 2 * H])
        dhe = acc(dy[k]) + acc(dh[k])
        da_r, da_z, da_n = gru_cell_bwd(dhe, r, z, n, acc(ghn[k]), acc(hprev[k]))
        dhp[k] = dhe * z
        dxp[q] = da_r
        dxp[q + H] = da_z
        dxp[q + 2 * H] = da_n
        dgh[q] = da_r
        dgh[q + H] = da_z
        dgh[q + 2 * H] = da_n * r

    # ------------------------------------------------------------------ Elman RNN

    @cuda.jit
    def _rnn_step_fwd_kernel(g, h, B, H, relu):
        # g, h (B, H)
        k = cuda.grid(1)
        if k >= B * H:
            return
        v = acc(g[k])
        if relu:
            h[k] = acc(0) if v < acc(0) else v          # NaN stays NaN
        else:
            h[k] = math.tanh(v)

    # h = tanh(g): dg = dhe (1 - h^2);  h = relu(g): dg = dhe where h > 0, else 0.
    @cuda.jit
    def _rnn_step_bwd_kernel(h, dy, dh, dg, B, H, relu):
        # h, dy, dh, dg (B, H)
        k = cuda.grid(1)
        if k >= B * H:
            return
        dhe = acc(dy[k]) + acc(dh[k])
        hv = acc(h[k])
        if relu:
            dg[k] = acc(0) if hv <= acc(0) else dhe
        else:
            dg[k] = dhe * (acc(1) - hv * hv)

    # ------------------------------------------------------------------ layer-norm helpers
    # Row statistics: make_row_stats (_common.py).  The backward through ghat = LN(gh) over a row
    # of G gate blocks of H, with dghat = d w_hh_norm:
    #     dgh = rstd_h (dghat - mean(dghat) - ghat mean(dghat ghat))
    # ln_bwd_sums adds one unit's G terms to the thread's partial sums, ln_bwd_finish forms the
    # means and writes dgh for the thread's own units (j = tid, tid + blockDim.x, ...).

    @cuda.jit(device=True)
    def normalize(v, vhat, q, mu, rs):
        """vhat[q] = (v[q] - mu) rs (the row statistics' (mu, rs)), returned."""
        x = (acc(v[q]) - mu) * rs
        vhat[q] = x
        return x

    @cuda.jit(device=True)
    def ln_bwd_sums(d, w_hh_norm, ghat, q, j, H, G, s1, s2):
        for k in range(G):
            dghat = acc(d[q + k * H]) * acc(w_hh_norm[j + k * H])
            s1 += dghat
            s2 += dghat * acc(ghat[q + k * H])
        return s1, s2

    @cuda.jit(device=True)
    def ln_bwd_finish(red, s1, s2, d, w_hh_norm, ghat, rs, dgh, gb, H, G):
        ng = acc(G * H)
        m1 = block_sum(red, s1) / ng
        m2 = block_sum(red, s2) / ng
        for j in range(cuda.threadIdx.x, H, cuda.blockDim.x):
            for k in range(G):
                q = gb + j + k * H
                dghat = acc(d[q]) * acc(w_hh_norm[j + k * H])
                dgh[q] = rs * (dghat - m1 - acc(ghat[q]) * m2)

    # ------------------------------------------------------------------ LayerNormLSTM

    @cuda.jit
    def _ln_lstm_step_fwd_kernel(xp, gh, w_hh_norm, w_c, b_c, cprev, c, h, act, ghat, rstd_h, chat,
                                 rstd_c, H, eps):
        # xp, gh, act, ghat (B, 4H); w_hh_norm (4H,); w_c, b_c (H,); cprev, c, h, chat (B, H);
        # rstd_h, rstd_c (B,).  One block per row.
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        red = cuda.shared.array(MAX_THREADS, acc)
        gb = row * 4 * H
        cb = row * H
        mu, rs = row_stats(red, gh, gh, gb, 4 * H, eps, True, False)
        # gates from G = xp + w_hh_norm ghat, then the cell
        for j in range(tid, H, nt):
            q = gb + j
            gi = normalize(gh, ghat, q, mu, rs)
            gf = normalize(gh, ghat, q + H, mu, rs)
            gc = normalize(gh, ghat, q + 2 * H, mu, rs)
            go = normalize(gh, ghat, q + 3 * H, mu, rs)
            i = sigmoid(acc(xp[q]) + acc(w_hh_norm[j]) * gi)
            f = sigmoid(acc(xp[q + H]) + acc(w_hh_norm[j + H]) * gf)
            gg = math.tanh(acc(xp[q + 2 * H]) + acc(w_hh_norm[j + 2 * H]) * gc)
            o = sigmoid(acc(xp[q + 3 * H]) + acc(w_hh_norm[j + 3 * H]) * go)
            act[q] = i
            act[q + H] = f
            act[q + 2 * H] = gg
            act[q + 3 * H] = o
            c[cb + j] = f * acc(cprev[cb + j]) + i * gg
        muc, rsc = row_stats(red, c, c, cb, H, eps, True, False)     # (c in the accumulator type)
        if tid == 0:
            rstd_h[row] = rs
            rstd_c[row] = rsc
        for j in range(tid, H, nt):
            ch = normalize(c, chat, cb + j, muc, rsc)
            h[cb + j] = acc(act[gb + 3 * H + j]) * math.tanh(acc(w_c[j]) * ch + acc(b_c[j]))

    # LayerNormLSTM backward.  Forward: ghat = LN(gh) (over 4H), G = xp + w_hh_norm ghat, gates as
    # the LSTM, c = f cprev + i gg, chat = LN(c) (over H), y = w_c chat + b_c, h = o tanh(y).
    #   dhe = dy + dh;  dg_o = dhe tanh(y) o (1 - o);  dcn = dL/dy = dhe o (1 - tanh(y)^2).
    #   LN backward (xhat = LN(x), dxhat given; mean over the row):
    #       dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)),
    #   with dxhat = dcn w_c for the cell:  dce = dc + rstd_c (dchat - m(dchat) - chat m(dchat chat)),
    #   then dg_i, dg_f, dg_g as the LSTM with dce, dc <- dce f;
    #   and with dghat = dg w_hh_norm for the recurrent part:  dgh = rstd_h (dghat - m(dghat)
    #   - ghat m(dghat ghat)) over the 4H row.  The caller sums dg ghat (w_hh_norm), dcn chat (w_c)
    #   and dcn (b_c) over rows, and takes dgh through W_hh.
    # Three passes over the row: (1) dg_o, dcn and the sums of the cell norm; (2) dce, dg_i,f,g,
    # dc and the sums of the recurrent norm; (3) dgh.
    @cuda.jit
    def _ln_lstm_step_bwd_kernel(act, ghat, rstd_h, chat, rstd_c, cprev, w_hh_norm, w_c, b_c, dy, dh,
                                 dc, dg, dgh, dcn, H):
        # act, ghat, dg, dgh (B, 4H); chat, cprev, dy, dh, dc, dcn (B, H); rstd_h, rstd_c (B,);
        # w_hh_norm (4H,); w_c, b_c (H,).  One block per row.
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        red = cuda.shared.array(MAX_THREADS, acc)
        one = acc(1)
        gb = row * 4 * H
        cb = row * H
        s1 = acc(0)
        s2 = acc(0)
        for j in range(tid, H, nt):
            dhe = acc(dy[cb + j]) + acc(dh[cb + j])
            o = acc(act[gb + 3 * H + j])
            ch = acc(chat[cb + j])
            tc = math.tanh(acc(w_c[j]) * ch + acc(b_c[j]))
            dg[gb + 3 * H + j] = dhe * tc * o * (one - o)
            d = dhe * o * (one - tc * tc)
            dcn[cb + j] = d
            dchat = d * acc(w_c[j])
            s1 += dchat
            s2 += dchat * ch
        nh = acc(H)
        m1 = block_sum(red, s1) / nh
        m2 = block_sum(red, s2) / nh
        rsc = acc(rstd_c[row])
        s1 = acc(0)
        s2 = acc(0)
        for j in range(tid, H, nt):
            q = gb + j
            ch = acc(chat[cb + j])
            dce = acc(dc[cb + j]) + rsc * (acc(dcn[cb + j]) * acc(w_c[j]) - m1 - ch * m2)
            f = acc(act[q + H])
            dgi, dgf, dgg = lstm_cell_bwd(dce, acc(act[q]), f, acc(act[q + 2 * H]), acc(cprev[cb + j]))
            dg[q] = dgi
            dg[q + H] = dgf
            dg[q + 2 * H] = dgg
            dc[cb + j] = dce * f
            s1, s2 = ln_bwd_sums(dg, w_hh_norm, ghat, q, j, H, 4, s1, s2)
        ln_bwd_finish(red, s1, s2, dg, w_hh_norm, ghat, acc(rstd_h[row]), dgh, gb, H, 4)

    # ------------------------------------------------------------------ LayerNormGRU

    @cuda.jit
    def _ln_gru_step_fwd_kernel(xp, gh, w_hh_norm, b_hh, hprev, h, act, ghat, rstd_h, ghn, H, eps):
        # xp, gh, act, ghat (B, 3H); w_hh_norm, b_hh (3H,); hprev, h, ghn (B, H); rstd_h (B,).
        # One block per row.  a = w_hh_norm LN(gh) + b_hh plays the GRU's recurrent part.
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        red = cuda.shared.array(MAX_THREADS, acc)
        gb = row * 3 * H
        cb = row * H
        mu, rs = row_stats(red, gh, gh, gb, 3 * H, eps, True, False)
        if tid == 0:
            rstd_h[row] = rs
        for j in range(tid, H, nt):
            q = gb + j
            gr = normalize(gh, ghat, q, mu, rs)
            gz = normalize(gh, ghat, q + H, mu, rs)
            gn = normalize(gh, ghat, q + 2 * H, mu, rs)
            an = acc(w_hh_norm[j + 2 * H]) * gn + acc(b_hh[j + 2 * H])
            r, z, n, hn = gru_cell(acc(xp[q]), acc(xp[q + H]), acc(xp[q + 2 * H]),
                                   acc(w_hh_norm[j]) * gr + acc(b_hh[j]),
                                   acc(w_hh_norm[j + H]) * gz + acc(b_hh[j + H]), an, acc(hprev[cb + j]))
            h[cb + j] = hn
            ghn[cb + j] = an
            act[q] = r
            act[q + H] = z
            act[q + 2 * H] = n

    # LayerNormGRU backward.  The GRU backward (gru_cell_bwd) with a = w_hh_norm ghat + b_hh as the
    # recurrent part gives dxp and da; then dghat = da w_hh_norm and, ghat = LN(gh) over 3H,
    #   dgh = rstd_h (dghat - mean(dghat) - ghat mean(dghat ghat)).
    # The caller sums da ghat (w_hh_norm) and da (b_hh) over rows, and adds dgh W_hh to dhp.
    # Two passes over the row: (1) the GRU backward and the sums; (2) dgh.
    @cuda.jit
    def _ln_gru_step_bwd_kernel(act, ghat, rstd_h, ghn, hprev, w_hh_norm, dy, dh, dxp, da, dgh, dhp, H):
        # act, ghat, dxp, da, dgh (B, 3H); ghn, hprev, dy, dh, dhp (B, H); rstd_h (B,);
        # w_hh_norm (3H,).  One block per row.
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        red = cuda.shared.array(MAX_THREADS, acc)
        gb = row * 3 * H
        cb = row * H
        s1 = acc(0)
        s2 = acc(0)
        for j in range(tid, H, nt):
            q = gb + j
            r = acc(act[q])
            z = acc(act[q + H])
            dhe = acc(dy[cb + j]) + acc(dh[cb + j])
            da_r, da_z, da_n = gru_cell_bwd(dhe, r, z, acc(act[q + 2 * H]), acc(ghn[cb + j]),
                                            acc(hprev[cb + j]))
            dhp[cb + j] = dhe * z
            dxp[q] = da_r
            dxp[q + H] = da_z
            dxp[q + 2 * H] = da_n
            da[q] = da_r
            da[q + H] = da_z
            da[q + 2 * H] = da_n * r
            s1, s2 = ln_bwd_sums(da, w_hh_norm, ghat, q, j, H, 3, s1, s2)
        ln_bwd_finish(red, s1, s2, da, w_hh_norm, ghat, acc(rstd_h[row]), dgh, gb, H, 3)

    return dict(
        lstm_fwd=_lstm_step_fwd_kernel, lstm_bwd=_lstm_step_bwd_kernel,
        gru_fwd=_gru_step_fwd_kernel, gru_bwd=_gru_step_bwd_kernel,
        rnn_fwd=_rnn_step_fwd_kernel, rnn_bwd=_rnn_step_bwd_kernel,
        ln_lstm_fwd=_ln_lstm_step_fwd_kernel, ln_lstm_bwd=_ln_lstm_step_bwd_kernel,
        ln_gru_fwd=_ln_gru_step_fwd_kernel, ln_gru_bwd=_ln_gru_step_bwd_kernel,
    )


def _elementwise(name, dtype, B, H, stream):
    """The kernel `name`, configured for one thread per (row, unit); None when there is no work."""
    n = int(B) * int(H)
    if n <= 0:
        return None
    return _kernels(dtype)[name][(n + _THREADS - 1) // _THREADS, _THREADS, stream]


def _per_row(name, dtype, B, H, stream, threads):
    """The kernel `name`, configured for one block per row (block_size(H) threads unless `threads`
    is given: a power of two <= MAX_THREADS, as make_block_sum needs); None when there is no work."""
    t = threads or block_size(int(H))
    if t > MAX_THREADS or t & (t - 1):
        raise ValueError(f"recurrent cuda: threads must be a power of two <= {MAX_THREADS}, got {t}")
    if int(B) <= 0 or int(H) <= 0:
        return None
    return _kernels(dtype)[name][int(B), t, stream]


# ---------------------------------------------------------------------- launchers


def lstm_step_forward(g, cprev, c, h, act, B, H, stream=0):
    """One LSTM step from the gate pre-activations g (B, 4H) = xp_t + h_{t-1} W_hh^T + biases:
    c = f cprev + i gg, h = o tanh(c) (B, H); act (B, 4H) = [i, f, gg, o] activated."""
    k = _elementwise("lstm_fwd", g.dtype, B, H, stream)
    if k is not None:
        k(g, cprev, c, h, act, int(B), int(H))


def lstm_step_backward(act, c, cprev, dy, dh, dc, dg, B, H, stream=0):
    """Backward of lstm_step_forward: dg (B, 4H) from dy (the output's gradient at this step) and
    the carries dh (read only) and dc (read, then overwritten with the gradient at cprev)."""
    k = _elementwise("lstm_bwd", act.dtype, B, H, stream)
    if k is not None:
        k(act, c, cprev, dy, dh, dc, dg, int(B), int(H))


def gru_step_forward(xp, gh, hprev, h, act, ghn, B, H, stream=0):
    """One GRU step from xp = x W_ih^T + b_ih and gh = hprev W_hh^T + b_hh (B, 3H):
    h (B, H); act (B, 3H) = [r, z, n]; ghn (B, H) = gh's n slice, saved for the backward."""
    k = _elementwise("gru_fwd", xp.dtype, B, H, stream)
    if k is not None:
        k(xp, gh, hprev, h, act, ghn, int(B), int(H))


def gru_step_backward(act, ghn, hprev, dy, dh, dxp, dgh, dhp, B, H, stream=0):
    """Backward of gru_step_forward: dxp, dgh (B, 3H) (gradients at xp and gh) and dhp (B, H), the
    direct part of the gradient at hprev (the caller adds dgh W_hh)."""
    k = _elementwise("gru_bwd", act.dtype, B, H, stream)
    if k is not None:
        k(act, ghn, hprev, dy, dh, dxp, dgh, dhp, int(B), int(H))


def rnn_step_forward(g, h, B, H, relu, stream=0):
    """One Elman RNN step: h = tanh(g) or relu(g), g (B, H) the pre-activation."""
    k = _elementwise("rnn_fwd", g.dtype, B, H, stream)
    if k is not None:
        k(g, h, int(B), int(H), bool(relu))


def rnn_step_backward(h, dy, dh, dg, B, H, relu, stream=0):
    """Backward of rnn_step_forward from its output h: dg (B, H)."""
    k = _elementwise("rnn_bwd", h.dtype, B, H, stream)
    if k is not None:
        k(h, dy, dh, dg, int(B), int(H), bool(relu))


def ln_lstm_step_forward(xp, gh, w_hh_norm, w_c, b_c, cprev, c, h, act, ghat, rstd_h, chat, rstd_c, B, H,
                         eps, stream=0, threads=None):
    """One LayerNormLSTM step.  xp (B, 4H): normalized input part with every bias; gh (B, 4H) =
    hprev W_hh^T, raw.  Writes ghat = LN(gh) (B, 4H) and its rstd_h (B,), act (B, 4H), c (B, H),
    chat = LN(c) (B, H) and its rstd_c (B,), h = o tanh(w_c chat + b_c) (B, H)."""
    k = _per_row("ln_lstm_fwd", xp.dtype, B, H, stream, threads)
    if k is not None:
        k(xp, gh, w_hh_norm, w_c, b_c, cprev, c, h, act, ghat, rstd_h, chat, rstd_c, int(H), float(eps))


def ln_lstm_step_backward(act, ghat, rstd_h, chat, rstd_c, cprev, w_hh_norm, w_c, b_c, dy, dh, dc, dg, dgh,
                          dcn, B, H, stream=0, threads=None):
    """Backward of ln_lstm_step_forward: dg (B, 4H) at G (= the gradient at xp), dgh (B, 4H) at gh,
    dcn (B, H) at w_c chat + b_c; dc is read, then overwritten with the gradient at cprev."""
    k = _per_row("ln_lstm_bwd", act.dtype, B, H, stream, threads)
    if k is not None:
        k(act, ghat, rstd_h, chat, rstd_c, cprev, w_hh_norm, w_c, b_c, dy, dh, dc, dg, dgh, dcn, int(H))


def ln_gru_step_forward(xp, gh, w_hh_norm, b_hh, hprev, h, act, ghat, rstd_h, ghn, B, H, eps, stream=0,
                        threads=None):
    """One LayerNormGRU step.  xp (B, 3H): normalized input part with b_ih; gh (B, 3H) =
    hprev W_hh^T, raw.  Writes ghat = LN(gh) (B, 3H), rstd_h (B,), h (B, H), act (B, 3H) = [r, z, n],
    ghn (B, H) = the n slice of a = w_hh_norm ghat + b_hh."""
    k = _per_row("ln_gru_fwd", xp.dtype, B, H, stream, threads)
    if k is not None:
        k(xp, gh, w_hh_norm, b_hh, hprev, h, act, ghat, rstd_h, ghn, int(H), float(eps))


def ln_gru_step_backward(act, ghat, rstd_h, ghn, hprev, w_hh_norm, dy, dh, dxp, da, dgh, dhp, B, H, stream=0,
                         threads=None):
    """Backward of ln_gru_step_forward: dxp (B, 3H) at xp, da (B, 3H) at a = w_hh_norm ghat + b_hh,
    dgh (B, 3H) at gh, dhp (B, H) the direct part of the gradient at hprev (caller adds dgh W_hh)."""
    k = _per_row("ln_gru_bwd", act.dtype, B, H, stream, threads)
    if k is not None:
        k(act, ghat, rstd_h, ghn, hprev, w_hh_norm, dy, dh, dxp, da, dgh, dhp, int(H))
