"""Sequence-to-sequence models: an encoder reads the source, a decoder writes the target one token
at a time, attending to the encoder's outputs.

Two architectures, one file each, behind this module's names:
- TransformerSeq2Seq (seq2seq_transformer.py): the Transformer of Vaswani et al. 2017, "Attention
  Is All You Need", in fairseq's `transformer` recipe -- sinusoidal positions, embeddings scaled
  by sqrt(E), post- or pre-norm layers, optional shared and tied embeddings.
- LSTMSeq2Seq (seq2seq_lstm.py): the attentional LSTM encoder-decoder of Luong et al. 2015,
  "Effective Approaches to Attention-based Neural Machine Translation", in fairseq's `lstm`
  recipe -- a bidirectional encoder, a stacked decoder with input feeding and dot-product
  attention.

Both read one vocabulary for source and target (fairseq's joined dictionary): `vocab_size`, with
`pad_id`, `bos_id` and `eos_id` in it.  The batch of `loss` (and of `example_batch`):
    src          (B, S) int64   source tokens, right-padded with pad_id
    src_lengths  (B,)   int64   tokens of each source, 1 <= length <= S
    tgt_in       (B, T) int64   bos_id + target, pad_id after its end (the decoder's input)
    tgt_out      (B, T) int64   target + eos_id, -100 after its end (what the decoder predicts)
`forward(src, src_lengths, tgt_in)` returns the logits (B, T, V); `greedy_decode(src,
src_lengths, max_len)` the argmax continuation of bos_id, (B, L <= max_len), each row ending at its
first eos_id with pad_id after it (a row that meets no eos_id runs to max_len); it reruns the whole
decoder at every step, the plain reference that fastseq.generate is tested against.

Generation (fastseq.generate's encoder-decoder protocol, Hugging Face's convention):
    memory = model.encode_for_generation(input_ids, attention_mask)   once per source
    cache = model.new_cache(N, max_length, memory)                    N = B * g decoder rows
    logits, cache = model(tgt_in=tokens, cache=cache)                 the decoder only
    cache.reorder(index)                                              beam search
The cache (fastseq.generation.cache.EncoderDecoderCache) holds the decoder's state for the N rows
-- the Transformer's self-attention KVCache, the LSTM's (h, c) per layer and input feed -- and what
the decoder reads of the B sources, computed once in new_cache: the Transformer's cross-attention
keys and values of every layer, the LSTM's attention keys and values.  A source's g rows (its
beams or samples) read that one copy; each step they attend to it together, as g queries of one
attention.

This file holds what the two share: the checks of the common config fields, the Seq2Seq base
class (forward, loss with the output layer fused into the cross-entropy, the greedy loop) and
example_batch.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import linear_cross_entropy
from ..generation.cache import EncoderDecoderCache
from ..generation.linear import linear
from .packing import Rows

__all__ = ["TransformerSeq2SeqConfig", "TransformerSeq2Seq", "LSTMSeq2SeqConfig", "LSTMSeq2Seq", "Seq2Seq",
           "example_batch"]


# ---------------------------------------------------------------------------- config checks

def check_positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(config).__name__}: {name} must be a positive int, got {value!r}")


def check_common(config):
    """vocab_size, the special ids and dropout: the fields every seq2seq config has."""
    name = type(config).__name__
    check_positive(config, "vocab_size")
    for field in ("pad_id", "bos_id", "eos_id"):
        value = getattr(config, field)
        if not isinstance(value, int) or not 0 <= value < config.vocab_size:
            raise ValueError(f"{name}: {field} must be a token id in [0, vocab_size={config.vocab_size}), "
                             f"got {value!r}")
    if config.pad_id in (config.bos_id, config.eos_id):
        raise ValueError(f"{name}: pad_id must differ from bos_id and eos_id, got pad_id={config.pad_id}, "
                         f"bos_id={config.bos_id}, eos_id={config.eos_id}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {config.dropout!r}")


# ---------------------------------------------------------------------------- the shared model

class Seq2Seq(nn.Module):
    """forward, loss, greedy_decode and generation over a subclass's parts:
        encode(src, src_lengths) -> memory       whatever the decoder reads of the source
        decode(tgt_in, memory) -> (B, T, E)      the decoder's outputs, before the output layer
        start(memory) -> state                   greedy decoding's state before the first step
        step(tokens, t, state) -> (B, E), state  the decoder's output at position t of tokens
        new_cache(N, max_length, memory)         an EncoderDecoderCache for N decoder rows
        decode_step(tgt_in, cache) -> (N, T, E)  the decoder's outputs at T new positions, cached
        output_weight                            (V, E), the output layer (no bias)
        max_target                               the longest target (None: no limit)"""

    max_target: Optional[int] = None
    is_encoder_decoder = True                    # fastseq.generate encodes once, then runs the decoder

    def forward(self, src: Optional[Tensor] = None, src_lengths: Optional[Tensor] = None,
                tgt_in: Optional[Tensor] = None, *, cache: Optional[EncoderDecoderCache] = None):
        """The logits of the token after each of tgt_in's.

        Args:
            src, src_lengths: the sources, right-padded with pad_id, and their lengths; None with
                a cache (it holds the encoded sources).
            tgt_in: the decoder's input tokens: bos_id + the target (teacher forcing), or with a
                cache the T positions after the cached ones (the start token first, then one
                token a step).
            cache: None, or an EncoderDecoderCache of new_cache, appended to in place.
        Returns:
            logits, or (logits, cache) with a cache.
        Shapes:
            src (B, S); src_lengths (B,); tgt_in (B, T), with a cache (N, T), N = cache.batch_size;
            logits (B or N, T, V).
        """
        if cache is not None:
            self._check_step(src, src_lengths, tgt_in, cache)
            return linear(self.decode_step(tgt_in, cache), self.output_weight), cache     # (N, T, V)
        if tgt_in is None:
            raise ValueError(f"{type(self).__name__}: expected tgt_in (the decoder's input tokens) with the sources, "
                             "got None")
        self._check(src, src_lengths, tgt_in)
        h = self.decode(tgt_in, self.encode(src, src_lengths))            # (B, T, E)
        return F.linear(h, self.output_weight)                            # (B, T, V)

    def encode_for_generation(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None):
        """Encode the sources once, for new_cache (fastseq.generate's encoder-decoder protocol).

        Args:
            input_ids: the source tokens.
            attention_mask: None (every position a token), or Hugging Face's mask, 1 = token and
                0 = padding: each row's tokens one contiguous run -- right padding (the encoder's
                own layout), left padding, or both; a row's run is moved to its front (the rest
                filled with pad_id) and src_lengths are the row sums.
        Returns:
            memory: what the decoder reads of the sources (new_cache's argument).
        Shapes:
            input_ids, attention_mask: (B, S).
        """
        src, src_lengths = right_padded(input_ids, attention_mask, self.config.pad_id, type(self).__name__)
        self._check(src, src_lengths)
        return self.encode(src, src_lengths)

    def loss(self, batch: dict, label_smoothing: float = 0.0, smoothing: str = "torch") -> Tensor:
        """Mean cross-entropy per target token of tgt_out (label smoothing in torch's or fairseq's
        convention), the output layer fused into the loss: the (B T, V) logits are never formed."""
        src, src_lengths, tgt_in, tgt_out = batch["src"], batch["src_lengths"], batch["tgt_in"], batch["tgt_out"]
        self._check(src, src_lengths, tgt_in)
        if tgt_out.shape != tgt_in.shape:
            raise ValueError(f"{type(self).__name__}: expected tgt_out of tgt_in's shape {list(tgt_in.shape)}, "
                             f"got {list(tgt_out.shape)}")
        rows = Rows(target_lengths(tgt_out), *tgt_in.shape)              # the positions the loss reads
        h = self.decode_rows(tgt_in, self.encode(src, src_lengths), rows)  # (N, E)
        return linear_cross_entropy(h, self.output_weight, rows.pack(tgt_out),
                                    ignore_index=-100, label_smoothing=label_smoothing, smoothing=smoothing)

    def decode_rows(self, tgt_in: Tensor, memory, rows: Rows) -> Tensor:
        """The decoder's outputs at the real positions of rows only, (N, E) (a subclass that can
        skip the others overrides this)."""
        return rows.pack(self.decode(tgt_in, memory))

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, src_lengths: Tensor, max_len: int) -> Tensor:
        """The argmax continuation of bos_id, at most max_len tokens: (B, L) int64, each row ending
        at its first eos_id with pad_id after it; stops when every row has ended.  Runs in eval
        mode (no dropout) and restores the module's mode."""
        c = self.config
        if not isinstance(max_len, int) or max_len < 1 or (self.max_target is not None and max_len > self.max_target):
            raise ValueError(f"{type(self).__name__}: max_len must be an int in [1, {self.max_target or 'inf'}], "
                             f"got {max_len!r}")
        self._check(src, src_lengths)
        was_training = self.training
        self.eval()
        try:
            B = src.shape[0]
            tokens = src.new_full((B, max_len + 1), c.pad_id)             # (B, 1 + max_len): bos + output
            tokens[:, 0] = c.bos_id
            done = torch.zeros(B, dtype=torch.bool, device=src.device)
            state = self.start(self.encode(src, src_lengths))
            W = self.output_weight
            for t in range(max_len):
                h, state = self.step(tokens, t, state)                    # (B, E)
                nxt = torch.mm(h, W.t()).argmax(-1).masked_fill_(done, c.pad_id)   # (B,)
                tokens[:, t + 1] = nxt
                done |= nxt == c.eos_id
                if bool(done.all()):
                    break
            return tokens[:, 1:t + 2]
        finally:
            self.train(was_training)

    def _check_step(self, src, src_lengths, tgt_in, cache) -> None:
        """A cached decoder call's inputs (ValueError naming what was received)."""
        name = type(self).__name__
        if src is not None or src_lengths is not None:
            raise ValueError(f"{name}: with a cache the sources are encoded already (in the cache): pass "
                             f"tgt_in=<the new decoder tokens> and cache= only, got src={type(src).__name__}, "
                             f"src_lengths={type(src_lengths).__name__}")
        if not isinstance(cache, EncoderDecoderCache):
            raise ValueError(f"{name}: cache must be an EncoderDecoderCache of new_cache, got {type(cache).__name__}")
        N = cache.batch_size
        if not isinstance(tgt_in, Tensor) or tgt_in.dim() != 2 or tgt_in.shape[0] != N or \
                tgt_in.dtype != torch.int64 or tgt_in.shape[1] == 0:
            raise ValueError(f"{name}: expected tgt_in as a ({N}, T) int64 tensor, T >= 1 (the cache's rows), got "
                             f"{getattr(tgt_in, 'dtype', type(tgt_in).__name__)} of shape "
                             f"{list(getattr(tgt_in, 'shape', []))}")
        cache.check_room(tgt_in.shape[1])

    def _check(self, src: Tensor, src_lengths: Tensor, tgt_in: Optional[Tensor] = None) -> None:
        """The inputs' shapes and the source lengths, with the values received (ValueError)."""
        name = type(self).__name__
        if not isinstance(src, Tensor) or src.dim() != 2 or src.dtype != torch.int64 or 0 in src.shape:
            raise ValueError(f"{name}: expected src as a non-empty (B, S) int64 tensor, got "
                             f"{getattr(src, 'dtype', type(src).__name__)} of shape {list(getattr(src, 'shape', []))}")
        B, S = src.shape
        if not isinstance(src_lengths, Tensor) or src_lengths.shape != (B,) or src_lengths.is_floating_point():
            raise ValueError(f"{name}: expected src_lengths as a ({B},) integer tensor, got "
                             f"{getattr(src_lengths, 'dtype', type(src_lengths).__name__)} of shape "
                             f"{list(getattr(src_lengths, 'shape', []))}")
        lo, hi = torch.aminmax(src_lengths)
        if lo < 1 or hi > S:
            raise ValueError(f"{name}: src_lengths must lie in [1, S={S}], got values in [{int(lo)}, {int(hi)}]")
        limit = self.max_target
        if limit is not None and S > limit:
            raise ValueError(f"{name}: source length {S} exceeds max_positions={limit}")
        if tgt_in is not None:
            if not isinstance(tgt_in, Tensor) or tgt_in.dim() != 2 or tgt_in.shape[0] != B or \
                    tgt_in.dtype != torch.int64 or tgt_in.shape[1] == 0:
                raise ValueError(f"{name}: expected tgt_in as a ({B}, T) int64 tensor, T >= 1, got "
                                 f"{getattr(tgt_in, 'dtype', type(tgt_in).__name__)} of shape "
                                 f"{list(getattr(tgt_in, 'shape', []))}")
            if limit is not None and tgt_in.shape[1] > limit:
                raise ValueError(f"{name}: target length {tgt_in.shape[1]} exceeds max_positions={limit}")


