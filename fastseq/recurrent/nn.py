"""The recurrent family's torch.nn drop-in modules: LSTM, GRU, RNN, their cells, and the
layer-normalized LSTM and GRU that torch lacks.

Each keeps its torch.nn class's constructor, parameters, state_dict keys, forward(input, hx)
and returns, and runs every layer and direction through functional.run_layer (the cell's fused
layer): padded input as a (T B, C) block of rows, PackedSequence input as its packed rows, so
variable-length batches cost only their real steps.  Where dispatch picks the "torch" backend
(forced, a dtype without kernels, autocast on, proj_size on a GPU) the modules with a torch twin
run torch's own forward, which is then exactly torch's (dtypes under autocast included).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from .. import _library
from . import functional as _fn
from . import rows as R
from .cells import GRU as _GRU, LN_GRU, LN_LSTM, LSTM as _LSTM, RNN_RELU, RNN_TANH, Cell


def _check_float(name, data, what="input tensor"):
    if not isinstance(data, torch.Tensor) or not data.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point {what}, got "
                         f"{getattr(data, 'dtype', type(data).__name__)}")


def _cast_states(hx, dtype, has_c):
    if hx is None:
        return None
    if has_c and isinstance(hx, (tuple, list)):
        return tuple(s.to(dtype) if isinstance(s, torch.Tensor) else s for s in hx)
    return hx.to(dtype) if isinstance(hx, torch.Tensor) else hx


def _autocast_off(module, input, hx, cell: Cell, dev: str):
    """A layer-normalized module under autocast: its forward in the parameters' dtype, autocast
    off (functional.py's docstring)."""
    dtype = next(module.parameters()).dtype
    inp = input.to(dtype) if isinstance(input, (torch.Tensor, PackedSequence)) else input
    with torch.autocast(dev, enabled=False):
        return module.forward(inp, _cast_states(hx, dtype, cell.has_c))


class _FusedStack:
    """The forward of a stack of recurrent layers (torch.nn.RNNBase's image) on the fused layers.

    Subclasses set CELL (a cells.Cell) and inherit from the torch.nn class whose constructor,
    parameters and state_dict they keep."""

    CELL: Cell = _LSTM
    EPS_DEFAULT = 1e-5

    def _cell(self) -> Cell:
        return self.CELL

    def _params(self, k: int, sfx: str):
        """(w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c) and w_hr of layer-direction k (suffix sfx),
        from torch's own list of the parameters (kept current by torch.nn.RNNBase)."""
        fw = self._flat_weights
        s = len(fw) // (self.num_layers * (2 if self.bidirectional else 1))
        w = fw[k * s:(k + 1) * s]
        p = (w[0], w[1], w[2], w[3]) if self.bias else (w[0], w[1], None, None)
        return p + (None,) * 4, (w[-1] if self.proj_size else None)

    def __new__(cls, *args, **kwargs):      # built, or converted by rebind(): either way through here
        _library.allow_dynamo_rnn_modules()
        return super().__new__(cls)

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        _check_float(type(self).__name__, data)
        cell = self._cell()
        if cell.layer_norm and _fn.autocast_on(data.device.type):
            return _autocast_off(self, input, hx, cell, data.device.type)
        backend = _fn.choose(cell, data, self.proj_size > 0)
        if not packed and data.dim() in (2, 3):
            T, B = (data.shape[1], data.shape[0]) if data.dim() == 3 and self.batch_first else \
                (data.shape[0], data.shape[1] if data.dim() == 3 else 1)
            if T == 0:
                raise ValueError(f"{type(self).__name__}: expected a sequence of at least one step, got T=0")
            if B == 0:                                # an empty batch: nothing to fuse
                backend = "torch"
        if backend == "torch" and not cell.layer_norm:
            return super().forward(input, hx)
        return self._fused_forward(input, hx, backend, cell)

    def _fused_forward(self, input, hx, backend, cell):
        name = type(self).__name__
        lstm = cell.has_c
        packed = isinstance(input, PackedSequence)
        if packed:
            x, batch_sizes, sorted_idx, unsorted_idx = input
            rows = R.packed(batch_sizes.cpu())
            batched = True
            if x.dim() != 2 or x.shape[0] != rows.N:
                raise ValueError(f"{name}: PackedSequence batch_sizes account for {rows.N} rows, its data has "
                                 f"shape {list(x.shape)}")
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: expected input to be 2D or 3D, got {input.dim()}D")
            batched = input.dim() == 3
            xs = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                xs = xs.transpose(0, 1)                                            # (T, B, C)
            T, B, C = xs.shape
            x = xs.reshape(T * B, C)                                               # (T B, C) rows
            rows, sorted_idx, unsorted_idx = R.padded(T, B), None, None
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{name}: expected input with {self.input_size} features, got {x.shape[-1]}")
        if x.dtype != self._flat_weights[0].dtype:
            raise ValueError(f"{name}: expected input of the parameters' dtype {self._flat_weights[0].dtype}, "
                             f"got {x.dtype}")
        dirs = 2 if self.bidirectional else 1
        L, B, H = self.num_layers, rows.B, self.hidden_size
        P = self.proj_size or H                                                  # the recurrent state's size
        h0, c0 = self._initial_states(hx, lstm, batched, sorted_idx, (L * dirs, B, P), (L * dirs, B, H), x, name)
        hs, cs = [], []
        eps = self.__dict__.get("eps", self.EPS_DEFAULT)       # (a missing Module attribute costs an exception)
        for layer in range(L):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                params, w_hr = self._params(k, f"l{layer}_reverse" if d else f"l{layer}")
                xin = x.index_select(0, rows.reverse(x.device)) if d else x
                y, (h, c) = _fn.run_layer(cell, xin, rows, h0[k], c0[k] if lstm else None, params, eps, backend,
                                          w_hr)
                outs.append(y.index_select(0, rows.reverse(y.device)) if d else y)
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]                   # (N, dirs H)
            if self.dropout and self.training and layer < L - 1:
                x = F.dropout(x, self.dropout, True)
        h_n = torch.stack(hs) if len(hs) > 1 else hs[0].unsqueeze(0)
        c_n = (torch.stack(cs) if len(cs) > 1 else cs[0].unsqueeze(0)) if lstm else None
        if unsorted_idx is not None:
            h_n = h_n.index_select(1, unsorted_idx)
            c_n = c_n.index_select(1, unsorted_idx) if lstm else None
        state = (h_n, c_n) if lstm else h_n
        if packed:
            return PackedSequence(x, batch_sizes, sorted_idx, unsorted_idx), state
        out = x.view(rows.T, B, x.shape[-1])
        if not batched:
            state = (h_n.squeeze(1), c_n.squeeze(1)) if lstm else h_n.squeeze(1)
            return out.squeeze(1), state
        return (out.transpose(0, 1) if self.batch_first else out), state

    def _initial_states(self, hx, lstm, batched, sorted_idx, shape, c_shape, x, name):
        if hx is None:
            z = torch.zeros(shape, dtype=x.dtype, device=x.device)
            return z, (torch.zeros(c_shape, dtype=x.dtype, device=x.device) if lstm and c_shape != shape else z)
        states = hx if lstm else (hx,)
        if lstm and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise ValueError(f"{name}: expected hx to be a tuple (h_0, c_0), got {type(hx).__name__}")
        out = []
        for i, s in enumerate(states):
            label = f"hx[{i}]" if lstm else "hx"
            if s.dim() != (3 if batched else 2):
                raise ValueError(f"{name}: expected {label} to be {3 if batched else 2}D for "
                                 f"{'batched' if batched else 'unbatched'} input, got {s.dim()}D")
            s = s if batched else s.unsqueeze(1)
            if sorted_idx is not None:
                s = s.index_select(1, sorted_idx)
            want = c_shape if i == 1 else shape
            if s.shape != want:
                raise ValueError(f"{name}: expected {label} of shape {list(want)} (num_layers * directions, "
                                 f"batch, {'proj_size' if want[-1] != c_shape[-1] else 'hidden'}), got {list(s.shape)}")
            if s.dtype != x.dtype or s.device != x.device:
                raise ValueError(f"{name}: expected {label} as {x.dtype} on {x.device}, got {s.dtype} on {s.device}")
            out.append(s)
        return (out[0], out[1]) if lstm else (out[0], None)


