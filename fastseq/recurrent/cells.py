"""One record per cell type (Cell): what the rest of the family needs to know about a cell, and
its fused layer: one layer, one direction, on packed rows, built from its autograd Function.

A fused layer runs in three parts:
  1. the input projection of every step at once: xp = x W_ih^T + b (for the layer-normalized
     cells xp = LN(x W_ih^T) gamma_ih + b, through fastseq.layer_norm);
  2. the sequential part in one call of the backend's time loop (functions.py): per step the
     recurrent GEMM and a fused pass over the gates; its backward returns the gradient of xp and
     forms dW_hh = sum_t dG_t^T h_{t-1} as one GEMM over all steps;
  3. the backward of part 1 gives dx, dW_ih and the input bias and norm gradients as large GEMMs.
With a gradient to form, parts 1 and 2 of the plain cells are one autograd node
(functions.ProjectedLayerFunction); without, the loop runs outside autograd (compute()).

Every fused layer has the signature fused(x, rows, h0, c0, params, eps, backend, w_hr, alias) ->
y (N, H), (h_n, c_n) with x (N, C) contiguous packed rows, rows a rows.Rows, c0 / c_n None for the
cells without a cell state, params = (w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c) (absent
biases and norms None), w_hr the LSTM's projection (torch's proj_size) or None; alias=True lets
h_n be a view of y where no gradient is formed (the cell modules, which drop y).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from .. import _dispatch, _library
from ..layer_norm import layer_norm as _fused_layer_norm
from . import cpu as cpu_loops
from . import ops
from . import reference as ref
from .functions import (GRULayerFunction, LayerNormGRULayerFunction, LayerNormLSTMLayerFunction, LSTMLayerFunction,
                        RNNLayerFunction, apply_projected, gate_perm, permute,
                        project, project_blocked)


@dataclass(frozen=True, eq=False)
class Cell:
    name: str                    # "lstm", "gru", "rnn_tanh", "rnn_relu", "ln_lstm", "ln_gru"
    op: str                      # the functional op (and its dispatch entry): "lstm_layer", ...
    gates: int                   # G: rows of W_ih / W_hh per hidden unit
    has_c: bool                  # a cell state c besides h (the LSTMs)
    layer_norm: bool             # layer-normalized (no torch twin: its torch backend is the reference)
    function: type               # its autograd Function
    fused: Callable              # its fused layer (module docstring)
    step_ref: Callable           # one step in plain torch (reference.py)
    native: Optional[Callable] = None   # torch's own op for one layer (the "torch" backend), or None
    relu: bool = False

    def __repr__(self):
        return f"Cell({self.name})"


def needs_grad(*tensors) -> bool:
    """Whether autograd must record this call."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


_UB = {}


