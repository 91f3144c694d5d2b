"""Output allocation for the CPU kernels.

glibc serves every block of 32 MiB or more with a fresh mmap, whose 4 KiB pages fault in one by
one when the kernel first writes them: for an (8192, 1024) fp32 output that costs ~11 ms on the
2-core dev box, four times the kernel itself.  NumPy asks the OS for transparent huge pages
(madvise MADV_HUGEPAGE) on its large allocations, which cuts that cost 3-5x, so CPU outputs of
32 MiB and more are NumPy-owned memory wrapped zero-copy as torch tensors.  Smaller outputs
(which glibc mostly recycles from its heap), and every output when FASTSEQ_HUGEPAGES=0, come
from torch.empty.  torch gets the same effect for all its tensors from THP_MEM_ALLOC_ENABLE=1,
or from a preloaded tcmalloc (README, performance notes).

The one visible difference: such a tensor's storage cannot be resized (`resize_` to a larger
size raises).  bench/ reports kernel-only time beside the end-to-end time, so the two effects
stay apart.
"""
import os

import numpy as np
import torch

HUGE_BYTES = 32 << 20
ENABLED = os.environ.get("FASTSEQ_HUGEPAGES", "1") != "0"

_NP = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
_ITEMSIZE = {torch.float32: 4, torch.float64: 8, torch.float16: 2}


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device), huge-page backed when large and on CPU."""
    if ENABLED and dtype in _NP and torch.device(device).type == "cpu":
        numel = 1
        for d in shape:
            numel *= d
        if numel * _ITEMSIZE[dtype] >= HUGE_BYTES:
            return torch.from_numpy(np.empty(tuple(shape), dtype=_NP[dtype]))
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous uninitialized tensor of t's shape, dtype and device."""
    return empty(t.shape, t.dtype, t.device)
