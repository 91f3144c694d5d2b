# The dropout mask, written once for every kernel that drops an element: dropout.pyx (dropout,
# dropout + residual, bias + activation + dropout) and layer_norm.pyx (dropout on the branch of
# the residual add).  Attention's kernels draw the same hash over their (B, H, T, S) index.
#
# Element k of a tensor (its flat row-major index, 64 bits) is kept when
#     fs_rand32(k, seed) = mix(mix(lo32(k) ^ lo32(seed)) ^ hi32(k) ^ hi32(seed)) >= thresh,
# thresh = p 2^32 (capped at 2^32 - 1), and a kept element is scaled by 1 / (1 - p) (0 when
# p = 1).  fastseq/dropout.py's dropout_keep is the same draw in torch (the test oracle).
#
# A block of at most MASK_BLOCK elements gets its multipliers (scale or 0) in one loop over
# 32-bit lanes: within a span where hi32(k) does not change, lo32(k) is lo32(k0) + j and the
# hash is all 32-bit arithmetic, which gcc vectorizes (8 or 16 lanes).  The multipliers stay in
# L1 for the loop that applies them; nothing is written to memory but the kernel's outputs.

from libc.stdint cimport uint32_t, uint64_t

from _common cimport real


cdef extern from "_fastmath.h" nogil:
    uint32_t fs_mix32(uint32_t x)


cdef enum:
    MASK_BLOCK = 512        # multipliers made at once: 2 KiB (float) / 4 KiB (double) of stack


cdef struct Drop:
    uint64_t seed
    uint32_t thresh         # kept when the draw >= thresh
    double scale            # 1 / (1 - p); 0 when p >= 1
    bint on                 # p > 0: draw a mask at all


cdef inline Drop drop_(double p, uint64_t seed) noexcept nogil:
    cdef Drop d
    d.seed = seed
    d.on = p > 0
    d.thresh = <uint32_t> min(p * 4294967296.0, 4294967295.0) if p > 0 else 0
    d.scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    return d


cdef inline void keep_span_(real* mul, uint64_t k0, Py_ssize_t n, const Drop* dr) noexcept nogil:
    """mul[j] = scale if element k0 + j is kept else 0, for a span in which hi32(k) is constant."""
    cdef uint32_t lo = <uint32_t> k0
    cdef uint32_t sl = <uint32_t> dr.seed
    cdef uint32_t hk = (<uint32_t> (k0 >> 32)) ^ (<uint32_t> (dr.seed >> 32))
    cdef uint32_t thr = dr.thresh
    cdef real s = <real> dr.scale
    cdef Py_ssize_t j
    for j in range(n):
        mul[j] = s if fs_mix32(fs_mix32((lo + <uint32_t> j) ^ sl) ^ hk) >= thr else 0


cdef inline void keep_mul_(real* mul, uint64_t k0, Py_ssize_t n, const Drop* dr) noexcept nogil:
    """mul[j] = scale or 0 for elements k0 .. k0 + n - 1 (n <= MASK_BLOCK); a span that crosses a
    multiple of 2^32 is cut there (at most once)."""
    cdef uint64_t room = (<uint64_t> 1 << 32) - <uint64_t> (<uint32_t> k0)
    cdef Py_ssize_t cut = n if <uint64_t> n <= room else <Py_ssize_t> room
    keep_span_(mul, k0, cut, dr)
    if cut < n:
        keep_span_(mul + cut, k0 + <uint64_t> cut, n - cut, dr)
