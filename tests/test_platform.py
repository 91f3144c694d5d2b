"""The platform under every family: registered torch.library ops (opcheck, torch.compile with
fullgraph=True, jit.trace, torch.func), autocast, explain, and the warning for a checkout
without compiled kernels.  Compiles use the aot_eager backend (Dynamo + AOTAutograd with fake
tensors: what a graph break or a missing fake/autograd registration would fail) except one
inductor run; each takes a few seconds on 2 cores."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fastseq
import fastseq.functional as FF


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


def _req(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


# ------------------------------------------------------------------ opcheck, op by op

@pytest.mark.parametrize("residual,weight,bias,center,return_sum,p", [
    (False, True, True, True, False, 0.0), (True, True, True, True, True, 0.0), (True, True, False, True, False, 0.0),
    (False, False, False, False, False, 0.0), (True, True, False, False, True, 0.0),
    (False, False, True, True, False, 0.0), (True, True, True, True, False, 0.3), (True, True, False, False, True, 0.3)])
def test_opcheck_norm_ops(residual, weight, bias, center, return_sum, p):
    x = _req(5, 3, 16)
    seed = torch.tensor(987654321, dtype=torch.int64)
    args = (x, _req(5, 3, 16) if residual else None, _req(16) if weight else None, _req(16) if bias else None,
            16, 1e-5, center, return_sum, "cpu", p, seed)
    opcheck(torch.ops.fastseq.norm_forward.default, args)
    v, dy = torch.randn(15, 16, dtype=torch.float64), torch.randn(15, 16, dtype=torch.float64)
    r = torch.randn(15, 16, dtype=torch.float64) if residual else None
    mean, rstd = torch.randn(15, dtype=torch.float64), torch.rand(15, dtype=torch.float64) + 0.5
    opcheck(torch.ops.fastseq.norm_backward.default,
            (v, r, dy, None, torch.randn(16, dtype=torch.float64), mean, rstd, 16, center, True, True, "cpu", p, seed,
             residual and p > 0))


@pytest.mark.parametrize("mask,causal,window,lengths,gqa,dropout", [
    (None, False, (-1, -1), None, False, 0.0), (None, True, (-1, -1), None, False, 0.0),
    ("bool", False, (3, 1), None, False, 0.0), ("float", False, (-1, -1), [5, 2], False, 0.0),
    (None, True, (-1, -1), None, True, 0.0), (None, False, (-1, -1), None, False, 0.3)])
def test_opcheck_attention_ops(mask, causal, window, lengths, gqa, dropout):
    B, Hq, Hk, T, S, D = 2, 4, 2 if gqa else 4, 5, 7, 8
    q, k, v = _req(B, Hq, T, D), _req(B, Hk, S, D), _req(B, Hk, S, D)
    m = None
    if mask == "bool":
        m = torch.rand(B, 1, T, S) > 0.3
    elif mask == "float":
        m = torch.randn(1, Hq, T, S, dtype=torch.float64)
    kl = torch.tensor(lengths) if lengths else None
    seed = torch.tensor(1234, dtype=torch.int64)
    opcheck(torch.ops.fastseq.attention_forward.default,
            (q, k, v, m, kl, causal, None, window[0], window[1], dropout, seed, "cpu"))


# ------------------------------------------------------------------ torch.compile, fullgraph

def test_compile_functional_norms_match_eager_forward_and_backward():
    w, b = _req(16, dtype=torch.float32), _req(16, dtype=torch.float32)

    def f(x, r):
        y, s = FF.add_layer_norm(x, r, (16,), w, b, return_sum=True)
        return FF.layer_norm(y, 16, w, None) + FF.rms_norm(s, (16,), w) + FF.add_rms_norm(x, y, (16,), None)

    x, r = _req(3, 5, 16, dtype=torch.float32), _req(3, 5, 16, dtype=torch.float32)
    out_c = _compiled(f)(x, r)
    gc = torch.autograd.grad(out_c.square().sum(), (x, r, w, b))
    out_e = f(x, r)
    ge = torch.autograd.grad(out_e.square().sum(), (x, r, w, b))
    torch.testing.assert_close(out_c, out_e)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)


def test_compile_attention_with_kv_cache_slice_and_dropout_seed_no_graph_break():
    cache_k, cache_v = torch.randn(1, 4, 32, 8), torch.randn(1, 4, 32, 8)

    def decode(q, n: int):
        return FF.scaled_dot_product_attention(q, cache_k[:, :, :n], cache_v[:, :, :n])

    q = torch.randn(1, 4, 1, 8)
    torch.testing.assert_close(_compiled(decode)(q, 20), decode(q, 20))

    def train(q, k, v):      # a seed drawn inside the graph: fullgraph=True would fail on .item()
        return FF.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)

    q, k, v = (_req(2, 2, 9, 8, dtype=torch.float32) for _ in range(3))
    torch.manual_seed(7)
    out = _compiled(train)(q, k, v)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    torch.manual_seed(7)
    ref_dropped = FF.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), dropout_p=0.25,
                                                  is_causal=True)
    # the compiled graph draws its seed with the same torch.randint on the same generator state
    torch.testing.assert_close(out.detach(), ref_dropped)


@pytest.mark.parametrize("norm_first", [False, True])
def test_compile_converted_transformer_fullgraph_matches_eager(norm_first):
    torch.manual_seed(0)
    model = torch.nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                 dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=norm_first)
    fast = fastseq.convert(model)
    src, tgt = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(5)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True

    def run(s, t):
        return fast(s, t, tgt_mask=mask, src_key_padding_mask=kpm, memory_key_padding_mask=kpm,
                    tgt_is_causal=True)

    out_c = _compiled(run)(src, tgt)
    out_e = run(src, tgt)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    params = list(fast.parameters())
    gc = torch.autograd.grad(out_c.sum(), params)
    ge = torch.autograd.grad(out_e.sum(), params)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_compile_inductor_layer_norm_mlp():
    torch.manual_seed(0)
    model = fastseq.convert(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                                                torch.nn.Linear(32, 16))).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(model, backend="inductor")(x), model(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ jit.trace, torch.func

def test_jit_trace_of_a_converted_model_runs_the_kernels_on_new_inputs():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    fast = fastseq.convert(torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)).eval()
    fast.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fast, (x,))
    assert "fastseq::" in str(traced.inlined_graph)
    x2 = torch.randn(2, 6, 32) * 3
    with torch.no_grad():
        torch.testing.assert_close(traced(x2), layer(x2), rtol=1e-5, atol=1e-5)


def test_torch_func_transforms_run_torch_ops():
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    g_fast = torch.func.grad(lambda a: FF.layer_norm(a, (8,), w, b).sin().sum())(x)
    g_ref = torch.func.grad(lambda a: F.layer_norm(a, (8,), w, b).sin().sum())(x)
    torch.testing.assert_close(g_fast, g_ref)
    q = torch.randn(2, 2, 4, 8, dtype=torch.float64)
    j_fast = torch.func.jacrev(lambda t: FF.scaled_dot_product_attention(t, q, q, is_causal=True))(q)
    j_ref = torch.func.jacrev(lambda t: F.scaled_dot_product_attention(t, q, q, is_causal=True))(q)
    torch.testing.assert_close(j_fast, j_ref)
    y = torch.func.vmap(lambda a: FF.layer_norm(a, (8,), w, b))(x.view(3, 1, 8))
    torch.testing.assert_close(y, F.layer_norm(x.view(3, 1, 8), (8,), w, b))


# ------------------------------------------------------------------ autocast

def test_autocast_cpu_dtypes_match_torch():
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    w, b = torch.randn(16), torch.randn(16)
    q = torch.randn(1, 2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.bfloat16()
        assert FF.layer_norm(x, (16,), w, b).dtype == F.layer_norm(x, (16,), w, b).dtype
        assert FF.layer_norm(xb, (16,), w, b).dtype == F.layer_norm(xb, (16,), w, b).dtype
        y = FF.add_layer_norm(xb, r, (16,), w, b)          # bf16 block output + fp32 residual stream
        ref = F.layer_norm(xb + r, (16,), w, b)
        assert y.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(y, ref)
        o = FF.scaled_dot_product_attention(q, q, q, is_causal=True)
        o_ref = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert o.dtype == o_ref.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), o_ref.float(), rtol=2e-2, atol=2e-2)


def test_autocast_leaves_fp64_alone_as_torch():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert FF.scaled_dot_product_attention(q, q, q).dtype == F.scaled_dot_product_attention(q, q, q).dtype


def test_compile_attention_with_key_lengths_no_graph_break():
    q = torch.randn(2, 2, 6, 8)
    kl = torch.tensor([3, 6])
    out = _compiled(lambda a: FF.scaled_dot_product_attention(a, a, a, key_lengths=kl))(q)
    torch.testing.assert_close(out, FF.scaled_dot_product_attention(q, q, q, key_lengths=kl))


def test_add_norm_promotes_like_addition():
    x, r = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8)
    y, s = FF.add_layer_norm(x, r, (8,), return_sum=True)
    assert y.dtype == s.dtype == torch.float64
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (8,)))


# ------------------------------------------------------------------ explain, attention edge inputs

def test_explain_takes_keywords_and_reports_calls_that_raise():
    x, r = torch.randn(2, 4), torch.randn(2, 4)
    assert "runs on backend 'cpu'" in fastseq.explain("add_layer_norm", x, r, normalized_shape=(4,))
    assert "raises ValueError" in fastseq.explain("layer_norm", x, (5,))
    with fastseq.use_backend("cpu"):
        assert "raises NotImplementedError" in fastseq.explain("layer_norm", x.half(), (4,))
    q = torch.randn(1, 1, 3, 4)
    assert "raises ValueError" in fastseq.explain("scaled_dot_product_attention", q, q, q, window=(True, False))
    assert "runs on backend 'cpu'" in fastseq.explain("scaled_dot_product_attention", q, q, q, window=(1, 0))


def test_attention_rejects_bool_window_and_odd_key_lengths_device():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="window must be"):
        FF.scaled_dot_product_attention(q, q, q, window=(True, False))
    with pytest.raises(ValueError, match="expected key_lengths on cpu .* got meta"):
        FF.scaled_dot_product_attention(q, q, q, key_lengths=torch.tensor([2], device="meta"))


def test_attention_head_dim_zero_runs_as_torch():
    q, v = torch.randn(2, 3, 5, 0), torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(FF.scaled_dot_product_attention(q, q, v), F.scaled_dot_product_attention(q, q, v))
    q = torch.randn(2, 3, 5, 4)
    out = FF.scaled_dot_product_attention(q, q, torch.randn(2, 3, 5, 0))
    assert out.shape == (2, 3, 5, 0)


# ------------------------------------------------------------------ a checkout without compiled kernels

def test_import_without_compiled_kernels_warns_once():
    code = ("import sys, warnings; sys.modules['fastseq._cpu'] = None\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import fastseq\n"
            "print(sum('no compiled CPU kernels' in str(x.message) for x in w), fastseq.available_backends())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "1 ['torch']", out.stderr


# ------------------------------------------------------------------ the recurrent family

def _recurrent_args(name, T=4, B=3, H=8, P=5):
    offs = torch.arange(T + 1, dtype=torch.int64) * B
    G = {"lstm_layer": 4, "lstm_proj_layer": 4, "gru_layer": 3, "rnn_layer": 1, "layer_norm_lstm_layer": 4,
         "layer_norm_gru_layer": 3}[name]
    xp = _req(T * B, G * H)
    if name == "lstm_layer":
        return ("cpu", offs, 8, xp, _req(B, H), _req(B, H), _req(4 * H, H))
    if name == "lstm_proj_layer":
        return ("cpu", offs, 8, xp, _req(B, P), _req(B, H), _req(4 * H, P), _req(P, H))
    if name == "gru_layer":
        return ("cpu", offs, 8, xp, _req(B, H), _req(3 * H, H), _req(3 * H))
    if name == "rnn_layer":
        return ("cpu", offs, 8, True, xp, _req(B, H), _req(H, H))
    if name == "layer_norm_lstm_layer":
        return ("cpu", offs, 1e-5, xp, _req(B, H), _req(B, H), _req(4 * H, H), _req(4 * H), _req(H), _req(H))
    return ("cpu", offs, 1e-5, xp, _req(B, H), _req(3 * H, H), _req(3 * H), _req(3 * H))


@pytest.mark.parametrize("name", ["lstm_layer", "lstm_proj_layer", "gru_layer", "rnn_layer", "layer_norm_lstm_layer",
                                  "layer_norm_gru_layer"])
def test_opcheck_recurrent_ops(name):
    opcheck(getattr(torch.ops.fastseq, f"{name}_forward").default, _recurrent_args(name))


@pytest.mark.parametrize("name", ["lstm_layer", "gru_layer", "layer_norm_lstm_layer"])
def test_recurrent_op_matches_its_function(name):
    from fastseq.recurrent import ops
    args = _recurrent_args(name)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out_op = ops.apply(name, *args)
    out_fn = ops.FUNCTION[name].apply(*args)
    g_op = torch.autograd.grad(sum(o.sin().sum() for o in out_op), tensors)
    g_fn = torch.autograd.grad(sum(o.sin().sum() for o in out_fn), tensors)
    for a, b in zip(list(out_op) + list(g_op), list(out_fn) + list(g_fn)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("build", [
    lambda: fastseq.convert(torch.nn.LSTM(8, 16, batch_first=True)),
    lambda: fastseq.convert(torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True)),
    lambda: fastseq.convert(torch.nn.LSTM(8, 16, proj_size=5)),
    lambda: fastseq.convert(torch.nn.GRU(8, 16, batch_first=True)),
    lambda: fastseq.convert(torch.nn.RNN(8, 16, nonlinearity="relu")),
    lambda: fastseq.nn.LayerNormLSTM(8, 16, num_layers=2),
    lambda: fastseq.nn.LayerNormGRU(8, 16),
], ids=["lstm", "lstm-2layer-bidir", "lstm-proj", "gru", "rnn-relu", "ln-lstm", "ln-gru"])
def test_compile_recurrent_modules_fullgraph_match_eager(build):
    torch.manual_seed(0)
    model = build()
    x = _req(5, 3, 8, dtype=torch.float32)
    out_c = _compiled(model)(x)
    out_e = model(x)
    flat = lambda o: [o[0]] + (list(o[1]) if isinstance(o[1], tuple) else [o[1]])   # noqa: E731
    for a, e in zip(flat(out_c), flat(out_e)):
        torch.testing.assert_close(a, e)
    params = [x] + list(model.parameters())
    gc = torch.autograd.grad(sum(t.sum() for t in flat(out_c)), params)
    ge = torch.autograd.grad(sum(t.sum() for t in flat(out_e)), params)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)


def test_jit_trace_lstm_runs_the_registered_op():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(8, 16)
    fast = fastseq.convert(torch.nn.LSTM(8, 16))
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fast, (x,))
    assert "fastseq::lstm_layer_forward" in str(traced.inlined_graph)
    x2 = torch.randn(5, 2, 8)
    with torch.no_grad():
        for a, e in zip([traced(x2)[0], *traced(x2)[1]], [ref(x2)[0], *ref(x2)[1]]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_compile_gpt_style_encoder_training_with_dropout_is_one_graph():
    """Pre-norm causal blocks with dropout 0.1 in training mode (GPT's shape): the attention
    dropout seed is drawn inside the graph, so fullgraph=True holds."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=True,
                                             activation="gelu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # torch's nested-tensor notice
        enc = fastseq.convert(torch.nn.TransformerEncoder(layer, 2)).train()
    mask = torch.nn.Transformer.generate_square_subsequent_mask(7)
    x = _req(2, 7, 32, dtype=torch.float32)
    out = _compiled(lambda t: enc(t, mask=mask, is_causal=True))(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_torch_func_grad_through_a_recurrent_module_runs_torch_ops():
    from torch.func import functional_call, grad
    torch.manual_seed(0)
    ref = torch.nn.GRU(8, 16)
    fast = fastseq.convert(torch.nn.GRU(8, 16))
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 8)
    g = grad(lambda p: functional_call(fast, p, (x,))[0].square().sum())(dict(fast.named_parameters()))
    g_ref = grad(lambda p: functional_call(ref, p, (x,))[0].square().sum())(dict(ref.named_parameters()))
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name])
