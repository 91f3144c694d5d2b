"""The recurrent family's functional ops (lstm_layer, gru_layer, rnn_layer, layer_norm_lstm_layer,
layer_norm_gru_layer), their dispatch, and run_layer(), the one entry the modules share.

Dispatch.  Each functional op is registered under its own name, so explain() takes the op's own
arguments: fastseq.explain("lstm_layer", x, hx, w_ih, w_hh, b_ih, b_hh).  A call's backend is
decided by (device type, dtype, autocast on, projection) and remembered (choose_cached): one
dict lookup per call.  The "torch" backend runs torch's own op (torch.lstm, what torch.nn.LSTM
calls) for the plain cells and the step-by-step reference for the layer-normalized ones.

Autocast.  Under torch.autocast for the input's device the plain cells run torch's own op, which
applies autocast's policy and returns torch's dtypes (on the CPU in bf16: LSTM and RNN in bf16,
GRU in fp32; packed LSTM in fp32); the fused kernels would not.  The layer-normalized cells,
which torch lacks, run in the parameters' dtype (fp32 for an fp32 model: layer normalization is
on autocast's fp32 list) with autocast off inside, on the fused kernels.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Tuple

import numpy as np
import torch

from .. import _dispatch, _library
from . import rows as R
from .cells import CELLS, GRU, LN_GRU, LN_LSTM, LSTM, RNN_RELU, RNN_TANH, Cell
from .reference import recurrent_ref

# ============================================================================ dispatch

_FLOAT = ("float32", "float64")


def autocast_on(device_type: str) -> bool:
    """torch.autocast is on for this device type (only "cpu" and "cuda" have it here)."""
    return (device_type == "cpu" or device_type == "cuda") and torch.is_autocast_enabled(device_type)


def _facts_of(op: str, device: str, dtype: torch.dtype, autocast: bool, proj: bool = False) -> dict:
    f = {"device": device, "dtype": str(dtype).replace("torch.", "")}
    if autocast:
        f["autocast"] = str(torch.get_autocast_dtype(device)).replace("torch.", "")
    if proj:
        f["proj_size"] = True
    return f


def _facts_fn(layer_norm: bool):
    def facts(input, *args, **kwargs) -> dict:
        """Facts of a functional call, from its own arguments (explain).  The layer-normalized
        cells under autocast run in weight_ih's dtype (the module docstring)."""
        dev = input.device.type
        dtype, ac = input.dtype, autocast_on(dev)
        if ac and layer_norm:
            w_ih = args[1] if len(args) > 1 else kwargs["weight_ih"]
            dtype, ac = w_ih.dtype, False
        return _facts_of("", dev, dtype, ac)
    return facts


def _reasons(backend: str, op: str, layer_norm: bool):
    def reasons(f: dict) -> List[str]:
        out = []
        if f["dtype"] not in _FLOAT:
            out.append(f"{backend} {op} takes float32 or float64, got {f['dtype']}")
        if f.get("autocast") and not layer_norm:
            out.append(f"autocast ({f['autocast']}) is on: torch's own op runs, to return torch's dtypes")
        if f.get("proj_size") and backend == "cuda":
            out.append("cuda lstm_layer has no projection (proj_size) loop: torch's own forward runs it")
        return out
    return reasons


for _op, _ln in (("lstm_layer", False), ("gru_layer", False), ("rnn_layer", False),
                 ("layer_norm_lstm_layer", True), ("layer_norm_gru_layer", True)):
    _dispatch.register_op(_op, _facts_fn(_ln), cpu=_reasons("cpu", _op, _ln), cuda=_reasons("cuda", _op, _ln),
                          torch=lambda f: [])


def choose(cell: Cell, x: torch.Tensor, proj: bool = False) -> str:
    """The backend that runs `cell` on tensors like x (cached by device type, dtype, autocast, proj).
    Under a torch.func transform: "torch" (fastseq/_library.py, transformed())."""
    if _library.transformed():
        return "torch"
    dev = "cpu" if x.is_cpu else x.device.type
    ac = not cell.layer_norm and autocast_on(dev)
    dtype = x.dtype
    return _dispatch.choose_cached(cell.op, (dev, dtype, ac, proj), _facts_of, cell.op, dev, dtype, ac, proj)


# ============================================================================ one layer

