"""Decoder caches (DESIGN.md §8): what a decoder keeps between steps, preallocated, reordered in
place for beam search.

KVCache: the keys and values of every attention layer, (L, 2, B, NH, S_max, D) allocated once.
A step writes its T new keys and values at [length, length + T) and attention reads the slice
[0, length + T) in place (fastseq's CPU attention reads a row-strided view without copying);
after a beam-search reorder, through a table of cache rows (see KVCache).

RecurrentCache: the recurrent layers' state, (h, c) or h, each (layers, B, H).

EncoderDecoderCache: a seq2seq decoder's state -- its own cache (a KVCache for self-attention,
or its recurrent state) for the N decoder rows, plus what it reads of the B sources, computed once
per source (the cross-attention keys and values of every layer, or the encoder's outputs), and
the map row -> source.  The per-source tensors are never copied per row: a source's g rows (its
beams, or its samples) read the same keys, and reorder moves the map, not the keys.

All of them count the positions they hold (`length`) and reorder their batch rows
(`reorder(index)`: row i becomes old row index[i]), which beam search calls after each step;
an index shorter than the batch drops the rows it does not name (greedy search and sampling
call it when rows finish, so that finished rows leave the work).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor


def _check_index(name: str, index: Tensor, B: int) -> None:
    """reorder's index: int64 (b,), 1 <= b <= B (b < B: the rows not named leave the batch)."""
    if not isinstance(index, Tensor) or index.dim() != 1 or not 1 <= index.shape[0] <= B \
            or index.dtype != torch.int64:
        raise ValueError(f"{name}.reorder: expected an int64 index of shape (b,), 1 <= b <= {B}, got "
                         f"{getattr(index, 'dtype', type(index).__name__)} of shape {list(getattr(index, 'shape', []))}")


