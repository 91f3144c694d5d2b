"""The recurrent family on a real GPU through the drop-in modules, at real sizes (skipped without
one; runs on the device machine): forward and every gradient against torch.nn (cuDNN) in fp64
(cuDNN and the fused loop agree to rounding) and fp32, padded and packed; the layer-normalized
cells against their step-by-step reference on the GPU."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq

pytestmark = pytest.mark.skipif("cuda" not in fastseq.available_backends(), reason="needs a GPU and numba-cuda")

TOL = {torch.float32: dict(rtol=2e-3, atol=2e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}
KINDS = {"LSTM": (torch.nn.LSTM, {}), "GRU": (torch.nn.GRU, {}), "RNN": (torch.nn.RNN, {}),
         "RNN_RELU": (torch.nn.RNN, {"nonlinearity": "relu"})}


def outputs_and_grads(m, x, lengths=None):
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    out, st = m(inp)
    if lengths is not None:
        out = pad_packed_sequence(out, total_length=x.shape[0])[0]
    states = st if isinstance(st, tuple) else (st,)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    loss = (out * w).sum() + sum((s * s).sum() for s in states)
    return [out, *states, *torch.autograd.grad(loss, [x] + list(m.parameters()))]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_modules_on_gpu_match_torch(kind, dtype, packed):
    cls, extra = KINDS[kind]
    T, B, C, H = 64, 16, 96, 130
    ref = cls(C, H, num_layers=2, bidirectional=True, **extra).to("cuda", dtype)
    fast = getattr(fastseq.nn, cls.__name__)(C, H, num_layers=2, bidirectional=True, **extra).to("cuda", dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, C, device="cuda", dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,)) if packed else None
    with fastseq.use_backend("cuda"):
        got = outputs_and_grads(fast, x, lengths)
    exp = outputs_and_grads(ref, x, lengths)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, **TOL[dtype])


@pytest.mark.parametrize("kind", ["LayerNormLSTM", "LayerNormGRU"])
def test_layer_norm_cells_on_gpu(kind):
    m = getattr(fastseq.nn, kind)(96, 130, num_layers=2).to("cuda", torch.float64)
    x = torch.randn(50, 8, 96, device="cuda", dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(1, 51, (8,))
    with fastseq.use_backend("cuda"):
        got = outputs_and_grads(m, x, lengths)
    with fastseq.use_backend("torch"):
        exp = outputs_and_grads(m, x, lengths)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, **TOL[torch.float64])
