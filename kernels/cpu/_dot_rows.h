/* y = a W^T for a few rows a (decode: one token per row), fp32: decode.pyx's small-batch GEMM.
 *
 * y[i, j] (+)= a[i] . W[j]  for i < B and weight rows j in [lo, hi),  a (B, K), W (N, K).
 *
 * One pass over the weight rows: a block of 4 weight rows is dotted with 2 rows of a at a time
 * (8 accumulators of 8 lanes: enough independent FMAs to hide their latency; 6 loads per 8
 * FMAs), so each weight byte comes from memory once and from L1 / L2 for the other rows of a.
 * A general GEMM packs the weight block first, which at these sizes adds a write and a read of
 * every weight byte to a bandwidth-bound product.  GCC's vector extensions (portable: 2 SSE
 * registers each where AVX is not enabled); unaligned loads through memcpy.
 */
#ifndef FASTSEQ_DOT_ROWS_H
#define FASTSEQ_DOT_ROWS_H
#include <string.h>

typedef float fs_v8f __attribute__((vector_size(32)));

static inline fs_v8f fs_load8(const float* p) {
    fs_v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float fs_hsum8(fs_v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* a_rows (1 or 2) rows of a against 4 weight rows w (stride K); sums into out[r * 4 + c]. */
static inline void fs_dot_4x(const float* a0, const float* a1, int a_rows, const float* w, long K, float* out) {
    fs_v8f s00 = {0}, s01 = {0}, s02 = {0}, s03 = {0}, s10 = {0}, s11 = {0}, s12 = {0}, s13 = {0};
    long k, K8 = K - K % 8;
    const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
    if (a_rows == 2) {
        for (k = 0; k < K8; k += 8) {
            fs_v8f x0 = fs_load8(a0 + k), x1 = fs_load8(a1 + k);
            fs_v8f v0 = fs_load8(w0 + k), v1 = fs_load8(w1 + k), v2 = fs_load8(w2 + k), v3 = fs_load8(w3 + k);
            s00 += v0 * x0; s01 += v1 * x0; s02 += v2 * x0; s03 += v3 * x0;
            s10 += v0 * x1; s11 += v1 * x1; s12 += v2 * x1; s13 += v3 * x1;
        }
    } else {
        for (k = 0; k < K8; k += 8) {
            fs_v8f x0 = fs_load8(a0 + k);
            s00 += fs_load8(w0 + k) * x0; s01 += fs_load8(w1 + k) * x0;
            s02 += fs_load8(w2 + k) * x0; s03 += fs_load8(w3 + k) * x0;
        }
    }
    out[0] = fs_hsum8(s00); out[1] = fs_hsum8(s01); out[2] = fs_hsum8(s02); out[3] = fs_hsum8(s03);
    out[4] = fs_hsum8(s10); out[5] = fs_hsum8(s11); out[6] = fs_hsum8(s12); out[7] = fs_hsum8(s13);
    for (k = K8; k < K; k++) {
        out[0] += w0[k] * a0[k]; out[1] += w1[k] * a0[k]; out[2] += w2[k] * a0[k]; out[3] += w3[k] * a0[k];
        if (a_rows == 2) {
            out[4] += w0[k] * a1[k]; out[5] += w1[k] * a1[k]; out[6] += w2[k] * a1[k]; out[7] += w3[k] * a1[k];
        }
    }
}

static inline void fs_dot_rows_f32(const float* a, long B, long K, const float* W, long lo, long hi, float* y,
                                   long ldy, int accumulate) {
    float out[8];
    long i, j, c, r, rows;
    for (j = lo; j + 4 <= hi; j += 4) {
        for (i = 0; i < B; i += 2) {
            rows = B - i >= 2 ? 2 : 1;
            fs_dot_4x(a + i * K, a + (i + rows - 1) * K, (int)rows, W + j * K, K, out);
            for (r = 0; r < rows; r++)
                for (c = 0; c < 4; c++)
                    y[(i + r) * ldy + j + c] = accumulate ? y[(i + r) * ldy + j + c] + out[r * 4 + c] : out[r * 4 + c];
        }
    }
    for (; j < hi; j++) {                 /* fewer than 4 weight rows left */
        for (i = 0; i < B; i++) {
            float s = 0;
            for (c = 0; c < K; c++)
                s += W[j * K + c] * a[i * K + c];
            y[i * ldy + j] = accumulate ? y[i * ldy + j] + s : s;
        }
    }
}

#endif