def run_layer(cell: Cell, x, rows, h0, c0, params, eps: float, backend: str, w_hr=None):
    """One layer, one direction of `cell` on packed rows x (N, C) with layout rows: y (N, H),
    (h_n, c_n) (c_n None without a cell state)."""
    if backend == "torch":
        if cell.native is not None:
            return cell.native(x, rows, h0, c0, params, eps, backend, w_hr)
        return recurrent_ref(cell, x, rows.offs_list, h0, c0, params, eps, w_hr)
    return cell.fused(x.contiguous(), rows, h0, c0, params, eps, backend, w_hr)


# ============================================================================ checks

_PARAM_NAMES = ("weight_hh", "bias_ih", "bias_hh", "norm_ih_weight", "norm_hh_weight", "norm_c_weight", "norm_c_bias")


def _check_layer(cell: Cell, x, h0, c0, params, same_dtype: bool = True):
    op = cell.op
    if x.dim() != 3:
        raise ValueError(f"{op}: expected input to be 3D (T, B, C), got {x.dim()}D")
    T, B, C = x.shape
    if T == 0:
        raise ValueError(f"{op}: expected a sequence of at least one step, got T=0")
    w_ih = params[0]
    G = cell.gates
    if w_ih.dim() != 2 or w_ih.shape[0] % G or w_ih.shape[1] != C:
        raise ValueError(f"{op}: expected weight_ih of shape ({G}H, {C}), got {list(w_ih.shape)}")
    H = w_ih.shape[0] // G
    GH = G * H
    dtype, device = x.dtype, x.device
    shapes = ((GH, H), (GH,), (GH,), (GH,), (GH,), (H,), (H,), (B, H), (B, H))
    for name, t, shape in zip(_PARAM_NAMES + ("h0", "c0"), params[1:] + (h0, c0), shapes):
        if t is None:
            continue
        if t.shape != shape:
            raise ValueError(f"{op}: expected {name} of shape {list(shape)}, got {list(t.shape)}")
        if (same_dtype and t.dtype != dtype) or t.device != device:
            raise ValueError(f"{op}: expected {name} as {dtype} on {device} (the input's), got "
                             f"{t.dtype} on {t.device}")
    if (params[2] is None) != (params[3] is None):
        raise ValueError(f"{op}: pass both biases or neither")
    return T, B, C, H


# ============================================================================ lengths

_PLANS: "OrderedDict[tuple, tuple]" = OrderedDict()


def _length_plan(op, lengths, T, B, device):
    """For lengths (B,) in [1, T]: (order, inv, flat, rows) on device: the batch sorted by
    decreasing length (order, its inverse inv), packed row -> padded row (flat), and the packed
    layout.  Cached by value (a small LRU)."""
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or tuple(lengths.shape) != (B,):
        raise ValueError(f"{op}: expected lengths as {B} integers (one per sequence), got "
                         f"{lengths.dtype} of shape {list(lengths.shape)}")
    lengths = lengths.cpu().to(torch.int64)
    key = (T, device, lengths.numpy().tobytes())
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    if B and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(f"{op}: lengths must lie in [1, T={T}], got {lengths.tolist()}")
    with torch.inference_mode(False):
        order = torch.sort(lengths, descending=True, stable=True).indices
        batch_sizes = (lengths[order][None, :] > torch.arange(T)[:, None]).sum(1)
        rows = R.packed(batch_sizes[batch_sizes > 0])
        t_of = torch.from_numpy(np.repeat(np.arange(rows.T), rows.batch_sizes))                  # (N,)
        b_of = order[torch.from_numpy(np.concatenate([np.arange(n) for n in rows.batch_sizes]))]  # (N,)
        flat = (t_of * B + b_of).to(device)                           # packed row -> padded row
        plan = (order.to(device), torch.argsort(order).to(device), flat, rows)
    _PLANS[key] = plan
    if len(_PLANS) > 256:
        _PLANS.popitem(last=False)
    return plan


# ============================================================================ functional

