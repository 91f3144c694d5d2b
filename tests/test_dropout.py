"""The dropout family (fastseq/dropout.py, kernels/cpu/dropout.pyx) and the dropout on the branch of
the fused add + norm (fastseq/layer_norm/): masks reproduced exactly by the pure-torch oracle of
the same hash, keep-rate and scale statistics, gradients against the oracle, gradcheck in fp64,
p = 0 / p = 1 / bad p, graph capture, the module and convert(), and the Transformer layers that
fuse their dropouts in training mode."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fastseq
import fastseq.functional as FF
from fastseq.attention import attention_ref
from fastseq.dropout import ACTIVATIONS, activation_ref, bias_act_dropout_ref, dropout_keep, dropout_ref
from fastseq.layer_norm import add_layer_norm_ref

ACC = {torch.float32: torch.float64, torch.float64: torch.float64}


def seeded(fn, s=1234):
    """Run fn under torch.manual_seed(s); return (its result, the seed the op drew)."""
    torch.manual_seed(s)
    seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))
    torch.manual_seed(s)
    return fn(), seed


def leaf(*shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()


def grads(out, inputs, dout):
    live = [t for t in inputs if t is not None]
    outs = out if isinstance(out, tuple) else (out,)
    douts = dout if isinstance(dout, tuple) else (dout,)
    return torch.autograd.grad(outs, live, douts)


# ============================================================================ dropout, dropout_add

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(97, 59), (3, 5, 1031), (7,), (2, 50257)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.93])
def test_dropout_mask_and_gradient_match_the_oracle(dtype, shape, p):
    x = leaf(*shape, dtype=dtype)
    y, seed = seeded(lambda: FF.dropout(x, p))
    keep = dropout_keep(seed, shape, p)
    assert torch.equal(y != 0, keep)                                     # the same elements dropped
    torch.testing.assert_close(y, dropout_ref(x.detach(), p, seed), rtol=0, atol=0)   # bit for bit
    dy = torch.randn_like(y)
    gx, = grads(y, [x], dy)
    torch.testing.assert_close(gx, dropout_ref(dy, p, seed), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_add_matches_the_oracle(dtype):
    x, r = leaf(61, 333, dtype=dtype), leaf(61, 333, dtype=dtype)
    y, seed = seeded(lambda: FF.dropout_add(x, r, 0.3))
    keep = dropout_keep(seed, x.shape, 0.3)
    assert torch.equal(y[~keep], r.detach()[~keep])                  # dropped: exactly the residual
    # kept: x * scale + r, in one rounding where the compiler fuses the multiply-add
    torch.testing.assert_close(y, dropout_ref(x.detach(), 0.3, seed, r.detach()))
    dy = torch.randn_like(y)
    gx, gr = grads(y, [x, r], dy)
    torch.testing.assert_close(gx, dropout_ref(dy, 0.3, seed), rtol=0, atol=0)
    torch.testing.assert_close(gr, dy, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_scale_statistics(p):
    x = torch.ones(1 << 20)
    y = FF.dropout(x, p)
    kept = (y != 0).double().mean().item()
    sd = math.sqrt(p * (1 - p) / x.numel())
    assert abs(kept - (1 - p)) < 5 * sd, (kept, 1 - p)
    assert torch.all((y == 0) | (y == torch.tensor(1 / (1 - p), dtype=torch.float32)))
    assert abs(y.double().mean().item() - 1.0) < 5 * sd / (1 - p)
    # neighbouring elements and consecutive calls are independent
    z = (y != 0).double()
    assert abs((z[1:] * z[:-1]).mean().item() - (1 - p) ** 2) < 10 * sd
    y2 = FF.dropout(x, p)
    assert abs(((y2 != 0).double() * z).mean().item() - (1 - p) ** 2) < 10 * sd


def test_the_mask_does_not_depend_on_the_thread_count():
    x = torch.randn(300, 700)
    old = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(seeded(lambda: (FF.dropout(x, 0.4), FF.bias_act_dropout(x, None, "gelu", 0.4),
                                        FF.dropout_add_layer_norm(x, x, 700, p=0.4)))[0])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_manual_seed_reproduces_and_calls_differ():
    x = torch.randn(64, 64)
    torch.manual_seed(7)
    a1, b1 = FF.dropout(x, 0.5), FF.dropout(x, 0.5)
    torch.manual_seed(7)
    a2, b2 = FF.dropout(x, 0.5), FF.dropout(x, 0.5)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and not torch.equal(a1, b1)


def test_p_one_drops_everything_in_every_op_and_its_gradients():
    x, r, w, b = leaf(6, 10), leaf(6, 10), leaf(10), leaf(10)
    for act in ACTIVATIONS:
        y = FF.bias_act_dropout(x, b, act, 1.0)
        assert torch.equal(y, torch.zeros_like(y))
        gx, gb = grads(y, [x, b], torch.ones_like(y))
        assert not gx.any() and not gb.any()
    y = FF.dropout_add_layer_norm(x, r, 10, w, b, p=1.0)
    torch.testing.assert_close(y, F.layer_norm(r, (10,), w, b))
    gx, gr = grads(y, [x, r], torch.randn_like(y))
    assert not gx.any()
    torch.testing.assert_close(gr, grads(F.layer_norm(r, (10,), w, b), [r], torch.randn_like(y))[0] * 0 + gr)


def test_p_zero_training_false_and_p_one():
    x = leaf(5, 8, dtype=torch.float32)
    assert FF.dropout(x, 0.0) is x and FF.dropout(x, 0.7, training=False) is x      # as torch: the input itself
    y = FF.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(y))
    gx, = grads(y, [x], torch.ones_like(y))
    assert torch.equal(gx, torch.zeros_like(gx))
    r = torch.randn(5, 8)
    torch.testing.assert_close(FF.dropout_add(x, r, 0.0), x + r)
    torch.testing.assert_close(FF.dropout_add(x, r, 1.0), r)
    torch.testing.assert_close(FF.dropout_add_layer_norm(x, r, 8, p=0.6, training=False), FF.add_layer_norm(x, r, 8))
    torch.testing.assert_close(FF.dropout_add_layer_norm(x, r, 8, p=1.0), F.layer_norm(r, (8,)))


@pytest.mark.parametrize("p,error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), RuntimeError),
                                     ("0.1", TypeError)])
def test_bad_p_is_rejected_as_torch_rejects_it(p, error):
    x = torch.randn(4, 8)
    with pytest.raises(error):
        F.dropout(x, p)
    for call in (lambda: FF.dropout(x, p), lambda: FF.dropout_add(x, x, p),
                 lambda: FF.bias_act_dropout(x, None, "relu", p), lambda: FF.dropout_add_layer_norm(x, x, 8, p=p),
                 lambda: FF.dropout_add_rms_norm(x, x, 8, p=p), lambda: fastseq.nn.AddLayerNorm(8, dropout=p)):
        with pytest.raises(error, match="dropout probability"):
            call()


def test_bad_inputs_name_what_was_received():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="residual of the input's shape"):
        FF.dropout_add(x, torch.randn(4, 9), 0.1)
    with pytest.raises(ValueError, match="activation must be one of"):
        FF.bias_act_dropout(x, None, "tanh", 0.1)
    with pytest.raises(ValueError, match=r"bias of shape \[8\].*got \[7\]"):
        FF.bias_act_dropout(x, torch.randn(7), "relu", 0.1)
    with pytest.raises(TypeError):                               # torch's type for a non-tensor
        F.dropout([1.0, 2.0], 0.1)
    with pytest.raises(TypeError, match="expected input to be a torch.Tensor, got list"):
        FF.dropout([1.0, 2.0], 0.1)
    with pytest.raises(TypeError, match="expected residual to be a torch.Tensor.*got NoneType"):
        FF.dropout_add_layer_norm(x, None, 8, p=0.5)
    with pytest.raises(ValueError, match="dropout probability"):  # p is checked whatever `training` says
        FF.bias_act_dropout(x, None, "relu", 2.0, training=False)
    with pytest.raises(ValueError, match="dropout probability"):
        FF.dropout_add_layer_norm(x, x, 8, p=-1.0, training=False)


def test_mask_spans_across_a_multiple_of_two_to_the_32():
    """The kernels cut a block of draws where the index's high word changes (k = 2^32 m): the
    multipliers there against the oracle's hash of the same 64-bit indices."""
    from fastseq._cpu import dropout as K
    from fastseq.dropout import _M32, _mix32
    seed, p = 0x9E3779B97F4A7C15 >> 1, 0.3
    for k0 in (2 ** 32 - 300, 3 * 2 ** 32 - 1, 2 ** 40 - 5):
        for dtype in (torch.float32, torch.float64):
            out = torch.full((1000,), float("nan"), dtype=dtype)
            K.mask_ptr(out.data_ptr(), k0, 1000, p, seed, dtype == torch.float64)
            k = torch.arange(k0, k0 + 1000, dtype=torch.int64)
            r = _mix32(_mix32((k & _M32) ^ (seed & _M32)) ^ ((k >> 32) & _M32) ^ ((seed >> 32) & _M32))
            want = (r >= int(p * 2 ** 32)).to(dtype) / (1 - p)
            torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_non_contiguous_inputs_and_bias():
    torch.manual_seed(0)
    xt = torch.randn(40, 24, dtype=torch.float64)[:, ::2]          # (40, 12), strided
    b = torch.randn(24, dtype=torch.float64)[::2]                  # (12,), strided
    r = torch.randn(12, 40, dtype=torch.float64).t()               # (40, 12), transposed
    for act in ACTIVATIONS:
        y, seed = seeded(lambda: FF.bias_act_dropout(xt, b, act, 0.25))
        torch.testing.assert_close(y, bias_act_dropout_ref(xt, b, act, 0.25, seed))
    y, seed = seeded(lambda: FF.dropout_add(xt, r, 0.25))
    torch.testing.assert_close(y, dropout_ref(xt, 0.25, seed, r))
    y, seed = seeded(lambda: FF.dropout_add_layer_norm(xt, r, 12, p=0.25))
    torch.testing.assert_close(y, add_layer_norm_ref(xt, r, 12, p=0.25, seed=seed))
    xg, bg = xt.clone().requires_grad_(), b.clone().requires_grad_()
    y, seed = seeded(lambda: FF.bias_act_dropout(xg[:, ::1], bg, "gelu", 0.25))
    dy = torch.randn(12, 40, dtype=torch.float64).t()                  # a non-contiguous gradient
    xr, br = xt.clone().requires_grad_(), b.clone().requires_grad_()
    for g, e in zip(grads(y, [xg, bg], dy), grads(bias_act_dropout_ref(xr, br, "gelu", 0.25, seed), [xr, br], dy)):
        torch.testing.assert_close(g, e)


