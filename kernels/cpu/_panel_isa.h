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

/* tile[r][c][l] = sum_k [a1 | a2][r][k] P[k][c][l] for r < R <= FS_RB: a row of A is a1's
 * first K1 elements (row stride lda1) followed by a2's K2 (stride lda2), P has K1 + K2 rows. */
FS_INLINE void FS_N(fs_tile_fixed_)(const int R, long K1, const float* a1, long lda1, long K2, const float* a2,
                                    long lda2, const float* P, float* tile) {
    FS_VEC acc[FS_RB][4];
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
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
        memcpy(tile + r * 4 * FS_VW, acc[r], sizeof acc[r]);
}

FS_TARGET static void FS_N(fs_tile_)(int R, long K1, const float* a1, long lda1, long K2, const float* a2,
                                     long lda2, const float* P, float* tile) {
    switch (R) {     /* one register allocation per row count */
    case 1: FS_N(fs_tile_fixed_)(1, K1, a1, lda1, K2, a2, lda2, P, tile); break;
    case 2: FS_N(fs_tile_fixed_)(2, K1, a1, lda1, K2, a2, lda2, P, tile); break;
#if FS_RB > 2
    case 3: FS_N(fs_tile_fixed_)(3, K1, a1, lda1, K2, a2, lda2, P, tile); break;
    case 4: FS_N(fs_tile_fixed_)(4, K1, a1, lda1, K2, a2, lda2, P, tile); break;
#endif
#if FS_RB > 4
    case 5: FS_N(fs_tile_fixed_)(5, K1, a1, lda1, K2, a2, lda2, P, tile); break;
    case 6: FS_N(fs_tile_fixed_)(6, K1, a1, lda1, K2, a2, lda2, P, tile); break;
#endif
    default: break;
    }
}

/* The LSTM cell on one row's tile (the 4 gate columns of FS_VW units): pre = tile + xp, then
 *   i, f, o = s(pre_i, pre_f, pre_o), g = tanh(pre_g);  c = f cprev + i g;  h = o tanh(c)
 * for the first nu lanes.  xp's gate q at xp + q gx (NULL: none); act (NULL: not kept) gets
 * the activated gates, gate q at act + q ga.  One transcendental per loop over the lanes: gcc
 * vectorizes each. */
FS_INLINE void FS_N(fs_lstm_cell_)(const float* tile, const float* xp, long gx, const float* cprev, float* c,
                                   float* h, float* act, long ga, int nu) {
    float g[4][FS_VW] __attribute__((aligned(64)));
    float cp[FS_VW] __attribute__((aligned(64))), cn[FS_VW] __attribute__((aligned(64)));
    float hn[FS_VW] __attribute__((aligned(64)));
    int q, l;
    memcpy(g, tile, sizeof g);
    if (nu == FS_VW) {
        if (xp)
            for (q = 0; q < 4; q++)
                for (l = 0; l < FS_VW; l++)
                    g[q][l] += xp[q * gx + l];
        memcpy(cp, cprev, sizeof cp);
    } else {
        memset(cp, 0, sizeof cp);
        for (l = 0; l < nu; l++) {
            if (xp)
                for (q = 0; q < 4; q++)
                    g[q][l] += xp[q * gx + l];
            cp[l] = cprev[l];
        }
    }
    for (l = 0; l < FS_VW; l++)
        g[0][l] = 1.0f / (1.0f + fs_expf(-g[0][l]));
    for (l = 0; l < FS_VW; l++)
        g[1][l] = 1.0f / (1.0f + fs_expf(-g[1][l]));
    for (l = 0; l < FS_VW; l++)
        g[2][l] = fs_tanhf(g[2][l]);
    for (l = 0; l < FS_VW; l++)
        g[3][l] = 1.0f / (1.0f + fs_expf(-g[3][l]));
    for (l = 0; l < FS_VW; l++)
        cn[l] = g[1][l] * cp[l] + g[0][l] * g[2][l];
    for (l = 0; l < FS_VW; l++)
        hn[l] = g[3][l] * fs_tanhf(cn[l]);
    if (nu == FS_VW) {      /* fixed sizes: vector stores, not calls to memcpy */
        memcpy(c, cn, sizeof cn);
        memcpy(h, hn, sizeof hn);
        if (act)
            for (q = 0; q < 4; q++)
                memcpy(act + q * ga, g[q], sizeof g[q]);
    } else {
        for (l = 0; l < nu; l++) {
            c[l] = cn[l];
            h[l] = hn[l];
            if (act)
                for (q = 0; q < 4; q++)
                    act[q * ga + l] = g[q][l];
        }
    }
}

/* One LSTM step for one gate panel (FS_VW units) over bt rows: row b's pre-activations are
 * [x_b | h_b] P (+ xp_b), then the cell (fs_lstm_cell_).  Row b reads x + b ldx (K1 elements,
 * K1 = 0: none), hprev + b ldh (K2), xp + b ldxp, cprev / c / h + b ldc, act + b ldact. */
FS_TARGET static void FS_N(fs_lstm_panel_)(long bt, long K1, const float* x, long ldx, long K2, const float* hprev,
                                           long ldh, const float* P, const float* xp, long ldxp, long gx,
                                           const float* cprev, float* c, float* h, long ldc, float* act, long ldact,
                                           long ga, int nu) {
    float tile[FS_RB * 4 * FS_VW] __attribute__((aligned(64)));
    long r0, b;
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
        FS_N(fs_tile_)(R, K1, x + r0 * ldx, ldx, K2, hprev + r0 * ldh, ldh, P, tile);
        for (r = 0; r < R; r++) {
            b = r0 + r;
            FS_N(fs_lstm_cell_)(tile + r * 4 * FS_VW, xp ? xp + b * ldxp : 0, gx, cprev + b * ldc, c + b * ldc,
                                h + b * ldc, act ? act + b * ldact : 0, ga, nu);
        }
    }
}

/* out[b][0:ncol] = a_b P (the panel's 4 FS_VW columns, the first ncol kept) for b < bt: a plain
 * product, the backward's dh_next = dG W_hh. */
FS_TARGET static void FS_N(fs_panel_gemm_)(long bt, long K, const float* a, long lda, const float* P, float* out,
                                           long ldo, int ncol) {
    float tile[FS_RB * 4 * FS_VW] __attribute__((aligned(64)));
    long r0;
    for (r0 = 0; r0 < bt; r0 += FS_RB) {
        int r, R = bt - r0 < FS_RB ? (int)(bt - r0) : FS_RB;
        FS_N(fs_tile_)(R, 0, a, 0, K, a + r0 * lda, lda, P, tile);
        for (r = 0; r < R; r++) {
            if (ncol == 4 * FS_VW)
                memcpy(out + (r0 + r) * ldo, tile + r * 4 * FS_VW, 4 * FS_VW * sizeof(float));
            else
                for (int l = 0; l < ncol; l++)
                    out[(r0 + r) * ldo + l] = tile[r * 4 * FS_VW + l];
        }
    }
}

#undef FS_N
#undef FS_VEC
#undef FS_INLINE
