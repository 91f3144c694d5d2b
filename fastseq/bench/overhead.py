"""Benchmark cases of per-call overhead (issue #8): tiny calls of every op, where the Python
between a call and its kernel is most of the time, each against torch's same op.

Decoding calls each op once per token, at batch 1; small recurrent layers step a cell per
token.  At these sizes a kernel runs in a microsecond or two, so what a call costs is its
argument checks, dispatch, allocation and autograd bookkeeping.  Each case times a loop of
back-to-back calls (Case.calls_per_sample; timing.calls_for shortens the loop for calls that
take longer) and reports microseconds per call for fastseq and torch, and the ratio torch /
fastseq (< 1: fastseq's call costs more).

Every op runs under torch.no_grad() (inference, the decoding case) and, where training calls it
too, a second time with grad enabled and parameters that require grad (the forward alone: what
building the autograd graph adds).  SDPA decode has no grad row: decoding is inference.
Peers get the same tensors (cells and layers: the same weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as FF, nn as fnn
from .registry import Case, Setup, register

D_NORM = 512               # layer_norm / rms_norm / add_layer_norm: (1, 512)
NH, D, S_CACHE, S = 8, 64, 256, 64    # decode: q (1, 8, 1, 64) against 64 keys of a (1, 8, 256, 64) cache
H = 256                    # cells and layers: (1, 256), T = B = 1
CALLS = 2000               # calls per sample at most (fewer for slower calls: timing.calls_for)


def _gen():
    return torch.Generator().manual_seed(0)


def _norm_case(op, device, grad):
    """layer_norm / rms_norm / add_layer_norm of (1, 512) with affine parameters."""
    def setup():
        g = _gen()
        mk = lambda *s: torch.randn(*s, generator=g).to(device)           # noqa: E731
        x, r, w, b = mk(1, D_NORM), mk(1, D_NORM), mk(D_NORM), mk(D_NORM)
        w.requires_grad_(grad)
        b.requires_grad_(grad)
        shape = (D_NORM,)
        if op == "layer_norm":
            fast = lambda: FF.layer_norm(x, shape, w, b)                         # noqa: E731
            peer = lambda: F.layer_norm(x, shape, w, b)                          # noqa: E731
        elif op == "rms_norm":
            fast = lambda: FF.rms_norm(x, shape, w, 1e-6)                        # noqa: E731
            peer = lambda: F.rms_norm(x, shape, w, 1e-6)                         # noqa: E731
        else:
            fast = lambda: FF.add_layer_norm(x, r, shape, w, b)                  # noqa: E731
            peer = lambda: F.layer_norm(x + r, shape, w, b)                      # noqa: E731
        return Setup(fastseq=fast, peers={"torch": peer}, grad_enabled=grad)
    return setup


def _decode_case(device):
    """One decode step's attention: q of length 1 against the first 64 keys of a preallocated
    KV cache, the slice taken in the call (as a decoder takes it each step) and read in place."""
    def setup():
        g = _gen()
        q = torch.randn(1, NH, 1, D, generator=g).to(device)
        k_cache = torch.randn(1, NH, S_CACHE, D, generator=g).to(device)
        v_cache = torch.randn(1, NH, S_CACHE, D, generator=g).to(device)
        return Setup(
            fastseq=lambda: FF.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S]),
            peers={"torch": lambda: F.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S])},
            grad_enabled=False)
    return setup


def _cell_case(kind, device, grad):
    """One step of fastseq.nn.LSTMCell / GRUCell against torch.nn's, same weights, state given."""
    def setup():
        torch.manual_seed(0)
        ref = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}[kind](H, H).to(device)
        fast = {"lstm": fnn.LSTMCell, "gru": fnn.GRUCell}[kind](H, H).to(device)
        fast.load_state_dict(ref.state_dict())
        for p in (*ref.parameters(), *fast.parameters()):
            p.requires_grad_(grad)
        g = _gen()
        x, h, c = (torch.randn(1, H, generator=g).to(device) for _ in range(3))
        state = (h, c) if kind == "lstm" else h
        return Setup(fastseq=lambda: fast(x, state), peers={"torch": lambda: ref(x, state)}, grad_enabled=grad)
    return setup