class KVCache:
    """Keys and values of `layers` attention layers for `batch_size` rows and up to `max_length`
    positions, preallocated: kv (L, 2, B, NH, S_max, D).

    Beam search reorders rows after every step.  Copying the held positions of every layer for
    that is O(length) a step, O(length^2) a search, and at batch 32 x 4 beams it was 44 % of a
    translation's time; instead the cache keeps origin (B, S_max): the cache row holding
    position j of row i.  reorder gathers this table of ints, never the keys; row i writes its
    new positions into cache row i (a position not yet written is referenced by no row, so any
    row's slot is free for it).  Attention reads through the table: attend_step (fastseq's CPU
    kernel) and GPT's fused step in place; `write` gathers the keys it returns (the module path,
    other devices).  Rows that leave without a reorder (an increasing index shorter than the
    batch, as greedy search and sampling drop finished rows) are moved down once instead, so
    every path keeps reading in place; the rows left are 0 .. b-1 of the storage."""

    def __init__(self, layers: int, batch_size: int, heads: int, head_dim: int, max_length: int,
                 dtype=torch.float32, device=None):
        self.kv = torch.empty(layers, 2, batch_size, heads, max_length, head_dim, dtype=dtype, device=device)
        self.length = 0
        self.max_length = max_length
        self.origin: Optional[Tensor] = None          # (b, S_max) int64; None: row i's positions in row i
        self._rows = batch_size

    @property
    def batch_size(self) -> int:
        return self._rows

    def check_room(self, T: int) -> None:
        if self.length + T > self.max_length:
            raise ValueError(f"KVCache: {self.length} positions held + {T} new exceed max_length {self.max_length}")

    def _store(self, layer: int, k: Tensor, v: Tensor) -> None:
        n, T, b = self.length, k.shape[2], self._rows
        kv = self.kv[layer]
        kv[0, :b, :, n:n + T] = k
        kv[1, :b, :, n:n + T] = v

    def write(self, layer: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Store k, v (B, NH, T, D) at positions [length, length + T) of `layer`; returns the
        cache's keys and values for [0, length + T), (B, NH, length + T, D): views read in place,
        or, after a reorder, gathered through origin."""
        self._store(layer, k, v)
        n, T, b = self.length, k.shape[2], self._rows
        kv = self.kv[layer]
        if self.origin is None:
            return kv[0, :b, :, :n + T], kv[1, :b, :, :n + T]
        rows = self.origin[:, :n + T]                                         # (b, S)
        pos = torch.arange(n + T, device=rows.device).expand(b, n + T)
        return kv[0][rows, :, pos].transpose(1, 2), kv[1][rows, :, pos].transpose(1, 2)   # (b, NH, S, D)

    def can_attend_step(self, q: Tensor, training: bool) -> bool:
        """Whether attend_step runs this step: one query, CPU fp32 / fp64 matching the cache, no
        gradient or dropout wanted, fastseq's CPU kernels available and not overridden by
        use_backend."""
        return q.shape[2] == 1 and not training and decode_kernels_run(q, self.kv)

    def attend_step(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One decode step's attention on fastseq's CPU kernel (with torch's thread count): the
        new position's keys and values are stored, then every held position is read in place,
        through origin after a reorder.  The caller checks can_attend_step first.

        Args:
            layer: the attention layer.
            q, k, v: the new position's query, key and value.
        Returns:
            the attention output.
        Shapes:
            q, k, v (B, NH, 1, D); output (B, NH, 1, D).
        """
        from .. import _blas, _dispatch
        num_threads = _dispatch.num_threads()
        self._store(layer, k, v)
        q = q.contiguous()
        b, NH, _, D = q.shape
        nk = self.length + 1
        o = torch.empty_like(q)
        work = q.new_empty(max(1, num_threads) * nk)
        _blas.cpu_kernels("decode").attend_cache(
            q.data_ptr(), self.kv[layer].data_ptr(), 0 if self.origin is None else self.origin.data_ptr(),
            o.data_ptr(), work.data_ptr(), b, self.kv.shape[2], NH, D, self.max_length, nk, num_threads,
            q.dtype == torch.float64)
        return o

    def advance(self, T: int) -> None:
        """The T positions every layer has written are now held."""
        self.length += T

    def reorder(self, index: Tensor) -> None:
        """Row i becomes old row index[i] (the origin table is gathered, not the keys); with fewer
        indices than rows the batch shrinks to them."""
        _check_index("KVCache", index, self._rows)
        index = index.to(self.kv.device)
        if self.origin is None and index.shape[0] < self._rows and bool((index[1:] > index[:-1]).all()):
            b, n = index.shape[0], self.length               # rows left, none reordered: move the kept
            held = self.kv[:, :, :, :, :n]                   # rows down once, and the keys stay in
            held[:, :, :b] = held.index_select(2, index)     # place for every path (no table to read)
            self._rows = b
            return
        if self.origin is None:
            self.origin = torch.arange(self._rows, device=self.kv.device).view(-1, 1).repeat(1, self.max_length)
        self.origin = self.origin.index_select(0, index)
        # the positions not written yet: row i will write them into cache row i (set here once,
        # not by every layer's write)
        self.origin[:, self.length:] = torch.arange(index.shape[0], device=self.kv.device).view(-1, 1)
        self._rows = index.shape[0]


def decode_kernels_run(q: Tensor, *tensors: Tensor) -> bool:
    """Whether the decode family's CPU kernels take a step reading q and tensors: all on the CPU
    in one dtype, fp32 or fp64, no gradient wanted, not under torch.compile / torch.func, the
    kernels built and not overridden by use_backend."""
    from .. import _dispatch, _library
    if _library.transformed() or torch.compiler.is_compiling():
        return False
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) \
        and all(t.device.type == "cpu" and t.dtype == q.dtype for t in tensors) \
        and not (torch.is_grad_enabled() and q.requires_grad) \
        and _dispatch.forced_backend() in (None, "cpu") and _dispatch.backend_missing("cpu") is None


