"""kernels/cuda/cross_entropy.py in Numba's CUDA simulator, on tiny grids, against torch autograd
of cross_entropy_ref(reduction="none") in fp64: forward (loss, lse, the target's weight) and the
logits' gradient, fp16/fp32/fp64, class weights, both label-smoothing conventions, z-loss,
ignored and out-of-range targets, per-row and scalar gradient scales, dz in place, a row stride
larger than V, NaN and -inf logits, outputs poisoned with NaN before each call.  The launchers
are called as fastseq/cross_entropy.py's _forward_rows / _backward_rows call them.  On a GPU
the same launchers run through fastseq.functional (tests/test_cross_entropy_gpu.py)."""
import numpy as np
import pytest
import torch
from numba import cuda

from fastseq._cuda import cross_entropy as K
from fastseq.cross_entropy import _Loss, cross_entropy_ref

NP = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
# judged against an fp64 reference of the same (rounded) inputs; fp16 gradients are stored in fp16
TOL = {torch.float16: dict(rtol=1e-2, atol=1e-3), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.float64: dict(rtol=1e-10, atol=1e-12)}


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dev(t):
    return cuda.to_device(np.ascontiguousarray(t.detach().numpy()))


def nan_dev(shape, dtype):
    return cuda.to_device(np.full(shape, np.nan, dtype=NP[dtype]))


def host(d):
    return torch.from_numpy(d.copy_to_host())


def logits_on_device(z, wide):
    """z (n, V) as a 2-D device array: contiguous, or a column slice of a wider array (row stride
    V + 7, as z[:, 3 : 3 + V] of a bigger tensor)."""
    if not wide:
        return dev(z)
    n, V = z.shape
    big = torch.full((n, V + 7), float("nan"), dtype=z.dtype)
    big[:, 3:3 + V] = z
    return dev(big)[:, 3:3 + V]


def expected(z, t, w, ignore_index, eps, smoothing, z_loss, g):
    """(loss, lse, wrow, dz) in fp64 from torch autograd of the reference; a target outside
    [0, V) counts as ignored (the kernels' rule; the binding raises before that).  The default
    dtype is fp64 meanwhile: the reference's `B * live` and `z_loss * live` (a Python float times
    a bool tensor) would otherwise round B and z_loss to fp32 (relative error ~1e-8)."""
    V = z.shape[1]
    live = (t != ignore_index) & (t >= 0) & (t < V)
    t_ref = torch.where(live, t, torch.full_like(t, ignore_index))
    z64 = z.to(torch.float64).requires_grad_()
    w64 = w.to(torch.float64) if w is not None else None
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        rows = cross_entropy_ref(z64, t_ref, w64, ignore_index, "none", eps, smoothing, z_loss)
    finally:
        torch.set_default_dtype(default)
    (dz,) = torch.autograd.grad(rows, z64, g.to(torch.float64))
    lse = torch.logsumexp(z64.detach(), -1)
    wt = (w64 if w64 is not None else torch.ones(V, dtype=torch.float64))[torch.where(live, t, 0)] * live
    return rows.detach(), lse, wt, dz


def run_kernels(z, t, w, ignore_index, eps, smoothing, z_loss, g=None, gs=0.0, wide=False, inplace=False,
                threads=None):
    """forward then backward as the binding calls them; returns (loss, lse, wrow, dz) on the host."""
    n, V = z.shape
    dtype, acc = z.dtype, acc_of(z.dtype)
    L = _Loss(V, w, ignore_index, eps, smoothing, z_loss)
    d_z, d_t = logits_on_device(z, wide), dev(t)
    d_w = dev(w) if w is not None else nan_dev(1, acc)             # dummy: never read
    d_loss, d_lse, d_wrow = nan_dev(n, acc), nan_dev(n, acc), nan_dev(n, acc)
    K.forward(d_z, d_t, d_w, w is not None, L.ignore_index, L.A, L.B, L.W, L.Z, d_loss, d_lse, d_wrow, n, V,
              threads=threads)
    d_g = dev(g.to(acc)) if g is not None else nan_dev(1, acc)     # dummy: never read
    d_dz = d_z if inplace else nan_dev((n, V), dtype)
    K.backward(d_z, d_t, d_w, w is not None, L.ignore_index, L.A, L.B, L.W, L.Z, d_lse, d_g, g is not None, gs,
               d_dz, n, V, threads=threads)
    return host(d_loss), host(d_lse), host(d_wrow), host(d_dz)


