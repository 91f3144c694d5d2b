"""The decode family's kernels (kernels/cpu/decode.pyx) outside GPT's fused step, which
tests/test_gpt_step.py covers: generation.linear (columns split over the threads) against
torch.nn.functional.linear, and KVCache's origin table (beam search reorders
rows without copying keys) read by attend_step against the gathered keys and torch's SDPA."""

import pytest
import torch
import torch.nn.functional as F

import fastseq
from fastseq.generation import linear as L
from fastseq.generation.cache import KVCache


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M, K, N", [(1, 37, 19), (5, 64, 70), (40, 48, 33), (128, 32, 200)])
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
def test_linear_matches_torch(dtype, M, K, N, activation):
    g = torch.Generator().manual_seed(M * 7 + N)
    x = torch.randn(2, M, K, generator=g, dtype=dtype)
    w, b = torch.randn(N, K, generator=g, dtype=dtype), torch.randn(N, generator=g, dtype=dtype)
    want = F.linear(x, w, b)
    want = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
            "silu": F.silu}[activation](want)
    calls = []
    real = L._runs
    L._runs = lambda *a: calls.append(real(*a)) or calls[-1]
    try:
        got = L.linear(x, w, b, activation)
        got_nobias = L.linear(x, w, None, activation)
    finally:
        L._runs = real
    assert calls == [2 * M <= L.MAX_ROWS] * 2
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    act = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
           "silu": F.silu}[activation]
    torch.testing.assert_close(got_nobias, act(F.linear(x, w)), rtol=tol, atol=tol * want.abs().max().item())


def test_linear_falls_back_where_the_kernel_does_not_run():
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(5, 8)
    assert not L._runs(x, w, None, 3)                                   # a gradient is wanted
    with torch.no_grad():
        assert L._runs(x, w, None, 3)
        assert not L._runs(x, w.t().contiguous().t(), None, 3)          # a strided weight
        assert not L._runs(x.half(), w.half(), None, 3)
        assert not L._runs(torch.randn(L.MAX_ROWS + 1, 8), w, None, L.MAX_ROWS + 1)
        with fastseq.use_backend("torch"):
            assert not L._runs(x, w, None, 3)
    y = L.linear(x, w)
    y.sum().backward()                                                  # F.linear's graph
    assert x.grad is not None


def _cache_pair(dtype=torch.float64):
    """A KVCache of 1 layer, 4 rows, 3 heads, D 8, filled over 5 positions."""
    g = torch.Generator().manual_seed(0)
    c = KVCache(1, 4, 3, 8, 12, dtype=dtype)
    for _ in range(5):
        k, v = torch.randn(2, 4, 3, 1, 8, generator=g, dtype=dtype)
        c.write(0, k, v)
        c.advance(1)
    return c, g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reorder_moves_the_origin_table_not_the_keys(dtype):
    c, g = _cache_pair(dtype)
    before = c.kv[:, :, :, :, :5].clone()                               # the held positions
    keys_before = c.kv[0, 0, :, :, :5].clone()
    index = torch.tensor([2, 2, 0, 3])
    c.reorder(index)
    assert torch.equal(c.kv[:, :, :, :, :5], before)                    # nothing copied
    assert c.origin[:, :5].tolist() == [[2] * 5, [2] * 5, [0] * 5, [3] * 5]
    q, k, v = torch.randn(3, 4, 3, 1, 8, generator=g, dtype=dtype)
    o = c.attend_step(0, q, k, v)
    # the reference: the keys each row sees, gathered, and torch's attention
    K = torch.cat([keys_before[index], k], 2)
    V = torch.cat([before[0, 1, :, :, :5][index], v], 2)
    want = F.scaled_dot_product_attention(q, K, V)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(o, want, rtol=tol, atol=tol)
    kw, vw = c.write(0, k, v)                                           # the gathering path agrees
    torch.testing.assert_close(kw, K, rtol=0, atol=0)
    torch.testing.assert_close(vw, V, rtol=0, atol=0)


def test_reorder_with_fewer_rows_then_more_steps():
    """Rows leave (a shorter index), beams reorder again: every row still reads its own history."""
    c, g = _cache_pair()
    hist_k = [c.kv[0, 0, i, :, :5].clone() for i in range(4)]            # per original row (NH, 5, D)
    hist_v = [c.kv[0, 1, i, :, :5].clone() for i in range(4)]
    rows = [0, 1, 2, 3]
    for index in (torch.tensor([3, 1, 2]), torch.tensor([1, 1]), torch.tensor([1])):
        c.reorder(index)
        hist_k = [hist_k[i] for i in index.tolist()]
        hist_v = [hist_v[i] for i in index.tolist()]
        rows = [rows[i] for i in index.tolist()]
        b = len(rows)
        q, k, v = torch.randn(3, b, 3, 1, 8, generator=g, dtype=torch.float64)
        o = c.attend_step(0, q, k, v)
        c.advance(1)
        for i in range(b):
            hist_k[i] = torch.cat([hist_k[i], k[i]], 1)
            hist_v[i] = torch.cat([hist_v[i], v[i]], 1)
            want = F.scaled_dot_product_attention(q[i], hist_k[i], hist_v[i])
            torch.testing.assert_close(o[i], want, rtol=1e-12, atol=1e-12)
    assert c.batch_size == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_attend_sources_reads_each_rows_source_in_place(dtype, with_lengths):
    """Cross-attention of one query a row over its source's keys (rows in any order, sources
    read in place) against torch's SDPA on per-row copies with the padding masked."""
    from fastseq.generation.cache import attend_sources
    g = torch.Generator().manual_seed(1)
    B, NH, S, D, N = 3, 2, 7, 8, 5
    kv = torch.randn(2, B, NH, S, D, generator=g, dtype=dtype)
    q = torch.randn(N, NH, 1, D, generator=g, dtype=dtype)
    source_of = torch.tensor([2, 0, 0, 1, 2])
    lengths = torch.tensor([7, 3, 5]) if with_lengths else None
    o = attend_sources(q, kv, source_of, lengths)
    k, v = kv[0][source_of], kv[1][source_of]                            # (N, NH, S, D) copies
    mask = None
    if lengths is not None:
        mask = (torch.arange(S)[None, :] < lengths[source_of][:, None]).view(N, 1, 1, S)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(o, want, rtol=tol, atol=tol)