def test_relu_gradient_at_nan_and_inf_is_torchs():
    u = torch.tensor([[float("nan"), -1.0, 0.0, 2.0]], requires_grad=True)
    dy = torch.tensor([[1.0, float("inf"), float("nan"), 3.0]])
    g_fast, = grads(FF.bias_act_dropout(u, None, "relu", 0.0), [u], dy)
    g_torch, = grads(torch.relu(u), [u], dy)
    torch.testing.assert_close(g_fast, g_torch, equal_nan=True)


def test_inplace_writes_the_input():
    x = torch.randn(16, 32)
    x0 = x.clone()
    (y, seed) = seeded(lambda: FF.dropout(x, 0.3, inplace=True))
    assert y is x
    torch.testing.assert_close(x, dropout_ref(x0, 0.3, seed), rtol=0, atol=0)


# ============================================================================ bias + activation + dropout

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_act_dropout_fp64_matches_the_oracle(activation, p, with_bias):
    x = leaf(37, 1031, scale=3.0)
    b = leaf(1031) if with_bias else None
    y, seed = seeded(lambda: FF.bias_act_dropout(x, b, activation, p))
    ref = bias_act_dropout_ref(x.detach(), b.detach() if b is not None else None, activation, p, seed)
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-13)
    if p > 0:
        keep = dropout_keep(seed, x.shape, p)
        assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))
    dy = torch.randn_like(y)
    got = grads(y, [x, b], dy)
    xr, br = x.detach().requires_grad_(), b.detach().requires_grad_() if b is not None else None
    want = grads(bias_act_dropout_ref(xr, br, activation, p, seed), [xr, br], dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


_TORCH_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda u: F.gelu(u, approximate="tanh"), "silu": F.silu}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_act_fp32_error_is_within_a_small_multiple_of_torchs(activation):
    """fp32 against an fp64 reference, judged by torch's own fp32 error on the same inputs
    (inputs spanning the activations' tails: |u| up to ~16)."""
    torch.manual_seed(0)
    x = (torch.randn(64, 2053) * 4).requires_grad_()
    b = torch.randn(2053).requires_grad_()
    dy = torch.randn(64, 2053)
    ref = _TORCH_ACT[activation](x.double() + b.double())
    gref = grads(ref, [x, b], dy.double())                          # autograd casts back to fp32: redo in fp64
    xd, bd = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    gref = grads(_TORCH_ACT[activation](xd + bd), [xd, bd], dy.double())
    ours = FF.bias_act_dropout(x, b, activation, 0.0)
    theirs = _TORCH_ACT[activation](x + b)
    g_ours, g_theirs = grads(ours, [x, b], dy), grads(theirs, [x, b], dy)
    for o, t, r in [(ours, theirs, ref)] + list(zip(g_ours, g_theirs, gref)):
        err_o = (o.double() - r).abs().max().item()
        err_t = (t.double() - r).abs().max().item()
        scale = r.abs().max().item()
        assert err_o <= 8 * err_t + 4e-7 * scale, (activation, err_o, err_t, scale)