def _lstm_layer_case(device, grad):
    """fastseq.functional.lstm_layer over one step (T = B = 1) against torch's functional LSTM
    (torch._VF.lstm, what nn.LSTM.forward calls), same weights and initial state."""
    def setup():
        torch.manual_seed(0)
        ref = nn.LSTM(H, H).to(device)
        for p in ref.parameters():
            p.requires_grad_(grad)
        g = _gen()
        x = torch.randn(1, 1, H, generator=g).to(device)                   # (T, B, C)
        h0, c0 = (torch.randn(1, H, generator=g).to(device) for _ in range(2))   # (B, H)
        hx = (h0.unsqueeze(0), c0.unsqueeze(0))                             # (layers, B, H)
        w = ref._flat_weights
        return Setup(
            fastseq=lambda: FF.lstm_layer(x, (h0, c0), *w),
            peers={"torch": lambda: torch._VF.lstm(x, hx, w, True, 1, 0.0, False, False, False)},
            grad_enabled=grad)
    return setup


def _module_case(kind, device, grad):
    """Module forwards as a model calls them: fastseq.nn.LayerNorm(512) on (1, 512),
    fastseq.nn.LSTM(256, 256) on (1, 1, 256) with no state given, against torch.nn's."""
    def setup():
        torch.manual_seed(0)
        if kind == "LayerNorm":
            ref, fast = nn.LayerNorm(D_NORM), fnn.LayerNorm(D_NORM)
            x = torch.randn(1, D_NORM, generator=_gen()).to(device)
        else:
            ref, fast = nn.LSTM(H, H), fnn.LSTM(H, H)
            x = torch.randn(1, 1, H, generator=_gen()).to(device)
        ref, fast = ref.to(device), fast.to(device)
        fast.load_state_dict(ref.state_dict())
        for p in (*ref.parameters(), *fast.parameters()):
            p.requires_grad_(grad)
        return Setup(fastseq=lambda: fast(x), peers={"torch": lambda: ref(x)}, grad_enabled=grad)
    return setup


def _mode(grad):
    return "grad" if grad else "no_grad"


# op -> (case builder taking (device, grad), whether a grad row makes sense)
OPS = {
    f"layer_norm (1, {D_NORM})": (lambda d, g: _norm_case("layer_norm", d, g), True),
    f"rms_norm (1, {D_NORM})": (lambda d, g: _norm_case("rms_norm", d, g), True),
    f"add_layer_norm (1, {D_NORM})": (lambda d, g: _norm_case("add_layer_norm", d, g), True),
    f"sdpa decode q (1, {NH}, 1, {D}) S={S}": (lambda d, g: _decode_case(d), False),
    f"LSTMCell (1, {H})": (lambda d, g: _cell_case("lstm", d, g), True),
    f"GRUCell (1, {H})": (lambda d, g: _cell_case("gru", d, g), True),
    f"lstm_layer T=1 B=1 H={H}": (lambda d, g: _lstm_layer_case(d, g), True),
    f"nn.LayerNorm({D_NORM}) (1, {D_NORM})": (lambda d, g: _module_case("LayerNorm", d, g), True),
    f"nn.LSTM({H}, {H}) (1, 1, {H})": (lambda d, g: _module_case("LSTM", d, g), True),
}

for _dev in ("cpu", "cuda"):
    for _op, (_build, _has_grad) in OPS.items():
        for _grad in ((False, True) if _has_grad else (False,)):
            register(Case("overhead", f"{_op} {_mode(_grad)}", _dev, _build(_dev, _grad), peers=("torch",),
                          calls_per_sample=CALLS, meta={"op": _op, "grad": _grad}))
