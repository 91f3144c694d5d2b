"""LayerNorm family on the CPU kernels: forward and every gradient against torch and the
reference, fp32 and fp64, awkward shapes, gradcheck, NaN, poisoned outputs, drop-in modules,
convert(), bad input (DESIGN.md section 6)."""
import pytest
import torch
import torch.nn.functional as F

import fastseq
from fastseq.functional import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastseq.layer_norm import add_layer_norm_ref, layer_norm_ref, rms_norm_ref

DTYPES = [torch.float32, torch.float64]
# (input shape, normalized_shape): 1823x781, one row, 1-3 normalized dims, odd sizes
SHAPES = [((1823, 781), (781,)), ((1, 59), (59,)), ((3, 97, 7, 13), (7, 13)),
          ((2, 5, 4, 6), (5, 4, 6)), ((4, 33), (33,))]


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def params(shape, dtype, affine=True, bias=True):
    w = (torch.randn(shape, dtype=dtype) if affine else None)
    b = (torch.randn(shape, dtype=dtype) if affine and bias else None)
    return w, b


def grads(out, inputs, dy):
    live = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, live, dy)
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def assert_same(a, b, **kw):
    for p, q in zip(a, b):
        assert (p is None) == (q is None)
        if p is not None:
            torch.testing.assert_close(p, q, **kw)


