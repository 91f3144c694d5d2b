"""kernels/cuda/recurrent.py in Numba's CUDA simulator, on tiny sizes, against pure-torch references
computed in float64 with autograd: every step kernel (forward and backward, fp32 and fp64,
outputs poisoned with NaN), then a T = 3 recurrence per cell with the time loop written here
(GEMMs through torch on the CPU, the step kernels on device arrays) against autograd of the
same recurrence in torch: outputs, final state and every gradient."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import cuda

from fastseq._cuda import recurrent as K

DTYPES = [torch.float32, torch.float64]
NP = {torch.float32: np.float32, torch.float64: np.float64}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-9)}
EPS = 1e-5


# ---------------------------------------------------------------------------- helpers

def rnd(*shape, dtype=torch.float32):
    """Fresh random float64 values exactly representable in `dtype` (the kernels' inputs)."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype).double()


def dev(t, dtype):
    return cuda.to_device(np.ascontiguousarray(t.detach().to(dtype).numpy().reshape(-1)))


def nan_dev(n, dtype):
    return cuda.to_device(np.full(max(n, 1), np.nan, dtype=NP[dtype]))


def host(d, *shape):
    return torch.from_numpy(d.copy_to_host()).reshape(shape)


def close(got, want, dtype):
    if not isinstance(got, torch.Tensor):
        got = host(got, *want.shape)
    torch.testing.assert_close(got.double(), want.detach().double(), **TOL[dtype])


# ---------------------------------------------------------------------------- reference steps (torch)

def lstm_cell(G, cprev):
    """G (B, 4H) pre-activations -> h, c (B, H), act (B, 4H)."""
    i, f, g, o = G.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c = f * cprev + i * g
    return o * c.tanh(), c, torch.cat([i, f, g, o], 1)


def gru_cell(xp, a, hprev):
    """xp, a (B, 3H) input and recurrent parts -> h (B, H), act (B, 3H)."""
    xr, xz, xn = xp.chunk(3, 1)
    ar, az, an = a.chunk(3, 1)
    r, z = (xr + ar).sigmoid(), (xz + az).sigmoid()
    n = (xn + r * an).tanh()
    return (1 - z) * n + z * hprev, torch.cat([r, z, n], 1)


def ln(v):
    return F.layer_norm(v, v.shape[-1:], eps=EPS)


def rstd(v):
    return (v.var(-1, unbiased=False) + EPS).rsqrt()


def ln_lstm_cell(xp, gh, w_hh_norm, w_c, b_c, cprev):
    ghat = ln(gh)
    _, c, act = lstm_cell(xp + w_hh_norm * ghat, cprev)
    chat = ln(c)
    y = w_c * chat + b_c
    h = act[:, 3 * c.shape[1]:] * y.tanh()
    return dict(h=h, c=c, act=act, ghat=ghat, chat=chat, y=y, rstd_h=rstd(gh), rstd_c=rstd(c))


def ln_gru_cell(xp, gh, w_hh_norm, b_hh, hprev):
    ghat = ln(gh)
    a = w_hh_norm * ghat + b_hh
    h, act = gru_cell(xp, a, hprev)
    return dict(h=h, act=act, ghat=ghat, a=a, ghn=a[:, 2 * h.shape[1]:], rstd_h=rstd(gh))


def leaves(*ts):
    return [t.clone().requires_grad_() for t in ts]


# ---------------------------------------------------------------------------- one step

@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_step(dtype):
    B, H = 3, 13
    g, cprev, dy, dh, dc = rnd(B, 4 * H, dtype=dtype), *(rnd(B, H, dtype=dtype) for _ in range(4))
    gl, cl = leaves(g, cprev)
    h, c, act = lstm_cell(gl, cl)
    dg_ref, dc_ref = torch.autograd.grad((h, c), (gl, cl), (dy + dh, dc))

    d_c, d_h, d_act = nan_dev(B * H, dtype), nan_dev(B * H, dtype), nan_dev(B * 4 * H, dtype)
    K.lstm_step_forward(dev(g, dtype), dev(cprev, dtype), d_c, d_h, d_act, B, H)
    close(d_h, h, dtype), close(d_c, c, dtype), close(d_act, act, dtype)

    d_dc, d_dg = dev(dc, dtype), nan_dev(B * 4 * H, dtype)
    K.lstm_step_backward(dev(act, dtype), dev(c, dtype), dev(cprev, dtype), dev(dy, dtype), dev(dh, dtype),
                         d_dc, d_dg, B, H)
    close(d_dg, dg_ref, dtype), close(d_dc, dc_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gru_step(dtype):
    B, H = 3, 13
    xp, gh = rnd(B, 3 * H, dtype=dtype), rnd(B, 3 * H, dtype=dtype)
    hprev, dy, dh = (rnd(B, H, dtype=dtype) for _ in range(3))
    xl, gl, hl = leaves(xp, gh, hprev)
    h, act = gru_cell(xl, gl, hl)
    dxp_ref, dgh_ref, dhp_ref = torch.autograd.grad(h, (xl, gl, hl), dy + dh)

    d_h, d_act, d_ghn = nan_dev(B * H, dtype), nan_dev(B * 3 * H, dtype), nan_dev(B * H, dtype)
    K.gru_step_forward(dev(xp, dtype), dev(gh, dtype), dev(hprev, dtype), d_h, d_act, d_ghn, B, H)
    close(d_h, h, dtype), close(d_act, act, dtype), close(d_ghn, gh[:, 2 * H:], dtype)

    d_dxp, d_dgh, d_dhp = nan_dev(B * 3 * H, dtype), nan_dev(B * 3 * H, dtype), nan_dev(B * H, dtype)
    K.gru_step_backward(dev(act, dtype), dev(gh[:, 2 * H:], dtype), dev(hprev, dtype), dev(dy, dtype),
                        dev(dh, dtype), d_dxp, d_dgh, d_dhp, B, H)
    close(d_dxp, dxp_ref, dtype), close(d_dgh, dgh_ref, dtype), close(d_dhp, dhp_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_rnn_step(dtype, relu):
    B, H = 3, 7
    g, dy, dh = (rnd(B, H, dtype=dtype) for _ in range(3))
    (gl,) = leaves(g)
    h = gl.relu() if relu else gl.tanh()
    (dg_ref,) = torch.autograd.grad(h, gl, dy + dh)

    d_h = nan_dev(B * H, dtype)
    K.rnn_step_forward(dev(g, dtype), d_h, B, H, relu)
    close(d_h, h, dtype)
    d_dg = nan_dev(B * H, dtype)
    K.rnn_step_backward(dev(h, dtype), dev(dy, dtype), dev(dh, dtype), d_dg, B, H, relu)
    close(d_dg, dg_ref, dtype)


# threads = 4 < H: a thread owns several units of its row, as at real sizes (H > 256)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,threads", [(3, 13, None), (2, 13, 4)])
def test_ln_lstm_step(dtype, B, H, threads):
    xp, gh, w_hh_norm = rnd(B, 4 * H, dtype=dtype), rnd(B, 4 * H, dtype=dtype), rnd(4 * H, dtype=dtype)
    w_c, b_c = rnd(H, dtype=dtype), rnd(H, dtype=dtype)
    cprev, dy, dh, dc = (rnd(B, H, dtype=dtype) for _ in range(4))
    xl, gl, wl, wcl, bcl, cl = leaves(xp, gh, w_hh_norm, w_c, b_c, cprev)
    r = ln_lstm_cell(xl, gl, wl, wcl, bcl, cl)
    dxp_ref, dgh_ref, dc_ref, dcn_ref, dw_ref, dwc_ref, dbc_ref = torch.autograd.grad(
        (r["h"], r["c"]), (xl, gl, cl, r["y"], wl, wcl, bcl), (dy + dh, dc))

    out = {k: nan_dev(n, dtype) for k, n in dict(c=B * H, h=B * H, act=B * 4 * H, ghat=B * 4 * H, rstd_h=B,
                                                 chat=B * H, rstd_c=B).items()}
    K.ln_lstm_step_forward(dev(xp, dtype), dev(gh, dtype), dev(w_hh_norm, dtype), dev(w_c, dtype),
                           dev(b_c, dtype), dev(cprev, dtype), out["c"], out["h"], out["act"], out["ghat"],
                           out["rstd_h"], out["chat"], out["rstd_c"], B, H, EPS, threads=threads)
    for k in out:
        close(out[k], r[k], dtype)

    d_dc = dev(dc, dtype)
    d_dg, d_dgh, d_dcn = nan_dev(B * 4 * H, dtype), nan_dev(B * 4 * H, dtype), nan_dev(B * H, dtype)
    K.ln_lstm_step_backward(*(dev(r[k], dtype) for k in ("act", "ghat", "rstd_h", "chat", "rstd_c")),
                            dev(cprev, dtype), dev(w_hh_norm, dtype), dev(w_c, dtype), dev(b_c, dtype),
                            dev(dy, dtype), dev(dh, dtype), d_dc, d_dg, d_dgh, d_dcn, B, H, threads=threads)
    dg, dcn = host(d_dg, B, 4 * H), host(d_dcn, B, H)
    close(dg, dxp_ref, dtype), close(d_dgh, dgh_ref, dtype), close(d_dc, dc_ref, dtype)
    close(dcn, dcn_ref, dtype)
    # what the caller sums over rows for the norms' parameters
    close((dg.double() * r["ghat"]).sum(0), dw_ref, dtype)
    close((dcn.double() * r["chat"]).sum(0), dwc_ref, dtype)
    close(dcn.sum(0), dbc_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,threads", [(3, 13, None), (2, 13, 4)])
def test_ln_gru_step(dtype, B, H, threads):
    xp, gh = rnd(B, 3 * H, dtype=dtype), rnd(B, 3 * H, dtype=dtype)
    w_hh_norm, b_hh = rnd(3 * H, dtype=dtype), rnd(3 * H, dtype=dtype)
    hprev, dy, dh = (rnd(B, H, dtype=dtype) for _ in range(3))
    xl, gl, wl, bl, hl = leaves(xp, gh, w_hh_norm, b_hh, hprev)
    r = ln_gru_cell(xl, gl, wl, bl, hl)
    dxp_ref, dgh_ref, dhp_ref, da_ref, dw_ref, db_ref = torch.autograd.grad(
        r["h"], (xl, gl, hl, r["a"], wl, bl), dy + dh)

    out = {k: nan_dev(n, dtype) for k, n in dict(h=B * H, act=B * 3 * H, ghat=B * 3 * H, rstd_h=B,
                                                 ghn=B * H).items()}
    K.ln_gru_step_forward(dev(xp, dtype), dev(gh, dtype), dev(w_hh_norm, dtype), dev(b_hh, dtype),
                          dev(hprev, dtype), out["h"], out["act"], out["ghat"], out["rstd_h"], out["ghn"], B, H, EPS,
                          threads=threads)
    for k in out:
        close(out[k], r[k], dtype)

    d_dxp, d_da, d_dgh = (nan_dev(B * 3 * H, dtype) for _ in range(3))
    d_dhp = nan_dev(B * H, dtype)
    K.ln_gru_step_backward(*(dev(r[k], dtype) for k in ("act", "ghat", "rstd_h", "ghn")), dev(hprev, dtype),
                           dev(w_hh_norm, dtype), dev(dy, dtype), dev(dh, dtype), d_dxp, d_da, d_dgh, d_dhp, B, H,
                           threads=threads)
    da = host(d_da, B, 3 * H)
    close(d_dxp, dxp_ref, dtype), close(d_dgh, dgh_ref, dtype), close(d_dhp, dhp_ref, dtype)
    close(da, da_ref, dtype)
    close((da.double() * r["ghat"]).sum(0), dw_ref, dtype)
    close(da.sum(0), db_ref, dtype)


def test_carries_may_alias():
    """c may overwrite cprev and h hprev in the forward, dhp may overwrite dh in the backward."""
    dtype, B, H = torch.float64, 2, 5
    g, cprev = rnd(B, 4 * H), rnd(B, H)
    h, c, act = lstm_cell(g, cprev)
    d_c = dev(cprev, dtype)
    K.lstm_step_forward(dev(g, dtype), d_c, d_c, nan_dev(B * H, dtype), nan_dev(B * 4 * H, dtype), B, H)
    close(d_c, c, dtype)

    xp, gh, w, b = rnd(B, 3 * H), rnd(B, 3 * H), rnd(3 * H), rnd(3 * H)
    hprev, dy, dh = rnd(B, H), rnd(B, H), rnd(B, H)
    xl, gl, hl = leaves(xp, gh, hprev)
    h, act = gru_cell(xl, gl, hl)
    _, _, dhp_ref = torch.autograd.grad(h, (xl, gl, hl), dy + dh)
    d_h = dev(hprev, dtype)
    K.gru_step_forward(dev(xp, dtype), dev(gh, dtype), d_h, d_h, nan_dev(B * 3 * H, dtype), nan_dev(B * H, dtype),
                       B, H)
    close(d_h, h, dtype)
    d_dh = dev(dh, dtype)
    K.gru_step_backward(dev(act, dtype), dev(gh[:, 2 * H:], dtype), dev(hprev, dtype), dev(dy, dtype), d_dh,
                        nan_dev(B * 3 * H, dtype), nan_dev(B * 3 * H, dtype), d_dh, B, H)
    close(d_dh, dhp_ref, dtype)

    r = ln_gru_cell(xp, gh, w, b, hprev)
    d_h = dev(hprev, dtype)
    K.ln_gru_step_forward(dev(xp, dtype), dev(gh, dtype), dev(w, dtype), dev(b, dtype), d_h, d_h,
                          *(nan_dev(n, dtype) for n in (B * 3 * H, B * 3 * H, B, B * H)), B, H, EPS)
    close(d_h, r["h"], dtype)

    gh4, w4, wc, bc = rnd(B, 4 * H), rnd(4 * H), rnd(H), rnd(H)
    d_c = dev(cprev, dtype)
    K.ln_lstm_step_forward(dev(g, dtype), dev(gh4, dtype), dev(w4, dtype), dev(wc, dtype), dev(bc, dtype),
                           d_c, d_c, *(nan_dev(n, dtype) for n in (B * H, B * 4 * H, B * 4 * H, B, B * H, B)),
                           B, H, EPS)
    close(d_c, ln_lstm_cell(g, gh4, w4, wc, bc, cprev)["c"], dtype)


def test_empty_batch_launches_nothing():
    dtype, H = torch.float32, 5
    a = [nan_dev(1, dtype) for _ in range(15)]
    K.lstm_step_forward(*a[:5], 0, H)
    K.lstm_step_backward(*a[:7], 0, H)
    K.gru_step_forward(*a[:6], 0, H)
    K.gru_step_backward(*a[:8], 0, H)
    K.rnn_step_forward(*a[:2], 0, H, False)
    K.rnn_step_backward(*a[:4], 0, H, True)
    K.ln_lstm_step_forward(*a[:13], 0, H, EPS)
    K.ln_lstm_step_backward(*a[:15], 0, H)
    K.ln_gru_step_forward(*a[:10], 0, H, EPS)
    K.ln_gru_step_backward(*a[:12], 0, H)
    assert all(np.isnan(x.copy_to_host()).all() for x in a)
    with pytest.raises(ValueError, match="power of two"):
        K.ln_gru_step_forward(*a[:10], 1, H, EPS, threads=48)


# ---------------------------------------------------------------------------- T steps

T, B_SEQ, C = 3, 2, 4


def seq_data(dtype, H, G, extra=()):
    """x (T, B, C), h0, c0 (B, H), W_ih (G H, C), W_hh (G H, H), the output gradients dY (T, B, H),
    dhT, dcT (B, H), and `extra` named parameter shapes; all float64 leaves, dtype-representable."""
    B = B_SEQ
    d = dict(x=(T, B, C), h0=(B, H), c0=(B, H), W_ih=(G * H, C), W_hh=(G * H, H), **dict(extra))
    p = {k: rnd(*s, dtype=dtype).requires_grad_() for k, s in d.items()}
    grads = dict(dY=rnd(T, B, H, dtype=dtype), dhT=rnd(B, H, dtype=dtype), dcT=rnd(B, H, dtype=dtype))
    return p, grads


def ref_grads(p, grads, ys, hT, cT=None):
    """Autograd of sum(ys dY) + sum(hT dhT) (+ sum(cT dcT)) w.r.t. every parameter in p."""
    loss = (ys * grads["dY"]).sum() + (hT * grads["dhT"]).sum()
    if cT is not None:
        loss = loss + (cT * grads["dcT"]).sum()
    return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))


def input_grads(xp, q, dxp):
    """The caller's input part (torch, through autograd) given the kernels' gradient at xp."""
    return dict(zip(q, torch.autograd.grad(xp, list(q.values()), dxp)))


def check_seq(dtype, ref_ys, ys, ref, got):
    close(torch.stack(ys), ref_ys, dtype)
    for k, v in ref.items():
        assert k in got, k
        close(got[k], v, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_sequence(dtype):
    H, B = 5, B_SEQ
    p, gr = seq_data(dtype, H, 4, dict(b_ih=(4 * H,), b_hh=(4 * H,)))
    h, c, ys = p["h0"], p["c0"], []
    for t in range(T):
        h, c, _ = lstm_cell(p["x"][t] @ p["W_ih"].T + p["b_ih"] + p["b_hh"] + h @ p["W_hh"].T, c)
        ys.append(h)
    ref_ys = torch.stack(ys)
    ref = ref_grads(p, gr, ref_ys, h, c)

    q = {k: p[k].detach().to(dtype).requires_grad_() for k in ("x", "W_ih", "b_ih", "b_hh")}
    xp = q["x"] @ q["W_ih"].T + q["b_ih"] + q["b_hh"]                           # (T, B, 4H)
    W_hh, h0 = p["W_hh"].detach().to(dtype), p["h0"].detach().to(dtype)
    hs, cs, acts = [], [dev(p["c0"], dtype)], []
    h = h0
    for t in range(T):
        g = xp[t].detach() + h @ W_hh.T                                          # (B, 4H)
        d_c, d_h, d_act = nan_dev(B * H, dtype), nan_dev(B * H, dtype), nan_dev(B * 4 * H, dtype)
        K.lstm_step_forward(dev(g, dtype), cs[-1], d_c, d_h, d_act, B, H)
        h = host(d_h, B, H)
        hs.append(h), cs.append(d_c), acts.append(d_act)
    dxp, dW_hh = torch.empty(T, B, 4 * H, dtype=dtype), torch.zeros_like(W_hh)
    dh, d_dc = gr["dhT"].to(dtype), dev(gr["dcT"], dtype)
    for t in reversed(range(T)):
        d_dg = nan_dev(B * 4 * H, dtype)
        K.lstm_step_backward(acts[t], cs[t + 1], cs[t], dev(gr["dY"][t], dtype), dev(dh, dtype), d_dc, d_dg, B, H)
        dg = host(d_dg, B, 4 * H)
        dxp[t] = dg
        dW_hh += dg.T @ (hs[t - 1] if t else h0)
        dh = dg @ W_hh
    got = dict(input_grads(xp, q, dxp), W_hh=dW_hh, h0=dh, c0=host(d_dc, B, H))
    check_seq(dtype, ref_ys, hs, ref, got)
    close(cs[-1], c, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gru_sequence(dtype):
    H, B = 7, B_SEQ
    p, gr = seq_data(dtype, H, 3, dict(b_ih=(3 * H,), b_hh=(3 * H,)))
    del p["c0"]
    h, ys = p["h0"], []
    for t in range(T):
        h, _ = gru_cell(p["x"][t] @ p["W_ih"].T + p["b_ih"], h @ p["W_hh"].T + p["b_hh"], h)
        ys.append(h)
    ref_ys = torch.stack(ys)
    ref = ref_grads(p, gr, ref_ys, h)

    q = {k: p[k].detach().to(dtype).requires_grad_() for k in ("x", "W_ih", "b_ih")}
    xp = q["x"] @ q["W_ih"].T + q["b_ih"]                                         # (T, B, 3H)
    W_hh, b_hh, h0 = (p[k].detach().to(dtype) for k in ("W_hh", "b_hh", "h0"))
    hs, saved = [h0], []
    for t in range(T):
        gh = hs[-1] @ W_hh.T + b_hh                                              # (B, 3H)
        d_h, d_act, d_ghn = nan_dev(B * H, dtype), nan_dev(B * 3 * H, dtype), nan_dev(B * H, dtype)
        K.gru_step_forward(dev(xp[t], dtype), dev(gh, dtype), dev(hs[-1], dtype), d_h, d_act, d_ghn, B, H)
        hs.append(host(d_h, B, H)), saved.append((d_act, d_ghn))
    dxp, dW_hh, db_hh = torch.empty(T, B, 3 * H, dtype=dtype), torch.zeros_like(W_hh), torch.zeros_like(b_hh)
    dh = gr["dhT"].to(dtype)
    for t in reversed(range(T)):
        d_dxp, d_dgh, d_dhp = nan_dev(B * 3 * H, dtype), nan_dev(B * 3 * H, dtype), nan_dev(B * H, dtype)
        K.gru_step_backward(*saved[t], dev(hs[t], dtype), dev(gr["dY"][t], dtype), dev(dh, dtype),
                            d_dxp, d_dgh, d_dhp, B, H)
        dgh = host(d_dgh, B, 3 * H)
        dxp[t] = host(d_dxp, B, 3 * H)
        dW_hh += dgh.T @ hs[t]
        db_hh += dgh.sum(0)
        dh = host(d_dhp, B, H) + dgh @ W_hh
    got = dict(input_grads(xp, q, dxp), W_hh=dW_hh, b_hh=db_hh, h0=dh)
    check_seq(dtype, ref_ys, hs[1:], ref, got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_rnn_sequence(dtype, relu):
    H, B = 5, B_SEQ
    p, gr = seq_data(dtype, H, 1, dict(b_ih=(H,), b_hh=(H,)))
    del p["c0"]
    act = torch.relu if relu else torch.tanh
    h, ys = p["h0"], []
    for t in range(T):
        h = act(p["x"][t] @ p["W_ih"].T + p["b_ih"] + p["b_hh"] + h @ p["W_hh"].T)
        ys.append(h)
    ref_ys = torch.stack(ys)
    ref = ref_grads(p, gr, ref_ys, h)

    q = {k: p[k].detach().to(dtype).requires_grad_() for k in ("x", "W_ih", "b_ih", "b_hh")}
    xp = q["x"] @ q["W_ih"].T + q["b_ih"] + q["b_hh"]                           # (T, B, H)
    W_hh, h0 = p["W_hh"].detach().to(dtype), p["h0"].detach().to(dtype)
    hs = [h0]
    for t in range(T):
        d_h = nan_dev(B * H, dtype)
        K.rnn_step_forward(dev(xp[t].detach() + hs[-1] @ W_hh.T, dtype), d_h, B, H, relu)
        hs.append(host(d_h, B, H))
    dxp, dW_hh, dh = torch.empty(T, B, H, dtype=dtype), torch.zeros_like(W_hh), gr["dhT"].to(dtype)
    for t in reversed(range(T)):
        d_dg = nan_dev(B * H, dtype)
        K.rnn_step_backward(dev(hs[t + 1], dtype), dev(gr["dY"][t], dtype), dev(dh, dtype), d_dg, B, H, relu)
        dg = host(d_dg, B, H)
        dxp[t] = dg
        dW_hh += dg.T @ hs[t]
        dh = dg @ W_hh
    got = dict(input_grads(xp, q, dxp), W_hh=dW_hh, h0=dh)
    check_seq(dtype, ref_ys, hs[1:], ref, got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ln_lstm_sequence(dtype):
    H, B = 5, B_SEQ
    p, gr = seq_data(dtype, H, 4, dict(w_ih_norm=(4 * H,), b=(4 * H,), w_hh_norm=(4 * H,), w_c=(H,), b_c=(H,)))
    xp_ref = ln(p["x"] @ p["W_ih"].T) * p["w_ih_norm"] + p["b"]                  # (T, B, 4H)
    h, c, ys = p["h0"], p["c0"], []
    for t in range(T):
        r = ln_lstm_cell(xp_ref[t], h @ p["W_hh"].T, p["w_hh_norm"], p["w_c"], p["b_c"], c)
        h, c = r["h"], r["c"]
        ys.append(h)
    ref_ys = torch.stack(ys)
    ref = ref_grads(p, gr, ref_ys, h, c)

    q = {k: p[k].detach().to(dtype).requires_grad_() for k in ("x", "W_ih", "w_ih_norm", "b")}
    xp = ln(q["x"] @ q["W_ih"].T) * q["w_ih_norm"] + q["b"]                      # (T, B, 4H)
    W_hh, h0 = p["W_hh"].detach().to(dtype), p["h0"].detach().to(dtype)
    w_hh_norm, w_c, b_c = (dev(p[k], dtype) for k in ("w_hh_norm", "w_c", "b_c"))
    hs, cs, saved = [h0], [dev(p["c0"], dtype)], []
    for t in range(T):
        gh = hs[-1] @ W_hh.T                                                     # (B, 4H)
        s = dict(act=nan_dev(B * 4 * H, dtype), ghat=nan_dev(B * 4 * H, dtype), rstd_h=nan_dev(B, dtype),
                 chat=nan_dev(B * H, dtype), rstd_c=nan_dev(B, dtype))
        d_c, d_h = nan_dev(B * H, dtype), nan_dev(B * H, dtype)
        K.ln_lstm_step_forward(dev(xp[t], dtype), dev(gh, dtype), w_hh_norm, w_c, b_c, cs[-1], d_c, d_h, s["act"],
                               s["ghat"], s["rstd_h"], s["chat"], s["rstd_c"], B, H, EPS)
        hs.append(host(d_h, B, H)), cs.append(d_c), saved.append(s)
    dxp, dW_hh = torch.empty(T, B, 4 * H, dtype=dtype), torch.zeros_like(W_hh)
    dw_hh_norm, dw_c, db_c = torch.zeros(4 * H, dtype=dtype), torch.zeros(H, dtype=dtype), torch.zeros(H, dtype=dtype)
    dh, d_dc = gr["dhT"].to(dtype), dev(gr["dcT"], dtype)
    for t in reversed(range(T)):
        s = saved[t]
        d_dg, d_dgh, d_dcn = nan_dev(B * 4 * H, dtype), nan_dev(B * 4 * H, dtype), nan_dev(B * H, dtype)
        K.ln_lstm_step_backward(s["act"], s["ghat"], s["rstd_h"], s["chat"], s["rstd_c"], cs[t], w_hh_norm, w_c,
                                b_c, dev(gr["dY"][t], dtype), dev(dh, dtype), d_dc, d_dg, d_dgh, d_dcn, B, H)
        dg, dgh, dcn = host(d_dg, B, 4 * H), host(d_dgh, B, 4 * H), host(d_dcn, B, H)
        dxp[t] = dg
        dw_hh_norm += (dg * host(s["ghat"], B, 4 * H)).sum(0)
        dw_c += (dcn * host(s["chat"], B, H)).sum(0)
        db_c += dcn.sum(0)
        dW_hh += dgh.T @ hs[t]
        dh = dgh @ W_hh
    got = dict(input_grads(xp, q, dxp), W_hh=dW_hh, w_hh_norm=dw_hh_norm, w_c=dw_c, b_c=db_c, h0=dh,
               c0=host(d_dc, B, H))
    check_seq(dtype, ref_ys, hs[1:], ref, got)
    close(cs[-1], c, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ln_gru_sequence(dtype):
    H, B = 7, B_SEQ
    p, gr = seq_data(dtype, H, 3, dict(w_ih_norm=(3 * H,), b_ih=(3 * H,), w_hh_norm=(3 * H,), b_hh=(3 * H,)))
    del p["c0"]
    xp_ref = ln(p["x"] @ p["W_ih"].T) * p["w_ih_norm"] + p["b_ih"]               # (T, B, 3H)
    h, ys = p["h0"], []
    for t in range(T):
        h = ln_gru_cell(xp_ref[t], h @ p["W_hh"].T, p["w_hh_norm"], p["b_hh"], h)["h"]
        ys.append(h)
    ref_ys = torch.stack(ys)
    ref = ref_grads(p, gr, ref_ys, h)

    q = {k: p[k].detach().to(dtype).requires_grad_() for k in ("x", "W_ih", "w_ih_norm", "b_ih")}
    xp = ln(q["x"] @ q["W_ih"].T) * q["w_ih_norm"] + q["b_ih"]                   # (T, B, 3H)
    W_hh, h0 = p["W_hh"].detach().to(dtype), p["h0"].detach().to(dtype)
    w_hh_norm, b_hh = dev(p["w_hh_norm"], dtype), dev(p["b_hh"], dtype)
    hs, saved = [h0], []
    for t in range(T):
        gh = hs[-1] @ W_hh.T                                                     # (B, 3H)
        s = dict(act=nan_dev(B * 3 * H, dtype), ghat=nan_dev(B * 3 * H, dtype), rstd_h=nan_dev(B, dtype),
                 ghn=nan_dev(B * H, dtype))
        d_h = nan_dev(B * H, dtype)
        K.ln_gru_step_forward(dev(xp[t], dtype), dev(gh, dtype), w_hh_norm, b_hh, dev(hs[-1], dtype), d_h,
                              s["act"], s["ghat"], s["rstd_h"], s["ghn"], B, H, EPS)
        hs.append(host(d_h, B, H)), saved.append(s)
    dxp, dW_hh = torch.empty(T, B, 3 * H, dtype=dtype), torch.zeros_like(W_hh)
    dw_hh_norm, db_hh = torch.zeros(3 * H, dtype=dtype), torch.zeros(3 * H, dtype=dtype)
    dh = gr["dhT"].to(dtype)
    for t in reversed(range(T)):
        s = saved[t]
        d_dxp, d_da, d_dgh = (nan_dev(B * 3 * H, dtype) for _ in range(3))
        d_dhp = nan_dev(B * H, dtype)
        K.ln_gru_step_backward(s["act"], s["ghat"], s["rstd_h"], s["ghn"], dev(hs[t], dtype), w_hh_norm,
                               dev(gr["dY"][t], dtype), dev(dh, dtype), d_dxp, d_da, d_dgh, d_dhp, B, H)
        da, dgh = host(d_da, B, 3 * H), host(d_dgh, B, 3 * H)
        dxp[t] = host(d_dxp, B, 3 * H)
        dw_hh_norm += (da * host(s["ghat"], B, 3 * H)).sum(0)
        db_hh += da.sum(0)
        dW_hh += dgh.T @ hs[t]
        dh = host(d_dhp, B, H) + dgh @ W_hh
    got = dict(input_grads(xp, q, dxp), W_hh=dW_hh, w_hh_norm=dw_hh_norm, b_hh=db_hh, h0=dh)
    check_seq(dtype, ref_ys, hs[1:], ref, got)


# ---------------------------------------------------------------------------- the GPU time loops end to end

@pytest.fixture
def gpu_loops(monkeypatch):
    """fastseq.recurrent with dispatch answering "cuda" for CPU tensors: the GPU's table of time
    loops (fastseq/recurrent/cuda.py: torch GEMMs plus the simulator's step kernels) runs, in
    torch's gate order as on a GPU, through the same Functions and the same ctx.backend."""
    import fastseq.recurrent.functional as RF

    real = RF.choose
    monkeypatch.setattr(RF, "choose", lambda cell, x, proj=False: "cuda" if real(cell, x, proj) == "cpu" else
                        real(cell, x, proj))
    return RF


MODULES = {"LSTM": (torch.nn.LSTM, {}), "GRU": (torch.nn.GRU, {}), "RNN_TANH": (torch.nn.RNN, {}),
           "RNN_RELU": (torch.nn.RNN, {"nonlinearity": "relu"})}


def _loss_and_grads(m, x, packed_lengths=None):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    inp = pack_padded_sequence(x, packed_lengths, enforce_sorted=False) if packed_lengths is not None else x
    out, st = m(inp)
    if packed_lengths is not None:
        out = pad_packed_sequence(out)[0]
    states = st if isinstance(st, tuple) else (st,)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + \
        sum((s * s).sum() for s in states)
    return [out, *states, *torch.autograd.grad(loss, [x] + list(m.parameters()))]


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gpu_loops_modules_match_torch(gpu_loops, kind, packed):
    import fastseq
    torch_cls, extra = MODULES[kind]
    ref = torch_cls(3, 5, num_layers=2, bidirectional=True, **extra).double()
    fast = getattr(fastseq.nn, torch_cls.__name__)(3, 5, num_layers=2, bidirectional=True, **extra).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 3]) if packed else None
    for g, e in zip(_loss_and_grads(fast, x, lengths), _loss_and_grads(ref, x, lengths)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["LayerNormLSTM", "LayerNormGRU"])
def test_gpu_loops_layer_norm_modules_match_the_cpu(gpu_loops, kind):
    import fastseq
    m = getattr(fastseq.nn, kind)(3, 5).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    got = _loss_and_grads(m, x, torch.tensor([3, 2]))
    with fastseq.use_backend("torch"):                    # the step-by-step reference
        exp = _loss_and_grads(m, x, torch.tensor([3, 2]))
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- autocast on the GPU path

def test_autocast_cuda_cannot_be_entered_here_so_its_decision_is_tested_directly(monkeypatch):
    """torch.autocast("cuda") needs a CUDA device: without one torch disables it (with a warning),
    so the simulator cannot run a GPU autocast region.  The decision the GPU path makes under it is
    tested directly: with autocast reported on for "cuda", the plain cells' cuda backend declines
    (torch's own op runs and returns torch's dtypes) and the layer-normalized cells' does not
    (they run in the parameters' dtype with autocast off)."""
    import warnings

    from fastseq import _dispatch
    from fastseq.recurrent import functional as RF
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cuda", dtype=torch.float16):
            assert not torch.is_autocast_enabled("cuda")
    real = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda dev=None: dev == "cuda" or real(dev))
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda dev: torch.float16)
    assert RF.autocast_on("cuda") and not RF.autocast_on("cpu") and not RF.autocast_on("meta")
    for op, ln in (("lstm_layer", False), ("gru_layer", False), ("rnn_layer", False),
                   ("layer_norm_lstm_layer", True), ("layer_norm_gru_layer", True)):
        facts = RF._facts_of(op, "cuda", torch.float32, RF.autocast_on("cuda") and not ln)
        why = _dispatch._REGISTRY[op].reasons["cuda"](facts)
        assert (why == ["autocast (float16) is on: torch's own op runs, to return torch's dtypes"]) != ln, (op, why)


@pytest.mark.parametrize("kind", ["GRU", "RNN", "GRUCell", "RNNCell", "LSTMCell"])
def test_gpu_loops_under_autocast_fp16_run_torchs_own_forward(gpu_loops, monkeypatch, kind):
    """With dispatch answering "cuda" (the GPU loops), fp16 autocast (on the CPU, the only device
    here) sends the modules with a torch twin to torch's own forward: torch's dtypes and values."""
    import fastseq
    ref = getattr(torch.nn, kind)(3, 5)
    fast = fastseq.convert(getattr(torch.nn, kind)(3, 5))
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(*((2, 3) if "Cell" in kind else (4, 2, 3)), requires_grad=True)
    from fastseq.recurrent import functions
    calls = []
    for name in ("gru_forward", "rnn_forward", "lstm_forward", "lstm_infer"):
        real = getattr(functions.LOOPS["cuda"], name)
        monkeypatch.setattr(functions.LOOPS["cuda"], name, (lambda f: lambda *a: calls.append(f) or f(*a))(real))
    with torch.autocast("cpu", dtype=torch.float16):
        got, exp = fast(x), ref(x)
    flat = lambda o: [o] if isinstance(o, torch.Tensor) else [t for s in o for t in flat(s)]   # noqa: E731
    assert [t.dtype for t in flat(got)] == [t.dtype for t in flat(exp)]
    for g, e in zip(flat(got), flat(exp)):
        torch.testing.assert_close(g, e)
    assert calls == []
    fast(x)                                                   # autocast off: the GPU loops again
    assert calls


@pytest.mark.parametrize("kind", ["LayerNormLSTM", "LayerNormGRU"])
def test_gpu_loops_layer_norm_cells_under_autocast_fp16_run_in_fp32(gpu_loops, kind):
    import fastseq
    m = getattr(fastseq.nn, kind)(3, 5)
    x = torch.randn(4, 2, 3).half().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        out, st = m(x)
    exp, _ = m(x.detach().float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exp)
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert gx.dtype == torch.float16
