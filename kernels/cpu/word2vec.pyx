# cython: language_level=3, cdivision=True
"""word2vec training (Mikolov et al. 2013): skip-gram and CBOW with negative sampling, fp32,
Hogwild over OpenMP threads (issue 14).  fastseq/word2vec.py builds the vocabulary and the
tables and calls train_epoch once per epoch.

The corpus is one int32 array of word indices (words outside the vocabulary already dropped),
sentence s owning [offs[s], offs[s + 1]).  Threads take whole sentences (static chunks) and
update the shared weights without locks, as word2vec.c and gensim do.

Randomness.  Every draw (subsampling, the reduced window, the negatives) comes from word2vec.c's
linear congruential generator r <- r * 25214903917 + 11 (mod 2^64), seeded per sentence from
(seed, epoch, sentence index): a run repeats bit for bit at one thread, whatever the chunking,
and a thread's draws never depend on another's progress.

Learning rate.  Linear from alpha_0 to alpha_1 over all epochs by position in the corpus: a
sentence starting at word p of epoch e trains at alpha_0 - (alpha_0 - alpha_1) (e N + p) / (E N)
(N corpus words, E epochs), so the schedule needs no shared counter.

Per (input vector v, output word w) pair, with the k negatives n_1..n_k drawn from the unigram^0.75
distribution (cum_table, binary search; a negative equal to w is skipped):

    for (u, label) in [(w, 1), (n_1, 0), ..., (n_k, 0)]:
        g = alpha (label - sigmoid(v . U[u]))        (v . U[u] clipped to [-6, 6] as word2vec.c)
        e += g U[u];   U[u] += g v
    v += e                                           (CBOW: e added to every context word)

Skip-gram: for each center position, each context word c in the (reduced) window gives the pair
(v = W[c], w = center).  CBOW: v = the mean (cbow_mean) or sum of the context words' W rows,
w = center.  W is syn0 (V, D), U is syn1neg (V, D).
"""
from cython.parallel cimport parallel, threadid
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

from _common cimport exp_

cdef extern from "_fastmath.h" nogil:
    int fs_team_size()

cdef extern from *:
    void __builtin_prefetch(const void* p) nogil

cdef enum:
    MAX_NEGATIVE = 64     # negatives per pair at most (Word2Vec checks)
    MAX_EXP = 6           # |v . U[u]| past this: the sigmoid taken as 0 or 1 (word2vec.c's table range)
    MAX_THREADS = 256


cdef uint32_t ALL = 0xFFFFFFFF   # keep[w] == ALL: never subsampled (no draw)


cdef inline uint64_t next_(uint64_t* r) noexcept nogil:
    r[0] = r[0] * <uint64_t> 25214903917ULL + 11
    return r[0]


cdef inline uint64_t seed_(uint64_t seed, int64_t epoch, int64_t s) noexcept nogil:
    """A sentence's generator state: splitmix64 of (seed, epoch, sentence)."""
    cdef uint64_t z = seed + <uint64_t> epoch * <uint64_t> 0x9E3779B97F4A7C15ULL + <uint64_t> s * <uint64_t> 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 30)) * <uint64_t> 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * <uint64_t> 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline int32_t negative_(const uint32_t* cum, const int32_t* start, int32_t V, uint64_t* r) noexcept nogil:
    """A word drawn from the unigram^0.75 distribution: the first entry of cum (its cumulative
    table scaled to [0, 2^31 - 1], gensim's cum_table) above the draw x = (r >> 16) mod 2^31 - 1.
    start[k] is the first entry above k 2^15, so the answer lies in [start[k], start[k + 1]] for
    k = x >> 15: a short scan instead of a binary search's unpredictable branches, and the modulo
    by folding instead of a 64-bit division (the two were ~80% of a pair's time)."""
    cdef uint64_t a = next_(r) >> 16
    cdef uint32_t x
    cdef int32_t i
    if cum[V - 1] == 0x7FFFFFFF:                     # a mod (2^31 - 1), a < 2^48
        a = (a & 0x7FFFFFFF) + (a >> 31)
        a = (a & 0x7FFFFFFF) + (a >> 31)
        x = <uint32_t> (a - 0x7FFFFFFF if a >= 0x7FFFFFFF else a)
    else:
        x = <uint32_t> (a % cum[V - 1])
    i = start[x >> 15]
    while i < V - 1 and cum[i] <= x:
        i = i + 1
    return i


