"""The cross-entropy family (fastseq/cross_entropy.py, kernels/cpu/cross_entropy.pyx): the fused
loss against F.cross_entropy for every option and against the formulas for the extras (fairseq's
smoothing, z-loss, lse), edge sizes, NaN/inf logits, bad targets, gradcheck, graph capture, the
modules, and linear_cross_entropy against F.linear + F.cross_entropy (weight gradient included)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fastseq
import fastseq.functional as FF
from fastseq.cross_entropy import cross_entropy_ref, smoothing_coefficients

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def _data(N, V, dtype=torch.float64, ignore=(), scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    for i in ignore:
        t[i] = -100
    return z, t


def _both(fast, ref, inputs, dtype, grad_out=None):
    """fast and ref agree on the output and on the gradients of `inputs`."""
    torch.testing.assert_close(fast, ref, **TOL[dtype])
    g = torch.randn_like(ref) if grad_out is None else grad_out
    gf = torch.autograd.grad(fast, inputs, g)
    gr = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_torch_for_every_option(dtype, reduction, label_smoothing, weighted):
    z, t = _data(37, 97, dtype, ignore=(3, 20))
    w = torch.rand(97, dtype=dtype) + 0.1 if weighted else None
    _both(FF.cross_entropy(z, t, w, reduction=reduction, label_smoothing=label_smoothing),
          F.cross_entropy(z, t, w, reduction=reduction, label_smoothing=label_smoothing), [z], dtype)


@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_ignore_index_and_every_row_ignored(ignore_index):
    z, t = _data(9, 11)
    t[:4] = ignore_index
    _both(FF.cross_entropy(z, t, ignore_index=ignore_index), F.cross_entropy(z, t, ignore_index=ignore_index),
          [z], torch.float64)
    t[:] = ignore_index
    for red in ("mean", "sum", "none"):
        a = FF.cross_entropy(z, t, ignore_index=ignore_index, reduction=red)
        b = F.cross_entropy(z, t, ignore_index=ignore_index, reduction=red)
        torch.testing.assert_close(a, b, equal_nan=True)              # mean: 0 / 0 = NaN, as torch
        ga, = torch.autograd.grad(a.sum(), z)
        gb, = torch.autograd.grad(b.sum(), z)
        torch.testing.assert_close(ga, gb, equal_nan=True)


@pytest.mark.parametrize("N,V", [(1, 1), (1, 5), (3, 1), (2, 50257), (5, 781), (0, 7)])
def test_edge_sizes(N, V):
    z, t = _data(N, V)
    for ls in (0.0, 0.1):
        if N == 0:
            torch.testing.assert_close(FF.cross_entropy(z, t, reduction="sum", label_smoothing=ls),
                                       F.cross_entropy(z, t, reduction="sum", label_smoothing=ls))
            continue
        _both(FF.cross_entropy(z, t, label_smoothing=ls), F.cross_entropy(z, t, label_smoothing=ls), [z],
              torch.float64)


def test_unbatched_logits():
    z = torch.randn(13, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(4)
    for red in ("mean", "none"):
        _both(FF.cross_entropy(z, t, reduction=red, label_smoothing=0.2),
              F.cross_entropy(z, t, reduction=red, label_smoothing=0.2), [z], torch.float64)


def test_strided_rows():
    base = torch.randn(10, 50, dtype=torch.float64)
    z = base[:, 5:45].clone().requires_grad_()
    t = torch.randint(0, 40, (10,))
    view = base.clone().requires_grad_()
    a = FF.cross_entropy(view[:, 5:45], t, label_smoothing=0.1)        # row stride 50, 40 classes
    b = F.cross_entropy(z, t, label_smoothing=0.1)
    torch.testing.assert_close(a, b)
    ga, = torch.autograd.grad(a, view)
    gb, = torch.autograd.grad(b, z)
    torch.testing.assert_close(ga[:, 5:45], gb)
    assert not ga[:, :5].any() and not ga[:, 45:].any()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fairseq_smoothing_and_z_loss_match_their_formulas(reduction, weighted):
    """fairseq: target 1 - eps, every other class eps / (V - 1); z-loss: + c lse^2 per live row."""
    z, t = _data(17, 23, ignore=(2,))
    w = torch.rand(23, dtype=torch.float64) + 0.5 if weighted else None
    eps, c, V = 0.1, 1e-3, 23
    logp = torch.log_softmax(z, -1)
    live = t != -100
    tt = torch.where(live, t, 0)
    q = torch.full_like(logp, eps / (V - 1))
    q.scatter_(1, tt[:, None], 1 - eps)
    ww = w if w is not None else torch.ones(V, dtype=torch.float64)
    # the target's share weighted by w_t, the others by their own class weights (fastseq's rule)
    rows = -(q * logp * ww).sum(-1)
    rows = rows + c * torch.logsumexp(z, -1) ** 2
    rows = rows * live
    want = rows if reduction == "none" else rows.sum() / (ww[tt] * live).sum()
    got = FF.cross_entropy(z, t, w, reduction=reduction, label_smoothing=eps, smoothing="fairseq", z_loss=c)
    if not weighted:
        _both(got, want, [z], torch.float64)
    ref = cross_entropy_ref(z, t, w, reduction=reduction, label_smoothing=eps, smoothing="fairseq", z_loss=c)
    _both(FF.cross_entropy(z, t, w, reduction=reduction, label_smoothing=eps, smoothing="fairseq", z_loss=c), ref,
          [z], torch.float64)
    A, B = smoothing_coefficients(eps, V, "fairseq")
    assert math.isclose(A + B, 1 - eps) and math.isclose(B, eps / (V - 1))


def test_return_lse():
    z, t = _data(6, 40)
    loss, lse = FF.cross_entropy(z, t, return_lse=True)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1).detach())
    assert not lse.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(z, t))


def test_nan_and_inf_logits_behave_as_torch():
    z = torch.randn(4, 9, dtype=torch.float64)
    z[0, 3] = float("nan")
    z[1, 2] = float("-inf")
    z[2, :] = float("-inf")
    z[3, 5] = float("inf")
    t = torch.tensor([1, 4, 0, 2])
    for ls in (0.0, 0.1):
        a = FF.cross_entropy(z, t, reduction="none", label_smoothing=ls)
        b = F.cross_entropy(z, t, reduction="none", label_smoothing=ls)
        torch.testing.assert_close(a, b, equal_nan=True)


def test_bad_targets_raise_before_any_read():
    z, t = _data(5, 7)
    for bad in (7, 100, -1, -101):
        t2 = t.clone()
        t2[2] = bad
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
            FF.cross_entropy(z, t2)
        with pytest.raises(IndexError):
            F.cross_entropy(z, t2)
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        FF.cross_entropy(z, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be between"):
        FF.cross_entropy(z, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="class weight of shape \\[7\\]"):
        FF.cross_entropy(z, t, torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="smoothing must be one of"):
        FF.cross_entropy(z, t, smoothing="other")


def test_what_runs_on_torchs_op_still_matches():
    """Probability targets, (N, C, d) logits and int32 targets take torch's op (explain says why)."""
    z = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (3, 4))
    torch.testing.assert_close(FF.cross_entropy(z, t), F.cross_entropy(z, t))
    p = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    z2 = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(FF.cross_entropy(z2, p, label_smoothing=0.1), F.cross_entropy(z2, p, label_smoothing=0.1))
    text = fastseq.explain("cross_entropy", z2, p)
    assert "probability (soft) targets" in text and "runs on backend 'torch'" in text
    assert "runs on backend 'cpu'" in fastseq.explain("cross_entropy", z2, torch.tensor([0, 1, 2]))


