"""kernels/cuda/dropout.py in Numba's CUDA simulator, on tiny grids: the mask is dropout_keep's
bit for bit (the hash at indices past 2^32 too), dropout with and without a residual, p = 0 and
p = 1, bias + activation + dropout forward and backward for every activation against torch
autograd of the fp64 reference, the bias gradient's fixed summation order.  fp16/fp32/fp64,
NaN-poisoned outputs.  On a GPU the same launchers run through fastseq.functional
(tests/test_dropout_gpu.py)."""
import numpy as np
import pytest
import torch
from numba import cuda

from fastseq._cuda import _common as C
from fastseq._cuda import dropout as K
from fastseq.dropout import ACTIVATIONS, _mix32, bias_act_dropout_ref, dropout_keep, dropout_ref

NP = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
DTYPES = [torch.float32, torch.float64, torch.float16]
# vs the fp64 reference: the storage rounding (fp16), the fp32 arithmetic (fp16 / fp32 data)
TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.float32: dict(rtol=2e-5, atol=2e-5),
       torch.float64: dict(rtol=1e-12, atol=1e-12)}
SEED = 2**62 + 0x9E3779B97F4A7C15 % 2**62          # both 32-bit halves of the seed non-zero
THREADS = 32


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dev(t):
    return cuda.to_device(np.ascontiguousarray(t.detach().numpy().reshape(-1)))


def nan_dev(n, dtype):
    return cuda.to_device(np.full(max(n, 1), np.nan, dtype=dtype))


def host(d, shape):
    return torch.from_numpy(d.copy_to_host()).reshape(shape)


def rand32_py(index, seed):
    """fs_rand32 (kernels/cpu/_fastmath.h) in plain Python integers: a third, independent oracle."""
    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    m = 0xFFFFFFFF
    return mix(mix((index & m) ^ (seed & m)) ^ ((index >> 32) & m) ^ ((seed >> 32) & m))


# ---------------------------------------------------------------------------- the hash

@cuda.jit
def _draws_kernel(base, count, seed_lo, seed_hi, out):
    i = cuda.grid(1)
    if i < count:
        out[i] = C.rand32(base + i, seed_lo, seed_hi)


@pytest.mark.parametrize("base", [0, 2**32 - 5, 2**32 + 5, 2**40 + 2**33 - 3, 2**62 + 7])
@pytest.mark.parametrize("seed", [0, 12345, SEED, 2**63 - 1])
def test_hash_matches_the_oracle_past_2_32(base, seed):
    count = 40
    out = cuda.to_device(np.zeros(count, dtype=np.uint64))
    _, _, _, lo, hi = C.dropout_params(0.5, seed)
    _draws_kernel[2, THREADS](np.int64(base), count, lo, hi, out)
    got = out.copy_to_host().astype(np.int64)
    index = torch.arange(base, base + count, dtype=torch.int64)          # dropout_keep's formula
    want = _mix32(_mix32((index & 0xFFFFFFFF) ^ (seed & 0xFFFFFFFF)) ^ ((index >> 32) & 0xFFFFFFFF)
                  ^ ((seed >> 32) & 0xFFFFFFFF))
    assert torch.equal(torch.from_numpy(got), want)
    assert [rand32_py(base + i, seed) for i in range(count)] == got.tolist()


def test_keep_threshold_and_scale():
    from fastseq.dropout import keep_threshold
    for p in (0.0, 1e-12, 0.1, 0.3, 0.5, 0.999999, 1.0):
        drop, thr, scale, lo, hi = C.dropout_params(p, SEED)
        assert drop == (p > 0)
        assert int(thr) == (keep_threshold(p) if p > 0 else 0)
        assert scale == (1.0 / (1.0 - p) if p < 1 else 0.0)
        assert (int(hi) << 32) | int(lo) == SEED