def right_padded(input_ids: Tensor, attention_mask: Optional[Tensor], pad_id: int, name: str):
    """(src, src_lengths): the sources of input_ids (B, S) as the encoders take them, right-padded
    with pad_id, from Hugging Face's attention_mask (B, S) (1 = token, 0 = padding; None: all
    tokens), whose rows must each hold one contiguous run of tokens (right or left padding, or both)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"{name}: expected the sources as a non-empty (B, S) tensor, got shape "
                         f"{list(getattr(input_ids, 'shape', []))}")
    B, S = input_ids.shape
    if attention_mask is None:
        return input_ids, torch.full((B,), S, dtype=torch.int64, device=input_ids.device)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"{name}: attention_mask must have the sources' shape {list(input_ids.shape)}, got "
                         f"{list(getattr(attention_mask, 'shape', []))}")
    mask = attention_mask.to(input_ids.device)
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{name}: attention_mask must hold only 0 (padding) and 1 (token)")
    real = mask != 0                                                                     # (B, S)
    lengths = real.sum(1)                                                                # (B,)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name}: every source needs a token, but attention_mask rows {empty} are all 0")
    first = real.int().argmax(1)                                                         # (B,) first token
    pos = torch.arange(S, device=real.device).view(1, S)
    run = (pos >= first.view(B, 1)) & (pos < (first + lengths).view(B, 1))              # (B, S)
    holes = (run != real).any(1).nonzero().flatten().tolist()
    if holes:
        raise ValueError(f"{name}: a source's tokens must be one contiguous run (right or left padding), but "
                         f"attention_mask row {holes[0]} is {mask[holes[0]].tolist()}")
    if bool((first > 0).any()):                                   # move each run to the front of its row
        input_ids = input_ids.gather(1, (pos + first.view(B, 1)) % S)
    return input_ids.masked_fill(pos >= lengths.view(B, 1), pad_id), lengths


def rows_per_source(name: str, batch_size, sources: int) -> int:
    """g, for new_cache(batch_size = sources * g, ...): g adjacent decoder rows per source."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1 or batch_size % sources:
        raise ValueError(f"{name}.new_cache: batch_size must be a positive multiple of the {sources} encoded "
                         f"sources (the rows of a source adjacent), got {batch_size!r}")
    return batch_size // sources


