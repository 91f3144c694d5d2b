# The GRU and Elman RNN kernels: included by recurrent.pyx (one compiled module; see its docstring for the layout,
# the threads and the gate math these kernels share).

# fp32 with `panels` (block_panel_floats): the recurrent product of each unit block runs on packed
# panels (_panel.h) instead of BLAS per step: the forward's gate rows of the block of W_hh
# (fs_pack_rows), the backward's columns of its units (fs_pack_units), packed once per call.

def block_panel_floats(Py_ssize_t G, Py_ssize_t H, Py_ssize_t ub):
    """Floats of the packed weights of gru_* / rnn_* (G gates: 3, 1) in blocks of ub units."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    return nblk * max(block_panels_fwd_(G, H, ub), block_panels_bwd_(G, H, ub))


cdef inline Py_ssize_t block_panels_fwd_(Py_ssize_t G, Py_ssize_t H, Py_ssize_t ub) noexcept nogil:
    cdef Py_ssize_t vw4 = 4 * fs_panel_width()
    return (G * ub + vw4 - 1) // vw4 * vw4 * H


cdef inline Py_ssize_t block_panels_bwd_(Py_ssize_t G, Py_ssize_t H, Py_ssize_t ub) noexcept nogil:
    cdef Py_ssize_t vw4 = 4 * fs_panel_width()
    return (ub + vw4 - 1) // vw4 * vw4 * G * H


cdef void block_pack_(const real* w, real* panels, bint forward, Py_ssize_t G, Py_ssize_t H, Py_ssize_t ub,
                      Py_ssize_t k) noexcept nogil:
    """Block k's panels (fp32): forward, its G nb gate rows of W_hh (blocked rows); backward, its
    nb columns over all G H rows."""
    cdef Py_ssize_t j0 = k * ub, nb = min(ub, H - k * ub)
    if real is float:
        if forward:
            fs_pack_rows(w, H, G * j0, G * nb, fs_panel_width(), panels + k * block_panels_fwd_(G, H, ub))
        else:
            fs_pack_units(w, G, H, H, j0, nb, fs_panel_width(), panels + k * block_panels_bwd_(G, H, ub))


cdef void block_product_(real* panels, bint forward, Py_ssize_t G, Py_ssize_t H, Py_ssize_t ub, Py_ssize_t k,
                         Py_ssize_t bt, const real* a, const real* w, real beta, real* out,
                         Py_ssize_t ldo) noexcept nogil:
    """Block k's part of one step's recurrent product, out (= or +=, beta 0 or 1):
    forward  out[:, G j0 : G (j0 + nb)] = a W_hh[G j0 : G (j0 + nb)]^T  (a = h_{t-1}, (bt, H));
    backward out[:, j0 : j0 + nb] = a W_hh[:, j0 : j0 + nb]             (a = dG_t, (bt, G H)),
    the gradient of the forward's product with respect to h_{t-1} (dL/dh_{t-1} = dG_t W_hh; W_hh's
    rows and dG's columns are both in the blocked order, so the rows pack as they are); on its
    panels where given (fp32), else BLAS."""
    cdef Py_ssize_t j0 = k * ub, nb = min(ub, H - k * ub)
    if real is float:
        if panels != NULL:
            if forward:
                panel_cols_(bt, H, a, H, panels + k * block_panels_fwd_(G, H, ub), G * nb, out + G * j0, ldo,
                            beta != 0)
            else:
                panel_cols_(bt, G * H, a, G * H, panels + k * block_panels_bwd_(G, H, ub), nb, out + j0, ldo,
                            beta != 0)
            return
    if forward:
        step_gemm_(False, True, <int> bt, <int> (G * nb), <int> H, 1, a, <int> H, w + G * j0 * H, <int> H, beta,
                   out + G * j0, <int> ldo)
    else:
        step_gemm_(False, False, <int> bt, <int> nb, <int> (G * H), 1, a, <int> (G * H), w + j0, <int> H, beta,
                   out + j0, <int> ldo)


cdef void pack_blocks_(const real* w, real* panels, bint forward, Py_ssize_t G, Py_ssize_t H, Py_ssize_t ub,
                       int nt) noexcept nogil:
    """Every block's panels, the blocks shared out over nt threads (the forwards, outside their
    per-step regions)."""
    cdef Py_ssize_t k, nblk = (H + ub - 1) // ub
    if panels == NULL:
        return
    if nt > 1:
        for k in prange(nblk, num_threads=nt, schedule="static", chunksize=1):
            block_pack_(w, panels, forward, G, H, ub, k)
    else:
        for k in range(nblk):
            block_pack_(w, panels, forward, G, H, ub, k)


# ============================================================================ GRU

def gru_forward(real[::1] xp, real[::1] w_hh, real[::1] b_hh, real[::1] h0, real[::1] y, real[::1] gates,
                real[::1] ghn, real[::1] g_step, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H,
                Py_ssize_t ub, int num_threads, real[::1] panels=None):
    """One GRU layer over T steps (torch's r, z, n; gru_cell_fwd_), gates in blocks of ub units.

    xp (N, 3H): x W_ih^T + b_ih, blocked columns.  w_hh (3H, H), b_hh (3H,): blocked rows.
    h0 (B_0, H).  Writes y (N, H), gates (N, 3H) the activated r, z, n (blocked), ghn (N, H) the
    recurrent n pre-activation h_{t-1} W_hn^T + b_hn.  g_step (B_0 3H,): one step's h W_hh^T + b_hh."""
    cdef Py_ssize_t t, r0, bt, rp, k, H3 = 3 * H, nblk = (H + ub - 1) // ub
    cdef real* pxp = ptr_(xp)
    cdef real* pw = ptr_(w_hh)
    cdef real* pb = ptr_(b_hh)
    cdef real* py = ptr_(y)
    cdef real* pg = ptr_(gates)
    cdef real* pn = ptr_(ghn)
    cdef real* gs = ptr_(g_step)
    cdef real* pp = ptr_(panels)
    cdef const real* hprev
    cdef int nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    with nogil:                                          # at every thread count
        pack_blocks_(pw, pp, True, 3, H, ub, nt)
        for t in range(T):
            r0, bt, rp = step_(offs, t)
            if bt == 0:
                continue
            hprev = &h0[0] if t == 0 else py + rp * H
            if nt > 1:
                for k in prange(nblk, num_threads=nt, schedule="static", chunksize=1):
                    gru_fwd_block_(pxp + r0 * H3, pw, pb, hprev, gs, pg + r0 * H3, pn + r0 * H, py + r0 * H, bt, H,
                                   ub, k, pp)
            else:                                        # no one-thread team (see the module docstring)
                for k in range(nblk):
                    gru_fwd_block_(pxp + r0 * H3, pw, pb, hprev, gs, pg + r0 * H3, pn + r0 * H, py + r0 * H, bt, H,
                                   ub, k, pp)


cdef void gru_fwd_block_(const real* xp, const real* w, const real* bias, const real* hprev, real* gs, real* act,
                         real* ghn, real* h, Py_ssize_t bt, Py_ssize_t H, Py_ssize_t ub, Py_ssize_t k,
                         real* panels) noexcept nogil:
    """Block k of one GRU forward step: gs[:, block] = b_hh + h_{t-1} W_block^T, then the gates."""
    cdef Py_ssize_t b, j0 = k * ub, nb = min(ub, H - k * ub), col = 3 * k * ub, H3 = 3 * H
    for b in range(bt):
        copy_(gs + b * H3 + col, bias + col, 3 * nb)
    block_product_(panels, True, 3, H, ub, k, bt, hprev, w, 1, gs, H3)
    for b in range(bt):
        gru_cell_fwd_(xp + b * H3 + col, gs + b * H3 + col, nb, hprev + b * H + j0, h + b * H + j0,
                      act + b * H3 + col, ghn + b * H + j0, nb)


def gru_backward(real[::1] dy, real[::1] w_hh, real[::1] h0, real[::1] y, real[::1] gates, real[::1] ghn,
                 real[::1] dxp, real[::1] dgh, real[::1] dh, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H,
                 Py_ssize_t ub, int num_threads, real[::1] panels=None):
    """Backward through time of gru_forward (gru_cell_bwd_ per step, then dh_next += dgh_t W_hh).

    dy (N, H); dh (B_0, H) the carry.  Writes dxp (N, 3H) (gradient of x W_ih^T + b_ih) and dgh
    (N, 3H) (of h W_hh^T + b_hh), blocked; the binding forms the weight gradients from them."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        with nogil:
            gru_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(h0), ptr_(y), ptr_(gates), ptr_(ghn), ptr_(dxp), ptr_(dgh),
                            ptr_(dh), ptr_(panels), &offs[0], T, H, ub, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        gru_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(h0), ptr_(y), ptr_(gates), ptr_(ghn), ptr_(dxp), ptr_(dgh),
                        ptr_(dh), ptr_(panels), &offs[0], T, H, ub, tid, fs_team_size())


cdef void gru_bwd_thread_(const real* dy, const real* w, const real* h0, const real* y, const real* gates,
                          const real* ghn, real* dxp, real* dgh, real* dh, real* panels, const int64_t* offs,
                          Py_ssize_t T, Py_ssize_t H, Py_ssize_t ub, int tid, int nt) noexcept nogil:
    """Thread tid's part of gru_backward, one parallel region for the sequence (as lstm_bwd_thread_):
    its blocks' gate gradients (leaving dh_t z in its columns of dh), a barrier, then its columns
    of dh_next = dh_t z + dgh_t W_hh."""
    cdef Py_ssize_t t, k, b, j0, nb, col, r0, bt, H3 = 3 * H, nblk = (H + ub - 1) // ub
    cdef const real* hprev
    k = tid
    while panels != NULL and k < nblk:
        block_pack_(w, panels, False, 3, H, ub, k)
        k = k + nt
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        hprev = h0 if t == 0 else y + offs[t - 1] * H
        k = tid
        while k < nblk:
            j0 = k * ub
            nb = min(ub, H - j0)
            col = 3 * j0
            for b in range(bt):
                gru_cell_bwd_(gates + (r0 + b) * H3 + col, ghn + (r0 + b) * H + j0, nb, hprev + b * H + j0,
                              dy + (r0 + b) * H + j0, dh + b * H + j0, dxp + (r0 + b) * H3 + col,
                              dgh + (r0 + b) * H3 + col, nb)
            k = k + nt
        fs_barrier()
        k = tid
        while k < nblk:                                    # dh_next[:, its units] += dgh_t W_hh[:, its units]
            block_product_(panels, False, 3, H, ub, k, bt, dgh + r0 * H3, w, 1, dh, H)
            k = k + nt


# ============================================================================ Elman RNN

cdef void rnn_act_(real* g, Py_ssize_t nb, bint relu) noexcept nogil:
    cdef Py_ssize_t j
    cdef real zero = 0
    if relu:
        for j in range(nb):                     # NaN stays NaN, as torch.relu
            g[j] = zero if g[j] < zero else g[j]
    else:
        for j in range(nb):
            g[j] = tanh_(g[j])


def rnn_forward(real[::1] xp, real[::1] w_hh, real[::1] h0, real[::1] y, const int64_t[::1] offs, Py_ssize_t T,
                Py_ssize_t H, Py_ssize_t ub, bint relu, int num_threads, real[::1] panels=None):
    """Elman RNN over T steps: h_t = act(xp_t + h_{t-1} W_hh^T), act = tanh or relu, computed in
    place in y (N, H).  xp (N, H) holds both biases.  Threads own column blocks of ub units."""
    cdef Py_ssize_t t, r0, bt, rp, k, nblk = (H + ub - 1) // ub
    cdef real* pxp = ptr_(xp)
    cdef real* pw = ptr_(w_hh)
    cdef real* py = ptr_(y)
    cdef real* pp = ptr_(panels)
    cdef const real* hprev
    cdef int nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    with nogil:                                          # at every thread count
        pack_blocks_(pw, pp, True, 1, H, ub, nt)
        for t in range(T):
            r0, bt, rp = step_(offs, t)
            if bt == 0:
                continue
            hprev = &h0[0] if t == 0 else py + rp * H
            if nt > 1:
                for k in prange(nblk, num_threads=nt, schedule="static", chunksize=1):
                    rnn_fwd_block_(pxp + r0 * H, pw, hprev, py + r0 * H, bt, H, ub, k, relu, pp)
            else:                                        # no one-thread team (see the module docstring)
                for k in range(nblk):
                    rnn_fwd_block_(pxp + r0 * H, pw, hprev, py + r0 * H, bt, H, ub, k, relu, pp)


cdef void rnn_fwd_block_(const real* xp, const real* w, const real* hprev, real* h, Py_ssize_t bt, Py_ssize_t H,
                         Py_ssize_t ub, Py_ssize_t k, bint relu, real* panels) noexcept nogil:
    """Units [k ub, k ub + nb) of one RNN step: h = act(xp + h_{t-1} W_block^T), in place in h."""
    cdef Py_ssize_t b, j0 = k * ub, nb = min(ub, H - k * ub)
    for b in range(bt):
        copy_(h + b * H + j0, xp + b * H + j0, nb)
    block_product_(panels, True, 1, H, ub, k, bt, hprev, w, 1, h, H)
    for b in range(bt):
        rnn_act_(h + b * H + j0, nb, relu)


cdef void rnn_cell_bwd_(const real* h, const real* dy, const real* dh, real* dg, Py_ssize_t nb,
                        bint relu) noexcept nogil:
    """dG = (dy + dh_next) act'(G), act' from the output: 1 - h^2 (tanh) or [h > 0] (relu)."""
    cdef Py_ssize_t j
    cdef real zero = 0
    if relu:
        for j in range(nb):                     # as torch: zero gradient where h <= 0 (not at NaN)
            dg[j] = zero if h[j] <= zero else dy[j] + dh[j]
    else:
        for j in range(nb):
            dg[j] = (dy[j] + dh[j]) * (1 - h[j] * h[j])


def rnn_backward(real[::1] dy, real[::1] w_hh, real[::1] y, real[::1] dg, real[::1] dh, const int64_t[::1] offs,
                 Py_ssize_t T, Py_ssize_t H, Py_ssize_t ub, bint relu, int num_threads, real[::1] panels=None):
    """Backward through time of rnn_forward: dG_t = (dy_t + dh_next) act'(G_t) into dg (N, H),
    dh_next = dG_t W_hh (BLAS).  dh (B_0, H) is the carry."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        with nogil:
            rnn_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(y), ptr_(dg), ptr_(dh), ptr_(panels), &offs[0], T, H, ub, relu,
                            0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        rnn_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(y), ptr_(dg), ptr_(dh), ptr_(panels), &offs[0], T, H, ub, relu,
                        tid, fs_team_size())