class LSTM(_FusedStack, torch.nn.LSTM):
    """torch.nn.LSTM on fused whole-sequence layers: same constructor, parameters, state_dict,
    forward (tensor or PackedSequence, hx) and returns, proj_size included (fused on the CPU; on a
    GPU proj_size > 0 runs torch's own forward)."""
    CELL = _LSTM


class GRU(_FusedStack, torch.nn.GRU):
    """torch.nn.GRU on fused whole-sequence layers: same constructor, parameters, state_dict,
    forward (tensor or PackedSequence, hx) and returns."""
    CELL = _GRU


class RNN(_FusedStack, torch.nn.RNN):
    """torch.nn.RNN (Elman, tanh or relu) on fused whole-sequence layers: same constructor,
    parameters, state_dict, forward and returns."""

    def _cell(self) -> Cell:
        return RNN_TANH if self.nonlinearity == "tanh" else RNN_RELU


class _LayerNormMixin:
    """Adds the norm parameters of the layer-normalized cells to a torch.nn.LSTM / GRU image:
    per layer and direction norm_ih_weight_l{k}, norm_hh_weight_l{k} (G H,), and for the LSTM
    norm_c_weight_l{k}, norm_c_bias_l{k} (H,); ones and zeros at init."""

    def _add_norms(self, eps, device, dtype):
        self.eps = float(eps)
        G, H = self.CELL.gates, self.hidden_size
        kw = dict(device=device, dtype=dtype)
        for layer in range(self.num_layers):
            for d in range(2 if self.bidirectional else 1):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                self.register_parameter(f"norm_ih_weight_{sfx}", torch.nn.Parameter(torch.ones(G * H, **kw)))
                self.register_parameter(f"norm_hh_weight_{sfx}", torch.nn.Parameter(torch.ones(G * H, **kw)))
                if self.CELL.has_c:
                    self.register_parameter(f"norm_c_weight_{sfx}", torch.nn.Parameter(torch.ones(H, **kw)))
                    self.register_parameter(f"norm_c_bias_{sfx}", torch.nn.Parameter(torch.zeros(H, **kw)))

    def _params(self, k: int, sfx: str):
        p, _ = _FusedStack._params(self, k, sfx)
        ps = self._parameters
        norms = (ps[f"norm_ih_weight_{sfx}"], ps[f"norm_hh_weight_{sfx}"])
        norms += (ps[f"norm_c_weight_{sfx}"], ps[f"norm_c_bias_{sfx}"]) if self.CELL.has_c else (None, None)
        return p[:4] + norms, None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