cdef inline float dot_(const float* a, const float* b, Py_ssize_t D) noexcept nogil:
    cdef Py_ssize_t j
    cdef float s = 0
    for j in range(D):
        s = s + a[j] * b[j]
    return s


cdef inline void axpy_(float g, const float* x, float* y, Py_ssize_t D) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(D):
        y[j] = y[j] + g * x[j]


cdef inline void step_(float g, const float* v, float* u, float* e, Py_ssize_t D) noexcept nogil:
    """e += g u;  u += g v   (one pass over u: the read for e is the one the update needs)."""
    cdef Py_ssize_t j
    cdef float uj
    for j in range(D):
        uj = u[j]
        e[j] = e[j] + g * uj
        u[j] = uj + g * v[j]


cdef void pair_(const float* v, float* e, int32_t w, float* U, const uint32_t* cum, const int32_t* start,
                int32_t V, int negative,
                float alpha, Py_ssize_t D, uint64_t* r) noexcept nogil:
    """One (input vector v, output word w) update of U's rows with negative sampling; the input's
    gradient step accumulates into e (the caller adds it to the input rows).  The negatives are
    drawn first (the same draws in the same order) so that their rows, at random places in U, are
    on their way into the cache while the earlier ones are used."""
    cdef int d, j
    cdef int32_t u
    cdef int32_t target[MAX_NEGATIVE + 1]
    cdef float f, g, label, one = 1
    cdef const char* row
    target[0] = w
    for d in range(1, negative + 1):
        target[d] = negative_(cum, start, V, r)
        row = <const char*> (U + <Py_ssize_t> target[d] * D)
        for j in range(0, <int> (D * 4), 64):
            __builtin_prefetch(row + j)
    for d in range(negative + 1):
        u = target[d]
        if d > 0 and u == w:
            continue
        label = one if d == 0 else 0
        f = dot_(v, U + <Py_ssize_t> u * D, D)
        if f > MAX_EXP:
            g = (label - one) * alpha
        elif f < -MAX_EXP:
            g = label * alpha
        else:
            g = (label - one / (one + exp_(-f))) * alpha
        step_(g, v, U + <Py_ssize_t> u * D, e, D)


cdef int64_t sentence_(const int32_t* words, Py_ssize_t n, float* W, float* U, const uint32_t* cum,
                       const int32_t* start,
                       const uint32_t* keep, int32_t V, Py_ssize_t D, int window, int negative, bint sg,
                       bint cbow_mean, float alpha, uint64_t r, int32_t* kept, float* v, float* e) noexcept nogil:
    """Train on one sentence; returns the words it kept after subsampling."""
    cdef Py_ssize_t i, j, m = 0, pos, lo, hi, b
    cdef int32_t w
    cdef int cw
    for i in range(n):                                   # subsampling: keep with probability keep[w] / 2^32
        w = words[i]
        if keep[w] != ALL and keep[w] < <uint32_t> (next_(&r) & ALL):
            continue
        kept[m] = w
        m = m + 1
    for pos in range(m):
        b = <Py_ssize_t> (next_(&r) % <uint64_t> window)          # the reduced window: window - b each side
        lo, hi = max(0, pos - window + b), min(m, pos + window + 1 - b)
        if sg:
            for j in range(lo, hi):
                if j == pos:
                    continue
                for i in range(D):
                    e[i] = 0
                pair_(W + <Py_ssize_t> kept[j] * D, e, kept[pos], U, cum, start, V, negative, alpha, D, &r)
                axpy_(1, e, W + <Py_ssize_t> kept[j] * D, D)
        else:
            cw = 0
            for i in range(D):
                v[i] = 0
                e[i] = 0
            for j in range(lo, hi):
                if j != pos:
                    axpy_(1, W + <Py_ssize_t> kept[j] * D, v, D)
                    cw = cw + 1
            if cw == 0:
                continue
            if cbow_mean:
                for i in range(D):
                    v[i] = v[i] / cw
            pair_(v, e, kept[pos], U, cum, start, V, negative, alpha, D, &r)
            for j in range(lo, hi):
                if j != pos:
                    axpy_(1, e, W + <Py_ssize_t> kept[j] * D, D)
    return m


