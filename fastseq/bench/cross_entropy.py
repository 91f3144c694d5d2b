"""Benchmark cases of the cross-entropy family (issue #10): time and peak extra memory of one
forward + backward, label smoothing 0.1, fp32.

    cross_entropy (N, V)                 peers: F.cross_entropy (torch eager), the same expression
                                         under torch.compile (inductor; full mode only)
    linear_cross_entropy (N, E, V)       peers: F.linear + F.cross_entropy (eager), torch's own
                                         F.linear_cross_entropy, the expression under torch.compile

Bytes (for GB/s): the fused loss reads the logits once and writes their gradient once (2 N V
elements); the logits' floor is those bytes over the copy bandwidth.  linear_cross_entropy's
FLOPs are its three GEMMs (6 N E V).  Peak extra memory: the resident set one call adds
(fastseq/bench/scaling.py's measure), per implementation.
"""
import torch
import torch.nn.functional as F

from .. import functional as FF
from .registry import Case, Setup, register

CE_SHAPES = ((8192, 32000), (4096, 50257))
LCE_SHAPES = ((8192, 512, 32000), (4096, 512, 50257))
QUICK_CE, QUICK_LCE = (2048, 32000), (1024, 256, 16000)
EPS = 0.1


def _grad(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn)


def _ce(device, N, V):
    def setup():
        g = torch.Generator().manual_seed(0)
        z = torch.randn(N, V, generator=g).to(device).requires_grad_()
        t = torch.randint(0, V, (N,), generator=g).to(device)
        expr = lambda a: F.cross_entropy(a, t, label_smoothing=EPS)                     # noqa: E731
        comp = _compiled(expr)
        return Setup(fastseq=lambda: _grad(FF.cross_entropy(z, t, label_smoothing=EPS), (z,)),
                     peers={"torch": lambda: _grad(expr(z), (z,)), "torch.compile": lambda: _grad(comp(z), (z,))},
                     bytes=2 * N * V * 4, grad_enabled=True)
    return setup


def _lce(device, N, E, V):
    def setup():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, E, generator=g).to(device).requires_grad_()
        w = (torch.randn(V, E, generator=g) * E ** -0.5).to(device).requires_grad_()
        t = torch.randint(0, V, (N,), generator=g).to(device)
        expr = lambda a, b: F.cross_entropy(F.linear(a, b), t, label_smoothing=EPS)      # noqa: E731
        comp = _compiled(expr)
        return Setup(fastseq=lambda: _grad(FF.linear_cross_entropy(x, w, t, label_smoothing=EPS), (x, w)),
                     peers={"torch": lambda: _grad(expr(x, w), (x, w)),
                            "torch linear_cross_entropy": lambda: _grad(
                                F.linear_cross_entropy(x, w, t, label_smoothing=EPS), (x, w)),
                            "torch.compile": lambda: _grad(comp(x, w), (x, w))},
                     flops=6.0 * N * E * V, grad_enabled=True)
    return setup


for _device in ("cpu", "cuda"):
    for (_N, _V) in CE_SHAPES + (QUICK_CE,):
        _quick = (_N, _V) == QUICK_CE
        register(Case("cross_entropy", f"cross_entropy fwd+bwd ({_N}, {_V}) ls={EPS}", _device, _ce(_device, _N, _V),
                      peers=("torch", "torch.compile"), quick=_quick,
                      meta={"memory": True, "quick_peers": ("torch",)}))
    for (_N, _E, _V) in LCE_SHAPES + (QUICK_LCE,):
        _quick = (_N, _E, _V) == QUICK_LCE
        register(Case("cross_entropy", f"linear_cross_entropy fwd+bwd ({_N}, {_E}, {_V}) ls={EPS}", _device,
                      _lce(_device, _N, _E, _V),
                      peers=("torch", "torch linear_cross_entropy", "torch.compile"), quick=_quick,
                      meta={"memory": True, "quick_peers": ("torch",)}))