def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _functional(cell: Cell, input, hx, params, batch_first, eps=1e-5, lengths=None):
    op = cell.op
    if not isinstance(input, torch.Tensor) or not input.dtype.is_floating_point:
        raise ValueError(f"{op}: expected a floating-point input tensor, got "
                         f"{getattr(input, 'dtype', type(input).__name__)}")
    dev = input.device.type
    autocast = autocast_on(dev)
    if autocast and cell.layer_norm:          # in the parameters' dtype, autocast off (module docstring)
        dtype = params[0].dtype
        hx = tuple(_cast(s, dtype) for s in hx) if cell.has_c and hx is not None else _cast(hx, dtype)
        with torch.autocast(dev, enabled=False):
            return _functional(cell, input.to(dtype), hx, params, batch_first, eps, lengths)
    x = input.transpose(0, 1) if batch_first else input
    lstm = cell.has_c
    h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
    T, B, C, H = _check_layer(cell, x, h0, c0, params, same_dtype=not autocast)
    if h0 is None:
        h0 = torch.zeros(B, H, dtype=x.dtype, device=x.device)
    if lstm and c0 is None:
        c0 = torch.zeros(B, H, dtype=x.dtype, device=x.device)
    backend = choose(cell, x) if B else "torch"          # B = 0: nothing to fuse
    if lengths is None:
        y, (h, c) = run_layer(cell, x.reshape(T * B, C), R.padded(T, B), h0, c0, params, eps, backend)
        y = y.view(T, B, y.shape[-1])
    else:                                   # only each sequence's own steps: pack, run, pad with zeros
        order, inv, flat, rows = _length_plan(op, lengths, T, B, x.device)
        y_p, (h, c) = run_layer(cell, x.reshape(T * B, C).index_select(0, flat), rows, h0.index_select(0, order),
                                c0.index_select(0, order) if lstm else None, params, eps, backend)
        y = y_p.new_zeros(T * B, y_p.shape[-1]).index_copy(0, flat, y_p).view(T, B, -1)
        h = h.index_select(0, inv)
        c = c.index_select(0, inv) if lstm else None
    y = y.transpose(0, 1) if batch_first else y
    return (y, (h, c)) if lstm else (y, h)


def lstm_layer(input: torch.Tensor, hx: Optional[Tuple[torch.Tensor, torch.Tensor]], weight_ih: torch.Tensor,
               weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor] = None,
               bias_hh: Optional[torch.Tensor] = None, batch_first: bool = False, lengths=None):
    """One unidirectional LSTM layer over a whole sequence, as one layer of torch.nn.LSTM.

    Args:
        input: (T, B, C), or (B, T, C) with batch_first.
        hx: (h0, c0), each (B, H); None for zeros.
        lengths: optional (B,) integers in [1, T]: sequence b runs its first lengths[b] steps only
            (no compute past them); its output is zero after them and its final state is at its last.
        weight_ih (4H, C), weight_hh (4H, H), bias_ih / bias_hh (4H,) or None: gates i, f, g, o.
    Returns:
        output (T, B, H) (or (B, T, H)), (h_n, c_n) each (B, H).  Under torch.autocast, torch's
        own op runs and the dtypes are torch.nn.LSTM's.
    """
    return _functional(LSTM, input, hx, (weight_ih, weight_hh, bias_ih, bias_hh, None, None, None, None), batch_first,
                       lengths=lengths)


def gru_layer(input: torch.Tensor, hx: Optional[torch.Tensor], weight_ih: torch.Tensor, weight_hh: torch.Tensor,
              bias_ih: Optional[torch.Tensor] = None, bias_hh: Optional[torch.Tensor] = None,
              batch_first: bool = False, lengths=None):
    """One unidirectional GRU layer over a whole sequence, as one layer of torch.nn.GRU
    (gates r, z, n; n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn))).

    Args:
        input: (T, B, C), or (B, T, C) with batch_first.   hx: h0 (B, H) or None for zeros.
        lengths: optional (B,) integers in [1, T]: sequence b runs its first lengths[b] steps only
            (no compute past them); its output is zero after them and its final state is at its last.
        weight_ih (3H, C), weight_hh (3H, H), bias_ih / bias_hh (3H,) or None.
    Returns:
        output (T, B, H) (or (B, T, H)), h_n (B, H).  Under torch.autocast, torch's own op runs
        and the dtypes are torch.nn.GRU's.
    """
    return _functional(GRU, input, hx, (weight_ih, weight_hh, bias_ih, bias_hh, None, None, None, None), batch_first,
                       lengths=lengths)


