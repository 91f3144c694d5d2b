"""Recurrent family.  So far: one LSTM layer, one direction, as a fused whole-sequence kernel.

Read top to bottom: the pure-torch reference (the oracle), dispatch facts, kernel calls, the
autograd Function, the functional op.  The "torch" backend is torch's own torch.lstm.
Issue #4 builds the rest on this: GRU, RNN, the layer-normalized cells, multi-layer and
bidirectional stacks, PackedSequence, and the torch.nn drop-in modules.

Shapes: input (T, B, C) (or (B, T, C) with batch_first); h0, c0 (B, H); weight_ih (4H, C),
weight_hh (4H, H), bias_ih / bias_hh (4H,), gates in torch's order i, f, g, o.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from . import _alloc, _blas, _dispatch


# ============================================================================ reference

def lstm_ref(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None):
    """(T, B, C) -> y (T, B, H), (h_T, c_T): the LSTM recurrence step by step in torch."""
    h, c = h0, c0
    ys = []
    for t in range(x.shape[0]):
        g = x[t] @ w_ih.t() + h @ w_hh.t()
        if b_ih is not None:
            g = g + b_ih + b_hh
        i, f, gg, o = g.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys), (h, c)


# ============================================================================ checks and dispatch

def _check(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    op = "lstm_layer"
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise ValueError(f"{op}: expected a floating-point input tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3:
        raise ValueError(f"{op}: expected input to be 3D (T, B, C), got {x.dim()}D")
    T, B, C = x.shape
    H4, Cw = w_ih.shape
    if H4 % 4 or Cw != C:
        raise ValueError(f"{op}: expected weight_ih of shape (4H, {C}), got {list(w_ih.shape)}")
    H = H4 // 4
    if tuple(w_hh.shape) != (H4, H):
        raise ValueError(f"{op}: expected weight_hh of shape [{H4}, {H}], got {list(w_hh.shape)}")
    for name, b in (("bias_ih", b_ih), ("bias_hh", b_hh)):
        if b is not None and tuple(b.shape) != (H4,):
            raise ValueError(f"{op}: expected {name} of shape [{H4}], got {list(b.shape)}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"{op}: pass both biases or neither")
    for name, s in (("h0", h0), ("c0", c0)):
        if s is not None and tuple(s.shape) != (B, H):
            raise ValueError(f"{op}: expected {name} of shape [{B}, {H}], got {list(s.shape)}")
    for name, t in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh),
                    ("h0", h0), ("c0", c0)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{op}: expected {name} as {x.dtype} on {x.device} (the input's), got "
                             f"{t.dtype} on {t.device}")
    return T, B, C, H


def _facts(x, *args, **kwargs) -> dict:
    return {"device": x.device.type, "dtype": str(x.dtype).replace("torch.", "")}


def _cpu_reasons(f: dict) -> List[str]:
    if f["dtype"] not in ("float32", "float64"):
        return [f"cpu lstm takes float32 or float64, got {f['dtype']}"]
    return []


_dispatch.register_op("lstm_layer", _facts, cpu=_cpu_reasons, torch=lambda f: [])


# ============================================================================ kernel calls

_NP = {torch.float32: np.float32, torch.float64: np.float64}


def _np(t):
    return t.detach().numpy().reshape(-1)


def _kernels():
    return _blas.cpu_kernels("recurrent")


def _unit_block(H: int, threads: int) -> int:
    """Hidden units per gate block: one block per thread, a multiple of 8 (a vector of floats)."""
    per_thread = -(-H // max(1, threads))                 # ceil(H / threads)
    return max(8, -(-per_thread // 8) * 8)                # rounded up to a multiple of 8


_PERMS = {}


def _gate_perm(H: int, ub: int) -> torch.Tensor:
    """Row order of the blocked gate layout (kernels/cpu/recurrent.pyx): for each block of ub
    units, its i, f, g, o rows in turn."""
    key = (H, ub)
    if key not in _PERMS:
        rows = []
        for j0 in range(0, H, ub):
            j1 = min(H, j0 + ub)
            for gate in range(4):
                rows.extend(range(gate * H + j0, gate * H + j1))
        _PERMS[key] = torch.tensor(rows, dtype=torch.int64)
    return _PERMS[key]


class LSTMLayerFunction(torch.autograd.Function):
    """One LSTM layer over a whole sequence.  Saves the input, weights, every step's hidden and
    cell state and the activated gates; backward runs the fused backward-through-time kernel and
    forms the weight gradients as GEMMs over all steps."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        T, B, C = x.shape
        H = w_hh.shape[1]
        nt = _dispatch.num_threads()
        ub = _unit_block(H, nt)
        perm = _gate_perm(H, ub)                                          # blocked gate layout
        bias = (b_ih + b_hh)[perm] if b_ih is not None else torch.zeros(4 * H, dtype=x.dtype)
        xp = torch.addmm(bias, x.reshape(T * B, C), w_ih[perm].t())        # (T*B, 4H): one GEMM
        y = _alloc.empty((T, B, H), x.dtype, x.device)
        cs = _alloc.empty((T, B, H), x.dtype, x.device)
        gates = _alloc.empty((T, B, 4 * H), x.dtype, x.device)
        step = torch.empty(B * 4 * H, dtype=x.dtype)
        h0c, c0c, whh = h0.contiguous(), c0.contiguous(), w_hh[perm].contiguous()
        _kernels().lstm_forward(_np(xp), _np(whh), _np(h0c), _np(c0c), _np(y), _np(cs), _np(gates), _np(step),
                                T, B, H, ub, nt)
        ctx.save_for_backward(x, h0c, c0c, w_ih, whh, y, cs, gates)
        ctx.has_bias = b_ih is not None
        ctx.ub = ub
        h_n, c_n = (y[-1], cs[-1]) if T else (h0c, c0c)
        return y, h_n.clone(), c_n.clone()

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, w_ih, w_hh, y, cs, gates = ctx.saved_tensors
        T, B, C = x.shape
        H = w_hh.shape[1]
        zeros = lambda *s: torch.zeros(*s, dtype=x.dtype)                  # noqa: E731
        dy = dy.contiguous() if dy is not None else zeros(T, B, H)
        dh_n = dh_n.contiguous() if dh_n is not None else zeros(B, H)
        dc_n = dc_n.contiguous() if dc_n is not None else zeros(B, H)
        dg = _alloc.empty((T, B, 4 * H), x.dtype, x.device)
        dh0, dc0 = torch.empty(B, H, dtype=x.dtype), torch.empty(B, H, dtype=x.dtype)
        _kernels().lstm_backward(_np(dy), _np(dh_n), _np(dc_n), _np(w_hh), _np(c0), _np(cs), _np(gates), _np(dg),
                                 _np(dh0), _np(dc0), T, B, H, ctx.ub, _dispatch.num_threads())
        perm = _gate_perm(H, ctx.ub)
        inv = torch.argsort(perm)                                          # blocked -> torch's row order
        dg2 = dg.view(T * B, 4 * H)                                        # (blocked columns)
        h_prev = torch.cat([h0.unsqueeze(0), y[:-1]]).view(T * B, H)      # h_{t-1} for every step
        dx = (dg2 @ w_ih[perm]).view(T, B, C) if ctx.needs_input_grad[0] else None
        dw_ih = (dg2.t() @ x.reshape(T * B, C))[inv] if ctx.needs_input_grad[3] else None
        dw_hh = (dg2.t() @ h_prev)[inv] if ctx.needs_input_grad[4] else None
        db = dg2.sum(0)[inv] if ctx.has_bias else None
        return dx, dh0, dc0, dw_ih, dw_hh, db, db


