"""Flash attention on the CPU kernels against torch's SDPA and the reference: forward and
gradients, fp32 and fp64, every feature, awkward sizes, gradcheck, masks, bad input."""
import pytest
import torch
import torch.nn.functional as F

import fastseq
from fastseq.attention import attention_ref, visible_keys
from fastseq.functional import scaled_dot_product_attention as sdpa

DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    return dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)


def qkv(B, Hq, Hk, T, S, D, Dv, dtype=torch.float32, scale=1.0):
    q = torch.randn(B, Hq, T, D, dtype=dtype) * scale
    k = torch.randn(B, Hk, S, D, dtype=dtype)
    v = torch.randn(B, Hk, S, Dv, dtype=dtype)
    return q, k, v


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def check(q, k, v, dtype, fast_kw=None, torch_kw=None, ref_kw=None):
    """fastseq vs torch SDPA (torch_kw) and vs attention_ref (ref_kw): output and dq, dk, dv."""
    fast_kw = fast_kw or {}
    a = leaves(q, k, v)
    o = sdpa(*a, **fast_kw)
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, a, do)
    for fn, kw in ((F.scaled_dot_product_attention, torch_kw), (attention_ref, ref_kw)):
        if kw is None:
            continue
        b = leaves(q, k, v)
        o2 = fn(*b, **kw)
        torch.testing.assert_close(o, o2, **tol(dtype))
        for x, y in zip(g, torch.autograd.grad(o2, b, do)):
            torch.testing.assert_close(x, y, **tol(dtype))
    return o, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hk,T,S,D,Dv", [
    (2, 3, 3, 97, 300, 59, 40),      # T != S, Dv != D, D not a multiple of 8
    (1, 2, 2, 300, 97, 64, 64),      # more queries than keys
    (2, 2, 2, 1, 257, 32, 32),       # decode: one query
    (2, 2, 2, 33, 1, 16, 8),         # one key
    (1, 1, 1, 260, 260, 8, 8),       # tiles: partial query and key tiles
])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_sdpa(poison, dtype, B, Hq, Hk, T, S, D, Dv, causal):
    q, k, v = qkv(B, Hq, Hk, T, S, D, Dv, dtype)
    kw = dict(is_causal=causal)
    check(q, k, v, dtype, kw, kw, kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hk", [(6, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_and_multi_query(poison, dtype, Hq, Hk, causal):
    q, k, v = qkv(2, Hq, Hk, 70, 130, 24, 24, dtype)
    kw = dict(is_causal=causal, enable_gqa=True)
    check(q, k, v, dtype, kw, kw, kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", [(70, 130), (2, 1, 70, 130), (1, 3, 1, 130), (2, 3, 70, 130)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_broadcasts_in_place(poison, dtype, mask_shape, kind):
    q, k, v = qkv(2, 3, 3, 70, 130, 16, 16, dtype)
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
    else:
        mask = torch.randn(mask_shape, dtype=dtype) * 2
    kw = dict(attn_mask=mask)
    check(q, k, v, dtype, kw, kw, kw)


def test_non_contiguous_mask_is_read_through_its_strides():
    q, k, v = qkv(1, 2, 2, 40, 50, 8, 8)
    mask = (torch.randn(50, 40) * 2).t()                      # (40, 50), transposed view
    check(q, k, v, torch.float32, dict(attn_mask=mask), dict(attn_mask=mask), dict(attn_mask=mask))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,causal", [((16, 16), False), ((100, 0), False), ((31, None), True),
                                           ((None, 5), False), ((0, 0), False)])
def test_sliding_window(poison, dtype, window, causal):
    q, k, v = qkv(2, 2, 2, 300, 300, 16, 16, dtype)
    keep = visible_keys(300, 300, causal, window)
    check(q, k, v, dtype, dict(window=window, is_causal=causal), dict(attn_mask=keep),
          dict(window=window, is_causal=causal))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_key_lengths_are_padding(poison, dtype, causal):
    q, k, v = qkv(3, 2, 2, 90, 300, 16, 16, dtype)
    lengths = torch.tensor([300, 17, 256])
    keep = visible_keys(90, 300, causal, None, lengths)
    check(q, k, v, dtype, dict(key_lengths=lengths, is_causal=causal), dict(attn_mask=keep),
          dict(key_lengths=lengths, is_causal=causal))
    # the padded keys get exactly zero gradient
    a = leaves(q, k, v)
    sdpa(*a, key_lengths=lengths, is_causal=causal).sum().backward()
    assert not a[1].grad[1, :, 17:].any() and not a[2].grad[1, :, 17:].any()


