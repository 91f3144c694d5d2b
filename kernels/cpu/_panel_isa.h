/* One instruction set's body of _panel.h: included once per set with
 *
 *   FS_ISA     the suffix of its names (avx512, avx2, generic)
 *   FS_VW      floats per vector (16, 8, 4)
 *   FS_RB      rows per register block (the accumulators are FS_RB x 4 vectors)
 *   FS_TARGET  its function attribute (__attribute__((target(...))) or nothing)
 *
 * A panel is 4 column vectors of FS_VW lanes over K: P[k][c][l] at P + (k 4 + c) FS_VW + l (see
 * _panel.h for what the columns are).  The product of rows of A with a panel is an outer
 * product per k: 4 vector loads of P, one broadcast per row, 4 FMAs per row into FS_RB x 4
 * accumulators held in registers (AVX-512: 24 of its 32 registers; AVX2: 8 of 16).  One row
 * alone (B = 1) would leave 4 chains of dependent FMAs, fewer than the 2 FMA units x 4 cycles of
 * latency can overlap: it splits k into even and odd halves, 8 chains.
 */

#define FS_N(name) FS_CAT(name, FS_ISA)
#define FS_VEC FS_N(fs_vec_)
#define FS_INLINE static inline __attribute__((always_inline)) FS_TARGET

typedef float FS_VEC __attribute__((vector_size(FS_VW * 4)));

FS_INLINE FS_VEC FS_N(fs_ld_)(const float* p) {
    FS_VEC v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* acc[r][c] += sum_{k < K} a[r lda + k] P[k][c], r < R (a compile-time constant once inlined). */
FS_INLINE void FS_N(fs_acc_rows_)(const int R, FS_VEC acc[FS_RB][4], long K, const float* a, long lda,
                                  const float* P) {
    long k;
    for (k = 0; k < K; k++) {
        const float* p = P + k * 4 * FS_VW;
        FS_VEC w0 = FS_N(fs_ld_)(p), w1 = FS_N(fs_ld_)(p + FS_VW);
        FS_VEC w2 = FS_N(fs_ld_)(p + 2 * FS_VW), w3 = FS_N(fs_ld_)(p + 3 * FS_VW);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            float x = a[r * lda + k];
            acc[r][0] += w0 * x;
            acc[r][1] += w1 * x;
            acc[r][2] += w2 * x;
            acc[r][3] += w3 * x;
        }
    }
}

/* The one-row case with two chains per column (even and odd k), summed at the end. */
FS_INLINE void FS_N(fs_acc_row1_)(FS_VEC acc[FS_RB][4], long K, const float* a, const float* P) {
    FS_VEC e0 = {0}, e1 = {0}, e2 = {0}, e3 = {0};
    long k;
    for (k = 0; k + 1 < K; k += 2) {
        const float* p = P + k * 4 * FS_VW;
        float x = a[k], z = a[k + 1];
        acc[0][0] += FS_N(fs_ld_)(p) * x;
        acc[0][1] += FS_N(fs_ld_)(p + FS_VW) * x;
        acc[0][2] += FS_N(fs_ld_)(p + 2 * FS_VW) * x;
        acc[0][3] += FS_N(fs_ld_)(p + 3 * FS_VW) * x;
        e0 += FS_N(fs_ld_)(p + 4 * FS_VW) * z;
        e1 += FS_N(fs_ld_)(p + 5 * FS_VW) * z;
        e2 += FS_N(fs_ld_)(p + 6 * FS_VW) * z;
        e3 += FS_N(fs_ld_)(p + 7 * FS_VW) * z;
    }
    if (k < K)
        FS_N(fs_acc_rows_)(1, acc, 1, a + k, 0, P + k * 4 * FS_VW);
    acc[0][0] += e0;
    acc[0][1] += e1;
    acc[0][2] += e2;
    acc[0][3] += e3;
}

/* The accumulators of R rows (R <= FS_RB): acc[r][c] = sum_k [a1 | a2][r][k] P[k][c], a row of
 * A being a1's first K1 elements (row stride lda1) followed by a2's K2 (stride lda2). */
