"""Softmax attention: softmax(Q K^T * scale + mask) V, flash-style.

Read top to bottom: the pure-torch reference (the test oracle), input checks, dispatch facts,
the kernel calls, the autograd Function, the functional op.  The "torch" backend is torch's own
F.scaled_dot_product_attention (given an equivalent mask for the keyword extras).

Layout: q (B, Hq, T, D), k (B, Hk, S, D), v (B, Hk, S, Dv) -> o (B, Hq, T, Dv); 3-D inputs
(B, T, D) are one head; more leading dims fold into B.  Hq = Hk, or Hk divides Hq with
enable_gqa (grouped-query attention, K and V never repeated).
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import _alloc, _blas, _dispatch, _library
from .dropout import dropout_keep

Window = Optional[Tuple[int, int]]


# ============================================================================ reference

def visible_keys(T: int, S: int, is_causal=False, window: Window = None, key_lengths=None, device=None):
    """(B or 1, 1, T, S) boolean: which keys each query may see under the structural masks.
    Causal is top-left aligned (query i sees keys j <= i), as torch; window=(left, right) lets
    query i see keys i - left <= j <= i + right; key_lengths (B,) hides keys j >= length."""
    i = torch.arange(T, device=device).view(T, 1)
    j = torch.arange(S, device=device).view(1, S)
    keep = torch.ones(T, S, dtype=torch.bool, device=device)
    if is_causal:
        keep &= j <= i
    if window is not None:
        left, right = window
        if left is not None and left >= 0:
            keep &= j >= i - left
        if right is not None and right >= 0:
            keep &= j <= i + right
    keep = keep.view(1, 1, T, S)
    if key_lengths is not None:
        keep = keep & (j.view(1, 1, 1, S) < key_lengths.to(device).view(-1, 1, 1, 1))
    return keep


def visible_count(T: int, S: int, is_causal=False, window: Window = None, key_lengths=None) -> int:
    """How many (query, key) pairs the structural masks leave visible, summed over the batch:
    O(T) memory (visible_keys would build T x S)."""
    left, right = _bounds(is_causal, window, T, S)
    i = torch.arange(T, dtype=torch.int64)
    lens = key_lengths.to(torch.int64).view(-1, 1) if key_lengths is not None else torch.tensor([[S]])
    lo = (i - left).clamp(min=0)
    hi = torch.minimum(i + right + 1, lens)
    return int((hi - lo).clamp(min=0).sum())


def attention_ref(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                  window: Window = None, key_lengths=None, dropout_p=0.0, dropout_seed=None):
    """The math, in the accumulator precision: rows that see no key output 0 (torch's rule).
    With dropout_p and dropout_seed: the kernels' own dropout mask (dropout_keep)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        ka, va = ka.repeat_interleave(rep, -3), va.repeat_interleave(rep, -3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = qa @ ka.transpose(-2, -1) * scale
    T, S = q.shape[-2], k.shape[-2]
    keep = visible_keys(T, S, is_causal, window, key_lengths, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            s = s + attn_mask.to(acc)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1)
    p = torch.where(torch.isnan(p) & ~torch.isnan(s), torch.zeros_like(p), p)   # all -inf rows -> 0
    if dropout_p > 0:
        shape = (q.shape[0] if q.dim() == 4 else 1, q.shape[-3] if q.dim() >= 3 else 1, T, S)
        p = p * dropout_keep(dropout_seed, shape, dropout_p, q.device).view(p.shape[:-2] + (T, S)) / (1 - dropout_p)
    return (p @ va).to(q.dtype)


# ============================================================================ input checks

def _fold(t: torch.Tensor) -> torch.Tensor:
    """(..., H, L, E) -> (B, H, L, E); (L, E) -> (1, 1, L, E); (B, L, E) -> (B, 1, L, E)."""
    if t.dim() == 4:
        return t
    if t.dim() == 2:
        return t.view(1, 1, *t.shape)
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t


def _check(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, key_lengths):
    """Validate at the boundary.  The common call (4-D q, k, v of one float dtype and device, no
    extras) is accepted by comparisons alone; anything else gets every check, in order, so an
    error names exactly what was received."""
    if (attn_mask is None and window is None and key_lengths is None and type(q) is torch.Tensor
            and type(k) is torch.Tensor and type(v) is torch.Tensor):
        qs, ks, vs = q.shape, k.shape, v.shape
        dt = q.dtype
        if (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and dt.is_floating_point and k.dtype == dt
                and v.dtype == dt and qs[3] == ks[3] and qs[0] == ks[0] == vs[0] and ks[1] == vs[1]
                and ks[2] == vs[2] and ks[1] > 0 and (qs[1] == ks[1] or (enable_gqa and qs[1] % ks[1] == 0))
                and 0.0 <= dropout_p <= 1.0 and q.device == k.device == v.device):
            return
    _check_all(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, key_lengths)


def _check_all(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, key_lengths):
    op = "scaled_dot_product_attention"
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{op}: expected floating-point {name}, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{op}: expected {name} with at least 2 dims (..., L, E), got {t.dim()}D")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: expected query, key and value of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: expected query, key and value on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"{op}: expected query, key and value of one rank, got {q.dim()}D, {k.dim()}D, {v.dim()}D")
    if q.shape[-1] != k.shape[-1]:
        raise _dispatch.ShapeError(f"{op}: query and key head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise _dispatch.ShapeError(f"{op}: key and value lengths differ: {k.shape[-2]} vs {v.shape[-2]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise _dispatch.ShapeError(f"{op}: key {list(k.shape)} and value {list(v.shape)} differ before the last dim")
    if q.shape[:-3] != k.shape[:-3]:
        raise _dispatch.ShapeError(f"{op}: batch dims of query {list(q.shape[:-3])} and key {list(k.shape[:-3])} differ")
    if q.dim() >= 3:
        hq, hk = (q.shape[-3], k.shape[-3]) if q.dim() >= 4 else (1, 1)
        if q.dim() == 3 and q.shape[0] != k.shape[0]:
            raise _dispatch.ShapeError(f"{op}: batch of query ({q.shape[0]}) and key ({k.shape[0]}) differ")
        if hk == 0 and hq > 0:
            raise ValueError(f"{op}: key has 0 heads for a query with {hq}")
        if hq != hk:
            if not enable_gqa:
                raise ValueError(f"{op}: query has {hq} heads and key {hk}; pass enable_gqa=True for "
                                 "grouped-query attention")
            if hq % hk:
                raise ValueError(f"{op}: enable_gqa needs key heads ({hk}) to divide query heads ({hq})")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise ValueError(f"{op}: expected attn_mask to be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise ValueError(f"{op}: expected attn_mask of dtype torch.bool or {q.dtype} (the query's), "
                             f"got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"{op}: expected attn_mask on {q.device} (the query's), got {attn_mask.device}")
        target = q.shape[:-1] + (k.shape[-2],)
        try:
            torch.broadcast_shapes(attn_mask.shape, target)
        except RuntimeError:
            raise ValueError(f"{op}: attn_mask of shape {list(attn_mask.shape)} does not broadcast to "
                             f"{list(target)} (query's (..., L) and key length S)") from None
        if torch.broadcast_shapes(attn_mask.shape, target) != target:
            raise ValueError(f"{op}: attn_mask of shape {list(attn_mask.shape)} would broadcast the output "
                             f"beyond {list(target)}")
        if is_causal:
            raise ValueError(f"{op}: pass either attn_mask or is_causal=True, not both (torch's rule)")
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2) or \
                any(w is not None and (isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < -1)
                    for w in window):
            raise ValueError(f"{op}: window must be (left, right) of ints >= 0 (None or -1: unbounded), "
                             f"got {window!r}")
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor) or key_lengths.dtype.is_floating_point or \
                key_lengths.dtype == torch.bool or key_lengths.is_complex() or key_lengths.dim() != 1:
            raise ValueError(f"{op}: key_lengths must be a 1-D integer tensor (B,), got "
                             f"{getattr(key_lengths, 'dtype', type(key_lengths).__name__)} "
                             f"of shape {list(getattr(key_lengths, 'shape', []))}")
        if key_lengths.device != q.device and key_lengths.device.type != "cpu":
            raise ValueError(f"{op}: expected key_lengths on {q.device} (the query's) or the CPU, got "
                             f"{key_lengths.device}")
        b = _fold(q).shape[0]
        if key_lengths.shape[0] != b:
            raise ValueError(f"{op}: key_lengths has {key_lengths.shape[0]} entries for a batch of {b}")
        if key_lengths.numel() and not _library.captured(key_lengths) and \
                (key_lengths.min() < 0 or key_lengths.max() > k.shape[-2]):      # (a value test: eager only)
            raise ValueError(f"{op}: key_lengths must lie in [0, {k.shape[-2]}], got "
                             f"[{int(key_lengths.min())}, {int(key_lengths.max())}]")


def _bounds(is_causal: bool, window: Window, T: int, S: int) -> Tuple[int, int]:
    """(left, right) visible-key bounds per query; T + S means unbounded."""
    left = right = T + S
    if window is not None:
        if window[0] is not None and window[0] >= 0:
            left = min(left, int(window[0]))
        if window[1] is not None and window[1] >= 0:
            right = min(right, int(window[1]))
    if is_causal:
        right = 0
    return left, right


# ============================================================================ dispatch

def _facts(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
           enable_gqa=False, *, window=None, key_lengths=None) -> dict:
    """Facts of a call, after its boundary checks (a call that would raise, raises here too);
    the functional op's own signature, so fastseq.explain takes the call's arguments."""
    _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, key_lengths)
    return _facts_of_key(_key(query, value, attn_mask, dropout_p))


def _key(q, v, attn_mask, dropout_p) -> tuple:
    """Everything the backends' reasons read, as a hashable key (one dict lookup per call)."""
    return (q.device, q.dtype, dropout_p, attn_mask is not None and attn_mask.requires_grad and
            torch.is_grad_enabled(), q.shape[-1], v.shape[-1])


def _facts_of_key(key: tuple) -> dict:
    device, dtype, p, mask_grad, D, Dv = key
    p = float(p)
    return {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "dropout": p > 0, "dropout_p": p,
            "mask_needs_grad": mask_grad, "D": D, "Dv": Dv}


def _backend(q, v, attn_mask, dropout_p) -> str:
    key = _key(q, v, attn_mask, dropout_p)
    return _dispatch.choose_cached("scaled_dot_product_attention", key, _facts_of_key, key)


def _cpu_reasons(f: dict) -> List[str]:
    out = []
    if min(f["D"], f["Dv"]) == 0:
        out.append(f"a head dim of 0 has nothing to fuse (torch's SDPA returns its empty or zero result), "
                   f"got D={f['D']}, Dv={f['Dv']}")
    if f["dropout_p"] >= 1:
        out.append("dropout_p=1 drops every probability (torch's SDPA returns zeros)")
    if f["dtype"] not in ("float32", "float64"):
        out.append(f"cpu attention takes float32 or float64, got {f['dtype']}")
    if f["mask_needs_grad"]:
        out.append("a flash kernel never forms the T x S scores, so it gives no gradient for a float "
                   "attn_mask that requires grad")
    return out


def _cuda_reasons(f: dict) -> List[str]:
    out = []
    if min(f["D"], f["Dv"]) == 0:
        out.append(f"a head dim of 0 has nothing to fuse, got D={f['D']}, Dv={f['Dv']}")
    if f["dropout_p"] >= 1:
        out.append("dropout_p=1 drops every probability (torch's SDPA returns zeros)")
    if f["dtype"] not in ("float16", "float32", "float64"):
        out.append(f"cuda attention takes float16, float32 or float64, got {f['dtype']}")
    if max(f["D"], f["Dv"]) > 128:
        out.append(f"cuda attention takes head dims up to 128, got D={f['D']}, Dv={f['Dv']}")
    if f["dropout"]:
        out.append("cuda attention has no dropout yet (torch's SDPA applies it)")
    if f["mask_needs_grad"]:
        out.append("no gradient for a float attn_mask that requires grad (the scores are never formed)")
    return out


def _torch_reasons(f: dict) -> List[str]:
    return []


_dispatch.register_op("scaled_dot_product_attention", _facts, cpu=_cpu_reasons, cuda=_cuda_reasons,
                      torch=_torch_reasons)


# ============================================================================ kernel calls

_NP = {torch.float32: np.float32, torch.float64: np.float64}
_EMPTY_U8 = np.empty(0, np.uint8)
_EMPTY_I64 = np.empty(0, np.int64)


def _np(t, dtype):
    if t is None:
        return np.empty(0, dtype)
    return t.detach().numpy().reshape(-1)


def _cpu():
    return _blas.cpu_kernels("attention")


def _mask_view(mask, shape4):
    """The mask broadcast to (B, H, T, S) without copying: a flat view of its storage span and the
    four element strides (0 along broadcast dims)."""
    m = torch.broadcast_to(mask, shape4)
    strides = m.stride()
    if m.numel() == 0:
        return m.reshape(-1), strides
    span = 1 + sum((n - 1) * st for n, st in zip(m.shape, strides) if n > 0)
    flat = torch.as_strided(m, (span,), (1,), m.storage_offset())
    return flat, strides


class _Call:
    """Everything the kernels need, from the folded 4-D inputs."""

    def __init__(self, q, k, v, attn_mask, is_causal, scale, window, key_lengths, dropout_p=0.0, seed=0):
        self.B, self.Hq, self.T, self.D = q.shape
        self.dropout_p, self.seed = float(dropout_p), int(seed)
        self.Hk, self.S, self.Dv = k.shape[1], k.shape[2], v.shape[3]
        self.scale = 1 / math.sqrt(self.D) if scale is None else float(scale)
        self.left, self.right = _bounds(is_causal, window, self.T, self.S)
        self.add = self.keep = None
        self.strides = (0, 0, 0, 0)
        if attn_mask is not None:
            flat, self.strides = _mask_view(attn_mask.detach(), (self.B, self.Hq, self.T, self.S))
            if flat.dtype == torch.bool:
                self.keep = flat.view(torch.uint8)
            else:
                self.add = flat
        self.key_lengths = key_lengths.to(torch.int64).contiguous() if key_lengths is not None else None

    def common(self, npd):
        return ((_np(self.add, npd), self.keep.numpy() if self.keep is not None else _EMPTY_U8,
                 self.key_lengths.numpy() if self.key_lengths is not None else _EMPTY_I64,
                 self.B, self.Hq, self.Hk, self.T, self.S, self.D, self.Dv, self.scale, self.left, self.right)
                + tuple(self.strides) + (self.dropout_p, self.seed))


def _kv_for(k, v, backend):
    """k, v as the kernels read them: the CPU forward reads row-strided views in place."""
    if backend == "cpu" and _row_strided(k) and _row_strided(v):
        return k, v
    return k.contiguous(), v.contiguous()


def _row_strided(t: torch.Tensor) -> bool:
    """A 4-D tensor whose rows are contiguous (a slice of a longer cache, say): the CPU forward
    reads it in place through its strides."""
    st = t.stride()
    return st[-1] == 1 and st[-2] >= t.shape[-1]


def _cuda_args(c: _Call, q):
    """The mask / key-length buffers and flags for the CUDA launchers (1-element stand-ins)."""
    from fastseq._cuda._common import as_array

    one = as_array(q.reshape(-1)[:1])
    kl = as_array(c.key_lengths.to(q.device)) if c.key_lengths is not None else \
        as_array(torch.zeros(1, dtype=torch.int64, device=q.device))
    keep = as_array(c.keep) if c.keep is not None else as_array(torch.zeros(1, dtype=torch.uint8, device=q.device))
    return ((as_array(c.add) if c.add is not None else one, keep, kl),
            (c.B, c.Hq, c.Hk, c.T, c.S, c.D, c.Dv, c.scale, c.left, c.right, tuple(c.strides)),
            (c.add is not None, c.keep is not None, c.key_lengths is not None))


# Below this many multiply-adds (~20 us of one core) a forward runs on one thread: waking a second
# costs several microseconds, more than it saves on a decode step ((1, 8, 1, 64) against 64 keys
# is 65 536), and on a busy machine a team waits for its slowest member's time slice.
_PARALLEL_WORK = 1 << 18


def _lse_dtype(q, backend):
    return torch.float64 if q.dtype == torch.float64 else (torch.float32 if backend == "cuda" else q.dtype)


def _forward(c: _Call, q, k, v, backend="cpu", want_lse=True):
    """o (B, Hq, T, Dv) and the per-row logsumexp lse (B, Hq, T) (None unless want_lse: on the CPU
    an inference call's lse goes to scratch).  q contiguous; k, v contiguous or, on the CPU,
    row-strided views (a KV cache slice), read in place through their strides."""
    o = _alloc.empty_like(q) if c.Dv == c.D else _alloc.empty((c.B, c.Hq, c.T, c.Dv), q.dtype, q.device)
    if backend == "cuda":
        lse = _alloc.empty((c.B, c.Hq, c.T), _lse_dtype(q, backend), q.device)
        from fastseq._cuda._common import as_array, on_device, torch_stream
        kern = _dispatch.cuda_kernels("attention")
        with on_device(q.device):
            masks, sizes, flags = _cuda_args(c, q)
            kern.forward(*(as_array(t.reshape(-1)) for t in (q, k, v, o, lse)), *masks, *sizes, *flags,
                         stream=torch_stream())
        return o, lse
    kern = _cpu()
    nt = torch.get_num_threads() if c.B * c.Hq * c.T * c.S * (c.D + c.Dv) >= _PARALLEL_WORK else 1
    rows = c.B * c.Hq * c.T
    ws = nt * kern.work_size(c.D, c.Dv, False)
    if want_lse:
        lse = _alloc.empty((c.B, c.Hq, c.T), q.dtype, q.device)
        p_lse, p_work = lse.data_ptr(), _alloc.scratch(ws, q.dtype).data_ptr()
    else:                                           # [lse | work] in one scratch buffer
        lse = None
        p_lse = _alloc.scratch(rows + ws, q.dtype).data_ptr()
        p_work = p_lse + rows * q.element_size()
    ks, vs = k.stride(), v.stride()
    kern.forward_ptr(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), p_lse,
                     c.add.data_ptr() if c.add is not None else 0, c.keep.data_ptr() if c.keep is not None else 0,
                     c.key_lengths.data_ptr() if c.key_lengths is not None else 0,
                     c.B, c.Hq, c.Hk, c.T, c.S, c.D, c.Dv, c.scale, c.left, c.right, *c.strides, c.dropout_p,
                     c.seed, p_work, nt, ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], q.dtype == torch.float64)
    return o, lse


def _backward(c: _Call, q, k, v, o, do, lse, backend="cpu"):
    dq, dk, dv = _alloc.empty_like(q), _alloc.empty_like(k), _alloc.empty_like(v)
    if backend == "cuda":
        from fastseq._cuda._common import as_array, on_device, torch_stream
        kern = _dispatch.cuda_kernels("attention")
        delta = torch.empty(c.B * c.Hq * c.T, dtype=lse.dtype, device=q.device)
        with on_device(q.device):
            masks, sizes, flags = _cuda_args(c, q)
            kern.backward(*(as_array(t.reshape(-1)) for t in (q, k, v, o, do, lse, delta, dq, dk, dv)),
                          *masks, *sizes, *flags, stream=torch_stream())
        return dq, dk, dv
    kern = _cpu()
    npd = _NP[q.dtype]
    nt = _dispatch.num_threads()
    delta = torch.empty(c.B * c.Hq * c.T, dtype=q.dtype)
    dq_part = torch.empty(nt * q.numel(), dtype=q.dtype)
    work = torch.empty(nt * kern.work_size(c.D, c.Dv, True), dtype=q.dtype)
    args = [_np(t, npd) for t in (q, k, v, o, do, lse, delta, dq, dk, dv, dq_part)]
    kern.backward(*args, *c.common(npd), _np(work, npd), nt)
    return dq, dk, dv


# ============================================================================ autograd

class AttentionFunction(torch.autograd.Function):
    """o = softmax(q k^T scale + mask) v on 4-D contiguous inputs.  Saves q, k, v, o and the
    per-row logsumexp; backward recomputes probabilities tile by tile from them."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, key_lengths, is_causal, scale, window, dropout_p, seed, backend):
        c = _Call(q, k, v, attn_mask, is_causal, scale, window, key_lengths, dropout_p, seed)
        o, lse = _forward(c, q, k, v, backend)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.call = c
        ctx.backend = backend
        return o

    @staticmethod
    def backward(ctx, do):
        if torch.is_grad_enabled():
            raise RuntimeError("scaled_dot_product_attention: double backward through the fused kernel is "
                               "not supported; use fastseq.use_backend('torch') for higher-order gradients")
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.call, q, k.contiguous(), v.contiguous(), o, do.contiguous(), lse, ctx.backend)
        return dq, dk, dv, None, None, None, None, None, None, None, None


_apply_attention = _library.direct_apply(AttentionFunction)


# ============================================================================ registered ops
# The same kernels as torch.library ops, for graph capture (fastseq/_library.py).  q, k, v are
# the folded 4-D tensors; the window travels as two ints (-1: unbounded side) and the dropout
# seed as a 0-dim int64 tensor (drawn in the graph: no .item(), no graph break).

def _window(left: int, right: int) -> Window:
    return None if left < 0 and right < 0 else (left, right)


@torch.library.custom_op("fastseq::attention_forward", mutates_args=())
def _attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                          key_lengths: Optional[torch.Tensor], is_causal: bool, scale: Optional[float],
                          window_left: int, window_right: int, dropout_p: float, seed: torch.Tensor,
                          backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    c = _Call(q, k, v, attn_mask, is_causal, scale, _window(window_left, window_right), key_lengths, dropout_p,
              int(seed))
    return _forward(c, q.contiguous(), *_kv_for(k, v, backend), backend)


@_attention_forward_op.register_fake
def _(q, k, v, attn_mask, key_lengths, is_causal, scale, window_left, window_right, dropout_p, seed, backend):
    B, Hq, T, _ = q.shape
    return q.new_empty((B, Hq, T, v.shape[-1])), q.new_empty((B, Hq, T), dtype=_lse_dtype(q, backend))


@torch.library.custom_op("fastseq::attention_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor,
                           lse: torch.Tensor, attn_mask: Optional[torch.Tensor], key_lengths: Optional[torch.Tensor],
                           is_causal: bool, scale: Optional[float], window_left: int, window_right: int,
                           dropout_p: float, seed: torch.Tensor,
                           backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = _Call(q, k, v, attn_mask, is_causal, scale, _window(window_left, window_right), key_lengths, dropout_p,
              int(seed))
    return _backward(c, q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous(), do.contiguous(), lse,
                     backend)


@_attention_backward_op.register_fake
def _(q, k, v, o, do, lse, attn_mask, key_lengths, is_causal, scale, window_left, window_right, dropout_p, seed,
      backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, attn_mask, key_lengths, is_causal, scale, left, right, dropout_p, seed, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, attn_mask, key_lengths, seed)
    ctx.meta = (is_causal, scale, left, right, dropout_p, backend)


def _attention_op_backward(ctx, do, dlse):
    q, k, v, o, lse, attn_mask, key_lengths, seed = ctx.saved_tensors
    is_causal, scale, left, right, dropout_p, backend = ctx.meta
    dq, dk, dv = _attention_backward_op(q, k, v, o, do, lse, attn_mask, key_lengths, is_causal, scale, left, right,
                                        dropout_p, seed, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_attention_forward_op.register_autograd(_attention_op_backward, setup_context=_attention_setup_context)


# ============================================================================ functional

def _fold_mask(attn_mask, query, key):
    """attn_mask as a (B, Hq, T, S)-broadcastable 4-D view matching _fold(query) (a copy only
    when more than two leading dims must merge)."""
    if attn_mask is None:
        return None
    return _fold(torch.broadcast_to(attn_mask, query.shape[:-1] + (key.shape[-2],)))


def _torch_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, key_lengths):
    """The "torch" backend: torch's SDPA, with window / key_lengths turned into a mask."""
    if window is None and key_lengths is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    qf, kf, vf = _fold(q), _fold(k), _fold(v)
    keep = visible_keys(q.shape[-2], k.shape[-2], is_causal, window, key_lengths, q.device)
    mask = _fold_mask(attn_mask, q, k)
    if mask is None:
        mask = keep
    elif mask.dtype == torch.bool:
        mask = mask & keep
    else:
        mask = mask.masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(qf, kf, vf, mask, dropout_p, False, scale=scale, enable_gqa=enable_gqa)
    # a row with no visible key: torch's flash kernel gives 0, its math path NaN; fastseq gives 0
    if mask.dtype == torch.bool:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out.reshape(q.shape[:-1] + (v.shape[-1],))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, window: Window = None,
                                 key_lengths: Optional[torch.Tensor] = None):
    """softmax(query key^T * scale + mask) value, as torch.nn.functional.scaled_dot_product_attention.

    Flash-style on the CPU: memory grows linearly with the sequence length (the T x S scores are
    never formed), and key tiles a mask hides are skipped, so causal costs about half and a
    sliding window is linear in T.

    Args:
        query: (..., Hq, T, D); key: (..., Hk, S, D); value: (..., Hk, S, Dv).
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
            (..., Hq, T, S); read in place, never expanded.
        dropout_p: dropout on the attention probabilities, from a counter-based draw keyed by a
            seed taken from torch's generator (torch.manual_seed reproduces it; the mask is
            regenerated in backward, never stored).  Not the same masks as torch's SDPA.
        is_causal: query i sees keys j <= i (top-left aligned, as torch); not with attn_mask.
        scale: defaults to 1 / sqrt(D).
        enable_gqa: allow Hk to divide Hq (grouped / multi-query attention).
        window: keyword extra, (left, right): query i sees keys i - left <= j <= i + right
            (None or -1 for an unbounded side); with is_causal, right is 0.  Aligned top-left
            like is_causal (query i at key position i).
        key_lengths: keyword extra, (B,) integer tensor: keys j >= key_lengths[b] are padding.
    Returns:
        (..., Hq, T, Dv), the query's dtype.  A query that sees no key gets 0 (and zero gradient).
    Shapes:
        3-D inputs (B, T, D) are one head; leading dims beyond (B, H) fold into the batch.
    """
    _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, key_lengths)
    cast = _library.autocast_dtype(query.device.type)
    if cast is not None:             # as torch's autocast: SDPA runs in the lower precision (fp64 stays)
        query, key, value, attn_mask = (_library.autocast_to(t, cast) for t in (query, key, value, attn_mask))
    backend = "torch" if _library.transformed() else _backend(query, value, attn_mask, dropout_p)
    if backend == "torch":
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, key_lengths)
    q = _fold(query).contiguous()
    k, v = _kv_for(_fold(key), _fold(value), backend)   # views into a KV cache stay views (CPU forward)
    mask = _fold_mask(attn_mask, query, key)
    if _library.captured(query):
        left, right = (-1 if w is None else int(w) for w in (window if window is not None else (None, None)))
        seed = _library.seed_tensor() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)
        o, _ = _attention_forward_op(q, k, v, mask, key_lengths, is_causal, scale, left, right, float(dropout_p),
                                     seed, backend)
        return o.view(query.shape[:-1] + (value.shape[-1],))
    seed = 0
    if dropout_p > 0:                # drawn from torch's generator: torch.manual_seed reproduces runs
        seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        o = _apply_attention(q, k, v, mask, key_lengths, is_causal, scale, window, dropout_p, seed, backend)
    else:
        c = _Call(q, k, v, mask, is_causal, scale, window, key_lengths, dropout_p, seed)
        o, _ = _forward(c, q, k, v, backend, want_lse=False)
    if query.dim() == 4:
        return o                                                        # (B, Hq, T, Dv)
    return o.view(query.shape[:-1] + (value.shape[-1],))               # (..., Hq, T, Dv)
