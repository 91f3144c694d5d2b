"""kernels/cuda/attention.py in Numba's CUDA simulator on tiny grids against the reference:
forward and dq/dk/dv, fp32/fp64/fp16, causal, masks, window, key lengths, GQA, empty rows."""
import numpy as np
import pytest
import torch
from numba import cuda

from fastseq._cuda import attention as K
from fastseq.attention import _bounds, _mask_view, attention_ref

NP = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
TOL = {torch.float16: dict(rtol=2e-2, atol=2e-2), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.float64: dict(rtol=1e-9, atol=1e-10)}


def dev(t, dtype=None):
    a = t.detach().contiguous().numpy().reshape(-1)
    return cuda.to_device(a.astype(dtype) if dtype is not None else a)


def run(q, k, v, do, mask=None, causal=False, window=None, key_lengths=None, threads=4):
    B, Hq, T, D = q.shape
    Hk, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    acc = np.float64 if q.dtype == torch.float64 else np.float32
    left, right = _bounds(causal, window, T, S)
    one = cuda.to_device(np.zeros(1, NP[q.dtype]))
    add = keep = None
    strides = (0, 0, 0, 0)
    if mask is not None:
        flat, strides = _mask_view(mask, (B, Hq, T, S))
        if mask.dtype == torch.bool:
            keep = dev(flat.view(torch.uint8))
        else:
            add = dev(flat)
    kl = dev(key_lengths.to(torch.int64)) if key_lengths is not None else cuda.to_device(np.zeros(1, np.int64))
    d_q, d_k, d_v = dev(q), dev(k), dev(v)
    o = cuda.to_device(np.full(B * Hq * T * Dv, np.nan, NP[q.dtype]))
    lse = cuda.to_device(np.full(B * Hq * T, np.nan, acc))
    masks = (add if add is not None else one, keep if keep is not None else cuda.to_device(np.zeros(1, np.uint8)), kl)
    flags = (add is not None, keep is not None, key_lengths is not None)
    scale = 1 / D ** 0.5
    K.forward(d_q, d_k, d_v, o, lse, *masks, B, Hq, Hk, T, S, D, Dv, scale, left, right, strides, *flags,
              threads=threads)
    dq = cuda.to_device(np.full(q.numel(), np.nan, NP[q.dtype]))
    dk = cuda.to_device(np.full(k.numel(), np.nan, NP[q.dtype]))
    dv = cuda.to_device(np.full(v.numel(), np.nan, NP[q.dtype]))
    delta = cuda.to_device(np.zeros(B * Hq * T, acc))
    K.backward(d_q, d_k, d_v, o, dev(do), lse, delta, dq, dk, dv, *masks, B, Hq, Hk, T, S, D, Dv, scale, left,
               right, strides, *flags, threads=threads)
    host = lambda d, like: torch.from_numpy(d.copy_to_host()).view(like.shape)     # noqa: E731
    return host(o, do), host(dq, q), host(dk, k), host(dv, v)


def reference(q, k, v, do, **kw):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    leaves = [t.to(acc).requires_grad_() for t in (q, k, v)]
    o = attention_ref(*leaves, enable_gqa=q.shape[1] != k.shape[1], **kw)
    return (o,) + torch.autograd.grad(o, leaves, do.to(acc))


def test_shared_memory_fits_the_static_limit():
    for acc_bytes in (4, 8):
        assert 2 * K.keys_per_tile(acc_bytes) * K.MAX_D * acc_bytes <= 48 * 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [{}, {"key_lengths": torch.tensor([60])}, {"window": (70, 0)}])
def test_several_key_tiles(dtype, kw):
    """Queries that see up to 75 keys: several shared-memory key tiles (32 keys in fp32, 16 in fp64)."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 1, 75, 4).to(dtype), torch.randn(1, 1, 75, 4).to(dtype), torch.randn(1, 1, 75, 4).to(dtype)
    do = torch.randn(1, 1, 75, 4).to(dtype)
    for g, e in zip(run(q, k, v, do, threads=32, **kw), reference(q, k, v, do, **kw)):
        torch.testing.assert_close(g.to(e.dtype), e, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"window": (2, 1)}, {"key_lengths": "yes"},
                                {"mask": "bool"}, {"mask": "float"}])
def test_matches_reference(dtype, kw):
    torch.manual_seed(0)
    B, Hq, Hk, T, S, D, Dv = 2, 2, 1, 5, 7, 4, 3            # GQA, T != S, Dv != D, partial tiles
    q, k, v = (torch.randn(B, h, n, d).to(dtype) for h, n, d in ((Hq, T, D), (Hk, S, D), (Hk, S, Dv)))
    do = torch.randn(B, Hq, T, Dv).to(dtype)
    fast_kw, ref_kw = {}, {}
    if kw.get("is_causal"):
        fast_kw["causal"] = ref_kw["is_causal"] = True
    if "window" in kw:
        fast_kw["window"] = ref_kw["window"] = kw["window"]
    if "key_lengths" in kw:
        fast_kw["key_lengths"] = ref_kw["key_lengths"] = torch.tensor([7, 3])
    if kw.get("mask") == "bool":
        m = torch.rand(B, 1, T, S) > 0.3
        m[0, 0, 1] = False                                     # one row sees nothing
        fast_kw["mask"] = ref_kw["attn_mask"] = m
    if kw.get("mask") == "float":
        fast_kw["mask"] = ref_kw["attn_mask"] = torch.randn(T, S).to(dtype)
    got = run(q, k, v, do, **fast_kw)
    exp = reference(q, k, v, do, **ref_kw)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.to(e.dtype), e, **TOL[dtype])
