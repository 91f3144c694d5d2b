"""The recurrent family's dispatch and autocast: explain with each functional op's own name, the
backend kept on ctx for backward, the cached choice, plain Function arguments; CPU autocast
against torch's modules and ops (split from test_recurrent.py)."""
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq
from fastseq import functional as FF

from _recurrent_helpers import LN, ln_module, params as _params


# ---------------------------------------------------------------------------- dispatch: explain, ctx, cache

def _layer_args(op, T=3, B=2, C=4, H=5, dtype=torch.float32):
    """(input, hx, weights...) of functional op `op`, and the op."""
    cell = {"lstm_layer": "lstm", "gru_layer": "gru", "rnn_layer": "rnn_tanh", "layer_norm_lstm_layer": "ln_lstm",
            "layer_norm_gru_layer": "ln_gru"}[op]
    return getattr(FF, op), (torch.randn(T, B, C, dtype=dtype), None, *_params(cell, C, H, dict(dtype=dtype)))


@pytest.mark.parametrize("op", ["lstm_layer", "gru_layer", "rnn_layer", "layer_norm_lstm_layer",
                                "layer_norm_gru_layer"])
def test_explain_takes_each_functional_ops_own_arguments(op):
    fn, args = _layer_args(op)
    text = fastseq.explain(op, *args)
    assert text.startswith(f"{op}(device=cpu, dtype=float32") and "runs on backend 'cpu'" in text
    fn(*args)                                                 # the same arguments run
    _, half = _layer_args(op, dtype=torch.float16)
    assert "runs on backend 'torch'" in fastseq.explain(op, *half)
    assert f"cpu {op} takes float32 or float64, got float16" in fastseq.explain(op, *half)
    with fastseq.use_backend("torch"):
        assert "runs on backend 'torch' (forced by use_backend)" in fastseq.explain(op, *args)


def _spy_loops(monkeypatch, backend="cpu"):
    """Record every call of the backend's loop table."""
    from fastseq.recurrent import functions
    table = functions.LOOPS[backend]
    calls = []
    for name in ("lstm_forward", "lstm_infer", "lstm_backward", "gru_forward", "gru_backward", "rnn_forward",
                 "rnn_backward", "ln_lstm_forward", "ln_lstm_backward", "ln_gru_forward", "ln_gru_backward"):
        real = getattr(table, name)
        monkeypatch.setattr(table, name, (lambda n, f: lambda *a, **k: calls.append(n) or f(*a, **k))(name, real))
    return calls


@pytest.mark.parametrize("op", ["lstm_layer", "gru_layer", "rnn_layer", "layer_norm_lstm_layer",
                                "layer_norm_gru_layer"])
def test_backward_runs_on_the_backend_forward_chose(monkeypatch, op):
    """The backend is kept on ctx: a backward outside (or under another) use_backend block runs the
    loops forward ran, and a forward forced to "torch" never touches the kernels."""
    fn, args = _layer_args(op, dtype=torch.float64)
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    calls = _spy_loops(monkeypatch)
    with fastseq.use_backend("cpu"):
        y, _ = fn(*args)
    assert calls and all(c.endswith("_forward") for c in calls)
    del calls[:]
    with fastseq.use_backend("torch"):
        g_cpu = torch.autograd.grad(y.sum(), [a for a in args if isinstance(a, torch.Tensor)])
    assert calls and all(c.endswith("_backward") for c in calls)
    del calls[:]
    with fastseq.use_backend("torch"):
        y_t, _ = fn(*args)
    g_t = torch.autograd.grad(y_t.sum(), [a for a in args if isinstance(a, torch.Tensor)])
    assert calls == []
    torch.testing.assert_close(y, y_t)
    for a, b in zip(g_cpu, g_t):
        torch.testing.assert_close(a, b)


