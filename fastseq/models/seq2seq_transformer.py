"""The Transformer encoder-decoder (Vaswani et al. 2017, "Attention Is All You Need"), in the shape
of fairseq's `transformer` model.

    x = dropout(sqrt(E) embed(tokens) + PE[positions])         sinusoidal positions, a fixed table
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

share_embeddings: source and target embeddings are one matrix (the vocabulary is shared anyway);
tie_weights: the output layer is the target embedding (Press & Wolf 2017).  Embeddings (and an
untied output layer) start as N(0, 1/E) with the pad row 0, as fairseq; the layers keep torch's
initialization.  The batch, forward, loss and greedy_decode are described in seq2seq.py.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import dropout
from ..nn import LayerNorm, TransformerDecoderLayer, TransformerEncoderLayer
from . import packing
from .packing import Rows
from .seq2seq import Seq2Seq, check_common, check_positive, sinusoids

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

    # greedy decoding reruns the decoder over the whole prefix at every step: outputs are short
    # here, and the generation issue (#12) brings the KV caches that make a step O(1) in the prefix
    def start(self, memory):
        return memory

    def step(self, tokens: Tensor, t: int, memory):
        return self.decode(tokens[:, :t + 1], memory)[:, -1], memory      # (B, E)