def rnn_layer(input: torch.Tensor, hx: Optional[torch.Tensor], weight_ih: torch.Tensor, weight_hh: torch.Tensor,
              bias_ih: Optional[torch.Tensor] = None, bias_hh: Optional[torch.Tensor] = None,
              nonlinearity: str = "tanh", batch_first: bool = False, lengths=None):
    """One unidirectional Elman RNN layer, h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh),
    act = tanh or relu, as one layer of torch.nn.RNN.

    Args:
        input: (T, B, C), or (B, T, C) with batch_first.   hx: h0 (B, H) or None for zeros.
        lengths: optional (B,) integers in [1, T]: sequence b runs its first lengths[b] steps only
            (no compute past them); its output is zero after them and its final state is at its last.
        weight_ih (H, C), weight_hh (H, H), bias_ih / bias_hh (H,) or None.
    Returns:
        output (T, B, H) (or (B, T, H)), h_n (B, H).  Under torch.autocast, torch's own op runs
        and the dtypes are torch.nn.RNN's.
    """
    if nonlinearity == "tanh":
        cell = RNN_TANH
    elif nonlinearity == "relu":
        cell = RNN_RELU
    else:
        raise ValueError(f"rnn_layer: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return _functional(cell, input, hx, (weight_ih, weight_hh, bias_ih, bias_hh, None, None, None, None), batch_first,
                       lengths=lengths)


def layer_norm_lstm_layer(input: torch.Tensor, hx: Optional[Tuple[torch.Tensor, torch.Tensor]],
                          weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor],
                          bias_hh: Optional[torch.Tensor], norm_ih_weight: torch.Tensor,
                          norm_hh_weight: torch.Tensor, norm_c_weight: torch.Tensor, norm_c_bias: torch.Tensor,
                          eps: float = 1e-5, batch_first: bool = False, lengths=None):
    """One layer-normalized LSTM layer (Ba et al. 2016; torch has none, its issue 6760):

        G = LN(x W_ih^T) norm_ih_weight + LN(h W_hh^T) norm_hh_weight + bias_ih + bias_hh
        c' = f c + i g;   h' = o tanh(LN(c') norm_c_weight + norm_c_bias)

    LN normalizes over the whole gate row (4H) or the cell (H); the biases play the role of the
    norms' shifts.

    Args:
        input: (T, B, C), or (B, T, C) with batch_first.   hx: (h0, c0) each (B, H), or None.
        lengths: optional (B,) integers in [1, T]: sequence b runs its first lengths[b] steps only
            (no compute past them); its output is zero after them and its final state is at its last.
        weight_ih (4H, C), weight_hh (4H, H), bias_ih / bias_hh (4H,) or None,
        norm_ih_weight / norm_hh_weight (4H,), norm_c_weight / norm_c_bias (H,); eps of the norms.
    Returns:
        output (T, B, H) (or (B, T, H)), (h_n, c_n) each (B, H).  Under torch.autocast: computed
        in the parameters' dtype, autocast off inside (layer normalization is on its fp32 list).
    """
    return _functional(LN_LSTM, input, hx, (weight_ih, weight_hh, bias_ih, bias_hh, norm_ih_weight, norm_hh_weight,
                                            norm_c_weight, norm_c_bias), batch_first, eps, lengths)


def layer_norm_gru_layer(input: torch.Tensor, hx: Optional[torch.Tensor], weight_ih: torch.Tensor,
                         weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor], bias_hh: Optional[torch.Tensor],
                         norm_ih_weight: torch.Tensor, norm_hh_weight: torch.Tensor, eps: float = 1e-5,
                         batch_first: bool = False, lengths=None):
    """One layer-normalized GRU layer: torch's GRU on x-part = LN(x W_ih^T) norm_ih_weight + bias_ih
    and h-part = LN(h W_hh^T) norm_hh_weight + bias_hh (LN over the 3H row).

    Args:
        input: (T, B, C), or (B, T, C) with batch_first.   hx: h0 (B, H) or None.
        lengths: optional (B,) integers in [1, T]: sequence b runs its first lengths[b] steps only
            (no compute past them); its output is zero after them and its final state is at its last.
        weight_ih (3H, C), weight_hh (3H, H), bias_ih / bias_hh (3H,) or None,
        norm_ih_weight / norm_hh_weight (3H,); eps of the norms.
    Returns:
        output (T, B, H) (or (B, T, H)), h_n (B, H).  Under torch.autocast: computed in the
        parameters' dtype, autocast off inside.
    """
    return _functional(LN_GRU, input, hx, (weight_ih, weight_hh, bias_ih, bias_hh, norm_ih_weight, norm_hh_weight,
                                           None, None), batch_first, eps, lengths)
