# The LSTM kernels, plain and with torch's proj_size: included by recurrent.pyx (one compiled module; see its docstring for the layout,
# the threads and the gate math these kernels share).

# ============================================================================ LSTM

def lstm_forward(real[::1] xp, real[::1] w_hh, real[::1] h0, real[::1] c0, real[::1] y, real[::1] cs,
                 real[::1] gates, real[::1] g_step, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H,
                 Py_ssize_t ub, int num_threads, bint save=True, bint xp_blocked=True):
    """One LSTM layer over T steps, gates in blocks of ub units (see the module docstring).

        G = xp_t + h_{t-1} W_hh^T;  i, f, o = s(G_i, G_f, G_o), g = tanh(G_g)
        c_t = f c_{t-1} + i g;      h_t = o tanh(c_t)

    xp (N, 4H): projected inputs with both biases, blocked columns (torch's order with
    xp_blocked=False).  w_hh (4H, H): torch's row order (lstm_backward takes it blocked).
    h0, c0 (B_0, H).  Writes y, cs (N, H): every step's h and c; gates (N, 4H): the activated
    gates (blocked).  g_step (B_0 4H,): one step's pre-activations.

    save=False (inference): nothing is kept for backward.  The gates are activated in place in
    g_step and c alternates between the two halves of cs (2 B_0 H,): step t writes half t % 2, so
    sequence b's final c is in half (L_b - 1) % 2.  gates is not touched.  This skips writing
    (N, 4H) + (N, H) elements and faulting their pages in."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:         # no one-thread team: MKL would see no parallel region and nest its own
        with nogil:
            lstm_fwd_thread_(ptr_(xp), xp_blocked, ptr_(w_hh), ptr_(h0), ptr_(c0), ptr_(y), ptr_(cs), ptr_(gates),
                             ptr_(g_step), &offs[0], T, H, ub, save, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lstm_fwd_thread_(ptr_(xp), xp_blocked, ptr_(w_hh), ptr_(h0), ptr_(c0), ptr_(y), ptr_(cs), ptr_(gates),
                         ptr_(g_step), &offs[0], T, H, ub, save, tid, fs_team_size())


cdef void lstm_fwd_thread_(const real* xp, bint xp_blocked, const real* w, const real* h0, const real* c0, real* y,
                           real* cs, real* gates, real* gs, const int64_t* offs, Py_ssize_t T, Py_ssize_t H,
                           Py_ssize_t ub, bint save, int tid, int nt) noexcept nogil:
    """Thread tid's part of lstm_forward, inside one parallel region for the whole sequence: the
    unit blocks k = tid, tid + nt, ... at every step, then a barrier (step t + 1's GEMM reads all
    of h_t).  Each thread writes only its own columns of every buffer."""
    cdef Py_ssize_t t, k, r0, bt, rp, H4 = 4 * H, nblk = (H + ub - 1) // ub, B0 = offs[1] - offs[0]
    cdef const real* hprev
    cdef const real* cprev
    cdef real* act
    cdef real* c
    for t in range(T):
        r0, bt, rp = offs[t], offs[t + 1] - offs[t], offs[t - 1] if t > 0 else 0
        hprev = h0 if t == 0 else y + rp * H
        if save:
            cprev = c0 if t == 0 else cs + rp * H
            act, c = gates + r0 * H4, cs + r0 * H
        else:
            cprev = c0 if t == 0 else cs + ((t - 1) % 2) * B0 * H
            act, c = gs, cs + (t % 2) * B0 * H
        k = tid
        while k < nblk:
            lstm_fwd_block_(xp + r0 * H4, xp_blocked, w, hprev, cprev, gs, act, c, y + r0 * H, bt, H, ub, k)
            k = k + nt
        fs_barrier()


cdef void lstm_fwd_block_(const real* xp, bint xp_blocked, const real* w, const real* hprev, const real* cprev,
                          real* gs, real* act, real* c, real* h, Py_ssize_t bt, Py_ssize_t H, Py_ssize_t ub,
                          Py_ssize_t k) noexcept nogil:
    """Block k of one forward step (bt rows): G[:, block] = xp_t[:, block] + h_{t-1} W_block^T in
    gs (bt, 4H, blocked), then the gate math of its units.  W_hh in torch's row order (four
    GEMMs, one per gate); xp (bt, 4H) blocked or in torch's order; act (bt, 4H), c, h (bt, H)
    of step t (act may be gs itself: the gates activate in place)."""
    cdef Py_ssize_t b, g, j0 = k * ub, nb = min(ub, H - k * ub), col = 4 * k * ub, H4 = 4 * H
    for b in range(bt):
        if xp_blocked:
            copy_(gs + b * H4 + col, xp + b * H4 + col, 4 * nb)
        else:
            for g in range(4):
                copy_(gs + b * H4 + col + g * nb, xp + b * H4 + g * H + j0, nb)
    for g in range(4):                                   # gate g of its units: rows g H + j0 .. of W_hh
        step_gemm_(False, True, <int> bt, <int> nb, <int> H, 1, hprev, <int> H, w + (g * H + j0) * H, <int> H,
                   1, gs + col + g * nb, <int> H4)
    for b in range(bt):
        lstm_gates_(gs + b * H4 + col, nb, cprev + b * H + j0, c + b * H + j0, act + b * H4 + col, nb)
        lstm_h_(act + b * H4 + col + 3 * nb, c + b * H + j0, h + b * H + j0, nb)


cdef void lstm_h_(const real* o, const real* c, real* h, Py_ssize_t nb) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(nb):
        h[j] = o[j] * tanh_(c[j])


def lstm_forward_panels(float[::1] xp, float[::1] w_hh, float[::1] h0, float[::1] c0, float[::1] y, float[::1] cs,
                        float[::1] gates, float[::1] panels, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H,
                        Py_ssize_t ub, int num_threads, bint save=True, bint xp_blocked=True, float[::1] x=None,
                        Py_ssize_t I=0, float[::1] w_ih=None, float[::1] bias=None):
    """lstm_forward (same arguments and outputs), fp32, on packed panels (_panel.h): each thread
    packs its unit blocks' rows of W_hh once into panels of panel_width() units, and per step
    runs the register-blocked product of h_{t-1} with each panel and the cell on its tile.

    With I > 0 the input projection is fused too: row b's pre-activations are [x_b | h_{t-1,b}]
    [W_ih | W_hh]^T + bias, x (N, I), w_ih (4H, I), bias (4H,) (b_ih + b_hh, or None), all in
    torch's order, and xp is not read.  panels: lstm_panel_floats(H, I + H, ub, False) floats."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        with nogil:
            lstm_fwd_panel_thread_(ptr_(xp), xp_blocked, ptr_(x), I, ptr_(w_ih), ptr_(bias), &w_hh[0], &h0[0],
                                   &c0[0], &y[0], &cs[0], ptr_(gates), &panels[0], &offs[0], T, H, ub, save, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lstm_fwd_panel_thread_(ptr_(xp), xp_blocked, ptr_(x), I, ptr_(w_ih), ptr_(bias), &w_hh[0], &h0[0],
                               &c0[0], &y[0], &cs[0], ptr_(gates), &panels[0], &offs[0], T, H, ub, save, tid,
                               fs_team_size())


cdef void lstm_fwd_panel_thread_(const float* xp, bint xp_blocked, const float* x, Py_ssize_t I, const float* w_ih,
                                 const float* bias, const float* w, const float* h0, const float* c0, float* y,
                                 float* cs, float* gates, float* panels, const int64_t* offs, Py_ssize_t T,
                                 Py_ssize_t H, Py_ssize_t ub, bint save, int tid, int nt) noexcept nogil:
    """Thread tid's part of lstm_forward_panels: pack its blocks k = tid, tid + nt, ..., then per
    step each block's panels (panel q: units j0 + q vw ..) and a barrier.  The gate stride of xp
    and of the saved gates is nb in the blocked layout (block k's gate g at column 4 j0 + g nb),
    H in torch's order."""
    cdef Py_ssize_t t, k, q, j0, nb, u, r0, bt, rp, H4 = 4 * H, nblk = (H + ub - 1) // ub, B0 = offs[1] - offs[0]
    cdef Py_ssize_t vw = fs_panel_width(), Kp = I + H
    cdef Py_ssize_t per_block = (ub + vw - 1) // vw * 4 * vw * Kp, per_panel = 4 * vw * Kp, gx, xcol, acol
    cdef const float* hprev
    cdef const float* cprev
    cdef const float* xrow
    cdef float* act
    cdef float* c
    k = tid
    while k < nblk:
        j0, nb = k * ub, min(ub, H - k * ub)
        if I > 0:
            fs_pack_gates(w_ih, H, I, j0, nb, vw, Kp, 0, panels + k * per_block)
        fs_pack_gates(w, H, H, j0, nb, vw, Kp, I, panels + k * per_block)
        k = k + nt
    for t in range(T):
        r0, bt, rp = offs[t], offs[t + 1] - offs[t], offs[t - 1] if t > 0 else 0
        hprev = h0 if t == 0 else y + rp * H
        act = gates + r0 * H4 if save else NULL
        if save:
            cprev, c = (c0 if t == 0 else cs + rp * H), cs + r0 * H
        else:
            cprev, c = (c0 if t == 0 else cs + ((t - 1) % 2) * B0 * H), cs + (t % 2) * B0 * H
        k = tid
        while k < nblk:
            j0, nb = k * ub, min(ub, H - k * ub)
            q = 0
            while q * vw < nb:
                u = j0 + q * vw
                if I > 0:              # the bias (torch's order) stands for xp: the same for every row
                    xrow, gx = (bias + u if bias != NULL else NULL), H
                elif xp_blocked:
                    xrow, gx = xp + r0 * H4 + 4 * j0 + q * vw, nb
                else:
                    xrow, gx = xp + r0 * H4 + u, H
                fs_lstm_panel(bt, I, x + r0 * I if I > 0 else NULL, I, H, hprev, H,
                              panels + k * per_block + q * per_panel,
                              xrow, 0 if I > 0 else H4, gx, cprev + u, c + u, y + r0 * H + u, H,
                              act + 4 * j0 + q * vw if save else NULL, H4, nb, <int> min(vw, nb - q * vw))
                q = q + 1
            k = k + nt
        fs_barrier()


def lstm_backward_panels(float[::1] dy, float[::1] w_hh, float[::1] c0, float[::1] cs, float[::1] gates,
                         float[::1] dgates, float[::1] dh, float[::1] dc, float[::1] panels, const int64_t[::1] offs,
                         Py_ssize_t T, Py_ssize_t H, Py_ssize_t ub, int num_threads):
    """lstm_backward (same arguments and outputs), fp32, with dh_next = dG_t W_hh on packed
    panels.  The forward's G_t = xp_t + h_{t-1} W_hh^T gives dL/dh_{t-1} = dG_t W_hh, entry by
    entry dh_next[b, j] = sum_q dG_t[b, q] W_hh[row(q), j] over the 4H gate columns q of dG in
    the blocked order (row(q): the torch row of blocked column q).  w_hh in torch's row order:
    each thread packs, once, the columns j of its units over all 4H rows q in that order (panels
    of 4 panel_width() units, fs_pack_units) and forms exactly the dh_next columns its next step
    reads.  panels: lstm_panel_floats(H, H, ub, True) floats."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        with nogil:
            lstm_bwd_panel_thread_(&dy[0], &w_hh[0], &c0[0], &cs[0], &gates[0], &dgates[0], &dh[0], &dc[0],
                                   &panels[0], &offs[0], T, H, ub, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lstm_bwd_panel_thread_(&dy[0], &w_hh[0], &c0[0], &cs[0], &gates[0], &dgates[0], &dh[0], &dc[0],
                               &panels[0], &offs[0], T, H, ub, tid, fs_team_size())


cdef void lstm_bwd_panel_thread_(const float* dy, const float* w, const float* c0, const float* cs,
                                 const float* gates, float* dg, float* dh, float* dc, float* panels,
                                 const int64_t* offs, Py_ssize_t T, Py_ssize_t H, Py_ssize_t ub, int tid,
                                 int nt) noexcept nogil:
    """lstm_bwd_thread_ with its dh_next columns from the thread's packed panels."""
    cdef Py_ssize_t t, k, b, p, j0, nb, col, r0, bt, H4 = 4 * H, nblk = (H + ub - 1) // ub
    cdef Py_ssize_t vw4 = 4 * fs_panel_width(), per_block = (ub + vw4 - 1) // vw4 * vw4 * H4
    cdef const float* cprev
    k = tid
    while k < nblk:
        fs_pack_units(w, 4, H, ub, k * ub, min(ub, H - k * ub), <int> (vw4 // 4), panels + k * per_block)
        k = k + nt
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        cprev = c0 if t == 0 else cs + offs[t - 1] * H
        k = tid
        while k < nblk:                                    # the gate gradients of this thread's blocks
            j0, nb = k * ub, min(ub, H - k * ub)
            col = 4 * j0
            for b in range(bt):
                lstm_cell_bwd_(gates + (r0 + b) * H4 + col, nb, cs + (r0 + b) * H + j0, cprev + b * H + j0,
                               dy + (r0 + b) * H + j0, dh + b * H + j0, dc + b * H + j0, dg + (r0 + b) * H4 + col, nb)
            k = k + nt
        fs_barrier()
        k = tid
        while k < nblk:                                    # dh_next[:, its units] = dG_t W_hh[:, its units]
            j0, nb = k * ub, min(ub, H - k * ub)
            p = 0
            while p * vw4 < nb:
                fs_panel_gemm(bt, H4, dg + r0 * H4, H4, panels + k * per_block + p * vw4 * H4, dh + j0 + p * vw4, H,
                              <int> min(vw4, nb - p * vw4), 0)
                p = p + 1
            k = k + nt


def lstm_backward(real[::1] dy, real[::1] w_hh, real[::1] c0, real[::1] cs, real[::1] gates, real[::1] dgates,
                  real[::1] dh, real[::1] dc, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H, Py_ssize_t ub,
                  int num_threads):
    """Backward through time of lstm_forward (same blocked layout), t = T-1 .. 0:

        dh_t = dy_t + dh_next;  dc_t = dc_next + dh_t o (1 - tanh(c_t)^2)
        do = dh_t tanh(c_t) o (1 - o);  di = dc_t g i (1 - i);  dg = dc_t i (1 - g^2)
        df = dc_t c_{t-1} f (1 - f);    dc_next = dc_t f;       dh_next = dG_t W_hh   (BLAS)

    dy (N, H).  dh, dc (B_0, H): the carries (see the module docstring).  Writes dgates (N, 4H),
    the pre-activation gradients dG, from which the binding forms every weight gradient."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        with nogil:
            lstm_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(c0), ptr_(cs), ptr_(gates), ptr_(dgates), ptr_(dh), ptr_(dc),
                             &offs[0], T, H, ub, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lstm_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(c0), ptr_(cs), ptr_(gates), ptr_(dgates), ptr_(dh), ptr_(dc),
                         &offs[0], T, H, ub, tid, fs_team_size())


cdef void lstm_bwd_thread_(const real* dy, const real* w, const real* c0, const real* cs, const real* gates,
                           real* dg, real* dh, real* dc, const int64_t* offs, Py_ssize_t T, Py_ssize_t H,
                           Py_ssize_t ub, int tid, int nt) noexcept nogil:
    """Thread tid's part of lstm_backward, inside one parallel region for the whole sequence.  Per
    step: the gate gradients of its unit blocks k = tid, tid + nt, ...; a barrier (dh_next needs
    every gate); then its own units' columns of dh_next = dG_t W_hh (a column slice of W_hh).
    The next step reads only those columns of dh, so one barrier per step suffices: a thread
    already at step t - 1 writes dG_{t-1} while the others still read dG_t."""
    cdef Py_ssize_t t, k, b, j0, nb, col, r0, bt, H4 = 4 * H, nblk = (H + ub - 1) // ub
    cdef const real* cprev
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        cprev = c0 if t == 0 else cs + offs[t - 1] * H
        k = tid
        while k < nblk:                                    # the gate gradients of this thread's blocks
            j0 = k * ub
            nb = min(ub, H - j0)
            col = 4 * j0
            for b in range(bt):
                lstm_cell_bwd_(gates + (r0 + b) * H4 + col, nb, cs + (r0 + b) * H + j0, cprev + b * H + j0,
                               dy + (r0 + b) * H + j0, dh + b * H + j0, dc + b * H + j0, dg + (r0 + b) * H4 + col, nb)
            k = k + nt
        fs_barrier()
        k = tid
        while k < nblk:                                    # dh_next[:, its units] = dG_t W_hh[:, its units]
            j0 = k * ub
            step_gemm_(False, False, <int> bt, <int> min(ub, H - j0), <int> H4, 1, dg + r0 * H4, <int> H4, w + j0,
                    <int> H, 0, dh + j0, <int> H)
            k = k + nt


# ============================================================================ LSTM with projection

def lstm_proj_forward(real[::1] xp, real[::1] w_hh, real[::1] w_hr, real[::1] h0, real[::1] c0, real[::1] y,
                      real[::1] cs, real[::1] gates, real[::1] m, real[::1] g_step, const int64_t[::1] offs,
                      Py_ssize_t T, Py_ssize_t H, Py_ssize_t P, Py_ssize_t ub, int num_threads):
    """lstm_forward with torch's proj_size P: the state that recurs and is output is the
    projection h_t = m_t W_hr^T (P,) of m_t = o tanh(c_t) (H,).

    w_hh (4H, P) blocked rows; w_hr (P, H).  h0 (B_0, P), c0 (B_0, H).  Writes y (N, P), cs, m
    (N, H), gates (N, 4H).  Per step: the thread's unit blocks (GEMM slice, gates, m), a barrier,
    its columns of h_t = m_t W_hr^T, a barrier."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        with nogil:
            lstm_proj_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(w_hr), ptr_(h0), ptr_(c0), ptr_(y), ptr_(cs), ptr_(gates),
                                  ptr_(m), ptr_(g_step), &offs[0], T, H, P, ub, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lstm_proj_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(w_hr), ptr_(h0), ptr_(c0), ptr_(y), ptr_(cs), ptr_(gates),
                              ptr_(m), ptr_(g_step), &offs[0], T, H, P, ub, tid, fs_team_size())


cdef void lstm_proj_fwd_thread_(const real* xp, const real* w, const real* wr, const real* h0, const real* c0,
                                real* y, real* cs, real* gates, real* m, real* gs, const int64_t* offs, Py_ssize_t T,
                                Py_ssize_t H, Py_ssize_t P, Py_ssize_t ub, int tid, int nt) noexcept nogil:
    cdef Py_ssize_t t, k, b, j0, nb, col, r0, bt, rp, p0, p1, H4 = 4 * H, nblk = (H + ub - 1) // ub
    cdef const real* hprev
    cdef const real* cprev
    for t in range(T):
        r0, bt, rp = offs[t], offs[t + 1] - offs[t], offs[t - 1] if t > 0 else 0
        hprev = h0 if t == 0 else y + rp * P
        cprev = c0 if t == 0 else cs + rp * H
        k = tid
        while k < nblk:
            j0 = k * ub
            nb = min(ub, H - j0)
            col = 4 * j0
            for b in range(bt):
                copy_(gs + b * H4 + col, xp + (r0 + b) * H4 + col, 4 * nb)
            step_gemm_(False, True, <int> bt, <int> (4 * nb), <int> P, 1, hprev, <int> P, w + col * P, <int> P,
                    1, gs + col, <int> H4)
            for b in range(bt):
                lstm_gates_(gs + b * H4 + col, nb, cprev + b * H + j0, cs + (r0 + b) * H + j0,
                            gates + (r0 + b) * H4 + col, nb)
                lstm_h_(gates + (r0 + b) * H4 + col + 3 * nb, cs + (r0 + b) * H + j0, m + (r0 + b) * H + j0, nb)
            k = k + nt
        fs_barrier()
        p0, p1 = cols_(P, nt, tid)
        if p1 > p0:                                      # h_t[:, p0:p1] = m_t W_hr[p0:p1]^T
            step_gemm_(False, True, <int> bt, <int> (p1 - p0), <int> H, 1, m + r0 * H, <int> H, wr + p0 * H, <int> H,
                    0, y + r0 * P + p0, <int> P)
        fs_barrier()


def lstm_proj_backward(real[::1] dy, real[::1] w_hh, real[::1] w_hr, real[::1] c0, real[::1] cs, real[::1] gates,
                       real[::1] dgates, real[::1] dhp, real[::1] dm, real[::1] dh, real[::1] dc,
                       const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H, Py_ssize_t P, Py_ssize_t ub,
                       int num_threads):
    """Backward through time of lstm_proj_forward.  With dhp_t = dy_t + dh_next (P,), the total
    gradient at h_t:

        dm_t = dhp_t W_hr  (H,);   then the LSTM cell backward with dm_t as dh_t;
        dh_next = dG_t W_hh  (P,),  dW_hr = sum_t dhp_t^T m_t  (the binding, one GEMM)

    dy (N, P); dh (B_0, P) and dc (B_0, H) the carries.  Writes dgates (N, 4H) and dhp (N, P);
    dm (B_0 H,) is scratch.  Per step: the thread's units (dm columns, gate gradients), a barrier,
    its P columns of dh_next and of the next step's dhp, a barrier."""
    cdef Py_ssize_t nblk = (H + ub - 1) // ub
    cdef int tid, nt = max(1, min(num_threads, nblk))
    if T == 0 or H == 0:
        return
    if nt == 1:
        with nogil:
            lstm_proj_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(w_hr), ptr_(c0), ptr_(cs), ptr_(gates), ptr_(dgates),
                                  ptr_(dhp), ptr_(dm), ptr_(dh), ptr_(dc), &offs[0], T, H, P, ub, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        lstm_proj_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(w_hr), ptr_(c0), ptr_(cs), ptr_(gates), ptr_(dgates),
                              ptr_(dhp), ptr_(dm), ptr_(dh), ptr_(dc), &offs[0], T, H, P, ub, tid, fs_team_size())


cdef void add_rows_(const real* a, const real* b, real* out, Py_ssize_t rows, Py_ssize_t p0, Py_ssize_t p1,
                    Py_ssize_t P) noexcept nogil:
    """out[:rows, p0:p1] = a[:rows, p0:p1] + b[:rows, p0:p1], row stride P."""
    cdef Py_ssize_t r, j
    for r in range(rows):
        for j in range(p0, p1):
            out[r * P + j] = a[r * P + j] + b[r * P + j]


cdef void lstm_proj_bwd_thread_(const real* dy, const real* w, const real* wr, const real* c0, const real* cs,
                                const real* gates, real* dg, real* dhp, real* dm, real* dh, real* dc,
                                const int64_t* offs, Py_ssize_t T, Py_ssize_t H, Py_ssize_t P, Py_ssize_t ub, int tid,
                                int nt) noexcept nogil:
    cdef Py_ssize_t t, k, b, j0, nb, col, r0, bt, p0, p1, H4 = 4 * H, nblk = (H + ub - 1) // ub
    cdef const real* cprev
    p0, p1 = cols_(P, nt, tid)
    r0, bt = offs[T - 1], offs[T] - offs[T - 1]
    add_rows_(dy + r0 * P, dh, dhp + r0 * P, bt, p0, p1, P)          # dhp_{T-1} = dy + dh_n
    fs_barrier()
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        cprev = c0 if t == 0 else cs + offs[t - 1] * H
        k = tid
        while k < nblk:
            j0 = k * ub
            nb = min(ub, H - j0)
            col = 4 * j0
            # dm[:, its units] = dhp_t W_hr[:, its units]: the gradient at o tanh(c) of its units
            step_gemm_(False, False, <int> bt, <int> nb, <int> P, 1, dhp + r0 * P, <int> P, wr + j0, <int> H, 0,
                    dm + j0, <int> H)
            for b in range(bt):
                lstm_proj_cell_bwd_(gates + (r0 + b) * H4 + col, nb, cs + (r0 + b) * H + j0, cprev + b * H + j0,
                                    dm + b * H + j0, dc + b * H + j0, dg + (r0 + b) * H4 + col, nb)
            k = k + nt
        fs_barrier()
        if p1 > p0:                                      # dh_next[:, p0:p1] = dG_t W_hh[:, p0:p1]
            step_gemm_(False, False, <int> bt, <int> (p1 - p0), <int> H4, 1, dg + r0 * H4, <int> H4, w + p0, <int> P,
                    0, dh + p0, <int> P)
            if t > 0:                                    # dhp_{t-1} = dy_{t-1} + dh_next, its columns
                add_rows_(dy + offs[t - 1] * P, dh, dhp + offs[t - 1] * P, offs[t] - offs[t - 1], p0, p1, P)
        fs_barrier()


cdef void lstm_proj_cell_bwd_(const real* act, Py_ssize_t gs, const real* c, const real* cprev, const real* dmv,
                              real* dc, real* dg, Py_ssize_t nb) noexcept nogil:
    """lstm_cell_bwd_ with dh_t = dm (the gradient at o tanh(c)) and no separate carry."""
    cdef Py_ssize_t j
    cdef real og, tc
    for j in range(nb):
        dg[3 * gs + j] = tanh_(c[j])
    for j in range(nb):
        og = act[3 * gs + j]
        tc = dg[3 * gs + j]
        dg[j] = dc[j] + dmv[j] * og * (1 - tc * tc)
        dg[3 * gs + j] = dmv[j] * tc * og * (1 - og)
    lstm_gates_bwd_(act, gs, cprev, dg, dc, dg, nb)