def test_dispatch_is_cached_by_device_dtype_and_forced_backend():
    from fastseq import _dispatch
    from fastseq.recurrent import LSTM_CELL, choose
    x32, x64, x16 = torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3).half()
    assert choose(LSTM_CELL, x32) == "cpu" and choose(LSTM_CELL, x64) == "cpu"
    assert choose(LSTM_CELL, x16) == "torch"                    # dtype changes the choice
    with fastseq.use_backend("torch"):
        assert choose(LSTM_CELL, x32) == "torch"                # a forced backend changes it
    assert choose(LSTM_CELL, x32) == "cpu"                      # and is not remembered outside the block
    keys = [k for k in _dispatch._CHOICES if k[0] == "lstm_layer"]
    assert ("lstm_layer", ("cpu", torch.float32, False, False), None) in keys
    assert ("lstm_layer", ("cpu", torch.float32, False, False), "torch") in keys
    assert _dispatch._CHOICES[("lstm_layer", ("cpu", torch.float16, False, False), None)] == "torch"
    with fastseq.use_backend("cpu"), pytest.raises(NotImplementedError, match="takes float32 or float64, got float16"):
        choose(LSTM_CELL, x16)                                  # forced and unable: raises every time
    with fastseq.use_backend("cpu"), pytest.raises(NotImplementedError, match="float16"):
        choose(LSTM_CELL, x16)


def test_functions_take_only_plain_arguments():
    """Every autograd Function's forward takes tensors, ints, floats, bools, None and strings (the
    backend's, a cell Function's name) only; the layout travels as a CPU int64 tensor of step
    offsets."""
    import inspect
    import unittest.mock

    from fastseq.recurrent import functions
    for fn in set(functions.FUNCTION.values()):
        params = list(inspect.signature(fn.forward).parameters)
        assert params[:3] == ["ctx", "backend", "offs"], fn
        assert "rows" not in params
    seen = []
    plain = (torch.Tensor, int, float, bool, str, type(None))

    def spying(cls):
        real = cls.forward

        def spy(ctx, *args):
            seen.append((cls.__name__, args))
            return real(ctx, *args)
        return unittest.mock.patch.object(cls, "forward", staticmethod(spy))
    x = torch.randn(6, 3, 4, requires_grad=True)
    with spying(functions.ProjectedLayerFunction), spying(functions.LayerNormLSTMLayerFunction):
        m = fastseq.nn.LSTM(4, 16)
        m(x)[0].sum().backward()
        m(pack_padded_sequence(x, torch.tensor([6, 4, 2])))[0].data.sum().backward()
        fastseq.nn.LayerNormLSTM(4, 16)(x)[0].sum().backward()
    assert [name for name, _ in seen] == ["ProjectedLayerFunction"] * 2 + ["LayerNormLSTMLayerFunction"]
    for _, args in seen:
        assert all(isinstance(a, plain) for a in args), [type(a) for a in args]
        offs = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.int64 and a.dim() == 1]
        assert offs and offs[0].device.type == "cpu"


# ---------------------------------------------------------------------------- autocast

AUTOCAST_MODULES = {
    "LSTM": lambda: torch.nn.LSTM(4, 6), "LSTM-proj": lambda: torch.nn.LSTM(4, 6, proj_size=3),
    "LSTM-2layer-bidir-bf": lambda: torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True),
    "GRU": lambda: torch.nn.GRU(4, 6), "GRU-2layer-bidir": lambda: torch.nn.GRU(4, 6, num_layers=2, bidirectional=True),
    "RNN": lambda: torch.nn.RNN(4, 6), "RNN-relu": lambda: torch.nn.RNN(4, 6, nonlinearity="relu"),
    "LSTMCell": lambda: torch.nn.LSTMCell(4, 6), "GRUCell": lambda: torch.nn.GRUCell(4, 6),
    "RNNCell": lambda: torch.nn.RNNCell(4, 6), "RNNCell-relu": lambda: torch.nn.RNNCell(4, 6, nonlinearity="relu")}


def _flat_out(o):
    from torch.nn.utils.rnn import PackedSequence
    if isinstance(o, PackedSequence):
        return [o.data]
    if isinstance(o, (tuple, list)):
        return [t for x in o for t in _flat_out(x)]
    return [o]


