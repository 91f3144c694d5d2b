"""Decoder caches (DESIGN.md §8): what a decoder keeps between steps, preallocated, reordered in
place for beam search.

KVCache: the keys and values of every attention layer, (L, 2, B, NH, S_max, D) allocated once.
A step writes its T new keys and values at [length, length + T) and attention reads the slice
[0, length + T) in place (fastseq's CPU attention reads a row-strided view without copying).

RecurrentCache: the recurrent layers' state, (h, c) or h, each (layers, B, H).

Both count the positions they hold (`length`) and reorder their batch rows in place
(`reorder(index)`: row i becomes old row index[i]), which beam search calls after each step.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor


def _check_index(name: str, index: Tensor, B: int) -> None:
    if not isinstance(index, Tensor) or index.shape != (B,) or index.dtype != torch.int64:
        raise ValueError(f"{name}.reorder: expected an int64 index of shape ({B},), got "
                         f"{getattr(index, 'dtype', type(index).__name__)} of shape {list(getattr(index, 'shape', []))}")


class KVCache:
    """Keys and values of `layers` attention layers for `batch_size` rows and up to `max_length`
    positions, preallocated: kv (L, 2, B, NH, S_max, D)."""

    def __init__(self, layers: int, batch_size: int, heads: int, head_dim: int, max_length: int,
                 dtype=torch.float32, device=None):
        self.kv = torch.empty(layers, 2, batch_size, heads, max_length, head_dim, dtype=dtype, device=device)
        self.length = 0
        self.max_length = max_length

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    def check_room(self, T: int) -> None:
        if self.length + T > self.max_length:
            raise ValueError(f"KVCache: {self.length} positions held + {T} new exceed max_length {self.max_length}")

    def write(self, layer: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Store k, v (B, NH, T, D) at positions [length, length + T) of `layer`; returns the
        cache's keys and values for [0, length + T), views (B, NH, length + T, D)."""
        n, T = self.length, k.shape[2]
        kv = self.kv[layer]
        kv[0, :, :, n:n + T] = k
        kv[1, :, :, n:n + T] = v
        return kv[0, :, :, :n + T], kv[1, :, :, :n + T]

    def advance(self, T: int) -> None:
        """The T positions every layer has written are now held."""
        self.length += T

    def reorder(self, index: Tensor) -> None:
        _check_index("KVCache", index, self.batch_size)
        held = self.kv[:, :, :, :, :self.length]
        held.copy_(held.index_select(2, index.to(self.kv.device)))


class RecurrentCache:
    """The state of a stack of recurrent layers: (h, c) for LSTMs, h for GRUs, each (layers, B, H);
    None before the first step (the layers start from zeros)."""

    def __init__(self, batch_size: int, max_length: Optional[int] = None):
        self.state: Union[None, Tensor, Tuple[Tensor, Tensor]] = None
        self.length = 0
        self.max_length = max_length
        self._B = batch_size

    @property
    def batch_size(self) -> int:
        return self._B

    def check_room(self, T: int) -> None:
        if self.max_length is not None and self.length + T > self.max_length:
            raise ValueError(f"RecurrentCache: {self.length} positions held + {T} new exceed max_length "
                             f"{self.max_length}")

    def update(self, state, T: int) -> None:
        self.state = state
        self.length += T

    def reorder(self, index: Tensor) -> None:
        _check_index("RecurrentCache", index, self._B)
        if self.state is None:
            return
        if isinstance(self.state, tuple):
            self.state = tuple(s.index_select(1, index.to(s.device)) for s in self.state)
        else:
            self.state = self.state.index_select(1, index.to(self.state.device))
