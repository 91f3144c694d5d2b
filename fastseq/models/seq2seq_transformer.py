"""The Transformer encoder-decoder (Vaswani et al. 2017, "Attention Is All You Need"), in the shape
of fairseq's `transformer` model.

    x = dropout(sqrt(E) embed(tokens) + PE[positions])         sinusoidal positions, a fixed table:
        the paper's (sin, cos interleaved, positions from 0; seq2seq.sinusoids), not fairseq's
        (sin half then cos half, timescale ln(1e4) / (E/2 - 1), positions from padding_idx + 1)
    encoder: N layers of self-attention (source pads masked) + feed-forward
    decoder: N layers of causal self-attention + cross-attention to the encoder's outputs (source
             pads masked) + feed-forward
    logits = h W_out^T                                          W_out the target embedding if tied

Each layer is post-norm, x = LN(x + dropout(f(x))) as in the paper, or pre-norm (norm_first),
x = x + dropout(f(LN(x))), with a final LayerNorm after each stack (fairseq's normalize_before).
The layers are fastseq.nn.TransformerEncoderLayer / TransformerDecoderLayer (batch_first; their
state_dict keys), run on the real tokens only (fastseq.models.packing): projections, feed-forward
blocks, norms and dropouts on the N real rows of the source and the target (the target up to
its last position with a target), attention on the flash kernels with the source padding as key
lengths and the decoder's causal mask as is_causal; every dropout fused into the pass next to it.

Generation (seq2seq.py's protocol): new_cache computes every decoder layer's cross-attention keys
and values once per source, (decoder_layers, 2, B, NH, S, D), and preallocates the self-attention
KVCache of the N decoder rows; decode_step writes a step's keys and values into it in place and
attends over the slice it holds, read in place, and each source's g rows attend to its cross keys
as g queries of one attention (the sources' lengths as key lengths).

share_embeddings: source and target embeddings are one matrix (the vocabulary is shared anyway);
tie_weights: the output layer is the target embedding (Press & Wolf 2017).  Embeddings (and an
untied output layer) start as N(0, 1/E) with the pad row 0, as fairseq; the layers keep torch's
initialization.  The batch, forward, loss and greedy_decode are described in seq2seq.py.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as FF
from ..functional import dropout
from ..generation.cache import EncoderDecoderCache, KVCache, attend_sources, decode_kernels_run
from ..generation.linear import linear
from ..nn import LayerNorm, TransformerDecoderLayer, TransformerEncoderLayer
from . import packing
from .packing import Rows, _drop_add_norm, _norm, feed_forward
from .seq2seq import Seq2Seq, check_common, check_positive, rows_per_source, sinusoids

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def activation_fn(name: str):
    """The `activation` a Transformer layer takes for `name` (forms fastseq fuses with its bias)."""
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[name]


@dataclass
class TransformerSeq2SeqConfig:
    vocab_size: int                         # V, source and target (joined dictionary)
    dim: int = 512                          # E
    layers: int = 6                         # encoder and decoder layers, unless set apart below
    encoder_layers: Optional[int] = None
    decoder_layers: Optional[int] = None
    heads: int = 8                          # NH, E % NH == 0
    ffn_dim: int = 2048                     # the feed-forward block's inner size
    dropout: float = 0.1                    # embeddings, residual branches, attention, and the feed-forward
                                            # hidden layer as torch's layers (fairseq: activation_dropout 0)
    activation: str = "relu"                # relu | gelu | gelu_tanh | silu
    norm_first: bool = False                # pre-norm (+ final norms) instead of post-norm
    layer_norm_eps: float = 1e-5
    max_positions: int = 1024               # longest source and target
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    share_embeddings: bool = False          # one embedding for source and target
    tie_weights: bool = False               # output layer = target embedding

    def __post_init__(self):
        if self.encoder_layers is None:
            self.encoder_layers = self.layers
        if self.decoder_layers is None:
            self.decoder_layers = self.layers
        check_positive(self, "dim", "layers", "encoder_layers", "decoder_layers", "heads", "ffn_dim", "max_positions")
        check_common(self)
        if self.dim % self.heads:
            raise ValueError(f"TransformerSeq2SeqConfig: dim must be divisible by heads, got dim={self.dim}, "
                             f"heads={self.heads}")
        if self.dim % 2:
            raise ValueError(f"TransformerSeq2SeqConfig: dim must be even (sin / cos position pairs), got {self.dim}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"TransformerSeq2SeqConfig: activation must be one of {', '.join(ACTIVATIONS)}, got "
                             f"{self.activation!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"TransformerSeq2SeqConfig: layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")


class TransformerSeq2Seq(Seq2Seq):
    """state_dict: encoder_embed.weight, decoder_embed.weight (the same tensor when shared),
    encoder_layers.i.* / decoder_layers.i.* (torch.nn's Transformer layer keys), encoder_norm.* /
    decoder_norm.* (pre-norm only), output_proj.weight (untied only).  The position table is a
    non-persistent buffer."""

    def __init__(self, config: TransformerSeq2SeqConfig):
        super().__init__()
        c = self.config = config
        E, V = c.dim, c.vocab_size
        self.encoder_embed = nn.Embedding(V, E, padding_idx=c.pad_id)
        self.decoder_embed = self.encoder_embed if c.share_embeddings else nn.Embedding(V, E, padding_idx=c.pad_id)
        layer = dict(d_model=E, nhead=c.heads, dim_feedforward=c.ffn_dim, dropout=c.dropout,
                     layer_norm_eps=c.layer_norm_eps, batch_first=True, norm_first=c.norm_first)
        self.encoder_layers = nn.ModuleList(TransformerEncoderLayer(activation=activation_fn(c.activation), **layer)
                                            for _ in range(c.encoder_layers))
        self.decoder_layers = nn.ModuleList(TransformerDecoderLayer(activation=activation_fn(c.activation), **layer)
                                            for _ in range(c.decoder_layers))
        self.encoder_norm = LayerNorm(E, eps=c.layer_norm_eps) if c.norm_first else None
        self.decoder_norm = LayerNorm(E, eps=c.layer_norm_eps) if c.norm_first else None
        self.output_proj = None if c.tie_weights else nn.Linear(E, V, bias=False)
        self.register_buffer("positions", sinusoids(c.max_positions, E), persistent=False)   # (max_positions, E)
        self.embed_scale = math.sqrt(E)
        self.max_target = c.max_positions
        for m in (self.encoder_embed, self.decoder_embed, self.output_proj):
            if m is not None:
                nn.init.normal_(m.weight, 0.0, E ** -0.5)
        with torch.no_grad():
            self.encoder_embed.weight[c.pad_id].zero_()
            self.decoder_embed.weight[c.pad_id].zero_()

    @property
    def output_weight(self) -> Tensor:
        return self.decoder_embed.weight if self.output_proj is None else self.output_proj.weight   # (V, E)

    def embed(self, table: nn.Embedding, tokens: Tensor, positions: Tensor) -> Tensor:
        """dropout(sqrt(E) table(tokens) + PE[positions]) of the real tokens (N,) -> (N, E)."""
        x = torch.add(self.positions[positions], table(tokens), alpha=self.embed_scale)   # (N, E)
        return dropout(x, self.config.dropout, self.training)

    def encode(self, src: Tensor, src_lengths: Tensor):
        """-> (the encoder's outputs at the real source tokens (M, E), where they sit: Rows)."""
        rows = Rows(src_lengths, *src.shape)
        x = self.embed(self.encoder_embed, rows.pack(src), rows.positions())             # (M, E)
        for layer in self.encoder_layers:
            x = packing.encoder_layer(layer, x, rows, self.config.activation)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        return x, rows

    def decode_rows(self, tgt_in: Tensor, memory, rows: Rows) -> Tensor:
        """The decoder's outputs (N, E) at rows' positions of tgt_in (B, T), causal: the
        positions after each row's length are never computed (none before them sees them)."""
        enc, src_rows = memory
        x = self.embed(self.decoder_embed, rows.pack(tgt_in), rows.positions())          # (N, E)
        for layer in self.decoder_layers:
            x = packing.decoder_layer(layer, x, rows, enc, src_rows, self.config.activation)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return x

    def decode(self, tgt_in: Tensor, memory) -> Tensor:
        """The decoder's outputs (B, T, E) at every position of tgt_in (B, T)."""
        rows = Rows(None, *tgt_in.shape, device=tgt_in.device)
        return rows.unpack(self.decode_rows(tgt_in, memory, rows))                       # (B, T, E)

    # ------------------------------------------------------------------ generation (cached)

    def new_cache(self, batch_size: int, max_length: int, memory) -> EncoderDecoderCache:
        """The decoder's cache for batch_size rows, g = batch_size / B adjacent rows per source.

        Args:
            batch_size: N, a multiple of the B sources in memory.
            max_length: the most target positions the rows will hold, <= max_positions.
            memory: encode_for_generation's (or encode's) output.
        Returns:
            an EncoderDecoderCache: decoder = a KVCache for the decoder's self-attention, memory =
            CrossAttentionMemory, every decoder layer's cross-attention keys and values of the
            sources, computed here once per source.
        Shapes:
            KVCache (decoder_layers, 2, N, NH, max_length, D); cross keys / values
            (decoder_layers, 2, B, NH, S, D); key_lengths (B,) or None (no source padded).
        """
        c, name = self.config, type(self).__name__
        enc, src_rows = memory                                                           # (M, E), Rows
        B, S, E = src_rows.B, src_rows.T, c.dim
        g = rows_per_source(name, batch_size, B)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= c.max_positions:
            raise ValueError(f"{name}.new_cache: max_length (target positions) must be an int in "
                             f"[1, max_positions={c.max_positions}], got {max_length!r}")
        NH = c.heads
        D = E // NH
        kv = []
        for layer in self.decoder_layers:
            w, b = layer.multihead_attn.in_proj_weight, layer.multihead_attn.in_proj_bias
            k_v = src_rows.unpack(F.linear(enc, w[E:], b[E:]))                           # (B, S, 2E), 0 at pads
            kv.append(k_v.view(B, S, 2, NH, D).permute(2, 0, 3, 1, 4))                   # (2, B, NH, S, D)
        cross = CrossAttentionMemory(torch.stack(kv), None if src_rows.full else src_rows.lengths)
        self_kv = KVCache(c.decoder_layers, batch_size, NH, D, max_length, enc.dtype, enc.device)
        return EncoderDecoderCache(self_kv, cross, B, g, enc.device)

    def decode_step(self, tgt_in: Tensor, cache: EncoderDecoderCache) -> Tensor:
        """The decoder's outputs (N, T, E) at the T positions of tgt_in (N, T) after the cache's,
        causal; their keys and values are appended to the cache."""
        if not isinstance(cache.decoder, KVCache) or not isinstance(cache.memory, CrossAttentionMemory):
            raise ValueError(f"{type(self).__name__}: the cache is not a TransformerSeq2Seq.new_cache one (it holds "
                             f"{type(cache.decoder).__name__}, {type(cache.memory).__name__})")
        n, T = cache.length, tgt_in.shape[1]
        x = torch.add(self.positions[n:n + T], self.decoder_embed(tgt_in), alpha=self.embed_scale)   # (N, T, E)
        x = dropout(x, self.config.dropout, self.training)
        for i, layer in enumerate(self.decoder_layers):
            x = decoder_layer_step(layer, x, cache, i, self.config.activation)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        cache.decoder.advance(T)
        return x                                                                         # (N, T, E)

    # greedy_decode reruns the decoder over the whole prefix at every step: the plain reference
    # (fastseq.generate runs the cached decode_step)
    def start(self, memory):
        return memory

    def step(self, tokens: Tensor, t: int, memory):
        return self.decode(tokens[:, :t + 1], memory)[:, -1], memory      # (B, E)


# ---------------------------------------------------------------------------- cached decoder steps

class CrossAttentionMemory(NamedTuple):
    """What the decoder reads of B sources, computed once per source (new_cache)."""
    kv: Tensor                              # (decoder_layers, 2, B, NH, S, D): cross-attention keys, values
    key_lengths: Optional[Tensor]           # (B,): the sources' lengths, None when none is padded


def self_attention_step(mha: nn.MultiheadAttention, x: Tensor, kv: KVCache, layer: int) -> Tensor:
    """mha's causal self-attention of T new positions x (N, T, E) after the kv.length cached
    ones: their keys / values written into the cache in place, the queries attending over the
    cache's slice [0, length + T), read in place -> (N, T, E)."""
    N, T, E = x.shape
    NH, D = mha.num_heads, mha.head_dim
    n = kv.length
    q, k, v = linear(x, mha.in_proj_weight, mha.in_proj_bias).view(N, T, 3, NH, D).permute(2, 0, 3, 1, 4)
    training = mha.training and mha.dropout > 0
    if kv.can_attend_step(q, training):                  # one query a row, read in place through kv.origin
        o = kv.attend_step(layer, q, k, v)                                               # (N, NH, 1, D)
        return linear(o.view(N, 1, E), mha.out_proj.weight, mha.out_proj.bias)        # (N, 1, E)
    k, v = kv.write(layer, k, v)                                                         # 2 x (N, NH, n + T, D)
    visible = None
    if n and T > 1:                                     # new query i sees keys j <= n + i (bottom-right causal)
        visible = torch.arange(n + T, device=x.device).view(1, n + T) <= \
            torch.arange(n, n + T, device=x.device).view(T, 1)                          # (T, n + T)
    o = FF.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=mha.dropout if mha.training else 0.0,
                                        is_causal=not n and T > 1)                      # (N, NH, T, D)
    return linear(o.transpose(1, 2).reshape(N, T, E), mha.out_proj.weight, mha.out_proj.bias)   # (N, T, E)


def cross_attention_step(mha: nn.MultiheadAttention, x: Tensor, cache: EncoderDecoderCache, layer: int) -> Tensor:
    """mha(x, memory, memory) for queries x (N, T, E) over the sources' cached keys and values.
    A one-token step in inference on the CPU reads each row's source in place (cache.source_of,
    the decode kernel).  Otherwise, while the rows are grouped (row i reads source i // g), a
    source's g rows run as g T queries of one attention over its keys; failing that each row
    gets a copy of its source's."""
    N, T, E = x.shape
    NH, D = mha.num_heads, mha.head_dim
    k, v = cache.memory.kv[layer]                                                        # 2 x (B, NH, S, D)
    lengths = cache.memory.key_lengths
    q = linear(x, mha.in_proj_weight[:E], mha.in_proj_bias[:E])                        # (N, T, E)
    if T == 1 and not (mha.training and mha.dropout > 0) and decode_kernels_run(q, k):   # rows read in place
        o = attend_sources(q.view(N, 1, NH, D).transpose(1, 2), cache.memory.kv[layer], cache.source_of, lengths)
        return linear(o.view(N, 1, E), mha.out_proj.weight, mha.out_proj.bias)          # (N, 1, E)
    if cache.grouped:
        B = cache.sources
        q = q.view(B, N // B * T, NH, D).transpose(1, 2)                                 # (B, NH, g T, D)
    else:
        k, v = cache.rows(k), cache.rows(v)                                              # 2 x (N, NH, S, D)
        lengths = None if lengths is None else cache.rows(lengths)
        q = q.view(N, T, NH, D).transpose(1, 2)                                          # (N, NH, T, D)
    o = FF.scaled_dot_product_attention(q, k, v, dropout_p=mha.dropout if mha.training else 0.0,
                                        key_lengths=lengths)                 # (B, NH, g T, D) or (N, NH, T, D)
    return linear(o.transpose(1, 2).reshape(N, T, E), mha.out_proj.weight, mha.out_proj.bias)   # (N, T, E)


def feed_forward_step(layer: nn.TransformerDecoderLayer, x: Tensor, activation: str) -> Tensor:
    """packing.feed_forward for a decode step: in inference both GEMMs are generation.linear's
    (columns split over the threads, bias + activation in the epilogue)."""
    if layer.training and layer.dropout.p > 0:
        return feed_forward(layer, x, activation)
    h = linear(x, layer.linear1.weight, layer.linear1.bias, activation)                  # (N, T, F)
    return linear(h, layer.linear2.weight, layer.linear2.bias)                           # (N, T, E)


def decoder_layer_step(layer: nn.TransformerDecoderLayer, x: Tensor, cache: EncoderDecoderCache, i: int,
                       activation: str) -> Tensor:
    """Decoder layer i on T new positions x (N, T, E) with its caches: what
    packing.decoder_layer computes for them (the same norms, dropouts and fusions), with the
    self-attention on the KVCache and the cross-attention on the sources' cached keys."""
    tr = layer.training
    p1, p2, p3 = layer.dropout1.p, layer.dropout2.p, layer.dropout3.p
    kv = cache.decoder
    if layer.norm_first:
        h, x = _drop_add_norm(self_attention_step(layer.self_attn, _norm(x, layer.norm1), kv, i), x, layer.norm2,
                              p1, tr, return_sum=True)                                  # norm2(x + sa), x + sa
        h, x = _drop_add_norm(cross_attention_step(layer.multihead_attn, h, cache, i), x, layer.norm3, p2, tr,
                              return_sum=True)                                          # norm3(x + ca), x + ca
        return FF.dropout_add(feed_forward_step(layer, h, activation), x, p3, tr)
    x = _drop_add_norm(self_attention_step(layer.self_attn, x, kv, i), x, layer.norm1, p1, tr)
    x = _drop_add_norm(cross_attention_step(layer.multihead_attn, x, cache, i), x, layer.norm2, p2, tr)
    return _drop_add_norm(feed_forward_step(layer, x, activation), x, layer.norm3, p3, tr)