CASES = {
    "plain": dict(V=37, weighted=False, eps=0.0, smoothing="torch", z_loss=0.0, ignore_index=-100,
                  per_row_g=True, inplace=False, wide=False, threads=None),
    "weighted-torch-smoothing-inplace": dict(V=37, weighted=True, eps=0.1, smoothing="torch", z_loss=0.0,
                                             ignore_index=3, per_row_g=False, inplace=True, wide=False,
                                             threads=None),
    "weighted-fairseq-zloss-strided": dict(V=37, weighted=True, eps=0.2, smoothing="fairseq", z_loss=0.1,
                                           ignore_index=-100, per_row_g=True, inplace=False, wide=True,
                                           threads=32),
    "V70-fairseq-zloss-strided-inplace": dict(V=70, weighted=False, eps=0.1, smoothing="fairseq", z_loss=0.01,
                                              ignore_index=-100, per_row_g=False, inplace=True, wide=True,
                                              threads=32),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_reference(dtype, case):
    c = CASES[case]
    V, ii = c["V"], c["ignore_index"]
    n = 6
    z = (2 * torch.randn(n, V)).to(dtype)
    # rows: live targets, the ignore_index, an out-of-range target above and below, a live row again
    t = torch.randint(0, V, (n,))
    t[1], t[3], t[4] = ii, V, -1
    if ii >= 0:
        t[0] = ii + 1                                              # a live neighbour of the ignored class
    w = (torch.rand(V) + 0.5).to(dtype) if c["weighted"] else None
    g = torch.randn(n) if c["per_row_g"] else None
    gs = 0.37
    got = run_kernels(z, t, w, ii, c["eps"], c["smoothing"], c["z_loss"], g, gs, c["wide"], c["inplace"],
                      c["threads"])
    g_rows = g if g is not None else torch.full((n,), gs, dtype=torch.float64)
    exp = expected(z, t, w, ii, c["eps"], c["smoothing"], c["z_loss"], g_rows)
    for name, a, e in zip(("loss", "lse", "wrow", "dz"), got, exp):
        assert a.dtype == (dtype if name == "dz" else acc_of(dtype)), name
        torch.testing.assert_close(a.to(torch.float64), e, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    # ignored rows: loss 0, weight 0, gradient exactly 0
    for i in (1, 3, 4):
        assert got[0][i] == 0 and got[2][i] == 0 and bool((got[3][i] == 0).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")              # the simulator's numpy: -inf - -inf
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_nan_and_inf_logits_as_torch(dtype, eps):
    n, V = 5, 37
    z = torch.randn(n, V).to(dtype)
    t = torch.tensor([4, 0, 9, 0, 6])
    z[0, 17] = float("nan")                                        # NaN in a row: NaN loss, lse and gradient
    z[1, 5] = z[1, 30] = float("-inf")                             # -inf logits elsewhere: finite loss
    z[2, :] = float("-inf")                                        # every logit -inf: lse -inf, NaN loss
    z[3, 0] = float("-inf")                                        # the target's logit -inf: loss inf
    z[4, :] = float("nan")                                         # all NaN: NaN (never a stale max)
    g = torch.randn(n)
    loss, lse, wrow, dz = run_kernels(z, t, None, -100, eps, "torch", 0.0, g, 0.0, threads=32)
    e_loss, e_lse, e_wrow, e_dz = expected(z, t, None, -100, eps, "torch", 0.0, g)
    tol = TOL[dtype]
    torch.testing.assert_close(loss.to(torch.float64), e_loss, equal_nan=True, **tol)
    torch.testing.assert_close(lse.to(torch.float64), e_lse, equal_nan=True, **tol)
    torch.testing.assert_close(wrow.to(torch.float64), e_wrow, **tol)
    torch.testing.assert_close(dz.to(torch.float64), e_dz, equal_nan=True, **tol)
    assert torch.isnan(loss[[0, 2, 4]]).all() and torch.isnan(lse[[0, 4]]).all()
    assert lse[2] == float("-inf") and loss[3] == float("inf") and torch.isfinite(lse[[1, 3]]).all()
    assert torch.isfinite(dz[[1, 3]]).all()
    if eps == 0:                       # (with smoothing, sum_c (lse - z_c) is inf and dz_c = -g B at z_c = -inf)
        assert torch.isfinite(loss[1]) and (dz[1, [5, 30]] == 0).all()


def test_no_classes_and_no_rows():
    # V == 0: lse = -inf (an empty log-sum-exp), every target out of range, so loss 0, weight 0
    n = 3
    d_z = cuda.to_device(np.zeros((n, 0), np.float32))
    d_t = cuda.to_device(np.array([0, -100, 2], np.int64))
    outs = [nan_dev(n, torch.float32) for _ in range(3)]
    dummy = nan_dev(1, torch.float32)
    K.forward(d_z, d_t, dummy, False, -100, 1.0, 0.0, 0.0, 0.0, *outs, n, 0)
    loss, lse, wrow = (host(o) for o in outs)
    assert (loss == 0).all() and (wrow == 0).all() and (lse == float("-inf")).all()
    K.backward(d_z, d_t, dummy, False, -100, 1.0, 0.0, 0.0, 0.0, outs[1], dummy, False, 1.0, d_z, n, 0)
    # n == 0: nothing launched, nothing read
    K.forward(d_z, d_t, dummy, False, -100, 1.0, 0.0, 0.0, 0.0, *outs, 0, 5)
    K.backward(d_z, d_t, dummy, False, -100, 1.0, 0.0, 0.0, 0.0, outs[1], dummy, False, 1.0, d_z, 0, 5)


def test_threads_must_be_a_power_of_two():
    d = nan_dev((2, 8), torch.float32)
    t = cuda.to_device(np.zeros(2, np.int64))
    o = nan_dev(2, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        K.forward(d, t, o, False, -100, 1.0, 0.0, 8.0, 0.0, o, o, o, 2, 8, threads=48)
    with pytest.raises(ValueError, match="power of two"):
        K.backward(d, t, o, False, -100, 1.0, 0.0, 8.0, 0.0, o, o, False, 1.0, d, 2, 8, threads=512)