# ------------------------------------------------------------------------------ layer_norm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,nshape", SHAPES)
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_matches_torch_forward_and_grads(poison, dtype, shape, nshape, affine, bias):
    x = torch.randn(shape, dtype=dtype) * 3 + 1.5
    w, b = params(nshape, dtype, affine, bias)
    dy = torch.randn(shape, dtype=dtype)
    ins = [leaf(x), leaf(w), leaf(b)]
    y = layer_norm(ins[0], nshape, ins[1], ins[2])
    ref_ins = [leaf(x), leaf(w), leaf(b)]
    y_t = F.layer_norm(ref_ins[0], nshape, ref_ins[1], ref_ins[2])
    torch.testing.assert_close(y, y_t, **tol(dtype))
    torch.testing.assert_close(y, layer_norm_ref(x, nshape, w, b), **tol(dtype))
    assert_same(grads(y, ins, dy), grads(y_t, ref_ins, dy), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,nshape", SHAPES)
def test_rms_norm_matches_torch_forward_and_grads(poison, dtype, shape, nshape):
    x = torch.randn(shape, dtype=dtype) + 0.5
    w = torch.randn(nshape, dtype=dtype)
    dy = torch.randn(shape, dtype=dtype)
    for eps in (None, 1e-6):
        ins = [leaf(x), leaf(w)]
        y = rms_norm(ins[0], nshape, ins[1], eps)
        ref_ins = [leaf(x), leaf(w)]
        y_t = F.rms_norm(ref_ins[0], nshape, ref_ins[1], eps)
        torch.testing.assert_close(y, y_t, **tol(dtype))
        torch.testing.assert_close(y, rms_norm_ref(x, nshape, w, eps), **tol(dtype))
        assert_same(grads(y, ins, dy), grads(y_t, ref_ins, dy), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,nshape", [((1823, 781), (781,)), ((3, 9, 5, 7), (5, 7))])
@pytest.mark.parametrize("rms", [False, True])
def test_add_norm_matches_torch_on_the_sum(poison, dtype, shape, nshape, rms):
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w, b = params(nshape, dtype)
    dy = torch.randn(shape, dtype=dtype)
    ins = [leaf(x), leaf(r), leaf(w), leaf(b)]
    ref_ins = [leaf(x), leaf(r), leaf(w), leaf(b)]
    if rms:
        y = add_rms_norm(ins[0], ins[1], nshape, ins[2], 1e-6)
        y_t = F.rms_norm(ref_ins[0] + ref_ins[1], nshape, ref_ins[2], 1e-6)
        ins[3] = ref_ins[3] = None
    else:
        y = add_layer_norm(ins[0], ins[1], nshape, ins[2], ins[3])
        y_t = F.layer_norm(ref_ins[0] + ref_ins[1], nshape, ref_ins[2], ref_ins[3])
    torch.testing.assert_close(y, y_t, **tol(dtype))
    assert_same(grads(y, ins, dy), grads(y_t, ref_ins, dy), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm_return_sum_feeds_both_paths(poison, dtype):
    """Pre-norm residual stream: y = LN(x + r) and s = x + r both reach the loss."""
    shape, nshape = (67, 3, 59), (59,)
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    w, b = params(nshape, dtype)
    dy, ds = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    ins = [leaf(x), leaf(r), leaf(w), leaf(b)]
    y, s = add_layer_norm(*ins[:2], nshape, *ins[2:], return_sum=True)
    ref_ins = [leaf(x), leaf(r), leaf(w), leaf(b)]
    y_t, s_t = add_layer_norm_ref(*ref_ins[:2], nshape, *ref_ins[2:], return_sum=True)
    torch.testing.assert_close(s, s_t, rtol=0, atol=0)
    torch.testing.assert_close(y, y_t, **tol(dtype))
    loss = (y * dy).sum() + (s * ds).sum()
    loss_t = (y_t * dy).sum() + (s_t * ds).sum()
    assert_same(torch.autograd.grad(loss, ins), torch.autograd.grad(loss_t, ref_ins), **tol(dtype))
    # only the sum used downstream: the norm's weight/bias get zero gradient
    ins = [leaf(x), leaf(r), leaf(w), leaf(b)]
    _, s = add_layer_norm(*ins[:2], nshape, *ins[2:], return_sum=True)
    gx, gr, gw, gb = torch.autograd.grad((s * ds).sum(), ins, allow_unused=True)
    torch.testing.assert_close(gx, ds)
    torch.testing.assert_close(gr, ds)
    for g in (gw, gb):                          # the norm did not reach the loss
        assert g is None or (g.shape == nshape and not g.any())


# ------------------------------------------------------------------------------ gradcheck

def test_gradcheck_every_function():
    d = dict(dtype=torch.float64)
    x = torch.randn(4, 3, 5, **d, requires_grad=True)
    r = torch.randn(4, 3, 5, **d, requires_grad=True)
    w = torch.randn(3, 5, **d, requires_grad=True)
    b = torch.randn(3, 5, **d, requires_grad=True)
    gc = torch.autograd.gradcheck
    assert gc(lambda x, w, b: layer_norm(x, (3, 5), w, b), (x, w, b))
    assert gc(lambda x: layer_norm(x, (5,)), (x,))
    assert gc(lambda x, w: rms_norm(x, (3, 5), w, 1e-5), (x, w))
    assert gc(lambda x, r, w, b: add_layer_norm(x, r, (5,), w[0], b[0]), (x, r, w, b))
    assert gc(lambda x, r, w, b: add_layer_norm(x, r, (3, 5), w, b, return_sum=True), (x, r, w, b))
    assert gc(lambda x, r, w: add_rms_norm(x, r, (3, 5), w, 1e-5, return_sum=True), (x, r, w))


# ------------------------------------------------------------------------------ edge cases

def test_nan_propagates_only_to_its_row(poison):
    x = torch.randn(6, 40)
    x[2, 7] = float("nan")
    y = layer_norm(x, (40,), torch.randn(40), torch.randn(40))
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3, 4, 5]]).all()
    x.requires_grad_()
    y = layer_norm(x, (40,))
    y.backward(torch.ones_like(y))
    assert torch.isnan(x.grad[2]).all() and torch.isfinite(x.grad[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_large_offset_rows_are_no_less_accurate_than_torch(offset):
    """mean >> std: a one-pass sum-of-squares variance loses everything here; the two-pass
    kernel must stay at least as close to the fp64 answer as torch's fp32 kernel."""
    x = torch.randn(8, 1024) * 1e-2 + offset
    exact = layer_norm_ref(x.double(), (1024,))
    err = (layer_norm(x, (1024,)).double() - exact).abs().max()
    err_torch = (F.layer_norm(x, (1024,)).double() - exact).abs().max()
    assert err <= err_torch * 1.05 + 1e-6


OPS = {  # name -> (fastseq call, torch call) on (x, r, w, b) with normalized_shape (n,)
    "layer_norm": (lambda x, r, w, b, n: layer_norm(x, (n,), w, b),
                   lambda x, r, w, b, n: F.layer_norm(x, (n,), w, b)),
    "rms_norm": (lambda x, r, w, b, n: rms_norm(x, (n,), w, 1e-6),
                 lambda x, r, w, b, n: F.rms_norm(x, (n,), w, 1e-6)),
    "add_layer_norm": (lambda x, r, w, b, n: add_layer_norm(x, r, (n,), w, b),
                       lambda x, r, w, b, n: F.layer_norm(x + r, (n,), w, b)),
    "add_rms_norm": (lambda x, r, w, b, n: add_rms_norm(x, r, (n,), w, 1e-6),
                     lambda x, r, w, b, n: F.rms_norm(x + r, (n,), w, 1e-6)),
}


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_input_matches_torch(poison, op):
    fast, ref = OPS[op]
    base = [torch.randn(64, 48) for _ in range(2)]
    w, b = torch.randn(64), torch.randn(64)
    ins = [leaf(t) for t in base] + [leaf(w), leaf(b)]
    ref_ins = [leaf(t) for t in base] + [leaf(w), leaf(b)]
    y = fast(ins[0].t(), ins[1].t(), ins[2], ins[3], 64)          # (48, 64) transposed views
    y_t = ref(ref_ins[0].t(), ref_ins[1].t(), ref_ins[2], ref_ins[3], 64)
    torch.testing.assert_close(y, y_t)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, ins, dy, allow_unused=True)
    exp = torch.autograd.grad(y_t, ref_ins, dy, allow_unused=True)
    for g, e in zip(got, exp):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("op", OPS)
def test_zero_rows_behave_as_torch(poison, op):
    fast, ref = OPS[op]
    x, r = (torch.zeros(0, 3, 16).requires_grad_() for _ in range(2))
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    y = fast(x, r, w, b, 16)
    assert y.shape == (0, 3, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(w.grad, torch.zeros(16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,big", [(768, 50.0), (8192, 3000.0)])
def test_outlier_channel_keeps_full_accuracy(dtype, n, big):
    """A 'massive activation' in one channel: the variance must not cancel away."""
    x = torch.randn(16, n, dtype=dtype)
    x[:, 0] = big
    x[:, n // 2] = -big / 3
    exact = layer_norm_ref(x.double(), (n,))
    rel = ((layer_norm(x, (n,)).double() - exact).abs().max() / exact.abs().max()).item()
    rel_torch = ((F.layer_norm(x, (n,)).double() - exact).abs().max() / exact.abs().max()).item()
    assert rel <= max(4 * rel_torch, 1e-6 if dtype == torch.float32 else 1e-14)


def test_inf_input_gives_nan_like_torch():
    x = torch.randn(3, 40)
    x[1, 3] = float("inf")
    y, y_t = layer_norm(x, (40,)), F.layer_norm(x, (40,))
    assert torch.isnan(y[1]).all() and torch.isnan(y_t[1]).all()
    torch.testing.assert_close(y[[0, 2]], y_t[[0, 2]])


@pytest.mark.parametrize("op", OPS)
def test_double_backward_matches_torch(op):
    """create_graph=True: higher-order gradients flow (through a recomputed reference)."""
    fast, ref = OPS[op]
    base = [torch.randn(4, 8, dtype=torch.float64) for _ in range(2)] + \
        [torch.randn(8, dtype=torch.float64) for _ in range(2)]

    def second_order(fn):
        x, r, w, b = (leaf(t) for t in base)
        z = (x * w).sum() + fn(x, r, w, b, 8).pow(3).sum()
        (g,) = torch.autograd.grad(z, x, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), (x, r, w), allow_unused=True)

    for got, exp in zip(second_order(fast), second_order(ref)):
        assert (got is None) == (exp is None)
        if exp is not None:
            torch.testing.assert_close(got, exp)
    x, w = leaf(base[0]), leaf(base[2])
    assert torch.autograd.gradgradcheck(lambda x, w: layer_norm(x, (8,), w), (x, w))


def test_mixed_dtypes_and_autocast_run_on_torch_native():
    x = torch.randn(6, 32).bfloat16()
    w, b = torch.randn(32), torch.randn(32)             # fp32 parameters, bf16 activations
    assert "mixed precision" in fastseq.explain("layer_norm", x, (32,), w, b)
    torch.testing.assert_close(layer_norm(x, (32,), w, b), F.layer_norm(x, (32,), w, b))
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.LayerNorm(32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)))
    fastseq.convert(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(got, expected)


def test_weight_gradients_are_deterministic():
    x = torch.randn(999, 257, requires_grad=True)
    w = torch.randn(257, requires_grad=True)
    b = torch.randn(257, requires_grad=True)
    dy = torch.randn(999, 257)
    runs = [torch.autograd.grad(layer_norm(x, (257,), w, b), (w, b), dy) for _ in range(3)]
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])


@pytest.mark.parametrize("threads", [1, 3, 7])
def test_gradients_do_not_depend_on_thread_count_beyond_rounding(threads):
    """Partial sums per thread, including more threads than rows."""
    old = torch.get_num_threads()
    x, r = torch.randn(5, 19), torch.randn(5, 19)
    w, b, dy = torch.randn(19), torch.randn(19), torch.randn(5, 19)
    ins = [leaf(x), leaf(r), leaf(w), leaf(b)]
    ref_ins = [leaf(x), leaf(r), leaf(w), leaf(b)]
    try:
        torch.set_num_threads(threads)
        got = torch.autograd.grad(add_layer_norm(ins[0], ins[1], (19,), ins[2], ins[3]), ins, dy)
    finally:
        torch.set_num_threads(old)
    exp = torch.autograd.grad(F.layer_norm(ref_ins[0] + ref_ins[1], (19,), ref_ins[2], ref_ins[3]), ref_ins, dy)
    assert_same(got, exp)


def test_float16_on_cpu_falls_back_to_torch():
    x = torch.randn(5, 16).half()
    torch.testing.assert_close(layer_norm(x, (16,)), F.layer_norm(x.float(), (16,)).half(),
                               rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call,match", [
    (lambda: layer_norm(torch.randn(4, 8), (7,)),
     r"normalized_shape \[7\] must match the trailing dims of the input, got input of shape \[4, 8\]"),
    (lambda: layer_norm(torch.randn(8), (2, 8)), r"got input of shape \[8\]"),
    (lambda: layer_norm(torch.arange(8).view(2, 4), (4,)), "expected a floating-point input, got torch.int64"),
    (lambda: layer_norm(torch.randn(2, 4), (4,), torch.randn(5)), r"expected weight of shape \[4\], got \[5\]"),
    (lambda: layer_norm(torch.randn(2, 4), (4,), torch.randn(4), torch.randn(2, 2)),
     r"expected bias of shape \[4\], got \[2, 2\]"),
    (lambda: layer_norm(torch.randn(2, 4), (4,), torch.randn(4, device="meta")),
     "expected weight on cpu \\(the input's\\), got meta"),
    (lambda: add_layer_norm(torch.randn(2, 4), torch.randn(2, 5), (4,)), r"expected a floating-point residual of the input's shape"),
    (lambda: rms_norm([1.0, 2.0], (2,)), "expected input to be a torch.Tensor, got list"),
])
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------ modules