def test_bias_act_without_dropout_equals_torchs_formula_and_broadcasts_leading_dims():
    x = leaf(2, 3, 4, 40)
    b = leaf(40)
    for act in ACTIVATIONS:
        torch.testing.assert_close(FF.bias_act_dropout(x, b, act, 0.5, training=False),
                                   _TORCH_ACT[act](x + b))
        torch.testing.assert_close(activation_ref(x + b, act), _TORCH_ACT[act](x + b))


def test_relu_keeps_nan_as_torch():
    x = torch.tensor([[float("nan"), -1.0, 2.0]])
    y = FF.bias_act_dropout(x, None, "relu", 0.0)
    assert torch.isnan(y[0, 0]) and y[0, 1] == 0 and y[0, 2] == 2


# ============================================================================ dropout + add + norm

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("return_sum", [False, True])
@pytest.mark.parametrize("n", [59, 768, 1031])
def test_dropout_add_norm_forward_and_gradients_match_the_oracle(dtype, rms, return_sum, n):
    x, r = leaf(13, 7, n, dtype=dtype), leaf(13, 7, n, dtype=dtype)
    w, b = leaf(n, dtype=dtype), (None if rms else leaf(n, dtype=dtype))
    p = 0.2
    if rms:
        out, seed = seeded(lambda: FF.dropout_add_rms_norm(x, r, n, w, 1e-6, p, True, return_sum))
    else:
        out, seed = seeded(lambda: FF.dropout_add_layer_norm(x, r, n, w, b, 1e-5, p, True, return_sum))
    acc = ACC[dtype]
    xa, ra, wa = (t.detach().to(acc).requires_grad_() for t in (x, r, w))
    ba = b.detach().to(acc).requires_grad_() if b is not None else None
    ref = add_layer_norm_ref(xa, ra, n, wa, ba, 1e-6 if rms else 1e-5, return_sum, rms, p, seed)
    outs, refs = (out, ref) if return_sum else ((out,), (ref,))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for o, e in zip(outs, refs):
        torch.testing.assert_close(o.to(acc), e.detach(), **tol)
    douts = tuple(torch.randn_like(o) for o in outs)
    got = grads(outs, [x, r, w, b], douts)
    want = grads(refs, [xa, ra, wa, ba], tuple(d.to(acc) for d in douts))
    for g, e in zip(got, want):
        torch.testing.assert_close(g.to(acc), e, **tol)


