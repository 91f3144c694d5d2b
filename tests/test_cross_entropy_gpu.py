"""The cross-entropy family on a real GPU through the public API, at real sizes (skipped without
one; runs on the device machine): fastseq.functional.cross_entropy and linear_cross_entropy on
the Numba CUDA kernels (kernels/cuda/cross_entropy.py) against F.cross_entropy /
F.linear + F.cross_entropy and cross_entropy_ref, forward and gradients.  fp32 error is judged
against an fp64 reference, within a small multiple of torch's own fp32 error."""
import pytest
import torch
import torch.nn.functional as F

import fastseq
from fastseq.cross_entropy import cross_entropy_ref
from fastseq.functional import cross_entropy, linear_cross_entropy

pytestmark = pytest.mark.skipif("cuda" not in fastseq.available_backends(), reason="needs a GPU and numba-cuda")


def scaled_err(a, e):
    """max |a - e| over max |e| (gradients of a mean are ~1 / (N V): judge them at their scale)."""
    e = e.double()
    return float((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-300))


def assert_within_torch(ours, theirs, ref64, slack=1e-6):
    """ours no further from the fp64 reference than a small multiple of torch's own error."""
    err, err_torch = scaled_err(ours, ref64), scaled_err(theirs, ref64)
    assert err <= 4 * err_torch + slack, f"fastseq error {err:.3g}, torch's {err_torch:.3g}"


def targets(N, V, ignore_index=-100, every=7):
    t = torch.randint(0, V, (N,), device="cuda")
    t[::every] = ignore_index
    return t


@pytest.mark.parametrize("shape", [(4096, 32000), (1823, 50257), (1, 59)])
def test_cross_entropy_fp32_matches_torch(shape):
    N, V = shape
    z = (3 * torch.randn(shape, device="cuda")).requires_grad_()
    t = targets(N, V)
    t[0] = 1 if N == 1 else t[0]                                   # a single row stays live
    with fastseq.use_backend("cuda"):
        loss = cross_entropy(z, t)
    (dz,) = torch.autograd.grad(loss, z)
    loss_t = F.cross_entropy(z, t)
    (dz_t,) = torch.autograd.grad(loss_t, z)
    z64 = z.detach().double().requires_grad_()
    loss_64 = F.cross_entropy(z64, t)
    (dz_64,) = torch.autograd.grad(loss_64, z64)
    assert loss.dtype == torch.float32 and dz.dtype == torch.float32
    assert_within_torch(loss.detach(), loss_t.detach(), loss_64.detach())
    assert_within_torch(dz, dz_t, dz_64)


