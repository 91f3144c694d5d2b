"""The row layout of one batch of sequences, padded or packed, as torch's PackedSequence.

Step t owns rows offs[t]:offs[t+1] (B_t = batch_sizes[t] of them) of every (rows, .) buffer,
the batch sorted by decreasing length, so the sequences still running at step t are the first
B_t of step t - 1.  A padded (T, B) batch is batch_sizes = [B] * T, rows t B + b.

A Rows is built once per layout and cached by value: padded layouts by (T, B), packed ones by
their batch sizes (a small LRU).  The autograd Functions take only the offsets, as a CPU int64
tensor (offs, (T + 1,)), and find their Rows again with of(offs, B, N); every index a layout
needs (final rows, time reversal, previous rows) is built once per layout and device.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch


class Rows:
    """One layout: batch_sizes (numpy; sizes: a CPU int64 tensor), offs (numpy, a CPU int64
    tensor and a list), T, B, N, padded."""

    __slots__ = ("batch_sizes", "sizes", "offs_np", "offs", "offs_list", "T", "B", "N", "padded", "_index")

    def __init__(self, batch_sizes):
        bs = np.array(batch_sizes, dtype=np.int64).reshape(-1)
        if bs.size and (bs.min() < 0 or (np.diff(bs) > 0).any()):
            raise ValueError(f"recurrent: batch_sizes must be non-negative and non-increasing, got {bs.tolist()}")
        self.batch_sizes = bs
        self.offs_np = np.concatenate([np.zeros(1, np.int64), np.cumsum(bs)])
        with torch.inference_mode(False):              # a cached tensor must serve autograd later too
            self.offs = torch.from_numpy(self.offs_np)
            self.sizes = torch.from_numpy(bs)          # batch_sizes as torch's packed ops take them
        self.offs_list = self.offs_np.tolist()
        self.T, self.B, self.N = len(bs), int(bs[0]) if len(bs) else 0, int(self.offs_np[-1])
        self.padded = bool((bs == self.B).all())
        self._index = {}

    def lengths(self) -> np.ndarray:
        """(B,) steps of each (sorted) sequence."""
        return (self.batch_sizes[None, :] > np.arange(self.B)[:, None]).sum(1)

    def index(self, name: str, make, device) -> torch.Tensor:
        """The int64 index `name` of this layout on `device` (built by make() -> numpy, once)."""
        key = (name, device)
        idx = self._index.get(key)
        if idx is None:
            with torch.inference_mode(False):
                idx = self._index[key] = torch.from_numpy(make()).to(device)
        return idx

    def last(self, device) -> torch.Tensor:
        """(B,) the row of each sequence's final step."""
        return self.index("last", lambda: self.offs_np[self.lengths() - 1] + np.arange(self.B), device)

    def reverse(self, device) -> torch.Tensor:
        """(N,) the row holding step L_b - 1 - t of sequence b, for every row (t, b): each
        sequence reversed in time within its own length (its own inverse)."""
        if self.padded and torch.compiler.is_compiling():    # traced: the index as graph ops, no numpy
            return torch.arange(self.N, device=device).view(self.T, self.B).flip(0).reshape(-1)
        def make():
            L = self.lengths()
            rev = np.empty(self.N, np.int64)
            for t in range(self.T):
                b = np.arange(self.batch_sizes[t])
                rev[self.offs_np[t] + b] = self.offs_np[L[b] - 1 - t] + b
            return rev
        return self.index("reverse", make, device)

    def final(self, seq: torch.Tensor, s0: torch.Tensor, alias: bool = False) -> torch.Tensor:
        """(B, H): each sequence's row of its last step in seq (N, H), a copy (a view of seq where
        alias and the layout is padded); s0's copy if N = 0."""
        if self.N == 0:
            return s0.clone()
        if self.padded:
            if alias:
                return seq if self.T == 1 else seq[self.N - self.B:]
            return seq[self.N - self.B:].clone()
        return seq.index_select(0, self.last(seq.device))

    def grad_w_hh(self, dg: torch.Tensor, h0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """dW_hh = sum_t dG_t^T h_{t-1} (G H, H) from dg (N, G H), h0 (B, H), y (N, H).  Padded:
        dG_0^T h0 + dG_{1:}^T y_{:-1} as two GEMMs, without forming h_prev (an (N, H) copy)."""
        if self.padded:
            return torch.addmm(dg[:self.B].t() @ h0, dg[self.B:].t(), y[:self.N - self.B])
        return dg.t() @ self.h_prev(h0, y)

    def h_prev(self, h0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, H): h_{t-1} of every row, from h0 (B, H) and the outputs y (N, H)."""
        if self.padded:
            return torch.cat([h0, y[:self.N - self.B]])
        prev = self.index("prev", lambda: np.concatenate(
            [np.arange(self.B)] + [self.B + self.offs_np[t - 1] + np.arange(self.batch_sizes[t])
                                   for t in range(1, self.T)]), y.device)
        return torch.cat([h0, y]).index_select(0, prev)


_PADDED: dict = {}
_PACKED: "OrderedDict[bytes, Rows]" = OrderedDict()
_PACKED_SIZE = 256                  # packed layouts remembered (a training run sees many)


@torch.compiler.assume_constant_result      # under torch.compile: built while tracing, a constant of the graph
def padded(T: int, B: int) -> Rows:
    """The layout of a padded (T, B) batch (cached)."""
    rows = _PADDED.get((T, B))
    if rows is None:
        if len(_PADDED) > 4096:
            _PADDED.clear()
        rows = _PADDED[(T, B)] = Rows([B] * T)
    return rows


def packed(batch_sizes) -> Rows:
    """The layout of a PackedSequence's batch_sizes (a CPU tensor or a sequence of ints; cached)."""
    bs = (batch_sizes.numpy() if isinstance(batch_sizes, torch.Tensor) else np.asarray(batch_sizes)).astype(np.int64)
    if bs.size and (bs == bs[0]).all() and bs[0] >= 0:
        return padded(int(bs.size), int(bs[0]))
    key = bs.tobytes()
    rows = _PACKED.get(key)
    if rows is None:
        rows = _PACKED[key] = Rows(bs)
        if len(_PACKED) > _PACKED_SIZE:
            _PACKED.popitem(last=False)
    else:
        _PACKED.move_to_end(key)
    return rows


def of(offs: torch.Tensor, B: int, N: int) -> Rows:
    """The Rows whose offsets are offs ((T + 1,) CPU int64), for B sequences and N rows, by value:
    N = T B only for the padded layout (batch sizes are at most B)."""
    T = offs.shape[0] - 1
    if N == T * B:
        return padded(T, B)
    o = offs.numpy()
    return packed(o[1:] - o[:-1])
