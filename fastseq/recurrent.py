"""Recurrent family: LSTM, GRU, Elman RNN (tanh / relu), and the layer-normalized LSTM and GRU.

Read top to bottom: the pure-torch references (the oracles), the row layout shared by padded and
packed sequences, dispatch facts, one autograd Function per cell around its fused
whole-sequence kernel, and the functional layer ops.  The torch.nn drop-in modules built on them
are in fastseq/recurrent_nn.py.

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
from torch.autograd.function import once_differentiable

from . import _alloc, _blas, _dispatch
from .layer_norm import layer_norm as _fused_layer_norm

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


# ============================================================================ kernel calls

def _np(t):
    return t.detach().numpy().reshape(-1)


def _kernels():
    return _blas.cpu_kernels("recurrent")


class _CpuLoops:
    """kernels/cpu/recurrent.pyx taking tensors where it takes numpy arrays: the same signatures
    as fastseq/_recurrent_cuda.py, the GPU's time loops."""

    def __getattr__(self, name):
        fn = getattr(_kernels(), name)
        return lambda *args: fn(*[_np(a) if isinstance(a, torch.Tensor) else a for a in args])


_CPU_LOOPS = _CpuLoops()


class _CudaLoops:
    """fastseq/_recurrent_cuda.py, each call with torch's and Numba's current device set to the
    first tensor's.  (The CUDA simulator's tests run it on CPU tensors.)"""

    def __getattr__(self, name):
        from . import _recurrent_cuda
        fn = getattr(_recurrent_cuda, name)

        def call(*args):
            if args[0].device.type != "cuda":
                return fn(*args)
            from ._cuda._common import on_device
            with on_device(args[0].device):
                return fn(*args)
        return call


_CUDA_LOOPS = _CudaLoops()


def _loops(t: torch.Tensor):
    """The time loops for tensors on t's device."""
    return _CUDA_LOOPS if t.device.type == "cuda" else _CPU_LOOPS