# ============================================================================ functional

def lstm_layer(input: torch.Tensor, hx: Optional[Tuple[torch.Tensor, torch.Tensor]], weight_ih: torch.Tensor,
               weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor] = None,
               bias_hh: Optional[torch.Tensor] = None, batch_first: bool = False):
    """One unidirectional LSTM layer over a whole sequence, as one layer of torch.nn.LSTM.

    Args:
        input: (T, B, C), or (B, T, C) with batch_first.
        hx: (h0, c0), each (B, H); None for zeros.
        weight_ih (4H, C), weight_hh (4H, H), bias_ih / bias_hh (4H,) or None: torch.nn.LSTM's
            weight_ih_l0 etc., gates in the order i, f, g, o.
    Returns:
        output (T, B, H) (or (B, T, H)), (h_n, c_n) each (B, H).
    """
    x = input.transpose(0, 1) if batch_first and isinstance(input, torch.Tensor) else input
    h0, c0 = hx if hx is not None else (None, None)
    T, B, C, H = _check(x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    if h0 is None:
        h0 = torch.zeros(B, H, dtype=x.dtype, device=x.device)
        c0 = torch.zeros(B, H, dtype=x.dtype, device=x.device)
    backend = _dispatch.choose("lstm_layer", _facts(x))
    if backend == "torch":
        params = [weight_ih, weight_hh] + ([bias_ih, bias_hh] if bias_ih is not None else [])
        y, h_n, c_n = torch.lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)), params, bias_ih is not None, 1, 0.0,
                                 False, False, False)
        h_n, c_n = h_n[0], c_n[0]
    else:
        y, h_n, c_n = LSTMLayerFunction.apply(x.contiguous(), h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    return (y.transpose(0, 1) if batch_first else y), (h_n, c_n)


# ============================================================================ modules

class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM on the fused LSTM layer: same constructor, parameters, state_dict, forward
    and returns.  Every layer and direction runs lstm_layer (the reverse direction on the
    time-flipped sequence); dropout between layers as torch.  PackedSequence input and
    proj_size > 0 run torch's own forward for now (issue #4 adds them to the kernels)."""

    def forward(self, input, hx=None):
        if isinstance(input, torch.nn.utils.rnn.PackedSequence) or self.proj_size > 0 or \
                _dispatch.choose("lstm_layer", _facts(input)) == "torch":
            return super().forward(input, hx)
        batched = input.dim() == 3
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: expected input to be 2D or 3D, got {input.dim()}D")
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)                                            # (T, B, C)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"LSTM: expected input with {self.input_size} features, got {x.shape[-1]}")
        dirs = 2 if self.bidirectional else 1
        L, B, H = self.num_layers, x.shape[1], self.hidden_size
        if hx is None:
            h0 = c0 = torch.zeros(L * dirs, B, H, dtype=x.dtype, device=x.device)
        else:
            h0, c0 = hx
            if not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            if tuple(h0.shape) != (L * dirs, B, H) or tuple(c0.shape) != (L * dirs, B, H):
                raise ValueError(f"LSTM: expected hx of shape {[L * dirs, B, H]}, got "
                                 f"{list(h0.shape)} and {list(c0.shape)}")
        hs, cs = [], []
        for layer in range(L):
            outs = []
            for d in range(dirs):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                w = [getattr(self, f"weight_ih_{sfx}"), getattr(self, f"weight_hh_{sfx}")]
                b = [getattr(self, f"bias_ih_{sfx}"), getattr(self, f"bias_hh_{sfx}")] if self.bias else [None, None]
                k = layer * dirs + d
                xin = x.flip(0) if d else x
                y, (h, c) = lstm_layer(xin, (h0[k], c0[k]), *w, *b)
                outs.append(y.flip(0) if d else y)
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]
            if self.dropout and self.training and layer < L - 1:
                x = torch.nn.functional.dropout(x, self.dropout, True)
        h_n, c_n = torch.stack(hs), torch.stack(cs)
        if not batched:
            return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), (h_n, c_n)
