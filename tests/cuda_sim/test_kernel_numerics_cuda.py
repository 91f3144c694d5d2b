"""Numerics of the CUDA kernels in Numba's simulator, on tiny grids (issue 8: 8b, 8c), as
tests/test_kernel_numerics.py for the CPU: LayerNorm of a constant row is exactly the bias (layer_norm,
the fused residual add, the layer-normalized recurrent cells), near-constant rows with a large
offset are no less accurate than torch's, and fp32 tanh is accurate relative to tiny values.
The simulator does not contract a * b + c into one FMA as a GPU may; the GPU run of the same
launchers goes through fastseq.functional (bench/gpu/run.sh)."""
import math

import numpy as np
import pytest
import torch
from numba import cuda

from fastseq._cuda import layer_norm as LN
from fastseq._cuda import recurrent as RC

NP = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
CONSTANTS = [(3.3, 1e-12), (1000005.5625, 1e-5)]


def dev(t):
    return cuda.to_device(np.ascontiguousarray(t.detach().numpy().reshape(-1)))


def nan_dev(n, dtype):
    return cuda.to_device(np.full(max(n, 1), np.nan, dtype=NP[dtype]))


def host(d, *shape):
    return torch.from_numpy(d.copy_to_host()).reshape(shape)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def cases():
    for dtype in (torch.float16, torch.float32, torch.float64):
        for value, eps in CONSTANTS:
            if dtype == torch.float16 and value > 65504:
                continue
            yield dtype, value, eps


# ============================================================================ layer_norm (8b)