def _unit_block(H: int, threads: int) -> int:
    """Hidden units per gate block: one block per thread, a multiple of 8 (a vector of floats)."""
    per_thread = -(-H // max(1, threads))                 # ceil(H / threads)
    return max(8, -(-per_thread // 8) * 8)                # rounded up to a multiple of 8


_PERMS = {}


def _gate_perm(H: int, ub: int, gates: int = 4) -> Optional[torch.Tensor]:
    """Row order of the blocked gate layout (kernels/cpu/recurrent.pyx): for each block of ub
    units, its rows of every gate in turn.  None when it is torch's order (one block)."""
    if ub >= H or gates == 1:
        return None
    key = (H, ub, gates)
    if key not in _PERMS:
        rows = []
        for j0 in range(0, H, ub):
            for gate in range(gates):
                rows.extend(range(gate * H + j0, gate * H + min(H, j0 + ub)))
        with torch.inference_mode(False):           # a cached index must serve autograd later too
            _PERMS[key] = torch.tensor(rows, dtype=torch.int64)
    return _PERMS[key]


def _inverse_perm(perm):
    return None if perm is None else _INVERSE.setdefault(id(perm), torch.argsort(perm))


_INVERSE = {}


def _permute(t, perm):
    """t's rows in the blocked gate order (a copy per call: a cache keyed on the parameter's
    version would miss writes through .data, which EMA and weight-averaging code make)."""
    return t if t is None or perm is None else t.index_select(0, perm)


def _empty(rows, cols, like):
    return _alloc.empty((rows, cols), like.dtype, like.device)


def _final(rows: _Rows, seq, s0):
    """Final state (B, H) of every sequence: its last row of seq (N, H); s0 when T = 0."""
    return seq.index_select(0, rows.last(seq.device)) if rows.N else s0.clone()


def _carry(grad, like):
    """The backward carry (B, H), entering as the gradient at the final state."""
    return grad.contiguous().clone() if grad is not None else torch.zeros_like(like)


def _grad_or_zeros(g, rows, H, like):
    return g.contiguous() if g is not None else torch.zeros(rows, H, dtype=like.dtype, device=like.device)


class LSTMLayerFunction(torch.autograd.Function):
    """The sequential part of one LSTM layer: (xp, h0, c0, W_hh) -> y, h_n, c_n.  W_hh in torch's
    row order.  Training: xp in the blocked gate layout of unit block ub (the backward returns its
    gradient dG blocked); saves every step's h and c and the activated gates.  infer=True (no
    gradient wanted, the caller checked): xp in torch's order, and nothing is kept."""

    @staticmethod
    def forward(ctx, rows, ub, xp, h0, c0, w_hh, infer=False):
        H = w_hh.shape[1]
        h0, c0, w_hh = h0.contiguous(), c0.contiguous(), w_hh.contiguous()
        step = torch.empty(rows.B * 4 * H, dtype=xp.dtype, device=xp.device)
        y = _empty(rows.N, H, xp)
        if infer and _loops(xp) is _CPU_LOOPS:                              # inference: keep nothing
            cs = torch.empty(2 * rows.B, H, dtype=xp.dtype)                # c of steps t % 2 (the kernel's doc)
            _loops(xp).lstm_forward(xp, w_hh, h0, c0, y, cs, step, step, rows.offs, rows.T, H, ub,
                                    _dispatch.num_threads(), False, False)
            half = torch.from_numpy((rows.lengths() - 1) % 2 * rows.B + np.arange(rows.B))
            return y, _final(rows, y, h0), cs.index_select(0, half) if rows.N else c0.clone()
        if infer and _gate_perm(H, ub, 4) is not None:
            raise RuntimeError("LSTMLayerFunction: infer=True runs on the CPU loops only")
        cs, gates = _empty(rows.N, H, xp), _empty(rows.N, 4 * H, xp)
        _loops(xp).lstm_forward(xp, w_hh, h0, c0, y, cs, gates, step,
                                rows.offs, rows.T, H, ub, _dispatch.num_threads())
        ctx.save_for_backward(h0, c0, w_hh, y, cs, gates)
        ctx.rows, ctx.ub = rows, ub
        return y, _final(rows, y, h0), _final(rows, cs, c0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        h0, c0, w_hh, y, cs, gates = ctx.saved_tensors
        rows, H = ctx.rows, w_hh.shape[1]
        perm = _gate_perm(H, ctx.ub, 4)
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh, dc = _carry(dh_n, h0), _carry(dc_n, c0)
        dg = _empty(rows.N, 4 * H, y)
        _loops(dy).lstm_backward(dy, _permute(w_hh, perm), c0, cs, gates, dg, dh, dc,
                                 rows.offs, rows.T, H, ctx.ub, _dispatch.num_threads())
        dw_hh = None
        if ctx.needs_input_grad[5]:
            dw_hh = dg.t() @ rows.h_prev(h0, y)                              # (4H, H), blocked rows
            dw_hh = _permute(dw_hh, _inverse_perm(perm))
        return None, None, dg, dh, dc, dw_hh, None


class LSTMProjLayerFunction(torch.autograd.Function):
    """LSTMLayerFunction with torch's proj_size: (xp, h0 (B, P), c0 (B, H), W_hh (4H, P), W_hr (P, H))
    -> y (N, P), h_n (B, P), c_n (B, H), h_t = (o tanh(c_t)) W_hr^T.  Saves m = o tanh(c) too."""

    @staticmethod
    def forward(ctx, rows, ub, xp, h0, c0, w_hh, w_hr):
        P, H = w_hr.shape
        h0, c0, w_hh, w_hr = h0.contiguous(), c0.contiguous(), w_hh.contiguous(), w_hr.contiguous()
        y, cs, m, gates = _empty(rows.N, P, xp), _empty(rows.N, H, xp), _empty(rows.N, H, xp), _empty(rows.N, 4 * H, xp)
        step = torch.empty(rows.B * 4 * H, dtype=xp.dtype)
        _CPU_LOOPS.lstm_proj_forward(xp, w_hh, w_hr, h0, c0, y, cs, gates, m, step, rows.offs, rows.T, H, P, ub,
                                     _dispatch.num_threads())
        ctx.save_for_backward(h0, c0, w_hh, w_hr, y, cs, gates, m)
        ctx.rows, ctx.ub = rows, ub
        return y, _final(rows, y, h0), _final(rows, cs, c0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        h0, c0, w_hh, w_hr, y, cs, gates, m = ctx.saved_tensors
        rows, (P, H) = ctx.rows, w_hr.shape
        dy = _grad_or_zeros(dy, rows.N, P, y)
        dh, dc = _carry(dh_n, h0), _carry(dc_n, c0)
        dg, dhp = _empty(rows.N, 4 * H, y), _empty(rows.N, P, y)
        dm = torch.empty(rows.B * H, dtype=y.dtype)
        _CPU_LOOPS.lstm_proj_backward(dy, w_hh, w_hr, c0, cs, gates, dg, dhp, dm, dh, dc, rows.offs, rows.T, H, P,
                                      ctx.ub, _dispatch.num_threads())
        dw_hh = dg.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[5] else None
        dw_hr = dhp.t() @ m if ctx.needs_input_grad[6] else None
        return None, None, dg, dh, dc, dw_hh, dw_hr


class GRULayerFunction(torch.autograd.Function):
    """The sequential part of one GRU layer: (xp = x W_ih^T + b_ih, h0, W_hh, b_hh) -> y, h_n,
    blocked gate layout.  Saves h, the activated gates and the recurrent n pre-activation."""

    @staticmethod
    def forward(ctx, rows, ub, xp, h0, w_hh, b_hh):
        H = w_hh.shape[1]
        y, gates, ghn = _empty(rows.N, H, xp), _empty(rows.N, 3 * H, xp), _empty(rows.N, H, xp)
        h0, w_hh = h0.contiguous(), w_hh.contiguous()
        b_hh = b_hh.contiguous() if b_hh is not None else torch.zeros(3 * H, dtype=xp.dtype, device=xp.device)
        step = torch.empty(rows.B * 3 * H, dtype=xp.dtype, device=xp.device)
        _loops(xp).gru_forward(xp, w_hh, b_hh, h0, y, gates, ghn, step,
                               rows.offs, rows.T, H, ub, _dispatch.num_threads())
        ctx.save_for_backward(h0, w_hh, y, gates, ghn)
        ctx.rows, ctx.ub = rows, ub
        return y, _final(rows, y, h0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        h0, w_hh, y, gates, ghn = ctx.saved_tensors
        rows, H = ctx.rows, w_hh.shape[1]
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh = _carry(dh_n, h0)
        dxp, dgh = _empty(rows.N, 3 * H, y), _empty(rows.N, 3 * H, y)
        _loops(dy).gru_backward(dy, w_hh, h0, y, gates, ghn, dxp, dgh, dh, rows.offs, rows.T, H, ctx.ub, _dispatch.num_threads())
        dw_hh = dgh.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[4] else None
        db_hh = dgh.sum(0) if ctx.needs_input_grad[5] else None
        return None, None, dxp, dh, dw_hh, db_hh


class RNNLayerFunction(torch.autograd.Function):
    """The sequential part of one Elman RNN layer: (xp = x W_ih^T + b_ih + b_hh, h0, W_hh) -> y, h_n."""

    @staticmethod
    def forward(ctx, rows, ub, relu, xp, h0, w_hh):
        H = w_hh.shape[1]
        y = _empty(rows.N, H, xp)
        h0, w_hh = h0.contiguous(), w_hh.contiguous()
        _loops(xp).rnn_forward(xp, w_hh, h0, y, rows.offs, rows.T, H, ub, relu,
                               _dispatch.num_threads())
        ctx.save_for_backward(h0, w_hh, y)
        ctx.rows, ctx.ub, ctx.relu = rows, ub, relu
        return y, _final(rows, y, h0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        h0, w_hh, y = ctx.saved_tensors
        rows, H = ctx.rows, w_hh.shape[1]
        dy = _grad_or_zeros(dy, rows.N, H, y)
        dh = _carry(dh_n, h0)
        dg = _empty(rows.N, H, y)
        _loops(dy).rnn_backward(dy, w_hh, y, dg, dh, rows.offs, rows.T, H, ctx.ub,
                                ctx.relu, _dispatch.num_threads())
        dw_hh = dg.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[5] else None
        return None, None, None, dg, dh, dw_hh


class LayerNormLSTMLayerFunction(torch.autograd.Function):
    """The sequential part of one layer-normalized LSTM layer: (xp = LN(x W_ih^T) gamma_ih + b,
    h0, c0, W_hh, gamma_hh, gamma_c, beta_c) -> y, h_n, c_n (torch's gate order).  Saves h, c,
    the gates, the normalized recurrent term and cell and their rstd."""

    @staticmethod
    def forward(ctx, rows, eps, xp, h0, c0, w_hh, g_hh, g_c, b_c):
        H, N = w_hh.shape[1], rows.N
        y, cs, chat = _empty(N, H, xp), _empty(N, H, xp), _empty(N, H, xp)
        gates, ghat = _empty(N, 4 * H, xp), _empty(N, 4 * H, xp)
        rstd_h, rstd_c = (torch.empty(N, dtype=xp.dtype, device=xp.device) for _ in range(2))
        h0, c0, w_hh, g_hh, g_c, b_c = (t.contiguous() for t in (h0, c0, w_hh, g_hh, g_c, b_c))
        step = torch.empty(rows.B * 4 * H, dtype=xp.dtype, device=xp.device)
        _loops(xp).ln_lstm_forward(xp, w_hh, g_hh, g_c, b_c, h0, c0, y, cs, gates, ghat, rstd_h, chat,
                                    rstd_c, step, rows.offs, rows.T, H, eps, _dispatch.num_threads())
        ctx.save_for_backward(h0, c0, w_hh, g_hh, g_c, b_c, y, cs, gates, ghat, rstd_h, chat, rstd_c)
        ctx.rows = rows
        return y, _final(rows, y, h0), _final(rows, cs, c0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        h0, c0, w_hh, g_hh, g_c, b_c, y, cs, gates, ghat, rstd_h, chat, rstd_c = ctx.saved_tensors
        rows, H, N = ctx.rows, w_hh.shape[1], ctx.rows.N
        dy = _grad_or_zeros(dy, N, H, y)
        dh, dc = _carry(dh_n, h0), _carry(dc_n, c0)
        dg, dgh, dcn = _empty(N, 4 * H, y), _empty(N, 4 * H, y), _empty(N, H, y)
        if _loops(dy) is _CPU_LOOPS:
            nt = _dispatch.num_threads()
            sums = torch.zeros(nt, 6 * H, dtype=y.dtype)      # per thread: sum dG ghat, dcn chat, dcn
            _loops(dy).ln_lstm_backward(dy, w_hh, g_hh, g_c, b_c, c0, cs, gates, ghat, rstd_h, chat, rstd_c, dg,
                                         dgh, dcn, dh, dc, sums, rows.offs, rows.T, H, nt)
            dg_hh, dg_c, db_c = sums.sum(0).split([4 * H, H, H])
        else:
            _loops(dy).ln_lstm_backward(dy, w_hh, g_hh, g_c, b_c, c0, cs, gates, ghat, rstd_h, chat, rstd_c, dg,
                                         dgh, dcn, dh, dc, rows.offs, rows.T, H)
            dg_hh, dg_c, db_c = (dg * ghat).sum(0), (dcn * chat).sum(0), dcn.sum(0)
        dw_hh = dgh.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[5] else None
        keep = ctx.needs_input_grad
        return (None, None, dg, dh, dc, dw_hh, dg_hh if keep[6] else None, dg_c if keep[7] else None,
                db_c if keep[8] else None)


class LayerNormGRULayerFunction(torch.autograd.Function):
    """The sequential part of one layer-normalized GRU layer: (xp = LN(x W_ih^T) gamma_ih + b_ih,
    h0, W_hh, gamma_hh, b_hh) -> y, h_n (torch's gate order)."""

    @staticmethod
    def forward(ctx, rows, eps, xp, h0, w_hh, g_hh, b_hh):
        H, N = w_hh.shape[1], rows.N
        y, ghn = _empty(N, H, xp), _empty(N, H, xp)
        gates, ghat = _empty(N, 3 * H, xp), _empty(N, 3 * H, xp)
        rstd_h = torch.empty(N, dtype=xp.dtype, device=xp.device)
        b_hh = b_hh if b_hh is not None else torch.zeros(3 * H, dtype=xp.dtype, device=xp.device)
        h0, w_hh, g_hh, b_hh = (t.contiguous() for t in (h0, w_hh, g_hh, b_hh))
        step = torch.empty(rows.B * 3 * H, dtype=xp.dtype, device=xp.device)
        _loops(xp).ln_gru_forward(xp, w_hh, g_hh, b_hh, h0, y, gates, ghat, rstd_h, ghn, step, rows.offs, rows.T, H, eps, _dispatch.num_threads())
        ctx.save_for_backward(h0, w_hh, g_hh, y, gates, ghat, rstd_h, ghn)
        ctx.rows = rows
        return y, _final(rows, y, h0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        h0, w_hh, g_hh, y, gates, ghat, rstd_h, ghn = ctx.saved_tensors
        rows, H, N = ctx.rows, w_hh.shape[1], ctx.rows.N
        dy = _grad_or_zeros(dy, N, H, y)
        dh = _carry(dh_n, h0)
        dxp, da, dgh = _empty(N, 3 * H, y), _empty(N, 3 * H, y), _empty(N, 3 * H, y)
        if _loops(dy) is _CPU_LOOPS:
            nt = _dispatch.num_threads()
            sums = torch.zeros(nt, 6 * H, dtype=y.dtype)      # per thread: sum da ghat, da
            _loops(dy).ln_gru_backward(dy, w_hh, g_hh, h0, y, gates, ghat, rstd_h, ghn, dxp, da, dgh, dh, sums,
                                       rows.offs, rows.T, H, nt)
            dg_hh, db_hh = sums.sum(0).split([3 * H, 3 * H])
        else:
            _loops(dy).ln_gru_backward(dy, w_hh, g_hh, h0, y, gates, ghat, rstd_h, ghn, dxp, da, dgh, dh, rows.offs,
                                       rows.T, H)
            dg_hh, db_hh = (da * ghat).sum(0), da.sum(0)
        dw_hh = dgh.t() @ rows.h_prev(h0, y) if ctx.needs_input_grad[4] else None
        keep = ctx.needs_input_grad
        return None, None, dxp, dh, dw_hh, dg_hh if keep[5] else None, db_hh if keep[6] else None


def _sum_bias(a, b):
    return None if a is None else a + b


class ProjectionFunction(torch.autograd.Function):
    """xp = x W^T + b for every step at once, (N, C) -> (N, G H), as F.linear, with the output
    and the input gradient in fastseq's allocations: at (T, B) = (512, 64), G H = 512 the (N, G H)
    buffer is 64 MiB, and faulting in fresh 4 KiB pages for it cost as much as the GEMM itself."""

    @staticmethod
    def forward(ctx, x, w, b):
        out = _alloc.empty((x.shape[0], w.shape[0]), x.dtype, x.device)
        if b is not None:
            torch.addmm(b, x, w.t(), out=out)
        else:
            torch.mm(x, w.t(), out=out)
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dxp):
        x, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dxp, w, out=_alloc.empty(x.shape, x.dtype, x.device))
        if ctx.needs_input_grad[1]:
            dw = dxp.t() @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dxp.sum(0)
        return dx, dw, db


def _project(x, w, b):
    return ProjectionFunction.apply(x, w, b) if x.device.type == "cpu" else F.linear(x, w, b)


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
