"""Recurrent family: LSTM, GRU, Elman RNN (tanh / relu), and the layer-normalized LSTM and GRU.

Read top to bottom: the pure-torch references (the oracles), the row layout shared by padded and
packed sequences, dispatch facts, one layer built from the autograd Functions (one per cell
around its fused whole-sequence kernel, in fastseq/recurrent_functions.py), and the functional
layer ops.  The torch.nn drop-in modules built on them are in fastseq/recurrent_nn.py.

One layer, one direction, runs in three parts:
  1. the input projection of every step at once, under torch autograd: xp = x W_ih^T + b
     (for the layer-normalized cells xp = LN(x W_ih^T) gamma_ih + b, through fastseq.layer_norm);
  2. the sequential part in one kernel call (kernels/cpu/recurrent.pyx): per step the recurrent
     GEMM and a fused pass over the gates; its backward returns the gradient of xp and forms
     dW_hh = sum_t dG_t^T h_{t-1} as one GEMM over all steps;
  3. autograd of part 1 gives dx, dW_ih and the input bias and norm gradients as large GEMMs.
Sequences are stored packed (torch's PackedSequence layout, see _Rows): variable lengths cost
only their own steps.

Shapes: input (T, B, C) (or (B, T, C) with batch_first), packed rows (N, C); hidden H; G gates
(LSTM 4: i, f, g, o; GRU 3: r, z, n; RNN 1); weight_ih (G H, C), weight_hh (G H, H), biases (G H,).

Layer-normalized cells (Ba et al. 2016; torch has none, its issue 6760), per layer and direction:
  LayerNormLSTM:  G = LN(x W_ih^T) gamma_ih + LN(h W_hh^T) gamma_hh + b_ih + b_hh
                  c' = f c + i g;   h' = o tanh(LN(c') gamma_c + beta_c)
  LayerNormGRU:   x-part = LN(x W_ih^T) gamma_ih + b_ih;  h-part = LN(h W_hh^T) gamma_hh + b_hh,
                  then torch's GRU equations on the two parts.
LN normalizes over the whole gate row (G H) or the cell (H), eps 1e-5 by default; the biases
b_ih / b_hh play the role of the norms' shifts.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import _dispatch
from .layer_norm import layer_norm as _fused_layer_norm
from .recurrent_functions import (GRULayerFunction, LayerNormGRULayerFunction, LayerNormLSTMLayerFunction,
                                  LSTMLayerFunction, LSTMProjLayerFunction, RNNLayerFunction, _gate_perm, _permute,
                                  _project, _sum_bias)

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1, "ln_lstm": 4, "ln_gru": 3}


# ============================================================================ references

def _zero_if_none(b, like):
    return b if b is not None else torch.zeros((), dtype=like.dtype, device=like.device)


def _ln(v, gamma, eps):
    return F.layer_norm(v, v.shape[-1:], gamma, None, eps)


def _step_ref(cell, p, eps, x, h, c=None, w_hr=None):
    """One step of `cell` on rows x (b, C), h (b, H) (c (b, H) for the LSTMs) with parameters p
    (w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c): the torch equations, no fusion.  w_hr (P, H):
    the LSTM's projection (torch's proj_size): the state h is then (b, P)."""
    w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c = p
    b_ih, b_hh = _zero_if_none(b_ih, x), _zero_if_none(b_hh, x)
    if cell in ("lstm", "ln_lstm"):
        if cell == "lstm":
            g = x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh
        else:
            g = _ln(x @ w_ih.t(), g_ih, eps) + b_ih + b_hh + _ln(h @ w_hh.t(), g_hh, eps)
        i, f, gg, o = g.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        u = c if cell == "lstm" else _ln(c, g_c, eps) + b_c
        h = torch.sigmoid(o) * torch.tanh(u)
        return (h if w_hr is None else h @ w_hr.t()), c
    if cell in ("gru", "ln_gru"):
        if cell == "gru":
            gi, gh = x @ w_ih.t() + b_ih, h @ w_hh.t() + b_hh
        else:
            gi, gh = _ln(x @ w_ih.t(), g_ih, eps) + b_ih, _ln(h @ w_hh.t(), g_hh, eps) + b_hh
        xr, xz, xn = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    a = x @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh
    return (torch.tanh(a) if cell == "rnn_tanh" else torch.relu(a)), None


def recurrent_ref(cell: str, x, offs, h0, c0, params, eps: float = 1e-5, w_hr=None):
    """The layer step by step in torch over packed rows x (N, C) (layout of _Rows: step t owns
    rows offs[t]:offs[t+1], the sequences still running are the first ones).  Returns y (N, H)
    and the final states (h_n, c_n) (c_n None for GRU / RNN), each (B, H)."""
    h, c = h0, c0
    ys = []
    for t in range(len(offs) - 1):
        r0, r1 = int(offs[t]), int(offs[t + 1])
        bt = r1 - r0
        h_new, c_new = _step_ref(cell, params, eps, x[r0:r1], h[:bt], None if c is None else c[:bt], w_hr)
        ys.append(h_new)
        h = torch.cat([h_new, h[bt:]])
        if c is not None:
            c = torch.cat([c_new, c[bt:]])
    y = torch.cat(ys) if ys else h0.new_zeros(0, h0.shape[-1])
    return y, (h, c)


def lstm_ref(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None):
    """(T, B, C) -> y (T, B, H), (h_T, c_T): torch.nn.LSTM's recurrence step by step."""
    T, B = x.shape[:2]
    y, (h, c) = recurrent_ref("lstm", x.reshape(T * B, -1), [t * B for t in range(T + 1)], h0, c0,
                              (w_ih, w_hh, b_ih, b_hh) + (None,) * 4)
    return y.view(T, B, -1), (h, c)


