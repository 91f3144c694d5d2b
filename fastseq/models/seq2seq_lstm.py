"""The attentional LSTM encoder-decoder of Luong et al. 2015 ("Effective Approaches to
Attention-based Neural Machine Translation"), in the shape of fairseq's `lstm` model.

Encoder: a bidirectional stack of LSTM layers (H/2 units a direction) over the packed source, so
pads cost nothing and never reach the states; its outputs are (B, S, H), both directions
concatenated.  Decoder: a stack of LSTM cells (H units) run one target step at a time, layer l
starting from encoder layer l's final states, the two directions concatenated (fairseq's
combine_bidir: no projection, hence the H/2 encoder).  At step t, with y_t the target embedding:
    x_t  = [y_t; a_{t-1}]                                 input feeding (a_0 = 0), (B, 2E)
    h_t  = cells(x_t, states)                             the top layer's hidden state, (B, H)
    s    = (W_a h_t) . enc_s,  source pads -inf           dot-product ("general") attention
    c_t  = sum_s softmax(s)_s enc_s                       context, (B, H)
    a_t  = dropout(tanh(W_c [c_t; h_t]))                  the attentional output, (B, E)
    logits_t = W_out a_t                                  W_out the target embedding if tied
The step loop reads what does not depend on t from the encoder once: the keys W_a^T enc_s
(so s = h_t . key_s) and the context's share of W_c applied to every enc_s (so W_c [c_t; h_t] =
softmax(s) (enc W_cc^T) + W_ch h_t); the output layer then runs on all steps at once, fused into
the loss.  Dropout (one probability) on the embeddings, between the encoder's layers, on its
outputs, between the decoder's layers and on a_t.  All parameters start as U(-0.1, 0.1)
(Luong et al.), the pad embedding row 0.

Generation (seq2seq.py's protocol): the cache holds the cells' (h, c) per layer and the input feed
a_{t-1} of the N decoder rows (LSTMDecoderCache) and the encoder's attention keys and values per
source (EncoderMemory, computed once by encode); a source's g rows attend to them together, one
(g, H) x (H, S) product per source.
"""
from dataclasses import dataclass
from typing import List, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..functional import dropout
from ..generation.cache import EncoderDecoderCache, _check_index
from ..nn import LSTM, LSTMCell
from .seq2seq import Seq2Seq, check_common, check_positive, padding_mask, rows_per_source


@dataclass
class LSTMSeq2SeqConfig:
    vocab_size: int                         # V, source and target (joined dictionary)
    dim: int = 256                          # E: embeddings and the attentional output
    hidden: int = 512                       # H: decoder cells and encoder outputs (H/2 a direction)
    layers: int = 1                         # encoder and decoder layers (decoder layer l starts at encoder layer l)
    dropout: float = 0.1
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    share_embeddings: bool = False          # one embedding for source and target
    tie_weights: bool = False               # output layer = target embedding

    def __post_init__(self):
        check_positive(self, "dim", "hidden", "layers")
        check_common(self)
        if self.hidden % 2:
            raise ValueError(f"LSTMSeq2SeqConfig: hidden must be even (H/2 units per encoder direction), got "
                             f"{self.hidden}")


class EncoderMemory(NamedTuple):
    """What the decoder reads of the source, computed once per batch."""
    keys_t: Tensor                          # (B, H, S): W_a^T enc_s, so that s = h_t . key_s
    values: Tensor                          # (B, S, E): W_cc enc_s, the context's share of W_c
    bias: Tensor                            # (B, 1, S): 0, or -inf at source pads
    w_ch: Tensor                            # (E, H): the hidden state's share of W_c
    h: List[Tensor]                         # per layer (B, H): the encoder's final states, both directions
    c: List[Tensor]