# ---------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_is_dropout_keep(dtype, p):
    m, n = 3, 45                                      # 135 elements: 5 blocks of 32 simulated threads
    acc = acc_of(dtype)
    x = (torch.rand(m, n) + 0.5).to(dtype)           # never 0: a zero output means dropped
    y = nan_dev(m * n, NP[dtype])
    K.dropout(dev(x), dev(x[:1, :1]), y, m * n, p, SEED, False, threads=THREADS)
    y = host(y, (m, n))
    kept = dropout_keep(SEED, (m, n), p)
    assert torch.equal(y != 0, kept)
    assert 0 < kept.sum() < m * n
    assert torch.equal(y[kept], (x.to(acc) * (1.0 / (1.0 - p))).to(dtype)[kept])
    assert torch.equal(y, dropout_ref(x, p, SEED))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_with_residual_and_grid_stride(dtype, monkeypatch):
    monkeypatch.setattr(K, "MAX_BLOCKS", 2)           # 64 threads over 185 elements: 3 trips each
    m, n, p = 5, 37, 0.3
    x, r = torch.randn(m, n).to(dtype), torch.randn(m, n).to(dtype)
    y = nan_dev(m * n, NP[dtype])
    K.dropout(dev(x), dev(r), y, m * n, p, SEED, True, threads=THREADS)
    torch.testing.assert_close(host(y, (m, n)), dropout_ref(x, p, SEED, residual=r), rtol=0, atol=0)
    y = nan_dev(m * n, NP[dtype])                     # without the residual
    K.dropout(dev(x), dev(x[:1, :1]), y, m * n, p, SEED, False, threads=THREADS)
    torch.testing.assert_close(host(y, (m, n)), dropout_ref(x, p, SEED), rtol=0, atol=0)


def test_dropout_in_place_and_other_seeds():
    m, n, p = 4, 33, 0.5
    x = torch.randn(m, n)
    d = dev(x)
    K.dropout(d, d, d, m * n, p, 7, False, threads=THREADS)          # y is x
    assert torch.equal(host(d, (m, n)), dropout_ref(x, p, 7))
    y = nan_dev(m * n, np.float32)
    K.dropout(dev(x), dev(x), y, m * n, p, 8, False, threads=THREADS)
    assert not torch.equal(host(y, (m, n)) != 0, dropout_keep(7, (m, n), p))


@pytest.mark.parametrize("dtype", DTYPES)
def test_p_zero_is_identity_and_p_one_is_zero(dtype, monkeypatch):
    m, n = 2, 40
    x, r = torch.randn(m, n).to(dtype), torch.randn(m, n).to(dtype)

    def no_hash(*args):
        raise AssertionError("p == 0 must draw no mask")
    with monkeypatch.context() as mp:                 # the simulator looks the device function up per call
        mp.setattr(K, "keep", no_hash)
        y = nan_dev(m * n, NP[dtype])
        K.dropout(dev(x), dev(x), y, m * n, 0.0, SEED, False, threads=THREADS)
        assert torch.equal(host(y, (m, n)), x)
        y = nan_dev(m * n, NP[dtype])
        K.dropout(dev(x), dev(r), y, m * n, 0.0, SEED, True, threads=THREADS)
        assert torch.equal(host(y, (m, n)), (x.to(acc_of(dtype)) + r.to(acc_of(dtype))).to(dtype))
    y = nan_dev(m * n, NP[dtype])
    K.dropout(dev(x), dev(x), y, m * n, 1.0, SEED, False, threads=THREADS)
    assert torch.equal(host(y, (m, n)), torch.zeros(m, n, dtype=dtype))
    y = nan_dev(m * n, NP[dtype])
    K.dropout(dev(x), dev(r), y, m * n, 1.0, SEED, True, threads=THREADS)
    assert torch.equal(host(y, (m, n)), r)


