"""Attention on a real GPU through the public API at real sizes (skipped without one)."""
import pytest
import torch
import torch.nn.functional as F

import fastseq
from fastseq.functional import scaled_dot_product_attention as sdpa

pytestmark = pytest.mark.skipif("cuda" not in fastseq.available_backends(), reason="needs a GPU and numba-cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 8, 2, 512, 512, 64), (1, 4, 4, 97, 300, 59)])
def test_gpu_matches_torch(dtype, causal, shape):
    B, Hq, Hk, T, S, D = shape
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hk, S, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hk, S, D, device="cuda", dtype=dtype, requires_grad=True)
    with fastseq.use_backend("cuda"):
        o = sdpa(q, k, v, is_causal=causal)
    o_t = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o.float(), o_t, **tol)
    do = torch.randn_like(o)
    for g, e in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(o_t, (q, k, v), do.float())):
        torch.testing.assert_close(g.float(), e, **tol)


def test_gpu_masks_window_padding():
    q, k, v = (torch.randn(2, 4, 256, 32, device="cuda") for _ in range(3))
    mask = torch.rand(2, 1, 256, 256, device="cuda") > 0.2
    lengths = torch.tensor([256, 100], device="cuda")
    with fastseq.use_backend("cuda"):
        a = sdpa(q, k, v, attn_mask=mask)
        b = sdpa(q, k, v, window=(64, 0), key_lengths=lengths)
    with fastseq.use_backend("torch"):
        a_t = sdpa(q, k, v, attn_mask=mask)
        b_t = sdpa(q, k, v, window=(64, 0), key_lengths=lengths)
    torch.testing.assert_close(a, a_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b, b_t, rtol=1e-4, atol=1e-4)