cdef void rnn_bwd_thread_(const real* dy, const real* w, const real* y, real* dg, real* dh, real* panels,
                          const int64_t* offs, Py_ssize_t T, Py_ssize_t H, Py_ssize_t ub, bint relu, int tid,
                          int nt) noexcept nogil:
    """Thread tid's part of rnn_backward (as lstm_bwd_thread_): its units' dG, a barrier, its
    columns of dh_next = dG_t W_hh."""
    cdef Py_ssize_t t, k, b, j0, nb, r0, bt, nblk = (H + ub - 1) // ub
    k = tid
    while panels != NULL and k < nblk:
        block_pack_(w, panels, False, 1, H, ub, k)
        k = k + nt
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        k = tid
        while k < nblk:
            j0 = k * ub
            nb = min(ub, H - j0)
            for b in range(bt):
                rnn_cell_bwd_(y + (r0 + b) * H + j0, dy + (r0 + b) * H + j0, dh + b * H + j0, dg + (r0 + b) * H + j0,
                              nb, relu)
            k = k + nt
        fs_barrier()
        k = tid
        while k < nblk:                                    # dh_next[:, its units] = dG_t W_hh[:, its units]
            block_product_(panels, False, 1, H, ub, k, bt, dg + r0 * H, w, 0, dh, H)
            k = k + nt