def test_fully_masked_rows_give_zero_like_torch():
    q, k, v = qkv(2, 2, 2, 6, 9, 8, 8)
    mask = torch.ones(2, 1, 6, 9, dtype=torch.bool)
    mask[0, 0, 3] = False
    a = leaves(q, k, v)
    o = sdpa(*a, attn_mask=mask)
    o.sum().backward()
    b = leaves(q, k, v)
    o2 = F.scaled_dot_product_attention(*b, attn_mask=mask)
    o2.sum().backward()
    assert not o[0, :, 3].any()
    torch.testing.assert_close(o, o2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
    # a batch with zero keys: all its rows are 0
    o = sdpa(q, k, v, key_lengths=torch.tensor([0, 9]))
    assert not o[0].any() and o[1].abs().sum() > 0


def test_large_logits_do_not_overflow():
    """Logits x30 (hundreds): no overflow, and no less accurate than torch against fp64."""
    q, k, v = qkv(1, 2, 2, 64, 300, 32, 32, scale=30.0)
    a = leaves(q, k, v)
    o = sdpa(*a)
    assert torch.isfinite(o).all()
    exact = attention_ref(q.double(), k.double(), v.double())
    err = (o.double() - exact).abs().max()
    err_torch = (F.scaled_dot_product_attention(q, k, v).double() - exact).abs().max()
    assert err <= 4 * err_torch + 1e-6
    g = torch.autograd.grad(o, a, torch.ones_like(o))
    assert all(torch.isfinite(t).all() for t in g)


def test_nan_propagates_to_the_rows_it_reaches():
    q, k, v = qkv(1, 1, 1, 8, 20, 8, 8)
    q[0, 0, 2, 3] = float("nan")
    o = sdpa(q, k, v)
    assert torch.isnan(o[0, 0, 2]).all() and torch.isfinite(o[0, 0, [0, 1, 3, 4, 5, 6, 7]]).all()
    k[0, 0, 5, 0] = float("nan")                             # a NaN key reaches every query that sees it
    o = sdpa(torch.randn(1, 1, 8, 8), k, v, is_causal=True)
    assert torch.isfinite(o[0, 0, :5]).all() and torch.isnan(o[0, 0, 5:]).all()


@pytest.mark.parametrize("T", [1, 37])
def test_reads_a_kv_cache_slice_in_place(poison, T):
    """K and V as views of a longer cache (decode and chunked prefill): same result as the
    contiguous copy, and gradients still flow."""
    cache_k, cache_v = torch.randn(2, 4, 8192, 64), torch.randn(2, 4, 8192, 64)
    k, v = cache_k[:, :, :3000], cache_v[:, :, :3000]
    assert not k.is_contiguous()
    q = torch.randn(2, 4, T, 64)
    torch.testing.assert_close(sdpa(q, k, v), F.scaled_dot_product_attention(q, k.contiguous(), v.contiguous()),
                               **tol(torch.float32))
    check(q, k, v, torch.float32, {}, {}, {})


def test_three_dim_and_batched_leading_dims():
    q, k, v = torch.randn(3, 50, 16), torch.randn(3, 70, 16), torch.randn(3, 70, 12)
    torch.testing.assert_close(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v), **tol(torch.float32))
    q, k, v = torch.randn(2, 3, 4, 20, 8), torch.randn(2, 3, 4, 30, 8), torch.randn(2, 3, 4, 30, 8)
    mask = torch.rand(3, 1, 20, 30) > 0.2
    torch.testing.assert_close(sdpa(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask),
                               **tol(torch.float32))


def test_custom_scale():
    q, k, v = qkv(1, 2, 2, 30, 40, 16, 16)
    check(q, k, v, torch.float32, dict(scale=0.37), dict(scale=0.37), dict(scale=0.37))


def test_results_do_not_depend_on_thread_count():
    q, k, v = qkv(2, 3, 3, 150, 260, 16, 16)
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            a = leaves(q, k, v)
            o = sdpa(*a, is_causal=True)
            outs.append((o,) + torch.autograd.grad(o, a, torch.ones_like(o)))
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_gradcheck():
    d = dict(dtype=torch.float64)
    gc = torch.autograd.gradcheck
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 5, 7, 3, 4, torch.float64))
    assert gc(lambda q, k, v: sdpa(q, k, v), (q, k, v))
    assert gc(lambda q, k, v: sdpa(q, k, v, is_causal=True), (q, k, v))
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    assert gc(lambda q, k, v: sdpa(q, k, v, attn_mask=mask), (q, k, v))
    fm = torch.randn(2, 5, 7, **d)
    assert gc(lambda q, k, v: sdpa(q, k, v, attn_mask=fm), (q, k, v))
    assert gc(lambda q, k, v: sdpa(q, k, v, window=(1, 2)), (q, k, v))
    assert gc(lambda q, k, v: sdpa(q, k, v, key_lengths=torch.tensor([4])), (q, k, v))
    qg = torch.randn(1, 4, 5, 3, **d, requires_grad=True)
    assert gc(lambda q, k, v: sdpa(q, k, v, enable_gqa=True), (qg, k, v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_the_reference_mask_and_gradients(poison, dtype, causal):
    """The kernel's counter-based mask equals dropout_keep() (the oracle), forward and backward,
    and backward regenerates it (nothing stored)."""
    q, k, v = qkv(2, 2, 2, 70, 300, 16, 8, dtype)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))
    torch.manual_seed(7)
    a = leaves(q, k, v)
    o = sdpa(*a, dropout_p=0.3, is_causal=causal)
    b = leaves(q, k, v)
    o2 = attention_ref(*b, is_causal=causal, dropout_p=0.3, dropout_seed=seed)
    torch.testing.assert_close(o, o2, **tol(dtype))
    do = torch.randn_like(o)
    for x, y in zip(torch.autograd.grad(o, a, do), torch.autograd.grad(o2, b, do)):
        torch.testing.assert_close(x, y, **tol(dtype))