@torch.compiler.assume_constant_result      # under torch.compile: the block of the thread count at tracing
def unit_block(H: int) -> int:
    """Hidden units per gate block on the CPU: one block per thread, a multiple of 8 (a vector of
    floats)."""
    threads = _dispatch.num_threads()
    ub = _UB.get((H, threads))
    if ub is None:
        per_thread = -(-H // max(1, threads))                        # ceil(H / threads)
        ub = _UB[(H, threads)] = max(8, -(-per_thread // 8) * 8)     # rounded up to a multiple of 8
    return ub


def _ub(backend: str, H: int, rows) -> int:
    """The unit block of this call: H (one block, torch's order) on a GPU, and on the CPU for a
    layer of at most 4 rows (T B <= 4: a decoding step), which one thread runs faster than a
    team (no fork and barrier; at (1, 1, 256) 14 us against 34 on the 2-core box), and for which
    blocks would copy more weights (the LSTM's and GRU's gate permutation) than the loop reads."""
    if backend != "cpu" or rows.N <= 4:
        return H
    return unit_block(H)


def _apply(name, grad, *args, alias=False):
    """The outputs of the Function ops.FUNCTION[name] ("layer_norm_lstm_layer", ...) on args, xp
    included: through autograd when a gradient is to be formed, as its registered op while a graph
    is captured (ops.py), else its compute() alone (alias: h_n may be a view of y, for callers
    that drop y)."""
    if _library.captured(args[ops.XP_ARG[name]]):
        return ops.apply(name, *args)
    fn = ops.FUNCTION[name]
    return fn.apply(*args) if grad else fn.compute(*args, alias=alias)[0]


def _project_and_apply(name, grad, x, w_ih, b_ih, b_hh, perm, *args, alias=False):
    """_apply(name, ...) with args' xp slot (None) filled by the projection x W_ih^T + b_ih (+ b_hh),
    its columns in the blocked order perm.  With a gradient to form on the eager path, projection
    and loop are one autograd node (ProjectedLayerFunction; alias applies without a gradient only)."""
    k = ops.XP_ARG[name]
    if grad and not _library.captured(x):
        return apply_projected(name, k, x, w_ih, b_ih, b_hh, perm, *args)
    xp = project_blocked(x, w_ih, b_ih, perm, grad, b_hh)
    return _apply(name, grad, *args[:k], xp, *args[k + 1:], alias=alias)


# ============================================================================ LSTM

def _lstm_fused(x, rows, h0, c0, p, eps, backend, w_hr=None, alias=False):
    w_ih, w_hh, b_ih, b_hh = p[:4]
    H = w_ih.shape[0] // 4                                    # (w_hh is (4H, P) with a projection)
    grad = needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    ub = _ub(backend, H, rows)
    if w_hr is not None:
        perm = gate_perm(H, ub, 4)
        y, h, c = _project_and_apply("lstm_proj_layer", grad, x, w_ih, b_ih, b_hh, perm, backend, rows.offs, ub, None,
                                     h0, c0, permute(w_hh, perm), w_hr, alias=alias)
        return y, (h, c)
    if not grad and not _library.captured(x):    # xp in torch's order, nothing kept: no weight is permuted
        if backend == "cpu" and w_ih.dtype == x.dtype and cpu_loops.fuses_projection(rows, x.dtype):
            y, h, c = LSTMLayerFunction.infer_projected(backend, rows.offs, ub, x, w_ih, b_ih, b_hh, h0, c0, w_hh,
                                                        alias=alias)
        else:
            y, h, c = LSTMLayerFunction.infer(backend, rows.offs, ub, project(x, w_ih, b_ih, False, b_hh), h0, c0,
                                              w_hh, alias=alias)
        return y, (h, c)
    # xp blocked: the backward's dG is its gradient
    y, h, c = _project_and_apply("lstm_layer", True, x, w_ih, b_ih, b_hh, gate_perm(H, ub, 4), backend, rows.offs, ub,
                                 None, h0, c0, w_hh)
    return y, (h, c)


def _ln_lstm_fused(x, rows, h0, c0, p, eps, backend, w_hr=None, alias=False):
    w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c = p
    grad = needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c)
    shift = None if b_ih is None else b_ih + b_hh
    xp = _fused_layer_norm(project(x, w_ih, None, grad), (w_ih.shape[0],), g_ih, shift, eps)
    y, h, c = _apply("layer_norm_lstm_layer", grad, backend, rows.offs, float(eps), xp, h0, c0, w_hh, g_hh, g_c,
                     b_c, alias=alias)
    return y, (h, c)


# ============================================================================ GRU

def _gru_fused(x, rows, h0, c0, p, eps, backend, w_hr=None, alias=False):
    w_ih, w_hh, b_ih, b_hh = p[:4]
    H = w_hh.shape[1]
    ub = _ub(backend, H, rows)
    perm = gate_perm(H, ub, 3)
    grad = needs_grad(x, h0, w_ih, w_hh, b_ih, b_hh)
    y, h = _project_and_apply("gru_layer", grad, x, w_ih, b_ih, None, perm, backend, rows.offs, ub, None, h0,
                              permute(w_hh, perm), permute(b_hh, perm), alias=alias)
    return y, (h, None)


def _ln_gru_fused(x, rows, h0, c0, p, eps, backend, w_hr=None, alias=False):
    w_ih, w_hh, b_ih, b_hh, g_ih, g_hh = p[:6]
    grad = needs_grad(x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh)
    xp = _fused_layer_norm(project(x, w_ih, None, grad), (w_ih.shape[0],), g_ih, b_ih, eps)
    y, h = _apply("layer_norm_gru_layer", grad, backend, rows.offs, float(eps), xp, h0, w_hh, g_hh, b_hh,
                  alias=alias)
    return y, (h, None)


# ============================================================================ RNN

def _rnn_fused(relu):
    def fused(x, rows, h0, c0, p, eps, backend, w_hr=None, alias=False):
        w_ih, w_hh, b_ih, b_hh = p[:4]
        ub = _ub(backend, w_hh.shape[1], rows)
        grad = needs_grad(x, h0, w_ih, w_hh, b_ih, b_hh)
        y, h = _project_and_apply("rnn_layer", grad, x, w_ih, b_ih, b_hh, None, backend, rows.offs, ub, relu, None, h0,
                                  w_hh, alias=alias)
        return y, (h, None)
    return fused


# ============================================================================ torch's own ops

def _native(vf_op):
    """One layer of torch's own op (torch.lstm / gru / rnn_tanh / rnn_relu, what torch.nn.LSTM
    etc. call) on packed rows: the "torch" backend of the plain cells (under autocast too, where
    it returns what torch.nn's modules return)."""
    def run(x, rows, h0, c0, p, eps, backend, w_hr=None, alias=False):
        w = [t for t in p[:4] if t is not None]
        if w_hr is not None:
            w.append(w_hr)
        hx = (h0.unsqueeze(0), c0.unsqueeze(0)) if c0 is not None else h0.unsqueeze(0)
        bias = len(w) - (w_hr is not None) == 4
        if rows.padded:
            out = vf_op(x.view(rows.T, rows.B, x.shape[-1]), hx, w, bias, 1, 0.0, False, False, False)
        else:
            out = vf_op(x, rows.sizes, hx, w, bias, 1, 0.0, False, False)
        y, st = out[0], out[1:]
        y = y.reshape(rows.N, y.shape[-1])
        return (y, (st[0][0], st[1][0])) if c0 is not None else (y, (st[0][0], None))
    return run


# ============================================================================ the records

LSTM = Cell("lstm", "lstm_layer", 4, True, False, LSTMLayerFunction, _lstm_fused, ref.lstm_step_ref,
            _native(torch.lstm))
GRU = Cell("gru", "gru_layer", 3, False, False, GRULayerFunction, _gru_fused, ref.gru_step_ref, _native(torch.gru))
RNN_TANH = Cell("rnn_tanh", "rnn_layer", 1, False, False, RNNLayerFunction, _rnn_fused(False), ref.rnn_tanh_step_ref,
                _native(torch.rnn_tanh))
RNN_RELU = Cell("rnn_relu", "rnn_layer", 1, False, False, RNNLayerFunction, _rnn_fused(True), ref.rnn_relu_step_ref,
                _native(torch.rnn_relu), relu=True)
LN_LSTM = Cell("ln_lstm", "layer_norm_lstm_layer", 4, True, True, LayerNormLSTMLayerFunction, _ln_lstm_fused,
               ref.layer_norm_lstm_step_ref)
LN_GRU = Cell("ln_gru", "layer_norm_gru_layer", 3, False, True, LayerNormGRULayerFunction, _ln_gru_fused,
              ref.layer_norm_gru_step_ref)

CELLS: Dict[str, Cell] = {c.name: c for c in (LSTM, GRU, RNN_TANH, RNN_RELU, LN_LSTM, LN_GRU)}