def train_epoch(const int32_t[::1] words, const int64_t[::1] offs, float[::1] W, float[::1] U,
                const uint32_t[::1] cum, const int32_t[::1] start, const uint32_t[::1] keep, int32_t[::1] scratch, float[::1] vecs,
                Py_ssize_t D, int window, int negative, bint sg, bint cbow_mean, double alpha_0, double alpha_1,
                int64_t epoch, int64_t epochs, uint64_t seed, int num_threads):
    """One epoch over the corpus (module docstring).  W, U (V D,); cum, keep (V,); scratch
    (num_threads * longest sentence,) int32; vecs (num_threads * 2 D,) float.  Returns the words
    kept after subsampling (the effective words trained on)."""
    cdef Py_ssize_t S = offs.shape[0] - 1
    cdef int64_t N = offs[S], total = 0
    cdef int32_t V = <int32_t> cum.shape[0]
    cdef Py_ssize_t longest = scratch.shape[0] // max(1, num_threads)
    cdef int tid, t, nt = max(1, min(num_threads, MAX_THREADS))
    cdef int64_t counts[MAX_THREADS]
    if S == 0 or N == 0 or V == 0:
        return 0
    for t in range(nt):
        counts[t] = 0
    if nt == 1:
        with nogil:
            counts[0] = epoch_part_(&words[0], &offs[0], S, N, &W[0], &U[0], &cum[0], &start[0], &keep[0], V, D,
                                    window,
                                    negative, sg, cbow_mean, alpha_0, alpha_1, epoch, epochs, seed, &scratch[0],
                                    &vecs[0], 0, 1)
    else:
        with nogil, parallel(num_threads=nt):
            tid = threadid()
            counts[tid] = epoch_part_(&words[0], &offs[0], S, N, &W[0], &U[0], &cum[0], &start[0], &keep[0], V, D,
                                    window,
                                      negative, sg, cbow_mean, alpha_0, alpha_1, epoch, epochs, seed,
                                      &scratch[0] + tid * longest, &vecs[0] + tid * 2 * D, tid, fs_team_size())
    for t in range(nt):
        total += counts[t]
    return total


cdef int64_t epoch_part_(const int32_t* words, const int64_t* offs, Py_ssize_t S, int64_t N, float* W, float* U,
                         const uint32_t* cum, const int32_t* start, const uint32_t* keep, int32_t V, Py_ssize_t D, int window,
                         int negative, bint sg, bint cbow_mean, double alpha_0, double alpha_1, int64_t epoch,
                         int64_t epochs, uint64_t seed, int32_t* kept, float* vecs, int tid, int nt) noexcept nogil:
    """Thread tid's sentences [S tid / nt, S (tid + 1) / nt)."""
    cdef Py_ssize_t s, s0 = S * tid // nt, s1 = S * (tid + 1) // nt
    cdef int64_t m = 0
    cdef double progress
    cdef float alpha
    for s in range(s0, s1):
        progress = (<double> epoch * N + offs[s]) / (<double> epochs * N)
        alpha = <float> (alpha_0 - (alpha_0 - alpha_1) * progress)
        m = m + sentence_(words + offs[s], offs[s + 1] - offs[s], W, U, cum, start, keep, V, D, window, negative, sg,
                          cbow_mean, alpha, seed_(seed, epoch, s), kept, vecs, vecs + D)
    return m
