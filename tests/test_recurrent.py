"""The recurrent family against torch.nn (LSTM, GRU, RNN and their cells) and against the
step-by-step reference (the layer-normalized cells): outputs, final states and every gradient,
fp32 and fp64, padded and packed (unsorted lengths), every constructor option; gradcheck of every
fused layer; drop-in state_dicts and convert(); state across chunks; NaN; bad input."""
import copy
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq
from fastseq import functional as FF
from fastseq.recurrent import lstm_ref, recurrent_ref

from _recurrent_helpers import LN, ln_module, params as _params

DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def poison(poison, monkeypatch):
    """conftest's poison, plus the recurrent CPU loops' own outputs (NumPy-allocated) start as NaN."""
    import numpy as np

    from fastseq.recurrent import cpu
    monkeypatch.setattr(cpu, "np_empty", lambda shape, dtype: np.full(shape, np.nan, dtype))
    yield


def tol(dtype):
    return dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)


TWINS = {"LSTM": (torch.nn.LSTM, fastseq.nn.LSTM, {}), "GRU": (torch.nn.GRU, fastseq.nn.GRU, {}),
         "RNN_TANH": (torch.nn.RNN, fastseq.nn.RNN, {}),
         "RNN_RELU": (torch.nn.RNN, fastseq.nn.RNN, {"nonlinearity": "relu"})}


def pair(kind, C, H, dtype, **kw):
    """A torch.nn module and its fastseq twin loaded from its state_dict."""
    torch_cls, fast_cls, extra = TWINS[kind]
    ref = torch_cls(C, H, **extra, **kw).to(dtype)
    fast = fast_cls(C, H, **extra, **kw).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def run(module, x, hx=None, lengths=None, batch_first=False):
    """Forward (packed when lengths are given) and a weighted loss over the output and states;
    returns the output (padded), the states and the gradients of input, hx and every parameter."""
    inp = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False) if lengths is not None \
        else x
    out, state = module(inp, hx)
    if lengths is not None:
        out = pad_packed_sequence(out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0])[0]
    states = state if isinstance(state, tuple) else (state,)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * w).sum() + sum((s * s.detach().sin()).sum() for s in states)
    leaves = [x] + ([] if hx is None else list(hx if isinstance(hx, tuple) else (hx,))) + list(module.parameters())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [out, *states, *grads]


def assert_all_close(got, exp, dtype):
    for i, (g, e) in enumerate(zip(got, exp)):
        if e is None:
            assert g is None or not g.abs().max() > 0, f"item {i}: expected no gradient"
            continue
        torch.testing.assert_close(g, e, **tol(dtype), msg=lambda m: f"item {i}: {m}")


# ---------------------------------------------------------------------------- drop-ins vs torch.nn

OPTIONS = list(itertools.product([1, 2], [True, False], [False, True], [False, True]))   # layers, bias, bf, bi


@pytest.mark.parametrize("kind", list(TWINS))
@pytest.mark.parametrize("layers,bias,batch_first,bidirectional", OPTIONS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_module_matches_torch(poison, kind, layers, bias, batch_first, bidirectional, packed):
    dtype = torch.float64
    ref, fast = pair(kind, 5, 13, dtype, num_layers=layers, bias=bias, batch_first=batch_first,
                     bidirectional=bidirectional)
    T, B = 7, 4
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5), dtype=dtype, requires_grad=True)
    lengths = torch.tensor([3, 7, 5, 1]) if packed else None
    dirs = 2 if bidirectional else 1
    h = torch.randn(layers * dirs, B, 13, dtype=dtype, requires_grad=True)
    hx = (h, torch.randn_like(h).requires_grad_()) if kind == "LSTM" else h
    assert_all_close(run(fast, x, hx, lengths, batch_first), run(ref, x, hx, lengths, batch_first), dtype)