class LayerNormLSTM(_LayerNormMixin, _FusedStack, torch.nn.LSTM):
    """An LSTM with layer normalization on the input and recurrent gate pre-activations and on
    the cell before the output tanh (Ba et al. 2016; equations in fastseq.functional's
    layer_norm_lstm_layer).  Same arguments as torch.nn.LSTM (proj_size must be 0) plus eps;
    parameters as torch.nn.LSTM's plus norm_ih_weight_l{k}, norm_hh_weight_l{k} (4H,),
    norm_c_weight_l{k}, norm_c_bias_l{k} (H,), so an nn.LSTM state_dict loads with strict=False.
    On a backend without the fused kernel it runs the step-by-step reference; under autocast it
    computes in the parameters' dtype."""
    CELL = LN_LSTM

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, eps=1e-5):
        if proj_size:
            raise ValueError(f"LayerNormLSTM: proj_size is not supported, got {proj_size}")
        super().__init__(input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
                         dropout=dropout, bidirectional=bidirectional, device=device, dtype=dtype)
        self._add_norms(eps, device, dtype)


class LayerNormGRU(_LayerNormMixin, _FusedStack, torch.nn.GRU):
    """A GRU with layer normalization on the input and recurrent gate pre-activations (each over
    the 3H row).  Same arguments as torch.nn.GRU plus eps; parameters as torch.nn.GRU's plus
    norm_ih_weight_l{k}, norm_hh_weight_l{k} (3H,)."""
    CELL = LN_GRU

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, eps=1e-5):
        super().__init__(input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
                         dropout=dropout, bidirectional=bidirectional, device=device, dtype=dtype)
        self._add_norms(eps, device, dtype)