def test_dropout_add_norm_input_gradient_is_zero_where_dropped():
    x, r = leaf(8, 64), leaf(8, 64)
    y, seed = seeded(lambda: FF.dropout_add_layer_norm(x, r, 64, p=0.5))
    gx, = grads(y, [x], torch.randn_like(y))
    keep = dropout_keep(seed, x.shape, 0.5)
    assert torch.equal(gx[~keep], torch.zeros_like(gx[~keep])) and (gx[keep] != 0).all()


def test_add_norm_modules_drop_in_training_only():
    m = fastseq.nn.AddLayerNorm(32, dropout=0.25)
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    y, seed = seeded(lambda: m(x, r))
    torch.testing.assert_close(y, add_layer_norm_ref(x, r, 32, m.weight, m.bias, p=0.25, seed=seed))
    m.eval()
    torch.testing.assert_close(m(x, r), F.layer_norm(x + r, (32,), m.weight, m.bias))
    sd = torch.nn.LayerNorm(32).state_dict()
    m.load_state_dict(sd)
    mr = fastseq.nn.AddRMSNorm(32, dropout=0.25, return_sum=True)
    (y, s), seed = seeded(lambda: mr(x, r))
    torch.testing.assert_close(s, dropout_ref(x, 0.25, seed, r))