@pytest.mark.parametrize("kind", list(TWINS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,C,H", [(7, 3, 11, 13), (1, 2, 5, 4), (20, 1, 16, 32), (5, 4, 781, 59)])
def test_awkward_sizes_and_dtypes(poison, kind, dtype, T, B, C, H):
    ref, fast = pair(kind, C, H, dtype)
    x = torch.randn(T, B, C, dtype=dtype, requires_grad=True)
    assert_all_close(run(fast, x), run(ref, x), dtype)


@pytest.mark.parametrize("kind", list(TWINS))
def test_unbatched_input_and_default_state(kind):
    ref, fast = pair(kind, 6, 8, torch.float64, num_layers=2)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert_all_close(run(fast, x), run(ref, x), torch.float64)
    h = torch.randn(2, 8, dtype=torch.float64)
    hx = (h, torch.randn_like(h)) if kind == "LSTM" else h
    out_f, st_f = fast(x, hx)
    out_r, st_r = ref(x, hx)
    torch.testing.assert_close(out_f, out_r)
    for a, b in zip(st_f if kind == "LSTM" else (st_f,), st_r if kind == "LSTM" else (st_r,)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", list(TWINS))
def test_dropout_between_layers_draws_as_torch(kind):
    """Dropout between layers in training mode uses torch's generator the same way as torch.nn."""
    ref, fast = pair(kind, 6, 8, torch.float64, num_layers=3, dropout=0.5)
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    torch.manual_seed(7)
    out_r = ref(x)[0]
    torch.manual_seed(7)
    out_f = fast(x)[0]
    torch.testing.assert_close(out_f, out_r)
    fast.eval()
    ref.eval()
    torch.testing.assert_close(fast(x)[0], ref(x)[0])


@pytest.mark.parametrize("kind", list(TWINS))
def test_state_carried_across_chunks(kind):
    """Running a sequence in two chunks, feeding the first chunk's final state to the second,
    equals one run, forward and gradients (truncated BPTT keeps working)."""
    _, fast = pair(kind, 6, 8, torch.float64, num_layers=2, bidirectional=False)
    x = torch.randn(9, 3, 6, dtype=torch.float64, requires_grad=True)
    whole, st = fast(x)
    a, st_a = fast(x[:4])
    b, st_b = fast(x[4:], st_a)
    torch.testing.assert_close(torch.cat([a, b]), whole)
    for u, v in zip(st_b if kind == "LSTM" else (st_b,), st if kind == "LSTM" else (st,)):
        torch.testing.assert_close(u, v)
    g1 = torch.autograd.grad(whole.sum(), [x] + list(fast.parameters()))
    g2 = torch.autograd.grad(torch.cat([a, b]).sum(), [x] + list(fast.parameters()))
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v)


def test_packed_sorted_lengths_and_enforce_sorted():
    ref, fast = pair("LSTM", 5, 7, torch.float64)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 2])
    p = pack_padded_sequence(x, lengths)                        # enforce_sorted=True: no permutation
    (out_f, (h_f, c_f)), (out_r, (h_r, c_r)) = fast(p), ref(p)
    assert out_f.sorted_indices is None
    torch.testing.assert_close(out_f.data, out_r.data)
    torch.testing.assert_close(h_f, h_r)
    torch.testing.assert_close(c_f, c_r)
    torch.testing.assert_close(out_f.batch_sizes, out_r.batch_sizes)


def test_packed_input_costs_only_its_rows(monkeypatch):
    """The kernel sees the packed rows only: sum of the lengths, not T * B."""
    import fastseq.recurrent as R
    seen = []
    real = R.LSTMLayerFunction.compute

    def spy(backend, offs, ub, xp, *args, **kwargs):
        seen.append(xp.shape[0])
        return real(backend, offs, ub, xp, *args, **kwargs)
    monkeypatch.setattr(R.LSTMLayerFunction, "compute", staticmethod(spy))
    x = torch.randn(50, 4, 3)
    fastseq.nn.LSTM(3, 5)(pack_padded_sequence(x, torch.tensor([50, 2, 3, 1]), enforce_sorted=False))
    assert seen == [56]