@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")    # fp16 dx at rstd = 1e6
@pytest.mark.parametrize("dtype,value,eps", list(cases()))
@pytest.mark.parametrize("n", [1, 7, 37])
@pytest.mark.parametrize("residual,write_sum", [(False, False), (True, False), (True, True)])
def test_layer_norm_of_a_constant_row_is_exactly_the_bias(dtype, value, eps, n, residual, write_sum):
    m = 3                                            # 3 blocks of 32 simulated threads
    const = torch.full((m, n), value, dtype=dtype)
    r = (torch.randint(-4, 9, (m, n)) / 8).to(dtype) if residual else None
    x = const - r if residual else const             # x + r == the constant, exactly
    if residual:
        assert torch.equal(x + r, const)
    w, b = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    acc = acc_of(dtype)
    d_x, d_r = dev(x), dev(r if residual else x[:1, :1])
    d_w, d_b = dev(w), dev(b)
    d_y = nan_dev(m * n, dtype)
    d_s = nan_dev(m * n, dtype) if write_sum else dev(x[:1, :1])
    d_mean, d_rstd = nan_dev(m, acc), nan_dev(m, acc)
    LN.forward(d_x, d_r, d_w, d_b, d_y, d_s, d_mean, d_rstd, m, n, eps, True, residual, write_sum, threads=32)
    assert torch.equal(host(d_y, m, n), b.expand(m, n))
    assert torch.equal(host(d_mean, m), const[:, 0].to(acc))

    # backward: xhat == 0, so dx = rstd (g - mean(g)), dw == 0 exactly, db = sum dy
    dy = torch.randn(m, n).to(dtype)
    src, src_r = (d_s, d_x) if write_sum else (d_x, d_r)
    d_dx = nan_dev(m * n, dtype)
    d_dw, d_db = nan_dev(n, dtype), nan_dev(n, dtype)
    chunks = LN.partial_chunks(m)[1]
    parts = [nan_dev(chunks * n, acc) for _ in range(2)]
    LN.backward(src, src_r, dev(dy), dev(dy), d_w, d_mean, d_rstd, d_dx, d_dw, d_db, *parts, m, n, True,
                residual and not write_sum, False, True, True, threads=32)
    assert torch.equal(host(d_dw, n), torch.zeros(n, dtype=dtype))
    g = dy.double() * w.double()
    want = (g - g.mean(-1, keepdim=True)) / math.sqrt(float(torch.tensor(eps, dtype=acc)))
    scale = max(1.0, want.abs().max().item())
    tol = {torch.float16: 2e-3, torch.float32: 3e-6, torch.float64: 1e-13}[dtype]
    if dtype != torch.float16 or scale < 6e4:      # (rstd = 1e6 overflows fp16's dx, as torch's)
        torch.testing.assert_close(host(d_dx, m, n).double() / scale, want / scale, rtol=0, atol=tol)
    torch.testing.assert_close(host(d_db, n).double(), dy.double().sum(0), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,noise", [(torch.float32, 1.0), (torch.float32, 0.25), (torch.float64, 1e-3)])
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_near_constant_rows_with_a_large_offset_are_as_accurate_as_torch(dtype, noise, eps):
    m, n, offset = 4, 37, 1e6
    x = (offset + noise * torch.randn(m, n, dtype=torch.float64)).to(dtype)
    w, b = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    ref = torch.nn.functional.layer_norm(x.double() - offset, (n,), w.double(), b.double(), eps)
    d_y, d_mean, d_rstd = nan_dev(m * n, dtype), nan_dev(m, dtype), nan_dev(m, dtype)
    LN.forward(dev(x), dev(x[:1, :1]), dev(w), dev(b), d_y, dev(x[:1, :1]), d_mean, d_rstd, m, n, eps, True,
               False, False, threads=32)
    err = (host(d_y, m, n).double() - ref).abs().max().item()
    err_torch = (torch.nn.functional.layer_norm(x, (n,), w, b, eps).double() - ref).abs().max().item()
    assert err <= 1.5 * err_torch + 1e-7 * (1 if dtype == torch.float32 else 1e-8), (err, err_torch)


# ============================================================================ layer-normalized cells (8b)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value,eps", CONSTANTS)
@pytest.mark.parametrize("H,threads", [(7, None), (13, 4)])
def test_ln_lstm_step_with_constant_rows_normalizes_to_exact_zeros(dtype, value, eps, H, threads):
    """gh constant over the row: ghat == 0; gate pre-activations constant per gate block and
    cprev constant: c constant over the units, so chat == 0 and h = o tanh(b_c)."""
    B = 2
    gate = torch.tensor([0.3, -0.7, 1.1, 0.4], dtype=torch.float64)
    xp = gate.repeat_interleave(H).expand(B, 4 * H).to(dtype)
    gh = torch.full((B, 4 * H), value, dtype=dtype)
    cprev = torch.full((B, H), 0.25, dtype=dtype)
    w_hh_norm, w_c, b_c = torch.randn(4 * H).to(dtype), torch.randn(H).to(dtype), torch.randn(H).to(dtype)
    out = {k: nan_dev(n, dtype) for k, n in dict(c=B * H, h=B * H, act=B * 4 * H, ghat=B * 4 * H, rstd_h=B,
                                                 chat=B * H, rstd_c=B).items()}
    RC.ln_lstm_step_forward(dev(xp), dev(gh), dev(w_hh_norm), dev(w_c), dev(b_c), dev(cprev), out["c"], out["h"],
                            out["act"], out["ghat"], out["rstd_h"], out["chat"], out["rstd_c"], B, H, eps,
                            threads=threads)
    assert torch.equal(host(out["ghat"], B, 4 * H), torch.zeros(B, 4 * H, dtype=dtype))
    assert torch.equal(host(out["chat"], B, H), torch.zeros(B, H, dtype=dtype))
    s = torch.sigmoid(gate)
    o = s[3].item()
    want = o * torch.tanh(b_c.double()).expand(B, H)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(host(out["h"], B, H).double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value,eps", CONSTANTS)
@pytest.mark.parametrize("H,threads", [(7, None), (13, 4)])
def test_ln_gru_step_with_a_constant_row_normalizes_to_exact_zeros(dtype, value, eps, H, threads):
    B = 2
    xp = torch.randn(B, 3 * H).to(dtype)
    gh = torch.full((B, 3 * H), value, dtype=dtype)
    hprev = torch.randn(B, H).to(dtype)
    w_hh_norm, b_hh = torch.randn(3 * H).to(dtype), torch.randn(3 * H).to(dtype)
    out = {k: nan_dev(n, dtype) for k, n in dict(h=B * H, act=B * 3 * H, ghat=B * 3 * H, rstd_h=B,
                                                 ghn=B * H).items()}
    RC.ln_gru_step_forward(dev(xp), dev(gh), dev(w_hh_norm), dev(b_hh), dev(hprev), out["h"], out["act"],
                           out["ghat"], out["rstd_h"], out["ghn"], B, H, eps, threads=threads)
    assert torch.equal(host(out["ghat"], B, 3 * H), torch.zeros(B, 3 * H, dtype=dtype))
    assert torch.equal(host(out["ghn"], B, H), b_hh[2 * H:].expand(B, H))       # a = w ghat + b_hh = b_hh


# ============================================================================ fp32 tanh (8c)

def test_rnn_step_tanh_is_accurate_relative_to_tiny_values():
    pts = torch.logspace(-10, 1, 200, dtype=torch.float64)
    g = torch.cat([pts, -pts]).float().reshape(2, -1)
    B, H = g.shape
    d_h = nan_dev(B * H, torch.float32)
    RC.rnn_step_forward(dev(g), d_h, B, H, False)
    got, want = host(d_h, B, H).double(), torch.tanh(g.double())
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel < 5e-7, rel
