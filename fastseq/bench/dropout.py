"""Benchmark cases of the fused dropout ops (issue #9), each against torch's unfused sequence:

    dropout_add_layer_norm   layer_norm(dropout(x) + r)        torch: F.dropout, add, F.layer_norm
    bias_act_dropout (gelu)  dropout(gelu(x + b))              torch: add, F.gelu, F.dropout
    dropout_add              r + dropout(x)                    torch: F.dropout, add
    dropout                  dropout(x)                        torch: F.dropout

at (8192, 512) and (8192, 2048), fp32, p = 0.1, forward alone (no grad) and forward + backward.
Bytes are the fused op's traffic (each tensor read or written once per pass; torch's sequence
moves several times that and writes a mask).  The bias + GELU peer adds the bias in its own pass;
inside torch's feed-forward block addmm adds it with the GEMM, so the models family is the
measure of what the fusion gains in a model.
"""
import torch
import torch.nn.functional as F

from ..dropout import bias_act_dropout, dropout, dropout_add
from ..layer_norm import dropout_add_layer_norm
from .registry import Case, Setup, register

SHAPES = ((8192, 512), (8192, 2048))
P = 0.1


def _leaves(device, shape):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_()   # noqa: E731
    n = shape[-1]
    return mk(*shape), mk(*shape), mk(n), mk(n), torch.randn(*shape, generator=g).to(device)


def _grad(y, inputs, dy):
    return torch.autograd.grad(y, inputs, dy)


def _case(op, device, shape, backward):
    def setup():
        x, r, w, b, dy = _leaves(device, shape)
        n = shape[-1]
        E = x.numel() * 4
        if op == "dropout_add_layer_norm":
            fast = lambda: dropout_add_layer_norm(x, r, (n,), w, b, 1e-5, P)                  # noqa: E731
            peer = lambda: F.layer_norm(F.dropout(x, P) + r, (n,), w, b)                       # noqa: E731
            ins, traffic = (x, r, w, b), (3 * E, 5 * E)   # fwd x, r -> y; bwd x, r, dy -> dx, dr
        elif op == "bias_act_dropout":
            fast = lambda: bias_act_dropout(x, b, "gelu", P)                                    # noqa: E731
            peer = lambda: F.dropout(F.gelu(x + b), P)                                         # noqa: E731
            ins, traffic = (x, b), (2 * E, 3 * E)         # fwd x -> y; bwd x, dy -> dx
        elif op == "dropout_add":
            fast = lambda: dropout_add(x, r, P)                                                 # noqa: E731
            peer = lambda: r + F.dropout(x, P)                                                 # noqa: E731
            ins, traffic = (x, r), (3 * E, 2 * E)         # fwd x, r -> y; bwd dy -> dx (dr = dy)
        else:
            fast = lambda: dropout(x, P)                                                        # noqa: E731
            peer = lambda: F.dropout(x, P)                                                     # noqa: E731
            ins, traffic = (x,), (2 * E, 2 * E)
        if backward:
            return Setup(fastseq=lambda: _grad(fast(), ins, dy), peers={"torch": lambda: _grad(peer(), ins, dy)},
                         bytes=traffic[0] + traffic[1], grad_enabled=True)
        return Setup(fastseq=fast, peers={"torch": peer}, bytes=traffic[0], grad_enabled=False)
    return setup


for _device in ("cpu", "cuda"):
    for _shape in SHAPES:
        for _op in ("dropout_add_layer_norm", "bias_act_dropout", "dropout_add", "dropout"):
            for _bwd in (False, True):
                register(Case("dropout", f"{_op} {'fwd+bwd' if _bwd else 'fwd'} {_shape} p={P}", _device,
                              _case(_op, _device, _shape, _bwd), peers=("torch",),
                              quick=_bwd and _op in ("dropout_add_layer_norm", "bias_act_dropout")))
