"""The fused LSTM layer against torch.nn.LSTM (one layer) and the step-by-step reference:
outputs, final states and every gradient, fp32 and fp64; gradcheck; bad input."""
import pytest
import torch

from fastseq.functional import lstm_layer
from fastseq.recurrent import lstm_ref

DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,B,C,H", [(7, 3, 11, 13), (1, 2, 5, 4), (20, 1, 16, 32), (5, 4, 781, 59)])
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_layer_matches_torch(poison, dtype, T, B, C, H, bias):
    ref = torch.nn.LSTM(C, H, bias=bias).to(dtype)
    x = torch.randn(T, B, C, dtype=dtype, requires_grad=True)
    h0 = torch.randn(B, H, dtype=dtype, requires_grad=True)
    c0 = torch.randn(B, H, dtype=dtype, requires_grad=True)
    params = list(ref.parameters())
    y, (h, c) = lstm_layer(x, (h0, c0), *params)
    y_t, (h_t, c_t) = ref(x, (h0.unsqueeze(0), c0.unsqueeze(0)))
    torch.testing.assert_close(y, y_t, **tol(dtype))
    torch.testing.assert_close(h, h_t[0], **tol(dtype))
    torch.testing.assert_close(c, c_t[0], **tol(dtype))
    dy, dh, dc = torch.randn_like(y), torch.randn_like(h), torch.randn_like(c)
    inputs = [x, h0, c0] + params
    got = torch.autograd.grad((y * dy).sum() + (h * dh).sum() + (c * dc).sum(), inputs)
    exp = torch.autograd.grad((y_t * dy).sum() + (h_t[0] * dh).sum() + (c_t[0] * dc).sum(), inputs)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, **tol(dtype))


def test_matches_the_reference_and_batch_first():
    x = torch.randn(3, 6, 8)                                 # (B, T, C)
    w_ih, w_hh, b_ih, b_hh = torch.randn(20, 8), torch.randn(20, 5), torch.randn(20), torch.randn(20)
    y, (h, c) = lstm_layer(x, None, w_ih, w_hh, b_ih, b_hh, batch_first=True)
    z = torch.zeros(3, 5)
    y_r, (h_r, c_r) = lstm_ref(x.transpose(0, 1), z, z, w_ih, w_hh, b_ih, b_hh)
    torch.testing.assert_close(y, y_r.transpose(0, 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h, h_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c, c_r, rtol=1e-4, atol=1e-5)


def test_gradcheck():
    d = dict(dtype=torch.float64, requires_grad=True)
    args = (torch.randn(4, 2, 3, **d), (torch.randn(2, 5, **d), torch.randn(2, 5, **d)), torch.randn(20, 3, **d),
            torch.randn(20, 5, **d), torch.randn(20, **d), torch.randn(20, **d))

    def fn(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        y, (h, c) = lstm_layer(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
        return y, h, c
    flat = (args[0], *args[1], *args[2:])
    assert torch.autograd.gradcheck(fn, flat)


@pytest.mark.parametrize("call,match", [
    (lambda: lstm_layer(torch.randn(4, 3), None, torch.randn(8, 3), torch.randn(8, 2)), "expected input to be 3D"),
    (lambda: lstm_layer(torch.randn(4, 2, 3), None, torch.randn(8, 5), torch.randn(8, 2)),
     r"expected weight_ih of shape \(4H, 3\)"),
    (lambda: lstm_layer(torch.randn(4, 2, 3), (torch.randn(3, 2), torch.randn(3, 2)), torch.randn(8, 3),
                        torch.randn(8, 2)), r"expected h0 of shape \[2, 2\], got \[3, 2\]"),
    (lambda: lstm_layer(torch.ones(4, 2, 3, dtype=torch.int64), None, torch.randn(8, 3), torch.randn(8, 2)),
     "expected a floating-point input tensor, got torch.int64"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias", [
    (1, False, False, True), (2, True, True, True), (3, False, True, False), (2, True, False, False)])
def test_lstm_module_is_a_drop_in(num_layers, bidirectional, batch_first, bias):
    import fastseq

    torch.manual_seed(0)
    kw = dict(input_size=9, hidden_size=7, num_layers=num_layers, bidirectional=bidirectional,
              batch_first=batch_first, bias=bias, dropout=0.3)
    ref, fast = torch.nn.LSTM(**kw).eval(), fastseq.nn.LSTM(**kw).eval()
    assert fast.state_dict().keys() == ref.state_dict().keys()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6, 9) if batch_first else torch.randn(6, 4, 9)
    dirs = 2 if bidirectional else 1
    hx = (torch.randn(num_layers * dirs, 4, 7), torch.randn(num_layers * dirs, 4, 7))
    for h in (None, hx):
        a, b = ref(x, h), fast(x, h)
        torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[1][0], a[1][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[1][1], a[1][1], rtol=1e-4, atol=1e-5)
    ga = torch.autograd.grad(a[0].sum() + a[1][1].sum(), list(ref.parameters()))
    gb = torch.autograd.grad(b[0].sum() + b[1][1].sum(), list(fast.parameters()))
    for p, q in zip(ga, gb):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_lstm_module_unbatched_packed_and_convert():
    import fastseq

    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 4)
    model = torch.nn.Sequential(ref)
    u = torch.randn(7, 5)                                   # unbatched (T, C)
    expected = ref(u)
    model = fastseq.convert(model)
    assert type(model[0]) is fastseq.nn.LSTM and model[0].weight_ih_l0 is ref.weight_ih_l0
    got = model[0](u)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(6, 3, 5), [6, 4, 2])
    out, _ = model[0](packed)                              # torch's own forward for now
    assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