# ============================================================================ rows: padded and packed

class _Rows:
    """Row layout of one (possibly packed) batch of sequences, as torch's PackedSequence: step t
    owns rows offs[t]:offs[t+1] (B_t = batch_sizes[t] of them), batch sorted by decreasing length.
    A padded (T, B) batch is batch_sizes = [B] * T, rows t B + b."""

    def __init__(self, batch_sizes):
        bs = np.asarray(batch_sizes, dtype=np.int64).reshape(-1)
        if bs.size and (bs.min() < 0 or (np.diff(bs) > 0).any()):
            raise ValueError(f"recurrent: batch_sizes must be non-negative and non-increasing, got {bs.tolist()}")
        self.batch_sizes = bs
        self.offs = np.concatenate([np.zeros(1, np.int64), np.cumsum(bs)])
        self.T, self.B, self.N = len(bs), int(bs[0]) if len(bs) else 0, int(self.offs[-1])
        self.padded = bool((bs == self.B).all())
        self._cache = {}

    @classmethod
    def padded_rows(cls, T: int, B: int) -> "_Rows":
        return cls([B] * T)

    def lengths(self) -> np.ndarray:
        """(B,) steps of each (sorted) sequence."""
        return (self.batch_sizes[None, :] > np.arange(self.B)[:, None]).sum(1)

    def _index(self, name, make, device):
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(make()).to(device)
        return self._cache[key]

    def last(self, device="cpu") -> torch.Tensor:
        """(B,) the row of each sequence's final step."""
        return self._index("last", lambda: self.offs[self.lengths() - 1] + np.arange(self.B), device)

    def reverse(self, device="cpu") -> torch.Tensor:
        """(N,) the row holding step L_b - 1 - t of sequence b, for every row (t, b): each
        sequence reversed in time within its own length (its own inverse)."""
        def make():
            L = self.lengths()
            rev = np.empty(self.N, np.int64)
            for t in range(self.T):
                b = np.arange(self.batch_sizes[t])
                rev[self.offs[t] + b] = self.offs[L[b] - 1 - t] + b
            return rev
        return self._index("reverse", make, device)

    def h_prev(self, h0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, H): h_{t-1} of every row, from h0 (B, H) and the outputs y (N, H)."""
        if self.padded:
            return torch.cat([h0, y[:self.N - self.B]])
        prev = self._index("prev", lambda: np.concatenate(
            [np.arange(self.B)] + [self.B + self.offs[t - 1] + np.arange(self.batch_sizes[t])
                                   for t in range(1, self.T)]), y.device)
        return torch.cat([h0, y]).index_select(0, prev)


# ============================================================================ dispatch

def _facts(x, cell: str = "lstm", **_) -> dict:
    return {"device": x.device.type, "dtype": str(x.dtype).replace("torch.", ""), "cell": cell}


def _cpu_reasons(f: dict) -> List[str]:
    if f["dtype"] not in ("float32", "float64"):
        return [f"cpu {f['cell']} takes float32 or float64, got {f['dtype']}"]
    return []


def _cuda_reasons(f: dict) -> List[str]:
    if f["dtype"] not in ("float32", "float64"):
        return [f"cuda {f['cell']} takes float32 or float64, got {f['dtype']}"]
    return []


_dispatch.register_op("recurrent", _facts, cpu=_cpu_reasons, cuda=_cuda_reasons, torch=lambda f: [])


# ============================================================================ layers

def _unit_block(H: int, threads: int) -> int:
    """Hidden units per gate block: one block per thread, a multiple of 8 (a vector of floats)."""
    per_thread = -(-H // max(1, threads))                 # ceil(H / threads)
    return max(8, -(-per_thread // 8) * 8)                # rounded up to a multiple of 8


def _fused_layer(cell: str, x, rows: _Rows, h0, c0, params, eps: float, w_hr=None):
    """One layer, one direction, on the fused kernels: packed rows x (N, C) -> y (N, H),
    (h_n, c_n).  params = (w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c)."""
    w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c = params
    H = w_ih.shape[0] // GATES[cell]                # (w_hh is (G H, P) with a projection)
    if cell in ("ln_lstm", "ln_gru"):
        shift = _sum_bias(b_ih, b_hh) if cell == "ln_lstm" else b_ih
        xp = _fused_layer_norm(_project(x, w_ih, None), (w_ih.shape[0],), g_ih, shift, eps)
        if cell == "ln_lstm":
            y, h, c = LayerNormLSTMLayerFunction.apply(rows, eps, xp, h0, c0, w_hh, g_hh, g_c, b_c)
            return y, (h, c)
        y, h = LayerNormGRULayerFunction.apply(rows, eps, xp, h0, w_hh, g_hh, b_hh)
        return y, (h, None)
    ub = _unit_block(H, _dispatch.num_threads()) if x.device.type == "cpu" else H   # GPU: torch's order
    perm = _gate_perm(H, ub, GATES[cell])
    if cell == "lstm":
        if w_hr is not None:
            xp = _project(x, _permute(w_ih, perm), _permute(_sum_bias(b_ih, b_hh), perm))
            y, h, c = LSTMProjLayerFunction.apply(rows, ub, xp, h0, c0, _permute(w_hh, perm), w_hr)
            return y, (h, c)
        infer = x.device.type == "cpu" and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)))
        if infer:           # the kernel reads xp in torch's order: no weight is permuted
            xp = _project(x, w_ih, _sum_bias(b_ih, b_hh))
        else:               # xp blocked: the backward's dG, blocked, is its gradient
            xp = _project(x, _permute(w_ih, perm), _permute(_sum_bias(b_ih, b_hh), perm))
        y, h, c = LSTMLayerFunction.apply(rows, ub, xp, h0, c0, w_hh, infer)
        return y, (h, c)
    if cell == "gru":
        xp = _project(x, _permute(w_ih, perm), _permute(b_ih, perm))
        y, h = GRULayerFunction.apply(rows, ub, xp, h0, _permute(w_hh, perm), _permute(b_hh, perm))
        return y, (h, None)
    xp = _project(x, w_ih, _sum_bias(b_ih, b_hh))
    y, h = RNNLayerFunction.apply(rows, ub, cell == "rnn_relu", xp, h0, w_hh)
    return y, (h, None)


def _layer(cell: str, x, rows: _Rows, h0, c0, params, eps: float, backend: str, w_hr=None):
    if backend == "torch":
        return recurrent_ref(cell, x, rows.offs, h0, c0, params, eps, w_hr)
    return _fused_layer(cell, x.contiguous(), rows, h0, c0, params, eps, w_hr)


# ============================================================================ functional

_OP_NAMES = {"lstm": "lstm_layer", "gru": "gru_layer", "rnn_tanh": "rnn_layer", "rnn_relu": "rnn_layer",
             "ln_lstm": "layer_norm_lstm_layer", "ln_gru": "layer_norm_gru_layer"}


def _check_layer(cell, x, h0, c0, params):
    op = _OP_NAMES[cell]
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise ValueError(f"{op}: expected a floating-point input tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3:
        raise ValueError(f"{op}: expected input to be 3D (T, B, C), got {x.dim()}D")
    T, B, C = x.shape
    if T == 0:
        raise ValueError(f"{op}: expected a sequence of at least one step, got T=0")
    w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c = params
    G = GATES[cell]
    if w_ih.dim() != 2 or w_ih.shape[0] % G or w_ih.shape[1] != C:
        raise ValueError(f"{op}: expected weight_ih of shape ({G}H, {C}), got {list(w_ih.shape)}")
    H = w_ih.shape[0] // G
    expect = {"weight_hh": (w_hh, (G * H, H)), "bias_ih": (b_ih, (G * H,)), "bias_hh": (b_hh, (G * H,)),
              "norm_ih_weight": (g_ih, (G * H,)), "norm_hh_weight": (g_hh, (G * H,)),
              "norm_c_weight": (g_c, (H,)), "norm_c_bias": (b_c, (H,)), "h0": (h0, (B, H)), "c0": (c0, (B, H))}
    for name, (t, shape) in expect.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{op}: expected {name} of shape {list(shape)}, got {list(t.shape)}")
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{op}: expected {name} as {x.dtype} on {x.device} (the input's), got "
                             f"{t.dtype} on {t.device}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"{op}: pass both biases or neither")
    return T, B, C, H


def _sorted_lengths(op, lengths, T, B):
    """Check lengths (B,) against T; the batch order by decreasing length and the _Rows of it."""
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or tuple(lengths.shape) != (B,):
        raise ValueError(f"{op}: expected lengths as {B} integers (one per sequence), got "
                         f"{lengths.dtype} of shape {list(lengths.shape)}")
    lengths = lengths.cpu().to(torch.int64)
    if B and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(f"{op}: lengths must lie in [1, T={T}], got {lengths.tolist()}")
    order = torch.sort(lengths, descending=True, stable=True).indices
    batch_sizes = (lengths[order][None, :] > torch.arange(T)[:, None]).sum(1)
    return order, _Rows(batch_sizes[batch_sizes > 0].numpy())


def _functional(cell, input, hx, params, batch_first, eps=1e-5, lengths=None):
    op = _OP_NAMES[cell]
    x = input.transpose(0, 1) if batch_first and isinstance(input, torch.Tensor) else input
    lstm = cell in ("lstm", "ln_lstm")
    h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
    T, B, C, H = _check_layer(cell, x, h0, c0, params)
    if h0 is None:
        h0 = torch.zeros(B, H, dtype=x.dtype, device=x.device)
    if lstm and c0 is None:
        c0 = torch.zeros(B, H, dtype=x.dtype, device=x.device)
    backend = _dispatch.choose("recurrent", _facts(x, cell)) if B else "torch"      # B = 0: nothing to fuse
    if lengths is None:
        y, (h, c) = _layer(cell, x.reshape(T * B, C), _Rows.padded_rows(T, B), h0, c0, params, eps, backend)
        y = y.view(T, B, H)
    else:                                   # only each sequence's own steps: pack, run, pad with zeros
        order, rows = _sorted_lengths(op, lengths, T, B)
        t_of = torch.from_numpy(np.repeat(np.arange(rows.T), rows.batch_sizes))                  # (N,)
        b_of = order[torch.from_numpy(np.concatenate([np.arange(n) for n in rows.batch_sizes]))]  # (N,)
        flat = (t_of * B + b_of).to(x.device)                           # packed row -> padded row
        order, inv = order.to(x.device), torch.argsort(order).to(x.device)
        y_p, (h, c) = _layer(cell, x.reshape(T * B, C).index_select(0, flat), rows, h0.index_select(0, order),
                             c0.index_select(0, order) if lstm else None, params, eps, backend)
        y = y_p.new_zeros(T * B, H).index_copy(0, flat, y_p).view(T, B, H)
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
        output (T, B, H) (or (B, T, H)), (h_n, c_n) each (B, H).
    """
    return _functional("lstm", input, hx, (weight_ih, weight_hh, bias_ih, bias_hh) + (None,) * 4, batch_first,
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
        output (T, B, H) (or (B, T, H)), h_n (B, H).
    """
    return _functional("gru", input, hx, (weight_ih, weight_hh, bias_ih, bias_hh) + (None,) * 4, batch_first,
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
        output (T, B, H) (or (B, T, H)), h_n (B, H).
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"rnn_layer: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return _functional(f"rnn_{nonlinearity}", input, hx, (weight_ih, weight_hh, bias_ih, bias_hh) + (None,) * 4,
                       batch_first, lengths=lengths)


def layer_norm_lstm_layer(input: torch.Tensor, hx: Optional[Tuple[torch.Tensor, torch.Tensor]],
                          weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor],
                          bias_hh: Optional[torch.Tensor], norm_ih_weight: torch.Tensor,
                          norm_hh_weight: torch.Tensor, norm_c_weight: torch.Tensor, norm_c_bias: torch.Tensor,
                          eps: float = 1e-5, batch_first: bool = False, lengths=None):
    """One layer-normalized LSTM layer (Ba et al. 2016; see the module docstring):

        G = LN(x W_ih^T) norm_ih_weight + LN(h W_hh^T) norm_hh_weight + bias_ih + bias_hh
        c' = f c + i g;   h' = o tanh(LN(c') norm_c_weight + norm_c_bias)

    Args:
        input: (T, B, C), or (B, T, C) with batch_first.   hx: (h0, c0) each (B, H), or None.
        lengths: optional (B,) integers in [1, T]: sequence b runs its first lengths[b] steps only
            (no compute past them); its output is zero after them and its final state is at its last.
        weight_ih (4H, C), weight_hh (4H, H), bias_ih / bias_hh (4H,) or None,
        norm_ih_weight / norm_hh_weight (4H,), norm_c_weight / norm_c_bias (H,); eps of the norms.
    Returns:
        output (T, B, H) (or (B, T, H)), (h_n, c_n) each (B, H).
    """
    return _functional("ln_lstm", input, hx, (weight_ih, weight_hh, bias_ih, bias_hh, norm_ih_weight,
                                              norm_hh_weight, norm_c_weight, norm_c_bias), batch_first, eps,
                       lengths)


def layer_norm_gru_layer(input: torch.Tensor, hx: Optional[torch.Tensor], weight_ih: torch.Tensor,
                         weight_hh: torch.Tensor, bias_ih: Optional[torch.Tensor], bias_hh: Optional[torch.Tensor],
                         norm_ih_weight: torch.Tensor, norm_hh_weight: torch.Tensor, eps: float = 1e-5,
                         batch_first: bool = False, lengths=None):
    """One layer-normalized GRU layer: torch's GRU on x-part = LN(x W_ih^T) norm_ih_weight + bias_ih
    and h-part = LN(h W_hh^T) norm_hh_weight + bias_hh.

    Args:
        input: (T, B, C), or (B, T, C) with batch_first.   hx: h0 (B, H) or None.
        lengths: optional (B,) integers in [1, T]: sequence b runs its first lengths[b] steps only
            (no compute past them); its output is zero after them and its final state is at its last.
        weight_ih (3H, C), weight_hh (3H, H), bias_ih / bias_hh (3H,) or None,
        norm_ih_weight / norm_hh_weight (3H,); eps of the norms.
    Returns:
        output (T, B, H) (or (B, T, H)), h_n (B, H).
    """
    return _functional("ln_gru", input, hx, (weight_ih, weight_hh, bias_ih, bias_hh, norm_ih_weight,
                                             norm_hh_weight, None, None), batch_first, eps,
                       lengths)
