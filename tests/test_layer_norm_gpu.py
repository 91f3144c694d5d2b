"""The LayerNorm family on a real GPU through the public API, at real sizes (skipped without
one; runs on the device machine).  Same checks as the CPU tests: forward and every gradient."""
import pytest
import torch
import torch.nn.functional as F

import fastseq
from fastseq.functional import add_layer_norm, layer_norm, rms_norm

pytestmark = pytest.mark.skipif("cuda" not in fastseq.available_backends(), reason="needs a GPU and numba-cuda")

TOL = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4096, 1024), (1823, 781), (1, 59)])
def test_layer_norm_gpu_matches_torch(dtype, shape):
    n = shape[-1]
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    with fastseq.use_backend("cuda"):
        y = layer_norm(x, (n,), w, b)
    got = torch.autograd.grad(y, (x, w, b), dy)
    y_t = F.layer_norm(x.float(), (n,), w.float(), b.float())
    exp = torch.autograd.grad(y_t, (x, w, b), dy.float())
    torch.testing.assert_close(y.float(), y_t, **TOL[dtype])
    # fp16 weight gradients sum thousands of rows: compare relative to their scale
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.float() / e.abs().max(), e.float() / e.abs().max(), **TOL[dtype])


@pytest.mark.parametrize("return_sum", [False, True])
def test_add_layer_norm_and_rms_norm_gpu(return_sum):
    x, r = (torch.randn(512, 768, device="cuda", requires_grad=True) for _ in range(2))
    w = torch.randn(768, device="cuda", requires_grad=True)
    with fastseq.use_backend("cuda"):
        out = add_layer_norm(x, r, (768,), w, None, 1e-5, return_sum)
        y = out[0] if return_sum else out
        z = rms_norm(x, (768,), w, 1e-6)
    torch.testing.assert_close(y, F.layer_norm(x + r, (768,), w), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z, F.rms_norm(x, (768,), w, 1e-6), rtol=1e-4, atol=1e-4)
    g = torch.autograd.grad(y.sum() + z.sum(), (x, r, w))
    g_t = torch.autograd.grad(F.layer_norm(x + r, (768,), w).sum() + F.rms_norm(x, (768,), w, 1e-6).sum(), (x, r, w))
    for a, e in zip(g, g_t):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