# ---------------------------------------------------------------------------- cells

_MISSING = object()


class _FusedCell:
    """One step of a cell (torch.nn.LSTMCell's image) through the cell's fused layer with T = 1."""

    CELL: Cell = _LSTM

    def _cell(self) -> Cell:
        return self.CELL

    def _param(self, name):
        p = self._parameters.get(name, _MISSING)
        return getattr(self, name) if p is _MISSING else p      # (a parametrization moves it)

    def forward(self, input, hx=None):
        name = type(self).__name__
        _check_float(name, input)
        cell = self._cell()
        backend = _fn.choose(cell, input)
        dim = input.dim()
        if backend == "torch" or (dim == 2 and input.shape[0] == 0):      # (an empty batch: torch's)
            return super().forward(input, hx)
        if dim == 2:
            x = input
        elif dim == 1:
            x = input.unsqueeze(0)
        else:
            raise ValueError(f"{name}: expected input to be 1D or 2D, got {dim}D")
        if x.shape[1] != self.input_size:
            raise ValueError(f"{name}: expected input with {self.input_size} features, got {x.shape[1]}")
        B, H = x.shape[0], self.hidden_size
        lstm = cell.has_c
        h0 = c0 = None
        if hx is not None:
            given = hx if lstm else (hx,)
            for i, s in enumerate(given):
                s = s if dim == 2 else s.unsqueeze(0)
                if s.shape != (B, H):
                    raise ValueError(f"{name}: expected hidden state of shape {[B, H]}, got {list(s.shape)}")
                if s.dtype != x.dtype or s.device != x.device:
                    raise ValueError(f"{name}: expected hidden state as {x.dtype} on {x.device} (the input's), "
                                     f"got {s.dtype} on {s.device}")
                if i == 0:
                    h0 = s
                else:
                    c0 = s
        if h0 is None:
            h0 = torch.zeros(B, H, dtype=x.dtype, device=x.device)
        if lstm and c0 is None:
            c0 = torch.zeros(B, H, dtype=x.dtype, device=x.device)
        params = (self._param("weight_ih"), self._param("weight_hh"), self._param("bias_ih"),
                  self._param("bias_hh"), None, None, None, None)
        _, (h, c) = cell.fused(x.contiguous(), R.padded(1, B), h0, c0, params, 1e-5, backend, alias=True)
        if dim == 1:
            h, c = h.squeeze(0), (c.squeeze(0) if lstm else None)
        return (h, c) if lstm else h


class LSTMCell(_FusedCell, torch.nn.LSTMCell):
    """torch.nn.LSTMCell on the fused LSTM step: same constructor, parameters, forward and returns."""
    CELL = _LSTM


class GRUCell(_FusedCell, torch.nn.GRUCell):
    """torch.nn.GRUCell on the fused GRU step."""
    CELL = _GRU


class RNNCell(_FusedCell, torch.nn.RNNCell):
    """torch.nn.RNNCell (tanh or relu) on the fused RNN step."""

    def _cell(self) -> Cell:
        return RNN_TANH if self.nonlinearity == "tanh" else RNN_RELU