def test_fp32_error_within_a_small_multiple_of_torchs():
    z, t = _data(64, 5000, torch.float32, scale=8.0)
    zd = z.detach().double().requires_grad_()
    ref = F.cross_entropy(zd, t, reduction="none", label_smoothing=0.1)
    gref, = torch.autograd.grad(ref.sum(), zd)
    ours = FF.cross_entropy(z, t, reduction="none", label_smoothing=0.1)
    g_ours, = torch.autograd.grad(ours.sum(), z)
    zt = z.detach().clone().requires_grad_()
    theirs = F.cross_entropy(zt, t, reduction="none", label_smoothing=0.1)
    g_theirs, = torch.autograd.grad(theirs.sum(), zt)
    for o, th, r in ((ours, theirs, ref), (g_ours, g_theirs, gref)):
        err_o = (o.double() - r).abs().max().item()
        err_t = (th.double() - r).abs().max().item()
        assert err_o <= 8 * err_t + 1e-7 * r.abs().max().item(), (err_o, err_t)


def test_thread_count_does_not_change_the_result():
    z, t = _data(300, 333, torch.float32)
    old = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            loss = FF.cross_entropy(z, t, reduction="none", label_smoothing=0.1)
            outs.append((loss, torch.autograd.grad(loss.sum(), z)[0]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_gradcheck():
    z, t = _data(4, 6, ignore=(1,))
    w = torch.rand(6, dtype=torch.float64) + 0.5
    for red in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda a: FF.cross_entropy(a, t, w, reduction=red, label_smoothing=0.2,
                                                                   smoothing="fairseq", z_loss=0.01), (z,))
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    t5 = torch.tensor([0, 5, -100, 2, 3])
    for red in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, c, d: FF.linear_cross_entropy(a, c, t5, linear_bias=d, reduction=red, label_smoothing=0.1,
                                                    chunk_rows=2),
            (x, W, b))