@pytest.mark.parametrize("kwargs", [{}, {"elementwise_affine": False}, {"bias": False}, {"eps": 1e-3}])
def test_layer_norm_module_is_a_drop_in(kwargs):
    ref = torch.nn.LayerNorm((6, 10), **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    fast = fastseq.nn.LayerNorm((6, 10), **kwargs)
    assert fast.state_dict().keys() == ref.state_dict().keys()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 10)
    torch.testing.assert_close(fast(x), ref(x))
    assert repr(fast).endswith(repr(ref).split("(", 1)[1])


def test_rms_norm_module_is_a_drop_in():
    ref = torch.nn.RMSNorm(12, eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
    fast = fastseq.nn.RMSNorm(12, eps=1e-6)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 12)
    torch.testing.assert_close(fast(x), ref(x))


def test_add_norm_modules():
    m = fastseq.nn.AddLayerNorm(8, return_sum=True)
    assert m.state_dict().keys() == torch.nn.LayerNorm(8).state_dict().keys()
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    y, s = m(x, r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (8,), m.weight, m.bias))
    torch.testing.assert_close(s, x + r)
    m2 = fastseq.nn.AddRMSNorm(8)
    torch.testing.assert_close(m2(x, r), F.rms_norm(x + r, (8,), m2.weight))


def test_convert_swaps_layers_and_shares_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8),
                                torch.nn.Sequential(torch.nn.RMSNorm(8), torch.nn.ReLU()))
    model.eval()
    x = torch.randn(5, 8)
    expected = model(x)
    params_before = [id(p) for p in model.parameters()]
    out = fastseq.convert(model)
    assert out is model
    assert type(model[1]) is fastseq.nn.LayerNorm
    assert type(model[2][0]) is fastseq.nn.RMSNorm
    assert [id(p) for p in model.parameters()] == params_before
    assert not model.training and not model[1].training
    torch.testing.assert_close(model(x), expected)
    # a layer used twice gets one twin
    shared = torch.nn.LayerNorm(8)
    twice = fastseq.convert(torch.nn.Sequential(shared, torch.nn.ReLU(), shared))
    assert twice[0] is twice[2] and type(twice[0]) is fastseq.nn.LayerNorm
    # a bare LayerNorm converts too, and train mode is kept
    ln = torch.nn.LayerNorm(4).train()
    new = fastseq.convert(ln)
    assert type(new) is fastseq.nn.LayerNorm and new.training and new.weight is ln.weight
