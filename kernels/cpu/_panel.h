/* The recurrent step's product against packed weight panels, fp32 (recurrent.pyx's LSTM).
 *
 * Why.  A step's recurrent product h_{t-1} W_hh^T is a small GEMM (B x H x 4H) run T times with
 * the same W_hh.  A general GEMM packs its operands on every call and cannot know that; here
 * each thread packs its slice of the weights once per call into panels and keeps them in its
 * core's cache across the T steps, and the LSTM cell runs on the accumulators' tile, so the
 * (B, 4H) pre-activations are never written to memory and read back.
 *
 * Panels.  FS_VW floats make a vector (16 AVX-512, 8 AVX2, 4 generic).  A panel holds 4 column
 * vectors over K: P[k][c][l], 4 FS_VW floats per k, contiguous in k.
 *   forward (fs_pack_gates): the panel of FS_VW units j: column c is gate c (i, f, g, o) of the
 *     units, P[k][c][l] = W[c H + j + l][k], W (4H, K) in torch's row order.  With the input
 *     projection fused, the panel's first I rows come from W_ih and the next H from W_hh.
 *   backward (fs_pack_units): dh_next = dG W_hh reads W_hh's columns: column c of the panel is
 *     units u + c FS_VW .. + FS_VW, P[q][c][l] = W[row(q)][u + c FS_VW + l] over the 4H gate
 *     rows q in the blocked order of dG (recurrent.pyx's docstring).
 * Lanes past the last unit are zero.
 *
 * Instruction sets.  _panel_isa.h is compiled three times, for AVX-512, AVX2 + FMA and generic
 * vectors (GCC vector extensions: SSE on x86-64, NEON on ARM), each with its function target;
 * fs_panel_select() picks the widest the CPU has at run time (or the one asked for: tests force
 * each), so one binary runs on every x86-64.  A build without -march=native gets the fast paths
 * too.
 */
#ifndef FASTSEQ_PANEL_H
#define FASTSEQ_PANEL_H
#include <string.h>
#include "_fastmath.h"

#define FS_CAT_(a, b) a##b
#define FS_CAT(a, b) FS_CAT_(a, b)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FS_PANEL_X86 1
#define FS_ISA avx512
#define FS_VW 16
#define FS_RB 6
#define FS_TARGET __attribute__((target("avx512f,avx2,fma")))
#include "_panel_isa.h"
#undef FS_ISA
#undef FS_VW
#undef FS_RB
#undef FS_TARGET
#define FS_ISA avx2
#define FS_VW 8
#define FS_RB 2
#define FS_TARGET __attribute__((target("avx2,fma")))
#include "_panel_isa.h"
#undef FS_ISA
#undef FS_VW
#undef FS_RB
#undef FS_TARGET
#else
#define FS_PANEL_X86 0
#endif
#define FS_ISA generic
#define FS_VW 4
#define FS_RB 2
#define FS_TARGET
#include "_panel_isa.h"
#undef FS_ISA
#undef FS_VW
#undef FS_RB
#undef FS_TARGET

enum { FS_PANEL_GENERIC = 0, FS_PANEL_AVX2 = 1, FS_PANEL_AVX512 = 2 };

static int fs_panel_isa_ = -1;