def test_dropout_statistics_and_reproducibility():
    """Uniform attention over identity values reads out P~ itself: ~p of it is zero, the rest
    is 1 / (S (1 - p)); the same torch seed gives the same output, another seed another."""
    S, p = 256, 0.25
    q = torch.zeros(2, 4, 64, 8)
    k = torch.zeros(2, 4, S, 8)
    v = torch.eye(S).expand(2, 4, S, S).contiguous()
    torch.manual_seed(1)
    o = sdpa(q, k, v, dropout_p=p)
    dropped = (o == 0).float().mean().item()
    assert abs(dropped - p) < 0.01
    torch.testing.assert_close(o[o != 0], torch.full_like(o[o != 0], 1 / (S * (1 - p))))
    torch.manual_seed(1)
    assert torch.equal(o, sdpa(q, k, v, dropout_p=p))
    assert not torch.equal(o, sdpa(q, k, v, dropout_p=p))


def test_gradcheck_with_dropout():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 5, 7, 3, 4, torch.float64))

    def fn(q, k, v):
        torch.manual_seed(11)                 # the same mask on every call gradcheck makes
        return sdpa(q, k, v, dropout_p=0.4, is_causal=True)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dropout_one_drops_everything():
    q, k, v = qkv(1, 2, 2, 6, 9, 8, 8)
    assert not sdpa(q, k, v, dropout_p=1.0).any()


def test_mask_gradients_run_on_torch():
    q, k, v = qkv(1, 2, 2, 10, 12, 8, 8)
    bias = torch.randn(2, 10, 12, requires_grad=True)        # a learned bias needs its gradient
    assert "gives no gradient for a float attn_mask" in fastseq.explain(
        "scaled_dot_product_attention", q, k, v, bias)
    sdpa(q, k, v, attn_mask=bias).sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


@pytest.mark.parametrize("call,match", [
    (lambda: sdpa(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 7), torch.randn(1, 2, 5, 7)),
     "query and key head dims differ: 8 vs 7"),
    (lambda: sdpa(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8)),
     "key and value lengths differ: 5 vs 6"),
    (lambda: sdpa(torch.randn(1, 6, 4, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8), enable_gqa=True),
     r"key heads \(4\) to divide query heads \(6\)"),
    (lambda: sdpa(torch.randn(1, 6, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)),
     "pass enable_gqa=True"),
    (lambda: sdpa(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8),
                  attn_mask=torch.ones(4, 6, dtype=torch.bool)), r"attn_mask of shape \[4, 6\] does not broadcast"),
    (lambda: sdpa(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8),
                  attn_mask=torch.ones(4, 5, dtype=torch.int64)), "attn_mask of dtype torch.bool or torch.float32"),
    (lambda: sdpa(torch.ones(1, 2, 4, 8, dtype=torch.int32), torch.ones(1, 2, 5, 8, dtype=torch.int32),
                  torch.ones(1, 2, 5, 8, dtype=torch.int32)), "expected floating-point query, got torch.int32"),
    (lambda: sdpa(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8),
                  key_lengths=torch.tensor([5, 6])), r"key_lengths must lie in \[0, 5\], got \[5, 6\]"),
    (lambda: sdpa(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), window=3),
     "window must be \\(left, right\\)"),
    (lambda: sdpa(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), window=(3, -2)),
     "window must be \\(left, right\\) of ints >= 0"),
    (lambda: sdpa(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8),
                  key_lengths=torch.tensor([True, False])), "key_lengths must be a 1-D integer tensor"),
    (lambda: sdpa(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), window=(True, 0)),
     "window must be \\(left, right\\) of ints"),
    (lambda: sdpa(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), dropout_p=1.5),
     r"dropout_p must be in \[0, 1\]"),
])
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