def test_double_backward_says_it_is_not_supported():
    z, t = _data(3, 4)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(FF.cross_entropy(z, t), z, create_graph=True)
    with fastseq.use_backend("torch"):                       # the way to higher-order gradients
        g, = torch.autograd.grad(FF.cross_entropy(z, t), z, create_graph=True)
    assert g.requires_grad


def test_opcheck_and_compile():
    z, t = _data(5, 7, ignore=(0,))
    for red in ("mean", "sum", "none"):
        opcheck(torch.ops.fastseq.cross_entropy.default,
                (z.detach().clone().requires_grad_(), t, None, -100, red, 0.1, "torch", 0.0, True, "cpu"))
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor([1, 2, 3, 4, 5, -100])
    opcheck(torch.ops.fastseq.linear_cross_entropy.default,
            (x, W, None, tt, None, -100, "mean", 0.0, "torch", 0.0, True, True, False, "cpu", 4))
    torch._dynamo.reset()
    f = torch.compile(lambda a, c: FF.cross_entropy(a, tt, label_smoothing=0.1) + FF.linear_cross_entropy(c, W, tt),
                      fullgraph=True, backend="aot_eager")
    a = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    out = f(a, x)
    want = F.cross_entropy(a, tt, label_smoothing=0.1) + F.cross_entropy(x @ W.t(), tt)
    torch.testing.assert_close(out, want)
    for g, e in zip(torch.autograd.grad(out, (a, x, W)), torch.autograd.grad(want, (a, x, W))):
        torch.testing.assert_close(g, e)


# ============================================================================ linear + cross-entropy

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 7])
def test_linear_cross_entropy_matches_linear_then_loss(reduction, bias, chunk):
    torch.manual_seed(0)
    x = torch.randn(29, 16, dtype=torch.float64, requires_grad=True)
    W = torch.randn(53, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(53, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, 53, (29,))
    t[[4, 11]] = -100
    cw = torch.rand(53, dtype=torch.float64) + 0.5
    ins = [x, W] + ([b] if bias else [])
    _both(FF.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction, label_smoothing=0.1, weight=cw,
                                  chunk_rows=chunk),
          F.cross_entropy(F.linear(x, W, b), t, cw, reduction=reduction, label_smoothing=0.1), ins, torch.float64)
    _both(FF.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction, label_smoothing=0.1, weight=cw),
          F.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction, label_smoothing=0.1, weight=cw), ins,
          torch.float64)


def test_linear_cross_entropy_tied_weight_leading_dims_and_grad_scale():
    torch.manual_seed(1)
    emb = torch.nn.Embedding(40, 12, dtype=torch.float64)
    tokens = torch.randint(0, 40, (3, 5))
    h = emb(tokens)                                              # (B, T, E), the head tied to the embedding
    t = torch.randint(0, 40, (3, 5))
    a = FF.linear_cross_entropy(h, emb.weight, t, z_loss=1e-3)
    b = cross_entropy_ref(F.linear(h, emb.weight).reshape(-1, 40), t.reshape(-1), z_loss=1e-3)
    torch.testing.assert_close(a, b)
    ga, = torch.autograd.grad(3.5 * a, emb.weight, retain_graph=True)   # an output gradient that is not 1
    gb, = torch.autograd.grad(3.5 * b, emb.weight)
    torch.testing.assert_close(ga, gb)


def test_linear_cross_entropy_without_grad_and_errors():
    x, W = torch.randn(8, 4), torch.randn(10, 4)
    t = torch.randint(0, 10, (8,))
    with torch.no_grad():
        torch.testing.assert_close(FF.linear_cross_entropy(x, W, t), F.cross_entropy(x @ W.t(), t))
    with pytest.raises(ValueError, match="expected input \\(N, E\\) and weight \\(V, E\\)"):
        FF.linear_cross_entropy(x, torch.randn(10, 5), t)
    with pytest.raises(ValueError, match="8 rows of input but 7 targets"):
        FF.linear_cross_entropy(x, W, t[:7])
    t[0] = 10
    with pytest.raises(IndexError, match="out of bounds"):
        FF.linear_cross_entropy(x, W, t)


