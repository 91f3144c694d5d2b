"""The recurrent family's torch.nn drop-in modules: LSTM, GRU, RNN, their cells, and the
layer-normalized LSTM and GRU that torch lacks.

Each keeps its torch.nn class's constructor, parameters, state_dict keys, forward(input, hx)
and returns, and runs every layer and direction through fastseq/recurrent.py's fused layers
(_layer): padded input as a (T B, C) block of rows, PackedSequence input as its packed rows, so
variable-length batches cost only their real steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from . import _dispatch
from .recurrent import GATES, _facts, _layer, _Rows


class _FusedStack:
    """The forward of a stack of recurrent layers (torch.nn.RNNBase's image) on the fused layers.

    Subclasses set CELL and provide _params(suffix); they also inherit from the torch.nn class
    whose constructor, parameters and state_dict they keep."""

    CELL = "lstm"
    EPS_DEFAULT = 1e-5

    def _cell(self) -> str:
        return self.CELL

    def _params(self, sfx: str):
        p = [getattr(self, f"weight_ih_{sfx}"), getattr(self, f"weight_hh_{sfx}")]
        p += [getattr(self, f"bias_ih_{sfx}"), getattr(self, f"bias_hh_{sfx}")] if self.bias else [None, None]
        return tuple(p) + (None,) * 4

    def _torch_forward(self, input, hx):
        return super().forward(input, hx)

    def _fused_forward(self, input, hx, backend):
        name, cell = type(self).__name__, self._cell()
        lstm = cell in ("lstm", "ln_lstm")
        packed = isinstance(input, PackedSequence)
        if packed:
            x, batch_sizes, sorted_idx, unsorted_idx = input
            rows = _Rows(batch_sizes.cpu())
            batched = True
            if x.dim() != 2 or x.shape[0] != rows.N:
                raise ValueError(f"{name}: PackedSequence batch_sizes account for {rows.N} rows, its data has "
                                 f"shape {list(x.shape)}")
        else:
            if not isinstance(input, torch.Tensor) or not input.dtype.is_floating_point:
                raise ValueError(f"{name}: expected a floating-point input tensor, got "
                                 f"{getattr(input, 'dtype', type(input).__name__)}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: expected input to be 2D or 3D, got {input.dim()}D")
            batched = input.dim() == 3
            xs = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                xs = xs.transpose(0, 1)                                            # (T, B, C)
            T, B = xs.shape[:2]
            x = xs.reshape(T * B, xs.shape[-1])                                    # (T B, C) rows
            rows, sorted_idx, unsorted_idx = _Rows.padded_rows(T, B), None, None
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{name}: expected input with {self.input_size} features, got {x.shape[-1]}")
        if x.dtype != self.weight_ih_l0.dtype:
            raise ValueError(f"{name}: expected input of the parameters' dtype {self.weight_ih_l0.dtype}, "
                             f"got {x.dtype}")
        dirs = 2 if self.bidirectional else 1
        L, B, H = self.num_layers, rows.B, self.hidden_size
        P = getattr(self, "proj_size", 0) or H                                  # the recurrent state's size
        h0, c0 = self._initial_states(hx, lstm, batched, sorted_idx, (L * dirs, B, P), (L * dirs, B, H), x, name)
        hs, cs = [], []
        eps = getattr(self, "eps", self.EPS_DEFAULT)
        for layer in range(L):
            outs = []
            for d in range(dirs):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                k = layer * dirs + d
                xin = x.index_select(0, rows.reverse(x.device)) if d else x
                w_hr = getattr(self, f"weight_hr_{sfx}") if getattr(self, "proj_size", 0) else None
                y, (h, c) = _layer(cell, xin, rows, h0[k], c0[k] if lstm else None, self._params(sfx), eps,
                                   backend, w_hr)
                outs.append(y.index_select(0, rows.reverse(y.device)) if d else y)
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, dim=-1) if dirs == 2 else outs[0]                   # (N, dirs H)
            if self.dropout and self.training and layer < L - 1:
                x = F.dropout(x, self.dropout, True)
        h_n = torch.stack(hs)
        c_n = torch.stack(cs) if lstm else None
        if unsorted_idx is not None:
            h_n = h_n.index_select(1, unsorted_idx)
            c_n = c_n.index_select(1, unsorted_idx) if lstm else None
        state = (h_n, c_n) if lstm else h_n
        if packed:
            return PackedSequence(x, batch_sizes, sorted_idx, unsorted_idx), state
        out = x.view(rows.T, B, -1)
        if not batched:
            state = (h_n.squeeze(1), c_n.squeeze(1)) if lstm else h_n.squeeze(1)
            return out.squeeze(1), state
        return (out.transpose(0, 1) if self.batch_first else out), state

    def _initial_states(self, hx, lstm, batched, sorted_idx, shape, c_shape, x, name):
        if hx is None:
            z = torch.zeros(shape, dtype=x.dtype, device=x.device)
            return z, (torch.zeros(c_shape, dtype=x.dtype, device=x.device) if c_shape != shape else z)
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
            if tuple(s.shape) != tuple(want):
                raise ValueError(f"{name}: expected {label} of shape {list(want)} (num_layers * directions, "
                                 f"batch, {'proj_size' if want[-1] != c_shape[-1] else 'hidden'}), got {list(s.shape)}")
            if s.dtype != x.dtype or s.device != x.device:
                raise ValueError(f"{name}: expected {label} as {x.dtype} on {x.device}, got {s.dtype} on {s.device}")
            out.append(s)
        return (out[0], out[1]) if lstm else (out[0], None)

    def forward(self, input, hx=None):
        data = input.data if isinstance(input, PackedSequence) else input
        if not isinstance(data, torch.Tensor) or not data.dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__}: expected a floating-point input tensor, got "
                             f"{getattr(data, 'dtype', type(input).__name__)}")
        backend = _dispatch.choose("recurrent", _facts(data, self._cell()))
        if not isinstance(input, PackedSequence) and data.dim() in (2, 3):
            T, B = (data.shape[1], data.shape[0]) if data.dim() == 3 and self.batch_first else \
                (data.shape[0], data.shape[1] if data.dim() == 3 else 1)
            if T == 0:
                raise ValueError(f"{type(self).__name__}: expected a sequence of at least one step, got T=0")
            if B == 0:                                # an empty batch: nothing to fuse
                backend = "torch"
        if (backend == "torch" and not self._ln()) or (getattr(self, "proj_size", 0) > 0 and backend != "cpu"):
            return self._torch_forward(input, hx)
        return self._fused_forward(input, hx, backend)

    def _ln(self) -> bool:
        return self._cell() in ("ln_lstm", "ln_gru")


class LSTM(_FusedStack, torch.nn.LSTM):
    """torch.nn.LSTM on fused whole-sequence layers: same constructor, parameters, state_dict,
    forward (tensor or PackedSequence, hx) and returns, proj_size included (fused on the CPU; on a
    GPU proj_size > 0 runs torch's own forward)."""
    CELL = "lstm"


class GRU(_FusedStack, torch.nn.GRU):
    """torch.nn.GRU on fused whole-sequence layers: same constructor, parameters, state_dict,
    forward (tensor or PackedSequence, hx) and returns."""
    CELL = "gru"


class RNN(_FusedStack, torch.nn.RNN):
    """torch.nn.RNN (Elman, tanh or relu) on fused whole-sequence layers: same constructor,
    parameters, state_dict, forward and returns."""

    def _cell(self) -> str:
        return "rnn_tanh" if self.nonlinearity == "tanh" else "rnn_relu"


class _LayerNormMixin:
    """Adds the norm parameters of the layer-normalized cells to a torch.nn.LSTM / GRU image:
    per layer and direction norm_ih_weight_l{k}, norm_hh_weight_l{k} (G H,), and for the LSTM
    norm_c_weight_l{k}, norm_c_bias_l{k} (H,); ones and zeros at init."""

    def _add_norms(self, eps, device, dtype):
        self.eps = float(eps)
        G, H = GATES[self.CELL], self.hidden_size
        kw = dict(device=device, dtype=dtype)
        for layer in range(self.num_layers):
            for d in range(2 if self.bidirectional else 1):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                self.register_parameter(f"norm_ih_weight_{sfx}", torch.nn.Parameter(torch.ones(G * H, **kw)))
                self.register_parameter(f"norm_hh_weight_{sfx}", torch.nn.Parameter(torch.ones(G * H, **kw)))
                if self.CELL == "ln_lstm":
                    self.register_parameter(f"norm_c_weight_{sfx}", torch.nn.Parameter(torch.ones(H, **kw)))
                    self.register_parameter(f"norm_c_bias_{sfx}", torch.nn.Parameter(torch.zeros(H, **kw)))

    def _params(self, sfx: str):
        p = list(_FusedStack._params(self, sfx)[:4])
        p += [getattr(self, f"norm_ih_weight_{sfx}"), getattr(self, f"norm_hh_weight_{sfx}")]
        p += ([getattr(self, f"norm_c_weight_{sfx}"), getattr(self, f"norm_c_bias_{sfx}")]
              if self.CELL == "ln_lstm" else [None, None])
        return tuple(p)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


class LayerNormLSTM(_LayerNormMixin, _FusedStack, torch.nn.LSTM):
    """An LSTM with layer normalization on the input and recurrent gate pre-activations and on
    the cell before the output tanh (Ba et al. 2016; equations in the module docstring).  Same
    arguments as torch.nn.LSTM (proj_size must be 0) plus eps; parameters as torch.nn.LSTM's plus
    norm_ih_weight_l{k}, norm_hh_weight_l{k} (4H,), norm_c_weight_l{k}, norm_c_bias_l{k} (H,), so
    an nn.LSTM state_dict loads with strict=False.  On a backend without the fused kernel it runs
    the step-by-step reference."""
    CELL = "ln_lstm"

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
    CELL = "ln_gru"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, eps=1e-5):
        super().__init__(input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
                         dropout=dropout, bidirectional=bidirectional, device=device, dtype=dtype)
        self._add_norms(eps, device, dtype)


# ---------------------------------------------------------------------------- cells

class _FusedCell:
    """One step of a cell (torch.nn.LSTMCell's image) through the fused layer with T = 1."""

    CELL = "lstm"

    def _cell(self) -> str:
        return self.CELL

    def forward(self, input, hx=None):
        name, cell = type(self).__name__, self._cell()
        lstm = cell == "lstm"
        if not isinstance(input, torch.Tensor) or not input.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point input tensor, got "
                             f"{getattr(input, 'dtype', type(input).__name__)}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: expected input to be 1D or 2D, got {input.dim()}D")
        backend = _dispatch.choose("recurrent", _facts(input, cell))
        if backend == "torch" or (input.dim() == 2 and input.shape[0] == 0):      # (an empty batch: torch's)
            return super().forward(input, hx)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if x.shape[1] != self.input_size:
            raise ValueError(f"{name}: expected input with {self.input_size} features, got {x.shape[1]}")
        B, H = x.shape[0], self.hidden_size
        states = [None, None]
        if hx is not None:
            given = hx if lstm else (hx,)
            for i, s in enumerate(given):
                s = s if batched else s.unsqueeze(0)
                if tuple(s.shape) != (B, H):
                    raise ValueError(f"{name}: expected hidden state of shape {[B, H]}, got {list(s.shape)}")
                if s.dtype != x.dtype or s.device != x.device:
                    raise ValueError(f"{name}: expected hidden state as {x.dtype} on {x.device} (the input's), "
                                     f"got {s.dtype} on {s.device}")
                states[i] = s
        for i in range(2 if lstm else 1):
            if states[i] is None:
                states[i] = torch.zeros(B, H, dtype=x.dtype, device=x.device)
        params = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh) + (None,) * 4
        _, (h, c) = _layer(cell, x, _Rows.padded_rows(1, B), states[0], states[1], params, 1e-5, backend)
        if not batched:
            h, c = h.squeeze(0), (c.squeeze(0) if lstm else None)
        return (h, c) if lstm else h


class LSTMCell(_FusedCell, torch.nn.LSTMCell):
    """torch.nn.LSTMCell on the fused LSTM step: same constructor, parameters, forward and returns."""
    CELL = "lstm"


class GRUCell(_FusedCell, torch.nn.GRUCell):
    """torch.nn.GRUCell on the fused GRU step."""
    CELL = "gru"


class RNNCell(_FusedCell, torch.nn.RNNCell):
    """torch.nn.RNNCell (tanh or relu) on the fused RNN step."""

    def _cell(self) -> str:
        return "rnn_tanh" if self.nonlinearity == "tanh" else "rnn_relu"