@pytest.mark.parametrize("kind", list(AUTOCAST_MODULES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("training", [False, True], ids=["infer", "train"])
def test_autocast_cpu_bf16_matches_torch(kind, packed, training):
    """Under torch.autocast("cpu", bfloat16) every module runs where torch's runs and returns
    torch's dtypes (LSTM and RNN bf16, GRU and LSTMCell fp32, LSTM's c with proj_size fp32, packed
    LSTM fp32, ...), with torch's values; backward runs and the gradients match."""
    cell = "Cell" in kind
    if packed and cell:
        pytest.skip("cells take no PackedSequence")
    ref = AUTOCAST_MODULES[kind]()
    fast = fastseq.convert(copy.deepcopy(ref))
    ref.train(training), fast.train(training)
    bf = getattr(ref, "batch_first", False)
    x = torch.randn(*((3, 4) if cell else (2, 5, 4) if bf else (5, 2, 4)), requires_grad=True)
    inp = (lambda: pack_padded_sequence(x, torch.tensor([5, 3]), batch_first=bf)) if packed else (lambda: x)
    with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16):
        got, exp = _flat_out(fast(inp())), _flat_out(ref(inp()))
    assert [t.dtype for t in got] == [t.dtype for t in exp]
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1.6e-2, atol=1e-2)
    if training:
        gf = torch.autograd.grad(sum(t.float().sum() for t in got), [x] + list(fast.parameters()))
        gr = torch.autograd.grad(sum(t.float().sum() for t in exp), [x] + list(ref.parameters()))
        for a, b in zip(gf, gr):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("lengths", [None, [5, 3]], ids=["padded", "lengths"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_autocast_cpu_bf16_functional_matches_torchs_module(kind, lengths):
    ref = getattr(torch.nn, kind)(4, 6)
    op = {"LSTM": FF.lstm_layer, "GRU": FF.gru_layer, "RNN": FF.rnn_layer}[kind]
    x = torch.randn(5, 2, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, st = op(x, None, *ref.parameters(), lengths=lengths)
        inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths))
        y_r, st_r = ref(inp)
    y_r = y_r if lengths is None else pad_packed_sequence(y_r)[0]
    got, exp = [y] + _flat_out(st), [y_r] + [s[0] for s in _flat_out(st_r)]
    assert [t.dtype for t in got] == [t.dtype for t in exp]
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1.6e-2, atol=1e-2)
    torch.autograd.grad(y.float().sum(), [x] + list(ref.parameters()))
    with fastseq.use_backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(NotImplementedError, match=r"autocast \(bfloat16\) is on"):
            op(x, None, *ref.parameters())


@pytest.mark.parametrize("kind", list(LN))
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_cpu_layer_norm_cells_run_in_the_parameters_dtype(kind, x_dtype):
    """The layer-normalized cells (no torch twin) run under autocast in the parameters' dtype with
    autocast off inside, on the fused kernels: fp32 outputs equal to the plain fp32 call; backward
    runs and gives the input's gradient in the input's dtype."""
    m = ln_module(kind, 4, 6, torch.float32, num_layers=2)
    x = torch.randn(5, 2, 4).to(x_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, st = m(x)
    exp, st_e = m(x.detach().float())
    for g, e in zip([out] + _flat_out(st), [exp] + _flat_out(st_e)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e)
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert gx.dtype == x_dtype
    op = FF.layer_norm_lstm_layer if kind == "LayerNormLSTM" else FF.layer_norm_gru_layer
    w = [m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, m.norm_ih_weight_l0, m.norm_hh_weight_l0]
    w += [m.norm_c_weight_l0, m.norm_c_bias_l0] if kind == "LayerNormLSTM" else []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = op(x, None, *w)
        assert "(device=cpu, dtype=float32) runs on backend 'cpu'" in fastseq.explain(op.__name__, x, None, *w)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, op(x.detach().float(), None, *w)[0])
