# The layer-normalized LSTM and GRU kernels (Ba et al. 2016): included by recurrent.pyx (one compiled module; see its docstring for the layout,
# the threads and the gate math these kernels share).

# ============================================================================ layer-normalized cells
# Torch's column order (no blocks): the row norms need whole rows, so a step has a columns
# phase (the recurrent GEMM) and a rows phase (norms and gate math); see ln_lstm_forward.

cdef inline void row_norm_(const real* v, real* vhat, real* rstd, Py_ssize_t n, real eps) noexcept nogil:
    """vhat = (v - mean) rstd over the row (_row_norm.pxd's statistics); writes rstd[0]."""
    cdef real mu
    row_stats_(v, n, eps, True, &mu, rstd)
    row_normalize_(v, mu, rstd[0], vhat, n)


cdef inline void sum_prod_(real* acc, const real* a, const real* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        acc[j] = acc[j] + a[j] * b[j]


cdef inline void sum_(real* acc, const real* a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        acc[j] = acc[j] + a[j]


cdef inline (Py_ssize_t, Py_ssize_t) cols_(Py_ssize_t G, int nt, int tid) noexcept nogil:
    """Thread tid's columns [c0, c1) of G, in slices of a multiple of 8 (a vector of floats)."""
    return col_slice_(G, nt, tid, 8)


# fp32 with `panels` (ln_panel_floats): each thread packs its column slice of W_hh once and runs its
# per-step GEMM slice on the panels (_panel.h); else (fp64, or panels None) BLAS per step.

cdef real* ln_pack_(const real* w, real* panels, bint forward, Py_ssize_t GH, Py_ssize_t H, int nt,
                    int tid) noexcept nogil:
    """Thread tid's panels (packed here): forward, its columns of h W_hh^T (rows of W_hh); backward,
    its columns of dgh W_hh (columns of W_hh over all GH rows).  NULL where there are none."""
    cdef Py_ssize_t k0, k1
    cdef real* mine
    if real is float:
        if panels == NULL:
            return NULL
        if forward:
            k0, k1 = cols_(GH, nt, tid)
            mine = panels + tid * ln_panel_stride_(GH, H, nt)
            if k1 > k0:
                fs_pack_rows(w, H, k0, k1 - k0, fs_panel_width(), mine)
        else:
            k0, k1 = cols_(H, nt, tid)
            mine = panels + tid * ln_panel_stride_(H, GH, nt)
            if k1 > k0:
                fs_pack_units(w, GH // H, H, H, k0, k1 - k0, fs_panel_width(), mine)
        return mine
    return NULL


cdef void ln_cols_(real* mine, bint forward, Py_ssize_t bt, Py_ssize_t k0, Py_ssize_t k1, Py_ssize_t K,
                   const real* a, const real* w, Py_ssize_t ldw, real beta, real* out, Py_ssize_t ldo) noexcept nogil:
    """out[:bt, k0:k1] (= or +=, beta 0 or 1) a W_hh[k0:k1]^T (forward, K = H) or a W_hh[:, k0:k1]
    (backward, K = G H), a (bt, K): on the thread's panels where it has them."""
    if real is float:
        if mine != NULL:
            panel_cols_(bt, K, a, K, mine, k1 - k0, out + k0, ldo, beta != 0)
            return
    if forward:
        step_gemm_(False, True, <int> bt, <int> (k1 - k0), <int> K, 1, a, <int> K, w + k0 * ldw, <int> ldw, beta,
                   out + k0, <int> ldo)
    else:
        step_gemm_(False, False, <int> bt, <int> (k1 - k0), <int> K, 1, a, <int> K, w + k0, <int> ldw, beta,
                   out + k0, <int> ldo)


cdef inline int ln_threads_(int num_threads, Py_ssize_t G) noexcept nogil:
    """Threads for a layer-normalized cell: at least 64 gate columns each, else one (a small step
    costs less than the barriers)."""
    return <int> max(1, min(<Py_ssize_t> num_threads, G // 64))


# One parallel region per sequence, each step in two phases separated by barriers:
#   columns: thread tid's slice of the recurrent GEMM (all rows);
#   rows:    thread tid's rows: the row norms and the gate math, which need whole rows.
# With nt = 1 the thread functions run outside any region (the barriers do nothing).

def ln_lstm_forward(real[::1] xp, real[::1] w_hh, real[::1] gamma_hh, real[::1] gamma_c, real[::1] beta_c,
                    real[::1] h0, real[::1] c0, real[::1] y, real[::1] cs, real[::1] gates, real[::1] ghat,
                    real[::1] rstd_h, real[::1] chat, real[::1] rstd_c, real[::1] g_step, const int64_t[::1] offs,
                    Py_ssize_t T, Py_ssize_t H, double eps, int num_threads, real[::1] panels=None):
    """Layer-normalized LSTM (Ba et al. 2016) over T steps:

        G   = xp_t + gamma_hh LN(h_{t-1} W_hh^T)        (xp_t = LN(x_t W_ih^T) gamma_ih + biases)
        i, f, o = s(G_i, G_f, G_o);  g = tanh(G_g);   c_t = f c_{t-1} + i g
        h_t = o tanh(gamma_c LN(c_t) + beta_c)

    LN normalizes a whole row (4H for the gates, H for the cell).  Saves y, cs (N, H); gates,
    ghat (N, 4H) the activations and the normalized recurrent term; chat (N, H) the normalized
    cell; rstd_h, rstd_c (N,).  g_step (B_0 4H,)."""
    cdef int tid, nt = ln_threads_(num_threads, 4 * H)
    if T == 0 or H == 0:
        return
    if nt == 1:
        with nogil:
            ln_lstm_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(gamma_hh), ptr_(gamma_c), ptr_(beta_c), ptr_(h0), ptr_(c0),
                                ptr_(y), ptr_(cs), ptr_(gates), ptr_(ghat), ptr_(rstd_h), ptr_(chat), ptr_(rstd_c),
                                ptr_(g_step), ptr_(panels), &offs[0], T, H, eps, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln_lstm_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(gamma_hh), ptr_(gamma_c), ptr_(beta_c), ptr_(h0), ptr_(c0),
                            ptr_(y), ptr_(cs), ptr_(gates), ptr_(ghat), ptr_(rstd_h), ptr_(chat), ptr_(rstd_c),
                            ptr_(g_step), ptr_(panels), &offs[0], T, H, eps, tid, fs_team_size())


cdef void ln_lstm_fwd_thread_(const real* xp, const real* w, const real* ghh, const real* gc, const real* bc,
                              const real* h0, const real* c0, real* y, real* cs, real* gates, real* ghat,
                              real* rstd_h, real* chat, real* rstd_c, real* gs, real* panels, const int64_t* offs,
                              Py_ssize_t T,
                              Py_ssize_t H, double eps, int tid, int nt) noexcept nogil:
    cdef Py_ssize_t t, b, j, row, r0, bt, rp, k0, k1, lo, hi, H4 = 4 * H
    cdef const real* hprev
    cdef const real* cprev
    cdef real e = <real> eps
    cdef real* mine = ln_pack_(w, panels, True, H4, H, nt, tid)
    for t in range(T):
        r0, bt, rp = offs[t], offs[t + 1] - offs[t], offs[t - 1] if t > 0 else 0
        hprev = h0 if t == 0 else y + rp * H
        cprev = c0 if t == 0 else cs + rp * H
        k0, k1 = cols_(H4, nt, tid)
        if k1 > k0:                                      # gs[:, k0:k1] = h_{t-1} W_hh[k0:k1]^T
            ln_cols_(mine, True, bt, k0, k1, H, hprev, w, H, 0, gs, H4)
        fs_barrier()
        lo, hi = chunk_(bt, nt, tid)
        for b in range(lo, hi):
            row = r0 + b
            row_norm_(gs + b * H4, ghat + row * H4, rstd_h + row, H4, e)
            for j in range(H4):
                gs[b * H4 + j] = xp[row * H4 + j] + ghh[j] * ghat[row * H4 + j]
            lstm_gates_(gs + b * H4, H, cprev + b * H, cs + row * H, gates + row * H4, H)
            row_norm_(cs + row * H, chat + row * H, rstd_c + row, H, e)
            ln_h_(gates + row * H4 + 3 * H, chat + row * H, gc, bc, y + row * H, H)
        fs_barrier()


cdef void ln_h_(const real* o, const real* chat, const real* gc, const real* bc, real* h, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        h[j] = o[j] * tanh_(gc[j] * chat[j] + bc[j])


def ln_lstm_backward(real[::1] dy, real[::1] w_hh, real[::1] gamma_hh, real[::1] gamma_c, real[::1] beta_c,
                     real[::1] c0, real[::1] cs, real[::1] gates, real[::1] ghat, real[::1] rstd_h, real[::1] chat,
                     real[::1] rstd_c, real[::1] dgates, real[::1] dgh, real[::1] dcn, real[::1] dh, real[::1] dc,
                     real[::1] sums, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H, int num_threads,
                     real[::1] panels=None):
    """Backward through time of ln_lstm_forward, per row of step t:

        dh_t = dy + dh_next;  u = gamma_c chat + beta_c;  dcn = dh_t o (1 - tanh(u)^2)   (dL/du)
        do = dh_t tanh(u) o (1 - o);   dc_t = dc_next + LN'(gamma_c dcn)      (through LN(c_t))
        di, df, dg, dc_next as the plain LSTM;            dG = (di, df, dg, do)  -> dgates
        dgh = LN'(gamma_hh dG)  (gradient of h_{t-1} W_hh^T);   dh_next = dgh W_hh   (BLAS)

    with LN'(d) = rstd (d - mean(d) - vhat mean(d vhat)) the gradient through a row norm.
    Writes dgates, dgh (N, 4H) and dcn (N, H), from which the binding forms the weight gradients,
    and accumulates the norm weights' gradients while the rows are in cache: sums (num_threads,
    6H), zeroed by the caller, gets per thread sum_rows dG ghat (4H), dcn chat (H) and dcn (H)."""
    cdef int tid, nt = ln_threads_(num_threads, 4 * H)
    if T == 0 or H == 0:
        return
    if nt == 1:
        with nogil:
            ln_lstm_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(gamma_hh), ptr_(gamma_c), ptr_(beta_c), ptr_(c0), ptr_(cs),
                                ptr_(gates), ptr_(ghat), ptr_(rstd_h), ptr_(chat), ptr_(rstd_c), ptr_(dgates),
                                ptr_(dgh),
                                ptr_(dcn), ptr_(dh), ptr_(dc), ptr_(sums), ptr_(panels), &offs[0], T, H, 0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln_lstm_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(gamma_hh), ptr_(gamma_c), ptr_(beta_c), ptr_(c0), ptr_(cs),
                            ptr_(gates), ptr_(ghat), ptr_(rstd_h), ptr_(chat), ptr_(rstd_c), ptr_(dgates), ptr_(dgh),
                            ptr_(dcn), ptr_(dh), ptr_(dc), ptr_(sums), ptr_(panels), &offs[0], T, H, tid,
                            fs_team_size())


cdef void ln_lstm_bwd_thread_(const real* dy, const real* w, const real* ghh, const real* gc, const real* bc,
                              const real* c0, const real* cs, const real* gates, const real* ghat,
                              const real* rstd_h, const real* chat, const real* rstd_c, real* dg, real* dgh,
                              real* dcn, real* dh, real* dc, real* sums, real* panels, const int64_t* offs,
                              Py_ssize_t T,
                              Py_ssize_t H, int tid, int nt) noexcept nogil:
    """Rows phase (its rows: everything up to dgh), barrier, columns phase (its columns of
    dh_next = dgh_t W_hh), barrier (the next rows phase reads whole rows of dh)."""
    cdef Py_ssize_t t, b, row, r0, bt, k0, k1, lo, hi, H4 = 4 * H
    cdef const real* cprev
    cdef real* mine = ln_pack_(w, panels, False, H4, H, nt, tid)
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        cprev = c0 if t == 0 else cs + offs[t - 1] * H
        lo, hi = chunk_(bt, nt, tid)
        for b in range(lo, hi):
            row = r0 + b
            ln_lstm_row_bwd_(gates + row * H4, chat + row * H, rstd_c[row], cprev + b * H, gc, bc, dy + row * H,
                             dh + b * H, dc + b * H, dcn + row * H, dg + row * H4, H)
            # dgh = LN'(gamma_hh dG): the saved ghat is xhat (mu = 0, scale 1)
            row_norm_bwd_(dg + row * H4, ghh, ghat + row * H4, 0, 1, rstd_h[row], dgh + row * H4, H4, True)
            sum_prod_(sums + tid * 6 * H, dg + row * H4, ghat + row * H4, H4)
            sum_prod_(sums + tid * 6 * H + H4, dcn + row * H, chat + row * H, H)
            sum_(sums + tid * 6 * H + 5 * H, dcn + row * H, H)
        fs_barrier()
        k0, k1 = cols_(H, nt, tid)
        if k1 > k0:                                      # dh_next[:, k0:k1] = dgh_t W_hh[:, k0:k1]
            ln_cols_(mine, False, bt, k0, k1, H4, dgh + r0 * H4, w, H, 0, dh, H)
        fs_barrier()


cdef void ln_lstm_row_bwd_(const real* act, const real* chat, real rstd_c, const real* cprev, const real* gc,
                           const real* bc, const real* dy, const real* dh, real* dc, real* dcn, real* dg,
                           Py_ssize_t H) noexcept nogil:
    """One row of ln_lstm_backward up to dG.  dg's g slot is scratch for tanh(u) and its i slot
    holds dc_t before the final gate gradients overwrite them."""
    cdef Py_ssize_t j
    cdef real og, tu, dhe
    for j in range(H):
        dg[2 * H + j] = tanh_(gc[j] * chat[j] + bc[j])
    for j in range(H):
        og = act[3 * H + j]
        tu = dg[2 * H + j]
        dhe = dy[j] + dh[j]
        dcn[j] = dhe * og * (1 - tu * tu)
        dg[3 * H + j] = dhe * tu * og * (1 - og)
    row_norm_bwd_(dcn, gc, chat, 0, 1, rstd_c, dg, H, True)    # dg[i slot] = LN'(gamma_c dcn)
    for j in range(H):
        dg[j] = dg[j] + dc[j]
    lstm_gates_bwd_(act, H, cprev, dg, dc, dg, H)


def ln_gru_forward(real[::1] xp, real[::1] w_hh, real[::1] gamma_hh, real[::1] b_hh, real[::1] h0, real[::1] y,
                   real[::1] gates, real[::1] ghat, real[::1] rstd_h, real[::1] ghn, real[::1] g_step,
                   const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H, double eps, int num_threads,
                   real[::1] panels=None):
    """Layer-normalized GRU over T steps: the GRU with its recurrent term
    a = gamma_hh LN(h_{t-1} W_hh^T) + b_hh (LN over the 3H row) in place of h_{t-1} W_hh^T + b_hh,
    and xp = LN(x W_ih^T) gamma_ih + b_ih.  Saves y (N, H), gates, ghat (N, 3H), rstd_h (N,),
    ghn (N, H) the n slice of a.  g_step (B_0 3H,)."""
    cdef int tid, nt = ln_threads_(num_threads, 3 * H)
    if T == 0 or H == 0:
        return
    if nt == 1:
        with nogil:
            ln_gru_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(gamma_hh), ptr_(b_hh), ptr_(h0), ptr_(y), ptr_(gates),
                               ptr_(ghat), ptr_(rstd_h), ptr_(ghn), ptr_(g_step), ptr_(panels), &offs[0], T, H, eps,
                               0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln_gru_fwd_thread_(ptr_(xp), ptr_(w_hh), ptr_(gamma_hh), ptr_(b_hh), ptr_(h0), ptr_(y), ptr_(gates),
                           ptr_(ghat), ptr_(rstd_h), ptr_(ghn), ptr_(g_step), ptr_(panels), &offs[0], T, H, eps, tid,
                           fs_team_size())


cdef void ln_gru_fwd_thread_(const real* xp, const real* w, const real* ghh, const real* bhh, const real* h0,
                             real* y, real* gates, real* ghat, real* rstd_h, real* ghn, real* gs, real* panels,
                             const int64_t* offs,
                             Py_ssize_t T, Py_ssize_t H, double eps, int tid, int nt) noexcept nogil:
    cdef Py_ssize_t t, b, j, row, r0, bt, k0, k1, lo, hi, H3 = 3 * H
    cdef const real* hprev
    cdef real e = <real> eps
    cdef real* mine = ln_pack_(w, panels, True, H3, H, nt, tid)
    for t in range(T):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        hprev = h0 if t == 0 else y + offs[t - 1] * H
        k0, k1 = cols_(H3, nt, tid)
        if k1 > k0:                                      # gs[:, k0:k1] = h_{t-1} W_hh[k0:k1]^T
            ln_cols_(mine, True, bt, k0, k1, H, hprev, w, H, 0, gs, H3)
        fs_barrier()
        lo, hi = chunk_(bt, nt, tid)
        for b in range(lo, hi):
            row = r0 + b
            row_norm_(gs + b * H3, ghat + row * H3, rstd_h + row, H3, e)
            for j in range(H3):
                gs[b * H3 + j] = ghh[j] * ghat[row * H3 + j] + bhh[j]
            gru_cell_fwd_(xp + row * H3, gs + b * H3, H, hprev + b * H, y + row * H, gates + row * H3,
                          ghn + row * H, H)
        fs_barrier()


def ln_gru_backward(real[::1] dy, real[::1] w_hh, real[::1] gamma_hh, real[::1] h0, real[::1] y, real[::1] gates,
                    real[::1] ghat, real[::1] rstd_h, real[::1] ghn, real[::1] dxp, real[::1] da, real[::1] dgh,
                    real[::1] dh, real[::1] sums, const int64_t[::1] offs, Py_ssize_t T, Py_ssize_t H,
                    int num_threads, real[::1] panels=None):
    """Backward through time of ln_gru_forward: the GRU step backward (gru_cell_bwd_) gives dxp
    and da (gradient of the recurrent term a, (N, 3H)); then dgh = LN'(gamma_hh da), the gradient
    of h_{t-1} W_hh^T, and dh_next = dh_t z + dgh W_hh.  sums (num_threads, 6H), zeroed by the
    caller, gets per thread sum_rows da ghat (3H) and da (3H): gamma_hh's and b_hh's gradients."""
    cdef int tid, nt = ln_threads_(num_threads, 3 * H)
    if T == 0 or H == 0:
        return
    if nt == 1:
        with nogil:
            ln_gru_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(gamma_hh), ptr_(h0), ptr_(y), ptr_(gates), ptr_(ghat),
                               ptr_(rstd_h), ptr_(ghn), ptr_(dxp), ptr_(da), ptr_(dgh), ptr_(dh), ptr_(sums),
                               ptr_(panels), &offs[0], T, H,
                               0, 1)
        return
    with nogil, parallel(num_threads=nt):
        tid = threadid()
        ln_gru_bwd_thread_(ptr_(dy), ptr_(w_hh), ptr_(gamma_hh), ptr_(h0), ptr_(y), ptr_(gates), ptr_(ghat),
                           ptr_(rstd_h), ptr_(ghn), ptr_(dxp), ptr_(da), ptr_(dgh), ptr_(dh), ptr_(sums),
                           ptr_(panels), &offs[0], T, H,
                           tid, fs_team_size())


cdef void ln_gru_bwd_thread_(const real* dy, const real* w, const real* ghh, const real* h0, const real* y,
                             const real* gates, const real* ghat, const real* rstd_h, const real* ghn, real* dxp,
                             real* da, real* dgh, real* dh, real* sums, real* panels, const int64_t* offs,
                             Py_ssize_t T, Py_ssize_t H,
                             int tid, int nt) noexcept nogil:
    cdef Py_ssize_t t, b, row, r0, bt, k0, k1, lo, hi, H3 = 3 * H
    cdef const real* hprev
    cdef real* mine = ln_pack_(w, panels, False, H3, H, nt, tid)
    for t in range(T - 1, -1, -1):
        r0, bt = offs[t], offs[t + 1] - offs[t]
        hprev = h0 if t == 0 else y + offs[t - 1] * H
        lo, hi = chunk_(bt, nt, tid)
        for b in range(lo, hi):
            row = r0 + b
            gru_cell_bwd_(gates + row * H3, ghn + row * H, H, hprev + b * H, dy + row * H, dh + b * H,
                          dxp + row * H3, da + row * H3, H)
            # dgh = LN'(gamma_hh da): the saved ghat is xhat (mu = 0, scale 1)
            row_norm_bwd_(da + row * H3, ghh, ghat + row * H3, 0, 1, rstd_h[row], dgh + row * H3, H3, True)
            sum_prod_(sums + tid * 6 * H, da + row * H3, ghat + row * H3, H3)
            sum_(sums + tid * 6 * H + H3, da + row * H3, H3)
        fs_barrier()
        k0, k1 = cols_(H, nt, tid)
        if k1 > k0:                                      # dh_next[:, k0:k1] = dh_t z + dgh_t W_hh[:, k0:k1]
            ln_cols_(mine, False, bt, k0, k1, H3, dgh + r0 * H3, w, H, 1, dh, H)
        fs_barrier()