def attend_sources(q: Tensor, kv: Tensor, source_of: Tensor, key_lengths: Optional[Tensor]) -> Tensor:
    """A seq2seq decoder's cross-attention for one query a row on fastseq's CPU kernel: row i
    attends over the keys and values of source source_of[i] (its first key_lengths[source]
    positions), read in place -- no per-row copy of a source after beam search moves rows
    (the caller checks decode_kernels_run first).

    Args:
        q: one query per row and head.
        kv: the sources' keys and values of one layer.
        source_of: the source each row reads.
        key_lengths: each source's length, or None (all S positions).
    Returns:
        the attention output.
    Shapes:
        q (N, NH, 1, D); kv (2, B, NH, S, D), contiguous; source_of (N,); key_lengths (B,) or None;
        -> (N, NH, 1, D).
    """
    from .. import _blas, _dispatch
    nt = _dispatch.num_threads()
    q = q.contiguous()
    N, NH, _, D = q.shape
    _, B, _, S, _ = kv.shape
    src = source_of.to(torch.int64).contiguous()
    lengths = None if key_lengths is None else key_lengths.to(torch.int64).contiguous()
    o = torch.empty_like(q)
    work = q.new_empty(max(1, nt) * S)
    _blas.cpu_kernels("decode").attend_sources(q.data_ptr(), kv.contiguous().data_ptr(), src.data_ptr(),
                                               0 if lengths is None else lengths.data_ptr(), o.data_ptr(),
                                               work.data_ptr(), N, B, NH, D, S, nt, q.dtype == torch.float64)
    return o


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
        self._B = index.shape[0]
        if self.state is None:
            return
        if isinstance(self.state, tuple):
            self.state = tuple(s.index_select(1, index.to(s.device)) for s in self.state)
        else:
            self.state = self.state.index_select(1, index.to(self.state.device))


class EncoderDecoderCache:
    """A seq2seq decoder's state for N = sources * rows_per_source decoder rows.

    decoder: the decoder's own cache over the N rows (it has length, max_length, check_room(T),
        reorder(index)): a KVCache for self-attention, or a recurrent state.
    memory: what the decoder reads of the sources, per source (batch dim `sources`), computed once
        (a model's cross-attention keys / values, its encoder outputs); never reordered.
    source_of (N,) int64: the source row i reads.  It starts as i // rows_per_source (the g rows
        of a source adjacent, as generate lays out beams and samples) and follows reorder.
    grouped: source_of is still i // rows_per_source (beam search keeps it so: a beam's parent is
        a beam of the same source), so attention can run a source's g rows as g queries of one
        attention over that source's keys; otherwise `rows(t)` gathers per-row copies.
    """

    def __init__(self, decoder, memory, sources: int, rows_per_source: int, device=None):
        if sources < 1 or rows_per_source < 1:
            raise ValueError(f"EncoderDecoderCache: sources and rows_per_source must be >= 1, got {sources} and "
                             f"{rows_per_source}")
        if decoder.batch_size != sources * rows_per_source:
            raise ValueError(f"EncoderDecoderCache: the decoder cache holds {decoder.batch_size} rows, expected "
                             f"sources * rows_per_source = {sources} * {rows_per_source}")
        self.decoder, self.memory = decoder, memory
        self.sources, self.rows_per_source = sources, rows_per_source
        self._home = torch.arange(sources * rows_per_source, device=device) // rows_per_source   # (N,)
        self.source_of = self._home
        self.grouped = True

    @property
    def batch_size(self) -> int:
        return self.source_of.shape[0]

    @property
    def length(self) -> int:
        return self.decoder.length

    @property
    def max_length(self) -> int:
        return self.decoder.max_length

    def check_room(self, T: int) -> None:
        self.decoder.check_room(T)

    def rows(self, t: Tensor) -> Tensor:
        """A per-source tensor t (sources, ...) -> its per-row copy (N, ...)."""
        return t.index_select(0, self.source_of)

    def reorder(self, index: Tensor) -> None:
        _check_index("EncoderDecoderCache", index, self.batch_size)
        index = index.to(self.source_of.device)
        self.decoder.reorder(index)
        self.source_of = self.source_of.index_select(0, index)
        self.grouped = self.source_of.shape == self._home.shape and torch.equal(self.source_of, self._home)