class LSTMDecoderCache:
    """The decoder's state between steps for N rows: hs, cs (per layer (N, H)) the cells' states,
    feed (N, E) the last attentional output a_{t-1}; length, the target positions run."""

    def __init__(self, hs: List[Tensor], cs: List[Tensor], feed: Tensor, max_length: int):
        self.hs, self.cs, self.feed = hs, cs, feed
        self.length, self.max_length = 0, max_length

    @property
    def batch_size(self) -> int:
        return self.feed.shape[0]

    def check_room(self, T: int) -> None:
        if self.length + T > self.max_length:
            raise ValueError(f"LSTMDecoderCache: {self.length} positions held + {T} new exceed max_length "
                             f"{self.max_length}")

    def reorder(self, index: Tensor) -> None:
        _check_index("LSTMDecoderCache", index, self.batch_size)
        self.hs = [h.index_select(0, index) for h in self.hs]
        self.cs = [c.index_select(0, index) for c in self.cs]
        self.feed = self.feed.index_select(0, index)


class LSTMSeq2Seq(Seq2Seq):
    """state_dict: encoder_embed.weight, decoder_embed.weight (the same tensor when shared),
    encoder.* (torch.nn.LSTM's keys, *_reverse included), decoder_cells.i.* (torch.nn.LSTMCell's),
    attention_proj.weight (W_a, (H, H)), attention_out.weight (W_c, (E, 2H): context columns
    first), output_proj.weight (untied only)."""

    def __init__(self, config: LSTMSeq2SeqConfig):
        super().__init__()
        c = self.config = config
        E, H, V = c.dim, c.hidden, c.vocab_size
        self.encoder_embed = nn.Embedding(V, E, padding_idx=c.pad_id)
        self.decoder_embed = self.encoder_embed if c.share_embeddings else nn.Embedding(V, E, padding_idx=c.pad_id)
        self.encoder = LSTM(E, H // 2, c.layers, batch_first=True, dropout=c.dropout if c.layers > 1 else 0.0,
                            bidirectional=True)
        self.decoder_cells = nn.ModuleList(LSTMCell(2 * E if i == 0 else H, H) for i in range(c.layers))
        self.attention_proj = nn.Linear(H, H, bias=False)
        self.attention_out = nn.Linear(2 * H, E, bias=False)
        self.output_proj = None if c.tie_weights else nn.Linear(E, V, bias=False)
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)
        with torch.no_grad():
            self.encoder_embed.weight[c.pad_id].zero_()
            self.decoder_embed.weight[c.pad_id].zero_()

    @property
    def output_weight(self) -> Tensor:
        return self.decoder_embed.weight if self.output_proj is None else self.output_proj.weight   # (V, E)

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderMemory:
        c = self.config
        p = c.dropout if self.training else 0.0
        B, S = src.shape
        x = dropout(self.encoder_embed(src), p)                                          # (B, S, E)
        packed = pack_padded_sequence(x, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, (h_n, c_n) = self.encoder(packed)
        enc = dropout(pad_packed_sequence(out, batch_first=True, total_length=S)[0], p)  # (B, S, H)
        H = c.hidden
        keys_t = torch.matmul(enc, self.attention_proj.weight).transpose(1, 2)          # (B, H, S)
        W_c = self.attention_out.weight                                                  # (E, 2H)
        values = torch.matmul(enc, W_c[:, :H].t())                                      # (B, S, E)
        bias = torch.zeros(B, 1, S, dtype=enc.dtype, device=enc.device)
        bias.masked_fill_(padding_mask(src_lengths, S).view(B, 1, S), float("-inf"))   # (B, 1, S)
        L = c.layers

        def both_directions(s):                       # (2 L, B, H/2) -> L states (B, H), [forward; backward]
            return list(s.view(L, 2, B, H // 2).transpose(1, 2).reshape(L, B, H).unbind(0))
        return EncoderMemory(keys_t, values, bias, W_c[:, H:], both_directions(h_n), both_directions(c_n))

    def decoder_step(self, x: Tensor, feed: Tensor, hs: list, cs: list, memory: EncoderMemory) -> Tensor:
        """One decoder step: embedding x (N, E) and the last attentional output feed (N, E) ->
        this step's attentional output a_t (N, E); the cells' states hs / cs are updated in place.
        memory holds B = N / g sources, row i reading source i // g: a source's g rows attend
        together, (g, H) x (H, S) (g = 1: one row a source)."""
        p = self.config.dropout if self.training else 0.0
        x = torch.cat((x, feed), 1)                                       # (N, 2E)
        last = len(self.decoder_cells) - 1
        for i, cell in enumerate(self.decoder_cells):
            hs[i], cs[i] = cell(x, (hs[i], cs[i]))
            x = dropout(hs[i], p) if i < last and p else hs[i]            # (N, H)
        N, H = x.shape
        B = memory.keys_t.shape[0]
        alpha = torch.softmax(torch.baddbmm(memory.bias, x.view(B, N // B, H), memory.keys_t), -1)   # (B, g, S)
        context = torch.bmm(alpha, memory.values).view(N, -1)                                         # (N, E)
        a = torch.addmm(context, x, memory.w_ch.t()).tanh_()              # (N, E)
        return dropout(a, p) if p else a

    def decode(self, tgt_in: Tensor, memory: EncoderMemory) -> Tensor:
        """The attentional outputs (B, T, E) of every step, teacher-forced by tgt_in (B, T)."""
        p = self.config.dropout if self.training else 0.0
        y = dropout(self.decoder_embed(tgt_in), p)                        # (B, T, E)
        hs, cs = list(memory.h), list(memory.c)
        a = y.new_zeros(y.shape[0], y.shape[2])                           # (B, E): a_0
        outs = []
        for t in range(y.shape[1]):
            a = self.decoder_step(y[:, t], a, hs, cs, memory)
            outs.append(a)
        return torch.stack(outs, 1)                                       # (B, T, E)

    def start(self, memory: EncoderMemory):
        feed = memory.values.new_zeros(memory.values.shape[0], self.config.dim)    # (B, E): a_0
        return memory, list(memory.h), list(memory.c), feed

    def step(self, tokens: Tensor, t: int, state):
        memory, hs, cs, feed = state
        a = self.decoder_step(self.decoder_embed(tokens[:, t]), feed, hs, cs, memory)   # (B, E)
        return a, (memory, hs, cs, a)

    # ------------------------------------------------------------------ generation (cached)

    def new_cache(self, batch_size: int, max_length: int, memory: EncoderMemory) -> EncoderDecoderCache:
        """The decoder's cache for batch_size rows, g = batch_size / B adjacent rows per source.

        Args:
            batch_size: N, a multiple of the B sources in memory.
            max_length: the most target positions the rows will run (>= 1).
            memory: encode_for_generation's (or encode's) output.
        Returns:
            an EncoderDecoderCache: decoder = an LSTMDecoderCache, every row starting from its
            source's encoder states and a_0 = 0; memory = the EncoderMemory itself, per source.
        Shapes:
            hs, cs: per layer (N, H); feed (N, E); memory: keys (B, H, S), values (B, S, E).
        """
        name = type(self).__name__
        B = memory.keys_t.shape[0]
        g = rows_per_source(name, batch_size, B)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"{name}.new_cache: max_length must be a positive int, got {max_length!r}")
        feed = memory.values.new_zeros(batch_size, self.config.dim)                    # (N, E): a_0
        state = LSTMDecoderCache([h.repeat_interleave(g, 0) for h in memory.h],
                                 [c.repeat_interleave(g, 0) for c in memory.c], feed, max_length)
        return EncoderDecoderCache(state, memory, B, g, feed.device)

    def decode_step(self, tgt_in: Tensor, cache: EncoderDecoderCache) -> Tensor:
        """The attentional outputs (N, T, E) of the T steps tgt_in (N, T) after the cache's; the
        cache's states move on past them."""
        state, memory = cache.decoder, cache.memory
        if not isinstance(state, LSTMDecoderCache) or not isinstance(memory, EncoderMemory):
            raise ValueError(f"{type(self).__name__}: the cache is not an LSTMSeq2Seq.new_cache one (it holds "
                             f"{type(state).__name__}, {type(memory).__name__})")
        if not cache.grouped:                                             # rows left their sources' order
            memory = memory._replace(keys_t=cache.rows(memory.keys_t), values=cache.rows(memory.values),
                                     bias=cache.rows(memory.bias))
        p = self.config.dropout if self.training else 0.0
        y = dropout(self.decoder_embed(tgt_in), p)                        # (N, T, E)
        a, outs = state.feed, []
        for t in range(y.shape[1]):
            a = self.decoder_step(y[:, t], a, state.hs, state.cs, memory)   # (N, E)
            outs.append(a)
        state.feed = a
        state.length += y.shape[1]
        return torch.stack(outs, 1)                                       # (N, T, E)
