"""Output allocation for the CPU kernels.

glibc serves every block of 32 MiB or more with a fresh mmap, whose 4 KiB pages fault in one by
one when the kernel first writes them: for an (8192, 1024) fp32 output that costs ~11 ms on the
2-core dev box, four times the kernel itself.  NumPy asks the OS for transparent huge pages
(madvise MADV_HUGEPAGE) on its large allocations, which cuts that cost 3-5x, so CPU outputs of
32 MiB and more are NumPy-owned memory wrapped zero-copy as torch tensors, and that memory is
reused (reused() below): a training loop allocates the same large outputs every step, and even
huge pages cost a fault and a zeroing each (inside a kernel's parallel region a fault also
stalls the other threads at the next barrier).  Smaller outputs (which glibc mostly recycles
from its heap), and every output when FASTSEQ_HUGEPAGES=0, come from torch.empty.  torch gets the same effect for all its tensors from THP_MEM_ALLOC_ENABLE=1,
or from a preloaded tcmalloc (README, performance notes).

The one visible difference: such a tensor's storage cannot be resized (`resize_` to a larger
size raises).  bench/ reports kernel-only time beside the end-to-end time, so the two effects
stay apart.
"""
import os
import threading
import weakref

import numpy as np
import torch

HUGE_BYTES = 32 << 20
ENABLED = os.environ.get("FASTSEQ_HUGEPAGES", "1") != "0"

_NP = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
_ITEMSIZE = {torch.float32: 4, torch.float64: 8, torch.float16: 2}


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device), huge-page backed when large and on CPU."""
    numel = 1
    for d in shape:
        numel *= d
    if ENABLED and numel * _ITEMSIZE.get(dtype, 0) >= HUGE_BYTES and torch.device(device).type == "cpu":
        return reused(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous uninitialized tensor of t's shape, dtype and device.  (torch.empty_like costs
    ~1 us where torch.empty(t.shape, dtype=..., device=...) costs ~2.5: parsing the arguments.)"""
    if ENABLED and t.is_cpu and t.numel() * _ITEMSIZE.get(t.dtype, 0) >= HUGE_BYTES:
        return reused(t.shape, t.dtype)
    return torch.empty_like(t) if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)


_tls = threading.local()


def scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A CPU work buffer of at least `numel` elements, reused by the calling Python thread across
    kernel calls (a buffer lives only for the kernel call that uses it, and the kernels release
    the GIL, so each thread has its own).  Contents are undefined."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(max(numel, 1024), dtype=dtype)
    return buf


# ---------------------------------------------------------------------------- reused large outputs

_POOL = []                      # [buffer, weakref to the array torch holds, or None]: most recently used last
_POOL_LOCK = threading.Lock()
POOL_FREE_BYTES = int(os.environ.get("FASTSEQ_POOL_MB", "512")) << 20   # free buffers kept beyond this are let go


def reused(shape, dtype: torch.dtype) -> torch.Tensor:
    """A new CPU output of `shape` in memory reused from an earlier output of the same byte size
    that no tensor holds any more (a caching allocator for the large CPU outputs).

    Why: a training loop allocates the same large outputs every call; glibc returns them to the
    OS and the next call faults fresh pages in, one by one, inside the kernel's parallel region,
    where each fault also stalls the other threads at the next barrier.  Measured on the LSTM
    (512, 64, 128) training forward: 17-110 ms of faults against a 55 ms kernel.

    A buffer is free when the NumPy array handed to torch.from_numpy is gone: the tensor's
    storage holds that array, every view of the tensor holds the storage, and an array from
    t.numpy() holds the tensor, so the array dies only with the last of them (a weak reference
    tells).  Contents are undefined (callers write every element).  FASTSEQ_POOL_MB (default 512)
    bounds the free memory kept; release_pool() lets it all go."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * _ITEMSIZE[dtype]
    with _POOL_LOCK:
        entry = None
        for i in range(len(_POOL)):
            e = _POOL[i]
            if e[0].nbytes == nbytes and _free(e):
                entry = _POOL.pop(i)
                break
        if entry is None:
            entry = [np.empty(nbytes, np.uint8), None]
            entry[0][::4096] = 0        # fault its pages in now, outside any kernel's parallel region
        held = entry[0].view(_NP[dtype]).reshape(tuple(shape))
        entry[1] = weakref.ref(held)
        _POOL.append(entry)
        free = 0
        for i in range(len(_POOL) - 1, -1, -1):
            if _free(_POOL[i]):
                free += _POOL[i][0].nbytes
                if free > POOL_FREE_BYTES:
                    del _POOL[i]
    return torch.from_numpy(held)


def _free(entry) -> bool:
    return entry[1] is None or entry[1]() is None


def release_pool() -> None:
    """Let go of every free buffer reused() keeps."""
    with _POOL_LOCK:
        _POOL[:] = [e for e in _POOL if not _free(e)]