def test_functional_lengths_match_packed_torch():
    ref = torch.nn.GRU(4, 6).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    lengths = torch.tensor([2, 5, 3])
    y, h = FF.gru_layer(x, None, *ref.parameters(), lengths=lengths)
    y_r, h_r = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
    torch.testing.assert_close(y, pad_packed_sequence(y_r)[0])
    torch.testing.assert_close(h, h_r[0])


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_proj_size_matches_torch(poison, layers, bidirectional, packed, dtype):
    """proj_size: h_t = (o tanh(c_t)) W_hr^T recurs and is output (P wide), c stays H wide."""
    ref = torch.nn.LSTM(5, 13, num_layers=layers, bidirectional=bidirectional, proj_size=4).to(dtype)
    fast = fastseq.nn.LSTM(5, 13, num_layers=layers, bidirectional=bidirectional, proj_size=4).to(dtype)
    fast.load_state_dict(ref.state_dict())
    dirs = 2 if bidirectional else 1
    x = torch.randn(7, 3, 5, dtype=dtype, requires_grad=True)
    h0 = torch.randn(layers * dirs, 3, 4, dtype=dtype, requires_grad=True)
    c0 = torch.randn(layers * dirs, 3, 13, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([4, 7, 2]) if packed else None
    assert_all_close(run(fast, x, (h0, c0), lengths), run(ref, x, (h0, c0), lengths), dtype)
    with pytest.raises(ValueError, match=r"expected hx\[0\] of shape \[%d, 3, 4\].*proj_size" % (layers * dirs)):
        fast(x, (c0, c0))


# ---------------------------------------------------------------------------- cells

CELLS = {"LSTMCell": (torch.nn.LSTMCell, fastseq.nn.LSTMCell, {}), "GRUCell": (torch.nn.GRUCell, fastseq.nn.GRUCell, {}),
         "RNNCell": (torch.nn.RNNCell, fastseq.nn.RNNCell, {}),
         "RNNCell_relu": (torch.nn.RNNCell, fastseq.nn.RNNCell, {"nonlinearity": "relu"})}


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cells_match_torch(poison, kind, bias, batched, dtype):
    torch_cls, fast_cls, extra = CELLS[kind]
    ref = torch_cls(7, 19, bias=bias, **extra).to(dtype)
    fast = fast_cls(7, 19, bias=bias, **extra).to(dtype)
    fast.load_state_dict(ref.state_dict())
    shape = (3,) if batched else ()
    x = torch.randn(*shape, 7, dtype=dtype, requires_grad=True)
    h = torch.randn(*shape, 19, dtype=dtype, requires_grad=True)
    hx = (h, torch.randn_like(h).requires_grad_()) if kind == "LSTMCell" else h
    for state in (None, hx):
        got, exp = fast(x, state), ref(x, state)
        got, exp = (got, exp) if kind == "LSTMCell" else ((got,), (exp,))
        leaves = [x] + ([] if state is None else list(state if kind == "LSTMCell" else (state,))) + \
            list(ref.parameters())
        gf = torch.autograd.grad(sum((g * g.detach().cos()).sum() for g in got), leaves[:len(leaves) - len(
            list(ref.parameters()))] + list(fast.parameters()))
        gr = torch.autograd.grad(sum((e * e.detach().cos()).sum() for e in exp), leaves)
        assert_all_close(list(got) + list(gf), list(exp) + list(gr), dtype)


# ---------------------------------------------------------------------------- layer-normalized cells


@pytest.mark.parametrize("kind", list(LN))
@pytest.mark.parametrize("layers,bias,batch_first,bidirectional", OPTIONS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_layer_norm_modules_match_the_reference(poison, kind, layers, bias, batch_first, bidirectional, packed):
    dtype = torch.float64
    m = ln_module(kind, 5, 13, dtype, num_layers=layers, bias=bias, batch_first=batch_first,
                  bidirectional=bidirectional)
    T, B = 6, 3
    x = torch.randn((B, T, 5) if batch_first else (T, B, 5), dtype=dtype, requires_grad=True)
    lengths = torch.tensor([2, 6, 4]) if packed else None
    got = run(m, x, None, lengths, batch_first)
    with fastseq.use_backend("torch"):          # the step-by-step reference with nn.functional.layer_norm
        exp = run(m, x, None, lengths, batch_first)
    assert_all_close(got, exp, dtype)


@pytest.mark.parametrize("kind", list(LN))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,C,H", [(7, 3, 11, 13), (20, 1, 16, 32), (3, 4, 781, 59)])
def test_layer_norm_cells_sizes_and_dtypes(poison, kind, dtype, T, B, C, H):
    """Against the reference run in float64 (the norms divide by row deviations, which magnifies
    fp32 rounding in the weight gradients: fp32 is held to 1e-3 relative, 1e-4 absolute)."""
    m = ln_module(kind, C, H, dtype)
    x = torch.randn(T, B, C, dtype=dtype, requires_grad=True)
    h = torch.randn(1, B, H, dtype=dtype, requires_grad=True)
    hx = (h, torch.randn_like(h).requires_grad_()) if kind == "LayerNormLSTM" else h
    got = run(m, x, hx)
    m64 = copy.deepcopy(m).double()
    x64 = x.detach().double().requires_grad_()
    hx64 = tuple(s.detach().double().requires_grad_() for s in hx) if isinstance(hx, tuple) else \
        hx.detach().double().requires_grad_()
    with fastseq.use_backend("torch"):
        exp = run(m64, x64, hx64)
    t = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else tol(dtype)
    for i, (g, e) in enumerate(zip(got, exp)):
        torch.testing.assert_close(g.double(), e, **t, msg=lambda msg: f"item {i}: {msg}")


def test_layer_norm_lstm_equations():
    """The reference itself, written out: LN on the input and recurrent gate pre-activations and
    on the cell (Ba et al. 2016), biases as the shifts."""
    m = ln_module("LayerNormLSTM", 4, 3, torch.float64)
    x = torch.randn(2, 1, 4, dtype=torch.float64)
    p = {n[:-3]: t for n, t in m.named_parameters()}
    ln = lambda v, g: torch.nn.functional.layer_norm(v, v.shape[-1:], g)     # noqa: E731
    h, c = torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    for t in range(2):
        g = ln(x[t] @ p["weight_ih"].t(), p["norm_ih_weight"]) + ln(h @ p["weight_hh"].t(), p["norm_hh_weight"]) \
            + p["bias_ih"] + p["bias_hh"]
        i, f, gg, o = g.chunk(4, -1)
        c = f.sigmoid() * c + i.sigmoid() * gg.tanh()
        h = o.sigmoid() * torch.tanh(ln(c, p["norm_c_weight"]) + p["norm_c_bias"])
    out, (h_n, c_n) = m(x)
    torch.testing.assert_close(out[-1], h)
    torch.testing.assert_close(c_n[0], c)


def test_layer_norm_lstm_loads_an_lstm_state_dict():
    ref = torch.nn.LSTM(5, 6, num_layers=2)
    m = fastseq.nn.LayerNormLSTM(5, 6, num_layers=2)
    missing, unexpected = m.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("norm") for k in missing) and len(missing) == 8
    assert sorted(m.state_dict()) == sorted(list(ref.state_dict()) + missing)
    fresh = fastseq.nn.LayerNormLSTM(5, 6, num_layers=2)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(3, 2, 5)
    torch.testing.assert_close(fresh(x)[0], m(x)[0])


def test_layer_norm_lstm_rejects_proj_size():
    with pytest.raises(ValueError, match="proj_size"):
        fastseq.nn.LayerNormLSTM(4, 6, proj_size=2)


# ---------------------------------------------------------------------------- functional + gradcheck

LAYER_OPS = {"lstm": FF.lstm_layer, "gru": FF.gru_layer, "rnn_tanh": FF.rnn_layer,
             "rnn_relu": lambda *a, **k: FF.rnn_layer(*a, nonlinearity="relu", **k),
             "ln_lstm": FF.layer_norm_lstm_layer, "ln_gru": FF.layer_norm_gru_layer}


@pytest.mark.parametrize("cell", list(LAYER_OPS))
@pytest.mark.parametrize("lengths", [None, [2, 4]], ids=["padded", "lengths"])
def test_gradcheck(cell, lengths):
    d = dict(dtype=torch.float64, requires_grad=True)
    T, B, C, H = 4, 2, 3, 5
    x, h0, c0 = torch.randn(T, B, C, **d), torch.randn(B, H, **d), torch.randn(B, H, **d)
    params = _params(cell, C, H, d)
    lstm = cell in ("lstm", "ln_lstm")

    def fn(x, h0, c0, *p):
        y, st = LAYER_OPS[cell](x, (h0, c0) if lstm else h0, *p, lengths=lengths)
        return (y, *st) if lstm else (y, st)
    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params))


