"""kernels/cuda/layer_norm.py in Numba's CUDA simulator, on tiny grids, against the torch
reference: forward and every gradient, fp16/fp32/fp64, residual, RMSNorm, NaN-poisoned outputs.
On a GPU the same launchers run through fastseq.functional (tests/test_layer_norm_gpu.py)."""
import numpy as np
import pytest
import torch
from numba import cuda

from fastseq._cuda import layer_norm as K
from fastseq.layer_norm import add_layer_norm_ref

NP = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
TOL = {torch.float16: dict(rtol=2e-2, atol=2e-2), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.float64: dict(rtol=1e-10, atol=1e-10)}


def dev(t):
    return cuda.to_device(np.ascontiguousarray(t.detach().numpy().reshape(-1)))


def nan_dev(n, dtype):
    return cuda.to_device(np.full(max(n, 1), np.nan, dtype=dtype))


def host(d, shape):
    return torch.from_numpy(d.copy_to_host()).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("center,residual,write_sum", [
    (True, False, False), (False, False, False), (True, True, False), (True, True, True), (False, True, True)])
def test_forward_and_backward_match_reference(dtype, center, residual, write_sum):
    m, n = 3, 37                                   # 3 blocks of 32 simulated threads; n not a multiple of 32
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(m, n).to(dtype)
    r = torch.randn(m, n).to(dtype) if residual else None
    w = torch.randn(n).to(dtype)
    b = torch.randn(n).to(dtype) if center else torch.zeros(n, dtype=dtype)
    dy = torch.randn(m, n).to(dtype)
    eps = 1e-5

    # reference in the accumulator precision
    xs = [t.to(acc).requires_grad_() if t is not None else None for t in (x, r, w, b)]
    out = add_layer_norm_ref(xs[0], xs[1] if residual else torch.zeros_like(xs[0]), (n,), xs[2],
                             xs[3] if center else None, eps, rms=not center)
    gx, gw, gb = torch.autograd.grad(out, (xs[0], xs[2], xs[3]), dy.to(acc), allow_unused=True)

    d_x, d_r = dev(x), (dev(r) if residual else dev(x[:1, :1]))
    d_w, d_b = dev(w), dev(b)
    d_y = nan_dev(m * n, NP[dtype])
    d_s = nan_dev(m * n, NP[dtype]) if write_sum else dev(x[:1, :1])
    d_mean, d_rstd = nan_dev(m, NP[acc]), nan_dev(m, NP[acc])
    K.forward(d_x, d_r, d_w, d_b, d_y, d_s, d_mean, d_rstd, m, n, eps, center, residual, write_sum, threads=32)
    torch.testing.assert_close(host(d_y, (m, n)).to(acc), out.detach(), **TOL[dtype])
    if write_sum:
        torch.testing.assert_close(host(d_s, (m, n)), x + r)

    # backward: from the materialized sum when it was written, else rebuilding x + r
    src, src_r = (d_s, d_x) if write_sum else (d_x, d_r)
    d_dy = dev(dy)
    d_dx = nan_dev(m * n, NP[dtype])
    d_dw, d_db = nan_dev(n, NP[dtype]), nan_dev(n, NP[dtype])
    chunks = K.partial_chunks(m)[1]
    parts = [nan_dev(chunks * n, NP[acc]) for _ in range(2)]
    K.backward(src, src_r, d_dy, d_dy, d_w, d_mean, d_rstd, d_dx, d_dw, d_db, *parts, m, n, center,
               residual and not write_sum, False, True, center, threads=32)
    torch.testing.assert_close(host(d_dx, (m, n)).to(acc), gx, **TOL[dtype])
    torch.testing.assert_close(host(d_dw, (n,)).to(acc), gw, **TOL[dtype])
    if center:
        torch.testing.assert_close(host(d_db, (n,)).to(acc), gb, **TOL[dtype])


def test_gradient_at_the_returned_sum_adds_to_dx():
    m, n = 2, 33
    x, dy, ds, w = torch.randn(m, n), torch.randn(m, n), torch.randn(m, n), torch.randn(n)
    b = torch.zeros(n)
    d_x, d_w, d_b = dev(x), dev(w), dev(b)
    d_y, d_mean, d_rstd = nan_dev(m * n, np.float32), nan_dev(m, np.float32), nan_dev(m, np.float32)
    K.forward(d_x, d_x, d_w, d_b, d_y, d_x, d_mean, d_rstd, m, n, 1e-5, True, False, False, threads=32)
    d_dx = nan_dev(m * n, np.float32)
    K.backward(d_x, d_x, dev(dy), dev(ds), d_w, d_mean, d_rstd, d_dx, d_w, d_w, d_w, d_w, m, n, True, False,
               True, False, False, threads=32)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(torch.nn.functional.layer_norm(xr, (n,), w), xr, dy)
    torch.testing.assert_close(host(d_dx, (m, n)), gx + ds, rtol=1e-4, atol=1e-4)


def test_nan_row_stays_in_its_row():
    m, n = 3, 32
    x = torch.randn(m, n)
    x[1, 5] = float("nan")
    d_y = nan_dev(m * n, np.float32)
    K.forward(dev(x), dev(x), dev(torch.ones(n)), dev(torch.zeros(n)), d_y, dev(x), nan_dev(m, np.float32),
              nan_dev(m, np.float32), m, n, 1e-5, True, False, False, threads=32)
    y = host(d_y, (m, n))
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