# ---------------------------------------------------------------------------- bias + activation + dropout

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("has_b", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bias_act_forward_and_backward_match_reference(dtype, act, has_b, p):
    m, n = 5, 37                                     # 185 elements; db over 5 chunks of one row
    a = ACTIVATIONS.index(act)
    acc = acc_of(dtype)
    x = (torch.randn(m, n) * 3).to(dtype)
    x[0, :4] = torch.tensor([-9.0, -6.0, 6.0, 0.25])  # the activations' tails
    b = torch.randn(n).to(dtype) if has_b else None
    dy = torch.randn(m, n).to(dtype)

    # reference: torch autograd of the formulas, in fp64 (the mask is exact, so only rounding differs)
    xr = x.double().requires_grad_()
    br = b.double().requires_grad_() if has_b else None
    out = bias_act_dropout_ref(xr, br, act, p, SEED)
    grads = torch.autograd.grad(out, (xr, br) if has_b else (xr,), dy.double())

    d_x, d_b = dev(x), (dev(b) if has_b else dev(x[:1, :1]))
    d_y = nan_dev(m * n, NP[dtype])
    K.bias_act_forward(d_x, d_b, d_y, m, n, a, p, SEED, has_b, threads=THREADS)
    y = host(d_y, (m, n))
    torch.testing.assert_close(y.double(), out.detach(), **TOL[dtype])
    if p > 0:
        assert (y[~dropout_keep(SEED, (m, n), p)] == 0).all()       # dropped: 0 (kept may underflow)

    chunks = K.partial_chunks(m)[1]
    for want_db in ([True, False] if has_b else [False]):
        d_dx = nan_dev(m * n, NP[dtype])
        d_db = nan_dev(n, NP[dtype])
        d_part = nan_dev(chunks * n, NP[acc])
        K.bias_act_backward(d_x, d_b, dev(dy), d_dx, d_db, d_part, m, n, a, p, SEED, has_b, want_db,
                            threads=THREADS)
        torch.testing.assert_close(host(d_dx, (m, n)).double(), grads[0], **TOL[dtype])
        if want_db:
            torch.testing.assert_close(host(d_db, (n,)).double(), grads[1], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bias_gradient_sums_in_a_fixed_order(dtype):
    m, n, p = 130, 5, 0.2                            # partial_chunks(130): 44 chunks of <= 3 rows
    rows, chunks = K.partial_chunks(m)
    assert rows > 1 and chunks > 1
    x, b, dy = torch.randn(m, n).to(dtype), torch.randn(n).to(dtype), torch.randn(m, n).to(dtype)
    d_x, d_b, d_dy = dev(x), dev(b), dev(dy)
    runs = []
    for _ in range(2):
        d_dx, d_db, d_part = nan_dev(m * n, NP[dtype]), nan_dev(n, NP[dtype]), nan_dev(chunks * n, NP[dtype])
        K.bias_act_backward(d_x, d_b, d_dy, d_dx, d_db, d_part, m, n, ACTIVATIONS.index("gelu"), p, SEED,
                            True, True, threads=THREADS)
        runs.append((host(d_dx, (m, n)).numpy(), host(d_db, (n,)).numpy()))
    dx, db = runs[0]
    assert np.array_equal(runs[1][1], db)
    # the exact order: rows in order within a chunk, then the chunks in order
    want = np.zeros(n, dtype=NP[dtype])
    for c in range(chunks):
        part = np.zeros(n, dtype=NP[dtype])
        for i in range(c * rows, min(m, (c + 1) * rows)):
            part += dx[i]
        want += part
    assert np.array_equal(db, want)


def test_bias_act_empty_rows_give_zero_bias_gradient():
    n = 7
    d_db = nan_dev(n, np.float32)
    chunks = K.partial_chunks(0)[1]
    one = dev(torch.zeros(1))
    K.bias_act_backward(one, dev(torch.randn(n)), one, one, d_db, nan_dev(chunks * n, np.float32), 0, n,
                        0, 0.5, SEED, True, True, threads=THREADS)
    assert torch.equal(host(d_db, (n,)), torch.zeros(n))


def test_launchers_reject_bad_thread_counts():
    one = dev(torch.zeros(4))
    with pytest.raises(ValueError, match="power of two"):
        K.dropout(one, one, one, 4, 0.5, 1, False, threads=48)
