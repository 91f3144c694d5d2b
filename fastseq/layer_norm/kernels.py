"""The per-backend kernel calls: forward and backward of every norm, on the CPU (Cython) and CUDA (Numba) kernels."""
from typing import Optional

import torch

from .. import _alloc, _dispatch


# ============================================================================ kernel calls

def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


_KERNELS = []


def _cpu_kernels():
    """fastseq._cpu.layer_norm (looked up once)."""
    if not _KERNELS:
        _KERNELS.append(_dispatch.cpu_kernels("layer_norm"))
    return _KERNELS[0]


_ONES, _ZEROS = {}, {}


def _affine(weight, bias, n, like):
    """weight and bias as contiguous n-vectors; absent ones as cached ones / zeros."""
    w = weight.contiguous() if weight is not None else _constant(_ONES, 1.0, n, like)
    b = bias.contiguous() if bias is not None else _constant(_ZEROS, 0.0, n, like)
    return w, b


def _constant(cache, value, n, like):
    key = (n, like.dtype, like.device)
    t = cache.get(key)
    if t is None:
        with torch.inference_mode(False):          # usable by autograd later, whatever mode made it
            t = cache[key] = torch.full((n,), value, dtype=like.dtype, device=like.device)
    return t


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Below this many elements (~10 us of one core's memory traffic) a forward runs on one thread:
# waking a second costs several microseconds, and on a busy machine a team waits for its slowest
# member's time slice.
_PARALLEL_ELEMENTS = 1 << 15


def _forward(backend, x, r, w, b, m, n, eps, center, want_sum, want_stats=True, p=0.0, seed=0):
    """Run the forward kernel; returns y, s (or None), mean, rstd (None unless want_stats: on the
    CPU the row statistics of an inference call go to scratch).  x, r, w, b contiguous; p > 0
    (with r): x is dropped with the mask keyed by seed before the add."""
    y = _alloc.empty_like(x)
    s = _alloc.empty_like(x) if want_sum else None
    if backend == "cpu":
        nt = torch.get_num_threads() if m * n >= _PARALLEL_ELEMENTS else 1
        need_scr = r is not None and not want_sum
        dbl = x.dtype == torch.float64
        if want_stats:
            mean, rstd = x.new_empty(m), x.new_empty(m)
            p_mean, p_rstd = mean.data_ptr(), rstd.data_ptr()
            p_scr = _alloc.scratch(nt * n, x.dtype).data_ptr() if need_scr else 0
        else:                                       # [mean | rstd | per-thread rows] in one buffer
            mean = rstd = None
            p_mean = _alloc.scratch(2 * m + (nt * n if need_scr else 0), x.dtype).data_ptr()
            p_rstd = p_mean + m * (8 if dbl else 4)
            p_scr = p_rstd + m * (8 if dbl else 4) if need_scr else 0
        _cpu_kernels().forward_ptr(
            x.data_ptr(), 0 if r is None else r.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(),
            0 if s is None else s.data_ptr(), p_scr, p_mean, p_rstd, m, n, eps, center, nt, dbl, p, seed)
    else:
        mean = _alloc.empty((m,), _stat_dtype(x), x.device)
        rstd = _alloc.empty((m,), _stat_dtype(x), x.device)
        k = _dispatch.cuda_kernels("layer_norm")
        from fastseq._cuda._common import as_array, on_device, torch_stream
        with on_device(x.device):
            dummy = as_array(w)                     # stands in for absent r / s (flags off)
            k.forward(as_array(x.view(-1)), as_array(r.view(-1)) if r is not None else dummy,
                      as_array(w), as_array(b), as_array(y.view(-1)),
                      as_array(s.view(-1)) if s is not None else dummy,
                      as_array(mean), as_array(rstd), m, n, float(eps), center, r is not None, want_sum,
                      p=p, seed=seed, stream=torch_stream())
    return y, s, mean, rstd


def _backward(backend, x, r, dy, ds, w, mean, rstd, m, n, center, want_dw, want_db, p=0.0, seed=0, want_dxd=False):
    """Run the backward kernel; returns dx, dxd (or None), dw (or None), db (or None).  dx is the
    gradient of the sum's summands; with p > 0 it is the residual's, and dxd (want_dxd) the
    dropped input's."""
    dx = _alloc.empty_like(x)
    dxd = _alloc.empty_like(x) if want_dxd else None
    dw = _alloc.empty((n,), x.dtype, x.device) if want_dw else None
    db = _alloc.empty((n,), x.dtype, x.device) if want_db else None
    if backend == "cpu":
        nt = max(1, min(_dispatch.num_threads(), m))
        size = x.element_size()
        need_part, need_scr = want_dw or want_db, r is not None
        work = _alloc.scratch((2 * nt * n if need_part else 0) + (nt * n if need_scr else 0), x.dtype).data_ptr()
        p_part = work if need_part else 0                          # [dw partials | db partials | rows]
        p_scr = work + (2 * nt * n * size if need_part else 0) if need_scr else 0
        _dispatch.cpu_kernels("layer_norm").backward_ptr(        # (looked up here: tests spy on it)
            x.data_ptr(), _ptr(r), dy.data_ptr(), _ptr(ds), w.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
            dx.data_ptr(), _ptr(dxd), p_part, p_scr, _ptr(dw), _ptr(db), m, n, center, nt,
            x.dtype == torch.float64, p, seed)
    else:
        k = _dispatch.cuda_kernels("layer_norm")
        from fastseq._cuda._common import as_array, on_device, torch_stream
        chunks = k.partial_chunks(m)[1]
        part = torch.empty(2, chunks * n, dtype=_stat_dtype(x), device=x.device)
        with on_device(x.device):
            dummy = as_array(w)                     # stands in for absent r / ds / dw / db (flags off)
            k.backward(as_array(x.view(-1)), as_array(r.view(-1)) if r is not None else dummy,
                       as_array(dy.view(-1)), as_array(ds.view(-1)) if ds is not None else dummy,
                       as_array(w), as_array(mean), as_array(rstd), as_array(dx.view(-1)),
                       as_array(dw) if dw is not None else dummy, as_array(db) if db is not None else dummy,
                       as_array(part[0]), as_array(part[1]), m, n, center, r is not None, ds is not None,
                       want_dw, want_db, dxd=as_array(dxd.view(-1)) if dxd is not None else None, p=p, seed=seed,
                       stream=torch_stream())
    return dx, dxd, dw, db