def target_lengths(tgt_out: Tensor) -> Tensor:
    """(B,) per row, 1 + the last position with a target (-100: none), at least 1: a causal
    decoder need not compute the positions after it."""
    T = tgt_out.shape[1]
    pos = torch.arange(1, T + 1, device=tgt_out.device).expand_as(tgt_out)
    return torch.where(tgt_out != -100, pos, 0).amax(1).clamp_(min=1)                    # (B,)


def padding_mask(src_lengths: Tensor, S: int) -> Tensor:
    """(B, S) bool, True at the source's pad positions (right padding)."""
    return torch.arange(S, device=src_lengths.device).view(1, S) >= src_lengths.view(-1, 1)   # (B, S)


def sinusoids(n: int, E: int) -> Tensor:
    """Vaswani et al.'s positions, (n, E): PE[p, 2i] = sin(p / 10000^(2i/E)), PE[p, 2i+1] = cos(...);
    computed in fp64, returned in the default dtype."""
    p = torch.arange(n, dtype=torch.float64).view(n, 1)                             # (n, 1)
    inv = torch.exp(torch.arange(0, E, 2, dtype=torch.float64) * (-math.log(10000.0) / E))   # (E/2,)
    pe = torch.empty(n, E, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(p * inv)
    pe[:, 1::2] = torch.cos(p * inv)
    return pe.to(torch.get_default_dtype())


# ---------------------------------------------------------------------------- example batch

def example_batch(config, B: int, T: int, generator: Optional[torch.Generator] = None, device="cpu") -> dict:
    """A random batch of the documented form: sources of width T with random lengths in
    [max(1, T // 2), T]; targets of random lengths in [max(0, T // 2 - 1), T - 1] (+ bos / eos:
    width T), so every row holds 50-100 % of T.  Tokens are drawn from the ids that are not pad,
    bos or eos."""
    if B < 1 or T < 2:
        raise ValueError(f"example_batch: expected B >= 1 and T >= 2, got B={B}, T={T}")
    special = {config.pad_id, config.bos_id, config.eos_id}
    ids = torch.tensor([i for i in range(config.vocab_size) if i not in special], dtype=torch.int64)
    if len(ids) == 0:
        raise ValueError(f"example_batch: vocab_size={config.vocab_size} leaves no token besides the special ids")

    def draw(shape):
        return ids[torch.randint(len(ids), shape, generator=generator)]

    src_lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=generator)
    tgt_lengths = torch.randint(max(0, T // 2 - 1), T, (B,), generator=generator)
    pos = torch.arange(T).view(1, T)
    src = draw((B, T)).masked_fill_(pos >= src_lengths.view(-1, 1), config.pad_id)       # (B, S)
    target = draw((B, T))                                                                # (B, T)
    n = tgt_lengths.view(-1, 1)
    tgt_in = torch.cat([torch.full((B, 1), config.bos_id), target[:, :T - 1]], 1)        # (B, T)
    tgt_in.masked_fill_(pos > n, config.pad_id)
    tgt_out = target.masked_fill(pos == n, config.eos_id).masked_fill_(pos > n, -100)    # (B, T)
    batch = {"src": src, "src_lengths": src_lengths, "tgt_in": tgt_in, "tgt_out": tgt_out}
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------- the two models
# (imported on first use: their files import this one)

_EXPORTS = {"TransformerSeq2SeqConfig": "seq2seq_transformer", "TransformerSeq2Seq": "seq2seq_transformer",
            "LSTMSeq2SeqConfig": "seq2seq_lstm", "LSTMSeq2Seq": "seq2seq_lstm"}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f".{module}", __package__), name)


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