FS_INLINE void FS_N(fs_tile_)(const int R, FS_VEC acc[FS_RB][4], long K1, const float* a1, long lda1, long K2,
                              const float* a2, long lda2, const float* P) {
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
        acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = (FS_VEC){0};
    if (R == 1) {
        if (K1 > 0)
            FS_N(fs_acc_row1_)(acc, K1, a1, P);
        FS_N(fs_acc_row1_)(acc, K2, a2, P + K1 * 4 * FS_VW);
    } else {
        if (K1 > 0)
            FS_N(fs_acc_rows_)(R, acc, K1, a1, lda1, P);
        FS_N(fs_acc_rows_)(R, acc, K2, a2, lda2, P + K1 * 4 * FS_VW);
    }
}

/* ---------------------------------------------------------------- lane-wise math on vectors */

typedef int FS_N(fs_ivec_) __attribute__((vector_size(FS_VW * 4)));
#define FS_IVEC FS_N(fs_ivec_)

FS_INLINE FS_VEC FS_N(fs_sel_)(FS_IVEC m, FS_VEC a, FS_VEC b) {      /* m ? a : b, m all ones or zeros */
    return (FS_VEC)((m & (FS_IVEC)a) | (~m & (FS_IVEC)b));
}

/* Keeps the compiler from reassociating across this point (the build has -fassociative-math,
 * which would fold a two-constant range reduction into one rounded constant). */
#if defined(__x86_64__)
#define FS_NO_REASSOC(v) __asm__("" : "+x"(v))
#else
#define FS_NO_REASSOC(v) ((void)0)
#endif

/* _fastmath.h's fs_expf on every lane (the same Cody-Waite reduction in two constants and the
 * same polynomial; n = x / ln 2 rounded half away from zero by a truncating conversion, since the
 * 1.5 2^23 shift trick would be folded away under -fassociative-math).  x < -87.3 gives 0; x
 * past ~88.38 overflows to +inf (as fs_expf); NaN gives NaN (its lanes are zeroed before the
 * conversion, whose result would be undefined, and restored at the end). */
FS_INLINE FS_VEC FS_N(fs_vexp_)(FS_VEC x) {
    const FS_VEC lo = (FS_VEC){0} - 87.3f, hi = (FS_VEC){0} + 88.7f, half = (FS_VEC){0} + 0.5f;
    FS_VEC xc = FS_N(fs_sel_)(x < lo, lo, x);
    xc = FS_N(fs_sel_)(xc > hi, hi, xc);
    xc = FS_N(fs_sel_)(x != x, (FS_VEC){0}, xc);
    FS_VEC v = xc * 1.44269504088896341f;
    FS_IVEC ni = __builtin_convertvector(v + FS_N(fs_sel_)(v < 0.0f, -half, half), FS_IVEC);
    FS_VEC n = __builtin_convertvector(ni, FS_VEC);
    FS_VEC r = xc - n * 0.693359375f;
    FS_NO_REASSOC(r);
    r = r - n * -2.12194440e-4f;
    FS_VEC p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    FS_VEC y = p * (FS_VEC)((ni + 127) << 23);
    y = FS_N(fs_sel_)(x < lo, (FS_VEC){0}, y);
    y = FS_N(fs_sel_)(x > hi, (FS_VEC){0} + __builtin_inff(), y);
    return FS_N(fs_sel_)(x != x, x, y);
}

FS_INLINE FS_VEC FS_N(fs_vsigmoid_)(FS_VEC x) {
    return 1.0f / (1.0f + FS_N(fs_vexp_)(-x));
}

/* fs_tanhf on every lane: the odd polynomial below |x| = 0.625, 2 / (1 + exp(-2x)) - 1 above. */
FS_INLINE FS_VEC FS_N(fs_vtanh_)(FS_VEC x) {
    FS_VEC z = x * x;
    FS_VEC p = z * -5.70498872745e-3f + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    FS_VEC small = p * z * x + x;
    FS_VEC big = 2.0f / (1.0f + FS_N(fs_vexp_)(-2.0f * x)) - 1.0f;
    FS_VEC ax = (FS_VEC)((FS_IVEC)x & 0x7fffffff);
    return FS_N(fs_sel_)(ax < 0.625f, small, big);
}

