/* Vectorizable exp for the attention kernels' softmax and the recurrent kernels' gates.
 *
 * glibc's expf does not vectorize without -ffast-math, and -ffinite-math-only would break the
 * -inf that masks rely on.  This one is branch-free, so gcc vectorizes loops that call it:
 * exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in two steps (Cody-Waite),
 * exp(r) by a degree-6 polynomial on |r| <= ln2/2 (relative error ~2e-7, about 1 ulp).
 * x < -87.3 (including -inf) gives 0; x > 88.7 gives +inf; NaN stays NaN.
 */
#ifndef FASTSEQ_FASTMATH_H
#define FASTSEQ_FASTMATH_H
#include <stdint.h>
#include <string.h>

static inline float fs_expf(float x) {
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    float n = __builtin_floorf(xc * log2e + 0.5f);
    float r = xc - n * ln2_hi;
    r = r - n * ln2_lo;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    y = x < -87.3f ? 0.0f : y;
    y = x > 88.7f ? __builtin_inff() : y;
    return x != x ? x : y;
}

/* Vectorizable tanh for the recurrent kernels' fp32 gates.
 *
 * 2 / (1 + exp(-2x)) - 1 alone cancels for small |x|: its absolute error stays ~1e-7 while
 * tanh(x) ~ x shrinks, a relative error of 2.5e-5 at x = 1e-3 and 2e-3 at 1e-5.  Below
 * |x| = 0.625 an odd polynomial x + x^3 P(x^2) (Cephes tanhf's minimax fit, relative error
 * ~1.5e-7) is used instead; above it the exp form (tanh >= 0.55, so its absolute error is a
 * relative one).  Both are computed and one is selected: branch-free, one transcendental, so
 * gcc vectorizes loops that call it.  +-inf give +-1, NaN stays NaN (through the exp form).
 */
static inline float fs_tanhf(float x) {
    float z = x * x;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    float small = p * z * x + x;
    float big = 2.0f / (1.0f + fs_expf(-2.0f * x)) - 1.0f;
    return __builtin_fabsf(x) < 0.625f ? small : big;
}

/* Vectorizable standard normal CDF Phi(u) = erfc(-u / sqrt 2) / 2 for the fp32 exact GELU.
 *
 * erfc(z), z >= 0, is written t exp(P(t) - z^2) with t = 1 / (1 + z / 2), P a degree-9
 * polynomial in t fitted (least squares on Chebyshev nodes, fastseq's own fit) to
 * log(erfc(z) / t) + z^2 over z in [0, 9.3]: |P error| <= 1.1e-7, which is erfc's relative error.
 * The tail u < 0 takes erfc(|u| / sqrt 2) / 2 directly, so Phi keeps its relative accuracy where
 * it is tiny (1 - erf would cancel); u >= 0 takes 1 - erfc / 2.  Beyond |u| ~ 13 exp underflows
 * to 0 (Phi = 0 or 1).  Branch-free: gcc vectorizes loops that call it.  NaN stays NaN. */
static inline float fs_normcdff(float u) {
    float z = __builtin_fabsf(u) * 0.70710678118654752f;
    float t = 1.0f / (1.0f + 0.5f * z);
    float p = 0.12862734f;
    p = p * t - 0.59145851f;
    p = p * t + 0.94488665f;
    p = p * t - 0.41198048f;
    p = p * t - 0.31756497f;
    p = p * t + 0.12864480f;
    p = p * t - 0.00923139f;
    p = p * t + 0.39593568f;
    p = p * t + 0.99753384f;
    p = p * t - 1.26539294f;
    float half_erfc = 0.5f * t * fs_expf(p - z * z);
    return u < 0.0f ? half_erfc : 1.0f - half_erfc;
}

/* The standard normal density phi(u) = exp(-u^2 / 2) / sqrt(2 pi) (GELU's derivative). */
static inline float fs_normpdff(float u) {
    return 0.39894228040143268f * fs_expf(-0.5f * u * u);
}

/* Counter-based random numbers for dropout (attention's, the dropout family's, the fused
 * add + norm): a keyed hash of the element's 64-bit index (two rounds of the "lowbias32"
 * avalanche mix), so backward regenerates exactly the forward's mask from (seed, index) without
 * storing it.  Branch-free and 32-bit only, so gcc vectorizes it over a row.  fastseq/dropout.py
 * has the same function in torch (the oracle, dropout_keep). */
static inline uint32_t fs_mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU;
    x ^= x >> 15; x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}
static inline uint32_t fs_rand32(uint64_t index, uint64_t seed) {
    return fs_mix32(fs_mix32((uint32_t)index ^ (uint32_t)seed) ^ (uint32_t)(index >> 32) ^ (uint32_t)(seed >> 32));
}

/* max of x[0..n) ignoring NaN (NaN still reaches the output through exp and the row sum);
 * -inf for n == 0 or an all-NaN row.  Written with AVX intrinsics: gcc will not vectorize a
 * NaN-aware max without -ffinite-math-only, which would break the -inf of masks. */
#ifdef __AVX__
#include <immintrin.h>
#endif
static inline float fs_rowmaxf(const float* x, long n) {
    float m = -__builtin_inff();
    long j = 0;
#ifdef __AVX__
    __m256 m0 = _mm256_set1_ps(-__builtin_inff()), m1 = m0;
    for (; j + 16 <= n; j += 16) {
        m0 = _mm256_max_ps(_mm256_loadu_ps(x + j), m0);      /* NaN in x: keeps m0 */
        m1 = _mm256_max_ps(_mm256_loadu_ps(x + j + 8), m1);
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_max_ps(m0, m1));
    for (int i = 0; i < 8; i++) m = t[i] > m ? t[i] : m;
#endif
    for (; j < n; j++) m = x[j] > m ? x[j] : m;
    return m;
}
/* A barrier of the innermost enclosing OpenMP parallel region (an orphaned directive): the
 * recurrent kernels run their whole time loop inside one region and meet here once per step.
 * Outside a region, or without OpenMP, it does nothing. */
static inline void fs_barrier(void) {
#pragma omp barrier
}

/* The number of threads in the current team (1 outside a region or without OpenMP). */
#ifdef _OPENMP
#include <omp.h>
static inline int fs_team_size(void) { return omp_get_num_threads(); }
#else
static inline int fs_team_size(void) { return 1; }
#endif

#endif