/* Whether this CPU (and this build) runs instruction set isa. */
static int fs_panel_supported(int isa) {
    if (isa == FS_PANEL_GENERIC)
        return 1;
#if FS_PANEL_X86
    __builtin_cpu_init();
    if (isa == FS_PANEL_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == FS_PANEL_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return 0;
}

/* Use isa (-1: the widest supported); returns the one in use, or -1 if isa is not supported. */
static int fs_panel_select(int isa) {
    if (isa < 0) {
        isa = FS_PANEL_AVX512;
        while (!fs_panel_supported(isa))
            isa--;
    } else if (isa > FS_PANEL_AVX512 || !fs_panel_supported(isa)) {
        return -1;
    }
    fs_panel_isa_ = isa;
    return isa;
}

static inline int fs_panel_isa(void) {
    return fs_panel_isa_ >= 0 ? fs_panel_isa_ : fs_panel_select(-1);
}

/* Floats per vector of the instruction set in use: a panel's lanes. */
static inline int fs_panel_width(void) {
    static const int vw[3] = {4, 8, 16};
    return vw[fs_panel_isa()];
}

static inline void fs_lstm_panel(long bt, long K1, const float* x, long ldx, long K2, const float* hprev, long ldh,
                                 const float* P, const float* xp, long ldxp, long gx, const float* cprev, float* c,
                                 float* h, long ldc, float* act, long ldact, long ga, int nu) {
    switch (fs_panel_isa()) {
#if FS_PANEL_X86
    case FS_PANEL_AVX512:
        fs_lstm_panel_avx512(bt, K1, x, ldx, K2, hprev, ldh, P, xp, ldxp, gx, cprev, c, h, ldc, act, ldact, ga, nu);
        return;
    case FS_PANEL_AVX2:
        fs_lstm_panel_avx2(bt, K1, x, ldx, K2, hprev, ldh, P, xp, ldxp, gx, cprev, c, h, ldc, act, ldact, ga, nu);
        return;
#endif
    default:
        fs_lstm_panel_generic(bt, K1, x, ldx, K2, hprev, ldh, P, xp, ldxp, gx, cprev, c, h, ldc, act, ldact, ga, nu);
    }
}

static inline void fs_panel_gemm(long bt, long K, const float* a, long lda, const float* P, float* out, long ldo,
                                 int ncol, int add) {
    switch (fs_panel_isa()) {
#if FS_PANEL_X86
    case FS_PANEL_AVX512:
        fs_panel_gemm_avx512(bt, K, a, lda, P, out, ldo, ncol, add);
        return;
    case FS_PANEL_AVX2:
        fs_panel_gemm_avx2(bt, K, a, lda, P, out, ldo, ncol, add);
        return;
#endif
    default:
        fs_panel_gemm_generic(bt, K, a, lda, P, out, ldo, ncol, add);
    }
}

/* Column c of a panel from n source rows w[l][k] (row stride K, l < n), the lanes n .. vw zero:
 * pp[k][c][l] = w[l][k].  A transpose in blocks of 16 k: each source line is read once, the 16
 * destination lines it scatters into stay in L1 (49 us for 512 KB here, against 85 row by row). */
static void fs_pack_column(const float* w, long K, int n, int vw, int c, float* pp) {
    long k, kb;
    int l;
    for (kb = 0; kb < K; kb += 16) {
        long ke = kb + 16 < K ? kb + 16 : K;
        for (l = 0; l < n; l++)
            for (k = kb; k < ke; k++)
                pp[(k * 4 + c) * vw + l] = w[l * K + k];
        for (; l < vw; l++)
            for (k = kb; k < ke; k++)
                pp[(k * 4 + c) * vw + l] = 0;
    }
}

/* Forward panels of units [j0, j0 + nb): panel q (units j0 + q vw ..) at P + q 4 vw Kp, whose
 * rows [k0, k0 + K) get W's columns: P[k0 + k][c][l] = W[c H + j0 + q vw + l][k], W (4H, K).
 * Kp: the panel's rows in all (K1 + K2 with the input projection fused). */
static void fs_pack_gates(const float* W, long H, long K, long j0, long nb, int vw, long Kp, long k0, float* P) {
    long q, ng = (nb + vw - 1) / vw;
    int c;
    for (q = 0; q < ng; q++) {
        int n = nb - q * vw < vw ? (int)(nb - q * vw) : vw;
        for (c = 0; c < 4; c++)
            fs_pack_column(W + (c * H + j0 + q * vw) * K, K, n, vw, c, P + q * 4 * vw * Kp + k0 * 4 * vw);
    }
}

/* Backward panels of units [u0, u0 + nu): panel p (units u0 + p 4 vw ..) at P + p 4 vw G H,
 * P[q][c][l] = W[row(q)][u0 + p 4 vw + c vw + l] for the G H gate rows q, W (G H, H): row(q) the
 * torch row of blocked gate row q (blocks of ub units, G rows each; ub >= H: torch's order). */
static void fs_pack_units(const float* W, long G, long H, long ub, long u0, long nu, int vw, float* P) {
    long p, q, np = (nu + 4 * vw - 1) / (4 * vw), GH = G * H;
    for (p = 0; p < np; p++) {
        long u = u0 + p * 4 * vw;
        long n = u0 + nu - u < 4 * vw ? u0 + nu - u : 4 * vw;
        float* pp = P + p * 4 * vw * GH;
        for (q = 0; q < GH; q++) {
            long row = q;
            if (ub < H) {
                long kb = q / (G * ub), r = q - kb * G * ub;
                long nb = H - kb * ub < ub ? H - kb * ub : ub;
                row = (r / nb) * H + kb * ub + r % nb;
            }
            memcpy(pp + q * 4 * vw, W + row * H + u, n * sizeof(float));
            memset(pp + q * 4 * vw + n, 0, (4 * vw - n) * sizeof(float));
        }
    }
}

/* Panels of W's rows [r0, r0 + nr) as output columns of a x W^T: panel p (rows r0 + p 4 vw ..)
 * at P + p 4 vw K, P[k][c][l] = W[r0 + p 4 vw + c vw + l][k] (0 past the last row), W (., K):
 * the layer-normalized cells' column slices of h W_hh^T. */
static void fs_pack_rows(const float* W, long K, long r0, long nr, int vw, float* P) {
    long p, np = (nr + 4 * vw - 1) / (4 * vw);
    int c;
    for (p = 0; p < np; p++) {
        for (c = 0; c < 4; c++) {
            long first = p * 4 * vw + c * vw;
            int n = nr - first >= vw ? vw : (nr > first ? (int)(nr - first) : 0);
            fs_pack_column(W + (r0 + first) * K, K, n, vw, c, P + p * 4 * vw * K);
        }
    }
}

#endif