# ============================================================================ gradcheck (fp64)

def _fixed_seed(fn):
    def run(*args):
        torch.manual_seed(99)
        return fn(*args)
    return run


def test_gradcheck_dropout_and_dropout_add():
    x, r = leaf(6, 11), leaf(6, 11)
    assert torch.autograd.gradcheck(_fixed_seed(lambda a: FF.dropout(a, 0.4)), (x,))
    assert torch.autograd.gradcheck(_fixed_seed(lambda a, c: FF.dropout_add(a, c, 0.4)), (x, r))
    assert torch.autograd.gradgradcheck(_fixed_seed(lambda a: FF.dropout(a, 0.4)), (x,))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_bias_act_dropout(activation):
    x = leaf(5, 13) + 0.05              # keep relu's inputs off its kink
    x = x.detach().requires_grad_()
    b = leaf(13)
    f = _fixed_seed(lambda a, c: FF.bias_act_dropout(a, c, activation, 0.3))
    assert torch.autograd.gradcheck(f, (x, b))
    if activation != "relu":
        assert torch.autograd.gradgradcheck(f, (x, b))


@pytest.mark.parametrize("rms,return_sum", [(False, False), (False, True), (True, False), (True, True)])
def test_gradcheck_dropout_add_norm(rms, return_sum):
    x, r, w, b = leaf(4, 9), leaf(4, 9), leaf(9), leaf(9)
    if rms:
        f = _fixed_seed(lambda a, c, d: FF.dropout_add_rms_norm(a, c, 9, d, 1e-6, 0.3, True, return_sum))
        args = (x, r, w)
    else:
        f = _fixed_seed(lambda a, c, d, e: FF.dropout_add_layer_norm(a, c, 9, d, e, 1e-5, 0.3, True, return_sum))
        args = (x, r, w, b)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


# ============================================================================ graph capture, torch.func