/* The first n lanes at p (the rest 0) / stored to p. */
FS_INLINE FS_VEC FS_N(fs_ldn_)(const float* p, int n) {
    float t[FS_VW] = {0};
    if (n == FS_VW)
        return FS_N(fs_ld_)(p);
    for (int l = 0; l < n; l++)
        t[l] = p[l];
    return FS_N(fs_ld_)(t);
}

FS_INLINE void FS_N(fs_stn_)(float* p, FS_VEC v, int n) {
    if (n == FS_VW) {
        memcpy(p, &v, sizeof v);
    } else {
        float t[FS_VW];
        memcpy(t, &v, sizeof v);
        for (int l = 0; l < n; l++)
            p[l] = t[l];
    }
}

/* The LSTM cell on one row's accumulators (the 4 gate columns of FS_VW units): pre = acc + xp,
 *   i, f, o = s(pre_i, pre_f, pre_o), g = tanh(pre_g);  c = f cprev + i g;  h = o tanh(c)
 * for the first nu lanes.  xp's gate q at xp + q gx (NULL: none); act (NULL: not kept) gets
 * the activated gates, gate q at act + q ga. */
FS_INLINE void FS_N(fs_lstm_cell_)(FS_VEC a[4], const float* xp, long gx, const float* cprev, float* c, float* h,
                                   float* act, long ga, int nu) {
    if (xp) {
        a[0] += FS_N(fs_ldn_)(xp, nu);
        a[1] += FS_N(fs_ldn_)(xp + gx, nu);
        a[2] += FS_N(fs_ldn_)(xp + 2 * gx, nu);
        a[3] += FS_N(fs_ldn_)(xp + 3 * gx, nu);
    }
    FS_VEC i = FS_N(fs_vsigmoid_)(a[0]), f = FS_N(fs_vsigmoid_)(a[1]);
    FS_VEC g = FS_N(fs_vtanh_)(a[2]), o = FS_N(fs_vsigmoid_)(a[3]);
    FS_VEC cn = f * FS_N(fs_ldn_)(cprev, nu) + i * g;
    FS_N(fs_stn_)(c, cn, nu);
    FS_N(fs_stn_)(h, o * FS_N(fs_vtanh_)(cn), nu);
    if (act) {
        FS_N(fs_stn_)(act, i, nu);
        FS_N(fs_stn_)(act + ga, f, nu);
        FS_N(fs_stn_)(act + 2 * ga, g, nu);
        FS_N(fs_stn_)(act + 3 * ga, o, nu);
    }
}

/* R rows of one LSTM step for one panel (fs_lstm_panel_'s arguments, rows already offset). */
FS_INLINE void FS_N(fs_lstm_rows_)(const int R, long K1, const float* x, long ldx, long K2, const float* hprev,
                                   long ldh, const float* P, const float* xp, long ldxp, long gx,
                                   const float* cprev, float* c, float* h, long ldc, float* act, long ldact, long ga,
                                   int nu) {
    FS_VEC acc[FS_RB][4];
    FS_N(fs_tile_)(R, acc, K1, x, ldx, K2, hprev, ldh, P);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
        FS_N(fs_lstm_cell_)(acc[r], xp ? xp + r * ldxp : 0, gx, cprev + r * ldc, c + r * ldc, h + r * ldc,
                            act ? act + r * ldact : 0, ga, nu);
}

/* One LSTM step for one gate panel (FS_VW units) over bt rows: row b's pre-activations are
 * [x_b | h_b] P (+ xp_b), then the cell (fs_lstm_cell_) on the accumulators.  Row b reads
 * x + b ldx (K1 elements, K1 = 0: none), hprev + b ldh (K2), xp + b ldxp (ldxp = 0: one row for
 * all, the bias), cprev / c / h + b ldc, act + b ldact. */
