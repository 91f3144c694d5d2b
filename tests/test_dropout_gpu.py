"""The dropout family on a real GPU through the public API, at real sizes (skipped without one;
runs on the device machine): dropout, dropout_add, bias_act_dropout and the fused
dropout_add_layer_norm / dropout_add_rms_norm, forward and every gradient, against the references
with the same mask.  Each op draws its key from torch's CPU generator at the call, so a test
draws that key itself after torch.manual_seed(s) and seeds again before calling the op."""
import pytest
import torch

import fastseq
import fastseq.functional as FF
from fastseq.dropout import ACTIVATIONS, bias_act_dropout_ref, dropout_keep, dropout_ref
from fastseq.layer_norm import add_layer_norm_ref

pytestmark = pytest.mark.skipif("cuda" not in fastseq.available_backends(), reason="needs a GPU and numba-cuda")

DEVICE = "cuda"
TOL = {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.float32: dict(rtol=1e-4, atol=1e-4),
       torch.float64: dict(rtol=1e-10, atol=1e-10)}
DTYPES = [torch.float16, torch.float32, torch.float64]
SHAPES = [(4096, 1024), (1823, 781)]


def key_of(s):
    """The key an op called right after torch.manual_seed(s) draws; seeds again for that call."""
    torch.manual_seed(s)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    torch.manual_seed(s)
    return seed


def randn(shape, dtype, grad=False):
    return torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def scale_of(p):
    return 1.0 / (1.0 - p) if p < 1 else 0.0


def close_scaled(got, want, dtype):
    """Column sums over thousands of rows (weight / bias gradients): relative to their scale."""
    m = want.abs().max().clamp_min(1e-30)
    torch.testing.assert_close((got.double() / m).to(want.dtype), want / m, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_gpu_matches_reference(dtype, shape):
    p = 0.1
    x, dy = randn(shape, dtype, True), randn(shape, dtype)
    seed = key_of(1)
    with fastseq.use_backend("cuda"):
        y = FF.dropout(x, p)
    torch.testing.assert_close(y, dropout_ref(x.detach(), p, seed), rtol=0, atol=0)
    kept = dropout_keep(seed, shape, p, DEVICE)
    assert abs(kept.double().mean().item() - (1 - p)) < 5e-3
    assert torch.equal(y != 0, kept & (x != 0))
    (gx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(gx, dropout_ref(dy, p, seed), rtol=0, atol=0)


def test_dropout_gpu_inplace_eval_reproducible():
    p = 0.3
    x = randn((512, 768), torch.float32)
    seed = key_of(5)
    with fastseq.use_backend("cuda"):
        xc = x.clone()
        out = FF.dropout(xc, p, inplace=True)
        want = dropout_ref(x, p, seed)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.testing.assert_close(xc, want, rtol=0, atol=0)
        assert torch.equal(FF.dropout(x, p, training=False), x)
        torch.manual_seed(5)
        a = FF.dropout(x, p)
        torch.manual_seed(5)
        b = FF.dropout(x, p)
        c = FF.dropout(x, p)                      # the generator moved on: another key
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_add_gpu_matches_reference(dtype):
    shape, p = (4096, 1024), 0.2
    x, r, dy = randn(shape, dtype, True), randn(shape, dtype, True), randn(shape, dtype)
    seed = key_of(2)
    with fastseq.use_backend("cuda"):
        y = FF.dropout_add(x, r, p)
    torch.testing.assert_close(y, dropout_ref(x.detach(), p, seed, residual=r.detach()), **TOL[dtype])
    gx, gr = torch.autograd.grad(y, (x, r), dy)
    torch.testing.assert_close(gx, dropout_ref(dy, p, seed), rtol=0, atol=0)
    torch.testing.assert_close(gr, dy, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,activation", [(torch.float32, a) for a in ACTIVATIONS]
                         + [(torch.float16, "gelu"), (torch.float64, "gelu"), (torch.float16, "silu")])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_act_dropout_gpu_matches_reference(dtype, activation, p, with_bias):
    shape = (4096, 1024)
    x, dy = randn(shape, dtype, True), randn(shape, dtype)
    b = randn(shape[-1], dtype, True) if with_bias else None
    seed = key_of(3)
    with fastseq.use_backend("cuda"):
        y = FF.bias_act_dropout(x, b, activation, p)
    got = torch.autograd.grad(y, (x, b) if with_bias else (x,), dy)

    # reference: autograd of the formulas in fp64, the same mask
    xr = x.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_() if with_bias else None
    y_ref = bias_act_dropout_ref(xr, br, activation, p, seed)
    want = torch.autograd.grad(y_ref, (xr, br) if with_bias else (xr,), dy.double())
    torch.testing.assert_close(y.double(), y_ref.detach(), **TOL[dtype])
    if p > 0:
        assert (y[~dropout_keep(seed, shape, p, DEVICE)] == 0).all()
    torch.testing.assert_close(got[0].double(), want[0], **TOL[dtype])
    if with_bias:
        close_scaled(got[1], want[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("return_sum", [False, True])
def test_dropout_add_norm_gpu_matches_reference(dtype, rms, return_sum):
    shape, p, n = (4096, 1024), 0.1, 1024
    x, r, dy, ds = randn(shape, dtype, True), randn(shape, dtype, True), randn(shape, dtype), randn(shape, dtype)
    w = randn(n, dtype, True)
    b = None if rms else randn(n, dtype, True)
    eps = 1e-6 if rms else 1e-5
    seed = key_of(4)
    with fastseq.use_backend("cuda"):
        if rms:
            out = FF.dropout_add_rms_norm(x, r, (n,), w, eps, p, return_sum=return_sum)
        else:
            out = FF.dropout_add_layer_norm(x, r, (n,), w, b, eps, p, return_sum=return_sum)
    y, s = out if return_sum else (out, None)
    params = (x, r, w) if rms else (x, r, w, b)
    loss = (y.double() * dy.double()).sum() + ((s.double() * ds.double()).sum() if return_sum else 0)
    got = torch.autograd.grad(loss, params)

    # reference: the sum of the dropped input and the residual, normalized, in fp64
    ref = [t.detach().double().requires_grad_() for t in params]
    xd = ref[0] * dropout_keep(seed, shape, p, DEVICE).double() * scale_of(p)
    y_ref, s_ref = add_layer_norm_ref(xd, ref[1], (n,), ref[2], None if rms else ref[3], eps, return_sum=True,
                                      rms=rms)
    loss_ref = (y_ref * dy.double()).sum() + ((s_ref * ds.double()).sum() if return_sum else 0)
    want = torch.autograd.grad(loss_ref, ref)
    torch.testing.assert_close(y.double(), y_ref.detach(), **TOL[dtype])
    if return_sum:
        torch.testing.assert_close(s, dropout_ref(x.detach(), p, seed, residual=r.detach()), **TOL[dtype])
    torch.testing.assert_close(got[0].double(), want[0], **TOL[dtype])       # the dropped input
    torch.testing.assert_close(got[1].double(), want[1], **TOL[dtype])       # the residual
    for g, e in zip(got[2:], want[2:]):                                       # weight (and bias)
        close_scaled(g, e, dtype)