# ============================================================================ modules

def test_cross_entropy_loss_module_is_torchs_and_convert_swaps_it():
    w = torch.rand(11)
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=0.05)
    fast = fastseq.convert(torch.nn.Sequential(ref))[0]
    assert type(fast) is fastseq.nn.CrossEntropyLoss
    z = torch.randn(7, 11, requires_grad=True)
    t = torch.randint(0, 11, (7,))
    _both(fast(z, t), ref(z, t), [z], torch.float32)
    assert fast.state_dict().keys() == ref.state_dict().keys()


def test_linear_cross_entropy_loss_module_is_torchs_and_convert_swaps_it():
    torch.manual_seed(0)
    ref = torch.nn.LinearCrossEntropyLoss(16, 30, bias=True, label_smoothing=0.1)
    fast = fastseq.convert(torch.nn.Sequential(ref))[0]
    assert type(fast) is fastseq.nn.LinearCrossEntropyLoss and fast.state_dict().keys() == ref.state_dict().keys()
    h = torch.randn(24, 16, requires_grad=True)
    t = torch.randint(0, 30, (24,))
    _both(fast(h, t), ref(h, t), [h, fast.linear.weight, fast.linear.bias], torch.float32)
    with pytest.raises(RuntimeError, match="dimensionality"):          # torch's error, as torch's module
        fast(h.view(4, 6, 16), t.view(4, 6))


# ============================================================================ review regressions

def test_no_gradient_work_without_grad_mode(monkeypatch):
    from fastseq import cross_entropy as CE
    seen = []
    real = CE._linear_ce_chunks
    monkeypatch.setattr(CE, "_linear_ce_chunks", lambda *a, **k: seen.append(a[8]) or real(*a, **k))
    x = torch.randn(6, 4)
    W = torch.nn.Parameter(torch.randn(9, 4))
    t = torch.randint(0, 9, (6,))
    with torch.no_grad():
        FF.linear_cross_entropy(x, W, t)
    assert seen == [(None, None, None)]


def test_compiled_calls_check_targets_and_ops_give_contiguous_outputs():
    torch._dynamo.reset()
    f = torch.compile(lambda a, t: FF.cross_entropy(a, t), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="out of bounds"):
        f(torch.randn(3, 5), torch.tensor([0, 1, 7]))
    x = torch.randn(3, 6, dtype=torch.float64).t().requires_grad_()              # (6, 3), strided
    W = torch.randn(3, 9, dtype=torch.float64).t().requires_grad_()              # (9, 3), strided
    opcheck(torch.ops.fastseq.linear_cross_entropy.default,
            (x, W, None, torch.tensor([1, 2, 3, 4, 5, 6]), None, -100, "mean", 0.0, "torch", 0.0, True, True, False,
             "cpu", 4))


def test_nan_and_inf_rows_give_torchs_gradients():
    z = torch.randn(3, 6, dtype=torch.float64)
    z[0, :] = float("-inf")
    z[1, 2] = float("nan")
    z = z.requires_grad_()
    t = torch.tensor([1, 2, 3])
    a = FF.cross_entropy(z, t, reduction="sum", label_smoothing=0.1)
    b = F.cross_entropy(z, t, reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(a, b, equal_nan=True)
    ga, = torch.autograd.grad(a, z)
    gb, = torch.autograd.grad(b, z)
    torch.testing.assert_close(ga, gb, equal_nan=True)


def test_class_weight_with_k_dim_logits_and_torchs_shapes():
    z = torch.randn(2, 5, 3, dtype=torch.float64)
    t = torch.randint(0, 5, (2, 3))
    w = torch.rand(5, dtype=torch.float64)
    torch.testing.assert_close(FF.cross_entropy(z, t, w), F.cross_entropy(z, t, w))
    x, W = torch.randn(4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    t0 = torch.tensor(3)
    a = FF.linear_cross_entropy(x, W, t0, reduction="none")
    assert a.shape == F.linear_cross_entropy(x, W, t0, reduction="none").shape == ()
    loss, lse = FF.cross_entropy(torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2]), return_lse=True)
    assert not lse.requires_grad and loss.requires_grad


def test_autocast_runs_the_loss_in_fp32_as_torch():
    z = torch.randn(8, 50).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 50, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = FF.cross_entropy(z, t, label_smoothing=0.1)
        b = F.cross_entropy(z, t, label_smoothing=0.1)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, z)[0], torch.autograd.grad(b, z)[0])