def test_functional_matches_the_reference_and_batch_first():
    x = torch.randn(3, 6, 8)                                 # (B, T, C)
    w_ih, w_hh, b_ih, b_hh = torch.randn(20, 8), torch.randn(20, 5), torch.randn(20), torch.randn(20)
    y, (h, c) = FF.lstm_layer(x, None, w_ih, w_hh, b_ih, b_hh, batch_first=True)
    z = torch.zeros(3, 5)
    y_r, (h_r, c_r) = lstm_ref(x.transpose(0, 1), z, z, w_ih, w_hh, b_ih, b_hh)
    torch.testing.assert_close(y, y_r.transpose(0, 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h, h_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c, c_r, rtol=1e-4, atol=1e-5)


def test_reference_packed_equals_padded_per_sequence():
    """recurrent_ref on packed rows gives each sequence what it gets alone."""
    p = _params("gru", 3, 4, dict(dtype=torch.float64))
    seqs = [torch.randn(L, 3, dtype=torch.float64) for L in (5, 3, 1)]
    packed = pack_padded_sequence(torch.nn.utils.rnn.pad_sequence(seqs), torch.tensor([5, 3, 1]))
    offs = [0] + torch.cumsum(packed.batch_sizes, 0).tolist()
    y, (h, _) = recurrent_ref("gru", packed.data, offs, torch.zeros(3, 4, dtype=torch.float64), None,
                              tuple(p) + (None,) * 4)
    for b, s in enumerate(seqs):
        y_b, (h_b, _) = recurrent_ref("gru", s, list(range(len(s) + 1)), torch.zeros(1, 4, dtype=torch.float64),
                                      None, tuple(p) + (None,) * 4)
        torch.testing.assert_close(h[b], h_b[0])


# ---------------------------------------------------------------------------- drop-in plumbing

@pytest.mark.parametrize("kind", list(TWINS))
def test_convert_swaps_and_shares_parameters(kind):
    torch_cls, fast_cls, extra = TWINS[kind]
    model = torch.nn.Sequential(torch_cls(4, 6, **extra))
    x = torch.randn(5, 2, 4)
    expect = model[0](x)[0]
    fast = fastseq.convert(model)
    assert type(fast[0]) is fast_cls and fast[0].weight_ih_l0 is model[0].weight_ih_l0
    torch.testing.assert_close(fast[0](x)[0], expect)
    fast[0].flatten_parameters()                             # torch's method still there


@pytest.mark.parametrize("kind", list(CELLS))
def test_convert_cells(kind):
    torch_cls, fast_cls, extra = CELLS[kind]
    cell = torch_cls(4, 6, **extra)
    assert type(fastseq.convert(cell)) is fast_cls


def test_state_dict_keys_match_torch():
    ref = torch.nn.GRU(4, 6, num_layers=2, bidirectional=True)
    fast = fastseq.nn.GRU(4, 6, num_layers=2, bidirectional=True)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert "weight_hh_l1_reverse" in fast.state_dict()


@pytest.mark.parametrize("kind", list(TWINS) + list(LN))
def test_nan_propagates(kind):
    m = (pair(kind, 4, 6, torch.float32)[1] if kind in TWINS else LN[kind](4, 6))
    x = torch.randn(5, 2, 4)
    x[1, 0, 2] = float("nan")
    out = m(x)[0]
    assert out[1:, 0].isnan().all() and not out[:, 1].isnan().any() and not out[0].isnan().any()


def test_backend_torch_runs_torchs_own_forward():
    ref, fast = pair("GRU", 4, 6, torch.float32)
    x = torch.randn(3, 2, 4)
    with fastseq.use_backend("torch"):
        torch.testing.assert_close(fast(x)[0], ref(x)[0], rtol=0, atol=0)
    assert "runs on backend 'cpu'" in fastseq.explain("gru_layer", x, None, *ref.parameters())


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kind", list(TWINS) + list(LN))
def test_bad_input_messages(kind):
    m = pair(kind, 4, 6, torch.float32, num_layers=2)[1] if kind in TWINS else LN[kind](4, 6, num_layers=2)
    name = type(m).__name__
    lstm = "LSTM" in kind
    ok = torch.randn(3, 2, 4)

    def state(*shape):
        h = torch.randn(*shape)
        return (h, torch.randn(*shape)) if lstm else h
    with pytest.raises(ValueError, match=rf"{name}: expected input with 4 features, got 5"):
        m(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match=rf"{name}: expected input to be 2D or 3D, got 4D"):
        m(torch.randn(3, 2, 4, 1))
    with pytest.raises(ValueError, match=rf"{name}: expected a floating-point input tensor, got torch.int64"):
        m(torch.ones(3, 2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected hx(\[0\])? of shape \[2, 2, 6\].*got \[2, 3, 6\]"):
        m(ok, state(2, 3, 6))                                # batch mismatch
    with pytest.raises(ValueError, match=r"expected hx(\[0\])? of shape \[2, 2, 6\].*got \[1, 2, 6\]"):
        m(ok, state(1, 2, 6))                                # layer mismatch
    with pytest.raises(ValueError, match=r"to be 3D for batched input, got 2D"):
        m(ok, state(2, 6))
    with pytest.raises(ValueError, match=r"expected input of the parameters' dtype"):
        m(ok.double())


def test_bad_lengths():
    lstm = torch.nn.LSTM(4, 6)
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match=r"lstm_layer: lengths must lie in \[1, T=3\], got \[5, 2\]"):
        FF.lstm_layer(x, None, *lstm.parameters(), lengths=torch.tensor([5, 2]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, T=3\], got \[0, 2\]"):
        FF.lstm_layer(x, None, *lstm.parameters(), lengths=[0, 2])
    with pytest.raises(ValueError, match=r"expected lengths as 2 integers"):
        FF.lstm_layer(x, None, *lstm.parameters(), lengths=[1.5, 2.0])
    # torch's pack_padded_sequence does not check lengths against T; the module does
    bad = pack_padded_sequence(x, torch.tensor([5, 2]), enforce_sorted=False)
    with pytest.raises(ValueError, match=r"batch_sizes account for 7 rows, its data has shape \[5, 4\]"):
        fastseq.nn.LSTM(4, 6)(bad)


def test_functional_bad_weights():
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match=r"gru_layer: expected weight_ih of shape \(3H, 4\), got \[10, 4\]"):
        FF.gru_layer(x, None, torch.randn(10, 4), torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"gru_layer: expected weight_hh of shape \[9, 3\], got \[9, 4\]"):
        FF.gru_layer(x, None, torch.randn(9, 4), torch.randn(9, 4))
    with pytest.raises(ValueError, match=r"rnn_layer: expected h0 of shape \[2, 3\], got \[1, 3\]"):
        FF.rnn_layer(x, torch.randn(1, 3), torch.randn(3, 4), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"nonlinearity must be 'tanh' or 'relu', got 'gelu'"):
        FF.rnn_layer(x, None, torch.randn(3, 4), torch.randn(3, 3), nonlinearity="gelu")


def test_cell_bad_input():
    cell = fastseq.nn.GRUCell(4, 6)
    with pytest.raises(ValueError, match=r"GRUCell: expected input with 4 features, got 3"):
        cell(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"GRUCell: expected hidden state of shape \[2, 6\], got \[3, 6\]"):
        cell(torch.randn(2, 4), torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"GRUCell: expected input to be 1D or 2D, got 3D"):
        cell(torch.randn(1, 2, 4))


@pytest.mark.parametrize("kind", list(TWINS) + list(LN))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_inference_keeps_nothing_and_matches(kind, packed):
    """Under no_grad the LSTM keeps no gates or cell history (c alternates between two buffers):
    outputs and final states still match the autograd path, padded and packed."""
    m = pair(kind, 5, 13, torch.float64, num_layers=2, bidirectional=True)[1] if kind in TWINS else \
        ln_module(kind, 5, 13, torch.float64, num_layers=2, bidirectional=True)
    x = torch.randn(7, 4, 5, dtype=torch.float64)
    inp = pack_padded_sequence(x, torch.tensor([3, 7, 6, 1]), enforce_sorted=False) if packed else x
    out, st = m(inp)
    with torch.no_grad():
        out_i, st_i = m(inp)
        out_again, _ = m(inp)                          # the cached blocked weights
    data = (lambda o: o.data) if packed else (lambda o: o)
    torch.testing.assert_close(data(out_i), data(out).detach())
    torch.testing.assert_close(data(out_again), data(out).detach())
    for a, b in zip(st_i if isinstance(st_i, tuple) else (st_i,), st if isinstance(st, tuple) else (st,)):
        torch.testing.assert_close(a, b.detach())


def test_inference_sees_updated_weights():
    m = fastseq.nn.LSTM(4, 16)
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        before = m(x)[0]
        m.weight_hh_l0.mul_(0.5)
        after = m(x)[0]
        ref = torch.nn.LSTM(4, 16)
        ref.load_state_dict(m.state_dict())
        torch.testing.assert_close(after, ref(x)[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("kind", ["LayerNormLSTM", "LayerNormGRU"])
def test_benchmark_peers_compute_the_same_function(kind):
    """The Python-loop peers of the benchmarks (and their TorchScript versions) are the same layer."""
    from fastseq.bench.recurrent import PythonLoopLayerNormGRU, PythonLoopLayerNormLSTM
    m = ln_module(kind, 6, 5, torch.float32)
    x = torch.randn(7, 3, 6)
    loop = (PythonLoopLayerNormLSTM if kind == "LayerNormLSTM" else PythonLoopLayerNormGRU)(6, 5).load_from(m)
    state = (torch.zeros(3, 5), torch.zeros(3, 5)) if kind == "LayerNormLSTM" else torch.zeros(3, 5)
    torch.testing.assert_close(loop(x, state)[0], m(x)[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- edge cases (review of #4)

@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_inference_mode_then_training(kind):
    """torch.inference_mode works, and leaves nothing behind that breaks a later training step."""
    ref, fast = pair(kind, 4, 16, torch.float32)
    x = torch.randn(5, 2, 4)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)
    fast(x)[0].sum().backward()
    assert fast.weight_hh_l0.grad is not None


def test_weights_written_through_data_are_seen():
    """In-place writes through .data (EMA, weight averaging) bump no version counter: no stale copy."""
    ref, fast = pair("LSTM", 4, 16, torch.float32)
    x = torch.randn(5, 2, 4)
    with torch.no_grad():
        fast(x)
        new = torch.randn_like(fast.weight_hh_l0)
        fast.weight_hh_l0.data.copy_(new)
        ref.weight_hh_l0.data.copy_(new)
        torch.testing.assert_close(fast(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)


def test_fewer_threads_than_asked(tmp_path):
    """OpenMP may start a smaller team than asked (OMP_THREAD_LIMIT): every output is still written."""
    import subprocess
    import sys
    code = (
        "import torch, fastseq\n"
        "torch.set_num_threads(2)\n"
        "for cls, fcls in ((torch.nn.LSTM, fastseq.nn.LSTM), (torch.nn.GRU, fastseq.nn.GRU)):\n"
        "    ref = cls(4, 40, proj_size=8) if cls is torch.nn.LSTM else cls(4, 40)\n"
        "    fast = fcls(4, 40, proj_size=8) if cls is torch.nn.LSTM else fcls(4, 40)\n"
        "    fast.load_state_dict(ref.state_dict())\n"
        "    x = torch.randn(6, 3, 4, requires_grad=True)\n"
        "    a, b = fast(x)[0], ref(x)[0]\n"
        "    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)\n"
        "    ga = torch.autograd.grad(a.sum(), [x] + list(fast.parameters()))\n"
        "    gb = torch.autograd.grad(b.sum(), [x] + list(ref.parameters()))\n"
        "    for u, v in zip(ga, gb): torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)\n"
        "m = fastseq.nn.LayerNormLSTM(4, 40)\n"
        "x = torch.randn(6, 3, 4)\n"
        "with fastseq.use_backend('torch'): e = m(x)[0]\n"
        "torch.testing.assert_close(m(x)[0], e, rtol=1e-4, atol=1e-5)\n")
    import os
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("kind", list(TWINS))
def test_empty_batch_and_empty_sequence(kind):
    ref, fast = pair(kind, 4, 6, torch.float32)
    x = torch.randn(3, 0, 4)
    out, st = fast(x)
    out_r, st_r = ref(x)
    assert out.shape == out_r.shape == (3, 0, 6)
    with pytest.raises(ValueError, match=r"expected a sequence of at least one step, got T=0"):
        fast(torch.randn(0, 2, 4))
    w = list(ref.parameters())
    op = {"LSTM": FF.lstm_layer, "GRU": FF.gru_layer, "RNN_TANH": FF.rnn_layer, "RNN_RELU": FF.rnn_layer}[kind]
    with pytest.raises(ValueError, match=r"got T=0"):
        op(torch.randn(0, 2, 4), None, *w)
    y, _ = op(torch.randn(3, 0, 4), None, *w)
    assert y.shape == (3, 0, 6)


def test_cell_state_dtype_is_checked():
    cell = fastseq.nn.LSTMCell(4, 6)
    with pytest.raises(ValueError, match=r"LSTMCell: expected hidden state as torch.float32 on cpu"):
        cell(torch.randn(2, 4), (torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)))


def test_double_backward_says_so():
    m = fastseq.nn.GRU(4, 6)
    x = torch.randn(3, 2, 4, requires_grad=True)
    (g,) = torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), x)