@pytest.mark.parametrize("shape", [(4096, 32000), (1823, 50257)])
def test_cross_entropy_fp16_matches_torch(shape):
    N, V = shape
    z = (3 * torch.randn(shape, device="cuda")).half().requires_grad_()
    t = targets(N, V)
    with fastseq.use_backend("cuda"):
        loss, lse = cross_entropy(z, t, reduction="sum", return_lse=True)
    (dz,) = torch.autograd.grad(loss, z)
    zf = z.detach().float().requires_grad_()
    loss_f = F.cross_entropy(zf, t, reduction="sum")               # the fp16 logits, in fp32
    (dz_f,) = torch.autograd.grad(loss_f, zf)
    assert loss.dtype == torch.float16 and dz.dtype == torch.float16 and lse.dtype == torch.float16
    torch.testing.assert_close(loss.float(), loss_f, rtol=2e-3, atol=0)
    torch.testing.assert_close(lse.float(), torch.logsumexp(zf.detach(), -1), rtol=1e-3, atol=1e-3)
    assert scaled_err(dz, dz_f) < 2e-3
    # and torch's own fp16 op agrees as well
    loss_h = F.cross_entropy(z, t, reduction="sum")
    (dz_h,) = torch.autograd.grad(loss_h, z)
    assert scaled_err(dz, dz_h) < 4e-3


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_smoothing_ignore_index_match_torch(reduction, dtype):
    N, V = 2048, 32000
    z = (2 * torch.randn(N, V, device="cuda", dtype=dtype)).requires_grad_()
    w = torch.rand(V, device="cuda", dtype=dtype) + 0.5
    t = targets(N, V, ignore_index=5)
    kw = dict(weight=w, ignore_index=5, reduction=reduction, label_smoothing=0.1)
    with fastseq.use_backend("cuda"):
        loss = cross_entropy(z, t, **kw)
    go = torch.randn_like(loss)
    (dz,) = torch.autograd.grad(loss, z, go)
    z64 = z.detach().double().requires_grad_()
    loss_64 = F.cross_entropy(z64, t, **{**kw, "weight": w.double()})
    (dz_64,) = torch.autograd.grad(loss_64, z64, go.double())
    if dtype == torch.float64:
        torch.testing.assert_close(loss.detach(), loss_64.detach(), rtol=1e-10, atol=1e-12)
        assert scaled_err(dz, dz_64) < 1e-10
    else:
        loss_t = F.cross_entropy(z, t, **kw)
        (dz_t,) = torch.autograd.grad(loss_t, z, go)
        assert_within_torch(loss.detach(), loss_t.detach(), loss_64.detach())
        assert_within_torch(dz, dz_t, dz_64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fairseq_smoothing_z_loss_lse_and_strided_rows_match_reference(dtype):
    N, V = 1024, 50257
    wide = 2 * torch.randn(N, V + 64, device="cuda", dtype=dtype)
    z = wide[:, 16:16 + V].requires_grad_()                        # row stride V + 64: a column slice
    t = targets(N, V)
    kw = dict(reduction="none", label_smoothing=0.1, smoothing="fairseq", z_loss=1e-4)
    with fastseq.use_backend("cuda"):
        loss, lse = cross_entropy(z, t, return_lse=True, **kw)
    go = torch.randn(N, device="cuda")
    (dz,) = torch.autograd.grad(loss, z, go.to(dtype))
    z64 = z.detach().double().requires_grad_()
    loss_64, lse_64 = cross_entropy_ref(z64, t, return_lse=True, **kw)
    (dz_64,) = torch.autograd.grad(loss_64, z64, go.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(loss.double(), loss_64.detach(), **tol)
    torch.testing.assert_close(lse.double(), lse_64, **tol)
    assert scaled_err(dz, dz_64) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_nan_logit_gives_nan_loss_as_torch():
    z = torch.randn(64, 32000, device="cuda")
    z[3, 100] = float("nan")
    z[5, :10] = float("-inf")
    t = torch.randint(10, 32000, (64,), device="cuda")
    with fastseq.use_backend("cuda"):
        rows = cross_entropy(z, t, reduction="none")
    expect = F.cross_entropy(z, t, reduction="none")
    torch.testing.assert_close(rows, expect, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert torch.isnan(rows[3]) and torch.isfinite(rows[5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_matches_linear_then_cross_entropy(dtype, reduction):
    N, E, V = 4096, 1024, 32000
    x = (torch.randn(N, E, device="cuda") / E ** 0.5).to(dtype).requires_grad_()
    W = torch.randn(V, E, device="cuda").to(dtype).requires_grad_()
    b = (0.1 * torch.randn(V, device="cuda")).to(dtype).requires_grad_()
    t = targets(N, V)
    with fastseq.use_backend("cuda"):
        loss = linear_cross_entropy(x, W, t, b, reduction=reduction)
    go = torch.randn_like(loss)
    got = torch.autograd.grad(loss, (x, W, b), go)
    loss_t = F.cross_entropy(F.linear(x, W, b).float(), t, reduction=reduction)   # same-precision GEMM
    exp = torch.autograd.grad(loss_t, (x, W, b), go.float())
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.float(), loss_t, rtol=tol, atol=tol)
    for name, g, e in zip(("dx", "dW", "db"), got, exp):
        assert g.dtype == dtype, name
        assert scaled_err(g, e) < tol, name