def test_opcheck_dropout_ops():
    seed = torch.tensor(424242, dtype=torch.int64)
    x, r, b = leaf(5, 3, 16), leaf(5, 3, 16), leaf(16)
    opcheck(torch.ops.fastseq.dropout.default, (x, r, 0.3, seed, "cpu"))
    opcheck(torch.ops.fastseq.dropout.default, (x, None, 0.3, seed, "cpu"))
    for act in range(len(ACTIVATIONS)):
        opcheck(torch.ops.fastseq.bias_act_dropout_forward.default, (x, b, act, 0.3, seed, "cpu"))
    opcheck(torch.ops.fastseq.bias_act_dropout_forward.default, (x, None, 1, 0.0, seed, "cpu"))
    opcheck(torch.ops.fastseq.bias_act_dropout_backward.default,
            (x.detach(), b.detach(), torch.randn(5, 3, 16, dtype=torch.float64), 1, 0.3, seed, True, "cpu"))


def test_compile_fullgraph_matches_eager():
    w, b = leaf(16, dtype=torch.float32), leaf(16, dtype=torch.float32)
    bias = leaf(16, dtype=torch.float32)

    def f(x, r):
        h = FF.bias_act_dropout(x, bias, "gelu", 0.2)
        y, s = FF.dropout_add_layer_norm(h, r, 16, w, b, 1e-5, 0.3, True, True)
        return FF.dropout_add(y, s, 0.1) + FF.dropout(s, 0.5)

    x, r = leaf(3, 5, 16, dtype=torch.float32), leaf(3, 5, 16, dtype=torch.float32)
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    out_c = cf(x, r)
    gc = grads(out_c.square().sum(), [x, r, w, b, bias], torch.tensor(1.0))
    torch.manual_seed(3)
    out_e = f(x, r)
    ge = grads(out_e.square().sum(), [x, r, w, b, bias], torch.tensor(1.0))
    torch.testing.assert_close(out_c, out_e)           # aot_eager keeps torch's RNG: the same seeds
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)


def test_torch_func_runs_on_torchs_ops():
    x = torch.randn(4, 8)
    jac = torch.func.jacrev(lambda a: FF.bias_act_dropout(a, None, "silu", 0.0))(x)
    assert jac.shape == (4, 8, 4, 8)


# ============================================================================ module, convert

def test_module_is_torchs_dropout_and_convert_swaps_it():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
    fast = fastseq.convert(model)
    assert type(fast[1]) is fastseq.nn.Dropout and fast[1].p == 0.3
    x = torch.randn(5, 8)
    y, seed = seeded(lambda: fast[1](x))
    torch.testing.assert_close(y, dropout_ref(x, 0.3, seed), rtol=0, atol=0)
    fast.eval()
    assert fast[1](x) is x
    assert repr(fast[1]) == repr(torch.nn.Dropout(0.3))


# ============================================================================ Transformer layers