# ---------------------------------------------------------------------------- dropout on the branch

SEED = 2**62 + 0x12345678ABC                       # both 32-bit halves of the seed non-zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("write_sum", [False, True])
def test_dropout_on_the_branch_matches_reference(dtype, center, write_sum):
    """y = norm(x * Z * scale + r): forward (and the returned sum) vs add_layer_norm_ref(dropout_ref(x), r);
    backward from x and r (write_sum off) or from the saved sum (write_sum on, with a gradient at
    the sum): dx (the gradient of r), dxd (of x), dw, db vs torch autograd of that reference."""
    from fastseq.dropout import dropout_keep, dropout_ref

    m, n, p = 3, 37, 0.3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, r, dy = (torch.randn(m, n).to(dtype) for _ in range(3))
    ds = torch.randn(m, n).to(dtype) if write_sum else None
    w = torch.randn(n).to(dtype)
    b = torch.randn(n).to(dtype) if center else torch.zeros(n, dtype=dtype)
    eps = 1e-5
    keep = dropout_keep(SEED, (m, n), p)
    assert 0 < keep.sum() < m * n

    # reference in the accumulator precision
    xa, ra, wa, ba = (t.to(acc).requires_grad_() for t in (x, r, w, b))
    xd = xa * keep.to(acc) * (1.0 / (1.0 - p))
    out, s_ref = add_layer_norm_ref(xd, ra, (n,), wa, ba if center else None, eps, return_sum=True, rms=not center)
    loss = (out * dy.to(acc)).sum() + ((s_ref * ds.to(acc)).sum() if write_sum else 0)
    gx, gr, gw, gb = torch.autograd.grad(loss, (xa, ra, wa, ba), allow_unused=True)
    y_ref = add_layer_norm_ref(dropout_ref(x, p, SEED), r, (n,), w, b if center else None, eps,
                               rms=not center)

    d_x, d_r, d_w, d_b = dev(x), dev(r), dev(w), dev(b)
    d_y = nan_dev(m * n, NP[dtype])
    d_s = nan_dev(m * n, NP[dtype]) if write_sum else dev(x[:1, :1])
    d_mean, d_rstd = nan_dev(m, NP[acc]), nan_dev(m, NP[acc])
    K.forward(d_x, d_r, d_w, d_b, d_y, d_s, d_mean, d_rstd, m, n, eps, center, True, write_sum, threads=32,
              p=p, seed=SEED)
    torch.testing.assert_close(host(d_y, (m, n)).to(acc), out.detach(), **TOL[dtype])
    torch.testing.assert_close(host(d_y, (m, n)), y_ref, **TOL[dtype])
    if write_sum:
        torch.testing.assert_close(host(d_s, (m, n)), dropout_ref(x, p, SEED, residual=r), rtol=0, atol=0)

    # backward: from the saved sum (x is s, has_r off) or rebuilding x * Z * scale + r
    src, src_r = (d_s, d_x) if write_sum else (d_x, d_r)
    d_dx, d_dxd = nan_dev(m * n, NP[dtype]), nan_dev(m * n, NP[dtype])
    d_dw, d_db = nan_dev(n, NP[dtype]), nan_dev(n, NP[dtype])
    chunks = K.partial_chunks(m)[1]
    parts = [nan_dev(chunks * n, NP[acc]) for _ in range(2)]
    K.backward(src, src_r, dev(dy), dev(ds) if write_sum else d_x, d_w, d_mean, d_rstd, d_dx, d_dw, d_db,
               *parts, m, n, center, not write_sum, write_sum, True, center, threads=32, dxd=d_dxd, p=p,
               seed=SEED)
    torch.testing.assert_close(host(d_dx, (m, n)).to(acc), gr, **TOL[dtype])
    torch.testing.assert_close(host(d_dxd, (m, n)).to(acc), gx, **TOL[dtype])
    assert (host(d_dxd, (m, n))[~keep] == 0).all()
    torch.testing.assert_close(host(d_dw, (n,)).to(acc), gw, **TOL[dtype])
    if center:
        torch.testing.assert_close(host(d_db, (n,)).to(acc), gb, **TOL[dtype])


def test_branch_gradient_without_dropout_is_dx():
    """p = 0 with dxd: dxd is dx (the sum's gradient is the branch's), and nothing else changes."""
    m, n = 2, 35
    x, r, dy, w = torch.randn(m, n), torch.randn(m, n), torch.randn(m, n), torch.randn(n)
    d_x, d_r, d_w, d_b = dev(x), dev(r), dev(w), dev(torch.zeros(n))
    d_y, d_mean, d_rstd = nan_dev(m * n, np.float32), nan_dev(m, np.float32), nan_dev(m, np.float32)
    K.forward(d_x, d_r, d_w, d_b, d_y, d_x, d_mean, d_rstd, m, n, 1e-5, True, True, False, threads=32)
    d_dx, d_dxd = nan_dev(m * n, np.float32), nan_dev(m * n, np.float32)
    K.backward(d_x, d_r, dev(dy), d_x, d_w, d_mean, d_rstd, d_dx, d_w, d_w, d_w, d_w, m, n, True, True,
               False, False, False, threads=32, dxd=d_dxd)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(torch.nn.functional.layer_norm(xr + r, (n,), w), xr, dy)
    torch.testing.assert_close(host(d_dx, (m, n)), gx, rtol=1e-4, atol=1e-4)
    assert torch.equal(host(d_dxd, (m, n)), host(d_dx, (m, n)))