FS_TARGET static void FS_N(fs_lstm_panel_)(long bt, long K1, const float* x, long ldx, long K2, const float* hprev,
                                           long ldh, const float* P, const float* xp, long ldxp, long gx,
                                           const float* cprev, float* c, float* h, long ldc, float* act, long ldact,
                                           long ga, int nu) {
    long r0;
    for (r0 = 0; r0 < bt; r0 += FS_RB) {
        int r, q, R = bt - r0 < FS_RB ? (int)(bt - r0) : FS_RB;
        /* xp and the saved gates are read / written a vector per gate, strided: the hardware
         * prefetcher does not follow, so the lines are asked for while the tile computes */
        for (r = 0; r < R; r++)
            for (q = 0; q < 4; q++) {
                if (xp && ldxp)
                    __builtin_prefetch(xp + (r0 + r) * ldxp + q * gx, 0, 2);
                if (act)
                    __builtin_prefetch(act + (r0 + r) * ldact + q * ga, 1, 2);
            }
#define FS_ROWS_(n) FS_N(fs_lstm_rows_)(n, K1, x + r0 * ldx, ldx, K2, hprev + r0 * ldh, ldh, P, \
                                        xp ? xp + r0 * ldxp : 0, ldxp, gx, cprev + r0 * ldc, c + r0 * ldc, \
                                        h + r0 * ldc, ldc, act ? act + r0 * ldact : 0, ldact, ga, nu)
        switch (R) {     /* one register allocation per row count */
        case 1: FS_ROWS_(1); break;
        case 2: FS_ROWS_(2); break;
#if FS_RB > 2
        case 3: FS_ROWS_(3); break;
        case 4: FS_ROWS_(4); break;
#endif
#if FS_RB > 4
        case 5: FS_ROWS_(5); break;
        case 6: FS_ROWS_(6); break;
#endif
        default: break;
        }
#undef FS_ROWS_
    }
}

/* R rows of the plain product: out[r][0:ncol] = (or +=, add) the accumulators. */
FS_INLINE void FS_N(fs_gemm_rows_)(const int R, long K, const float* a, long lda, const float* P, float* out,
                                   long ldo, int ncol, int add) {
    FS_VEC acc[FS_RB][4];
    FS_N(fs_tile_)(R, acc, 0, a, 0, K, a, lda, P);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        float t[4 * FS_VW];
        float* o = out + r * ldo;
        if (add) {
            for (int c = 0; c < 4; c++)
                acc[r][c] += FS_N(fs_ldn_)(o + c * FS_VW, ncol - c * FS_VW < 0 ? 0 : (ncol - c * FS_VW > FS_VW ?
                                                                                      FS_VW : ncol - c * FS_VW));
        }
        if (ncol == 4 * FS_VW) {
            memcpy(o, acc[r], sizeof acc[r]);
        } else {
            memcpy(t, acc[r], sizeof t);
            for (int l = 0; l < ncol; l++)
                o[l] = t[l];
        }
    }
}

/* out[b][0:ncol] = (or +=, add) a_b P (the panel's 4 FS_VW columns, the first ncol kept) for
 * b < bt: a plain product, the backward's dh_next = dG W_hh, the layer-normalized cells' slices. */
FS_TARGET static void FS_N(fs_panel_gemm_)(long bt, long K, const float* a, long lda, const float* P, float* out,
                                           long ldo, int ncol, int add) {
    long r0;
    for (r0 = 0; r0 < bt; r0 += FS_RB) {
        int R = bt - r0 < FS_RB ? (int)(bt - r0) : FS_RB;
        const float* ar = a + r0 * lda;
        float* o = out + r0 * ldo;
        switch (R) {
        case 1: FS_N(fs_gemm_rows_)(1, K, ar, lda, P, o, ldo, ncol, add); break;
        case 2: FS_N(fs_gemm_rows_)(2, K, ar, lda, P, o, ldo, ncol, add); break;
#if FS_RB > 2
        case 3: FS_N(fs_gemm_rows_)(3, K, ar, lda, P, o, ldo, ncol, add); break;
        case 4: FS_N(fs_gemm_rows_)(4, K, ar, lda, P, o, ldo, ncol, add); break;
#endif
#if FS_RB > 4
        case 5: FS_N(fs_gemm_rows_)(5, K, ar, lda, P, o, ldo, ncol, add); break;
        case 6: FS_N(fs_gemm_rows_)(6, K, ar, lda, P, o, ldo, ncol, add); break;
#endif
        default: break;
        }
    }
}

#undef FS_IVEC
#undef FS_NO_REASSOC
#undef FS_N
#undef FS_VEC
#undef FS_INLINE