def _mha_ref(mha, q_in, kv_in, seed, p, causal=False):
    """torch.nn.MultiheadAttention's math (batch_first) with fastseq's attention-dropout mask."""
    E, H = mha.embed_dim, mha.num_heads
    W, bias = mha.in_proj_weight, mha.in_proj_bias
    q = F.linear(q_in, W[:E], bias[:E])
    k = F.linear(kv_in, W[E:2 * E], bias[E:2 * E])
    v = F.linear(kv_in, W[2 * E:], bias[2 * E:])
    B, T, S = q_in.shape[0], q_in.shape[1], kv_in.shape[1]
    heads = lambda t, L: t.view(B, L, H, E // H).transpose(1, 2)                  # noqa: E731  (B, H, L, D)
    o = attention_ref(heads(q, T), heads(k, S), heads(v, S), is_causal=causal, dropout_p=p, dropout_seed=seed)
    return mha.out_proj(o.transpose(1, 2).reshape(B, T, E))                      # (B, T, E)


def _draw():
    return int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_training_step_is_the_oracle_with_the_same_seeds(norm_first, activation):
    torch.manual_seed(0)
    E, p = 32, 0.25
    layer = fastseq.nn.TransformerEncoderLayer(E, 4, 64, p, activation, batch_first=True, norm_first=norm_first,
                                               dtype=torch.float64)
    layer.train()
    x = torch.randn(3, 10, E, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    out = layer(x, is_causal=True, src_mask=torch.nn.Transformer.generate_square_subsequent_mask(10))
    torch.manual_seed(11)                     # the seeds in the order the layer draws them
    n1, n2 = layer.norm1, layer.norm2
    act = activation if activation != "gelu" else "gelu"
    if norm_first:
        s_att = _draw()
        sa = _mha_ref(layer.self_attn, F.layer_norm(x, (E,), n1.weight, n1.bias), F.layer_norm(x, (E,), n1.weight,
                                                                                              n1.bias), s_att, p, True)
        s1 = _draw()
        h, xs = add_layer_norm_ref(sa, x, E, n2.weight, n2.bias, return_sum=True, p=p, seed=s1)
        s_ff = _draw()
        ff = layer.linear2(bias_act_dropout_ref(F.linear(h, layer.linear1.weight), layer.linear1.bias, act, p, s_ff))
        s2 = _draw()
        ref = dropout_ref(ff, p, s2, xs)
    else:
        s_att = _draw()
        sa = _mha_ref(layer.self_attn, x, x, s_att, p, True)
        s1 = _draw()
        h = add_layer_norm_ref(sa, x, E, n1.weight, n1.bias, p=p, seed=s1)
        s_ff = _draw()
        ff = layer.linear2(bias_act_dropout_ref(F.linear(h, layer.linear1.weight), layer.linear1.bias, act, p, s_ff))
        s2 = _draw()
        ref = add_layer_norm_ref(ff, h, E, n2.weight, n2.bias, p=p, seed=s2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(out)
    params = [x] + list(layer.parameters())
    for g, e in zip(grads(out, params, dy), grads(ref, params, dy)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_training_step_is_the_oracle_with_the_same_seeds(norm_first):
    """Which dropout module applies where: self-attention's output (dropout1), cross-attention's
    (dropout2), the feed-forward middle (dropout) and its output (dropout3), each its own p."""
    torch.manual_seed(0)
    E = 32
    layer = fastseq.nn.TransformerDecoderLayer(E, 4, 64, 0.1, "gelu", batch_first=True, norm_first=norm_first,
                                               dtype=torch.float64)
    layer.dropout1.p, layer.dropout2.p, layer.dropout.p, layer.dropout3.p = 0.15, 0.25, 0.35, 0.45
    layer.self_attn.dropout, layer.multihead_attn.dropout = 0.2, 0.3
    layer.train()
    x = torch.randn(2, 9, E, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(2, 6, E, dtype=torch.float64, requires_grad=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64)
    torch.manual_seed(5)
    out = layer(x, mem, tgt_mask=causal, tgt_is_causal=True)
    torch.manual_seed(5)
    n1, n2, n3 = layer.norm1, layer.norm2, layer.norm3

    def ff(h):
        s_ff = _draw()
        return layer.linear2(bias_act_dropout_ref(F.linear(h, layer.linear1.weight), layer.linear1.bias, "gelu",
                                                  0.35, s_ff))
    if norm_first:
        h1 = F.layer_norm(x, (E,), n1.weight, n1.bias)
        sa = _mha_ref(layer.self_attn, h1, h1, _draw(), 0.2, True)
        h, xs = add_layer_norm_ref(sa, x, E, n2.weight, n2.bias, return_sum=True, p=0.15, seed=_draw())
        ca = _mha_ref(layer.multihead_attn, h, mem, _draw(), 0.3)
        h, xs = add_layer_norm_ref(ca, xs, E, n3.weight, n3.bias, return_sum=True, p=0.25, seed=_draw())
        f = ff(h)
        ref = dropout_ref(f, 0.45, _draw(), xs)
    else:
        sa = _mha_ref(layer.self_attn, x, x, _draw(), 0.2, True)
        h = add_layer_norm_ref(sa, x, E, n1.weight, n1.bias, p=0.15, seed=_draw())
        ca = _mha_ref(layer.multihead_attn, h, mem, _draw(), 0.3)
        h2 = add_layer_norm_ref(ca, h, E, n2.weight, n2.bias, p=0.25, seed=_draw())
        f = ff(h2)
        ref = add_layer_norm_ref(f, h2, E, n3.weight, n3.bias, p=0.45, seed=_draw())
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(out)
    params = [x, mem] + list(layer.parameters())
    for g, e in zip(grads(out, params, dy), grads(ref, params, dy)):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_layers_fall_back_to_torchs_blocks_when_they_cannot_fuse():
    class Mine(fastseq.nn.TransformerEncoderLayer):
        def _ff_block(self, x):
            return torch.zeros_like(x)
    torch.manual_seed(0)
    layer = Mine(16, 2, 32, 0.0, batch_first=True).train()
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), layer.norm2(layer.norm1(x + layer._sa_block(x, None, None))))
    other = fastseq.nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True).train()
    other.norm2 = torch.nn.RMSNorm(16)                 # not a LayerNorm: torch's blocks and the module's forward
    other(x)


@pytest.mark.parametrize("cls", ["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", torch.nn.GELU(approximate="tanh"), F.silu])
def test_layers_at_dropout_zero_train_as_torchs(cls, norm_first, activation):
    torch.manual_seed(0)
    E = 24
    if cls == "encoder":
        ref = torch.nn.TransformerEncoderLayer(E, 4, 48, 0.0, activation, batch_first=True, norm_first=norm_first,
                                               dtype=torch.float64)
        fast = fastseq.nn.TransformerEncoderLayer(E, 4, 48, 0.0, activation, batch_first=True,
                                                  norm_first=norm_first, dtype=torch.float64)
        args = (torch.randn(2, 7, E, dtype=torch.float64, requires_grad=True),)
    else:
        ref = torch.nn.TransformerDecoderLayer(E, 4, 48, 0.0, activation, batch_first=True, norm_first=norm_first,
                                               dtype=torch.float64)
        fast = fastseq.nn.TransformerDecoderLayer(E, 4, 48, 0.0, activation, batch_first=True,
                                                  norm_first=norm_first, dtype=torch.float64)
        args = (torch.randn(2, 7, E, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 5, E, dtype=torch.float64, requires_grad=True))
    fast.load_state_dict(ref.state_dict())
    ref.train()
    fast.train()
    out_r, out_f = ref(*args), fast(*args)
    torch.testing.assert_close(out_f, out_r)
    dy = torch.randn_like(out_r)
    for g, e in zip(grads(out_f, list(args) + list(fast.parameters()), dy),
                    grads(out_r, list(args) + list(ref.parameters()), dy)):
        torch.testing.assert_close(g, e)


def test_layer_with_a_custom_dropout_runs_torchs_blocks():
    torch.manual_seed(0)
    layer = fastseq.nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True)
    seen = []
    layer.dropout = torch.nn.Sequential()               # not an nn.Dropout: the unfused path
    layer.dropout.register_forward_hook(lambda m, i, o: seen.append(1))
    layer.train()
    layer(torch.randn(2, 3, 16))
    assert seen == [1]


def test_eval_mode_layers_are_unchanged():
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(16, 2, 32, 0.3, batch_first=True)
    fast = fastseq.convert(torch.nn.Sequential(ref))[0]
    ref2 = torch.nn.TransformerEncoderLayer(16, 2, 32, 0.3, batch_first=True)
    ref2.load_state_dict(fast.state_dict())
    fast.eval()
    ref2.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref2(x))
